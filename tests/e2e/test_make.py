"""The README's set-up path, as a user runs it: `make models` (what `make serve` runs first)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from migserve.contract import read_contract, sha256_file
from tests.helpers import ROOT, ExportedRepo


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    venv = Path(sys.prefix)
    stamp = venv / ".installed-stamp"
    # -o: this test runs inside an environment that exists already; never rebuild it.
    command = ["make", "-C", str(ROOT), f"VENV={venv}", "-o", str(stamp), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture()
def repo_copy(tiny_repo: ExportedRepo, tmp_path: Path) -> Path:
    copy = tmp_path / "model_repo"
    shutil.copytree(tiny_repo.root, copy)
    return copy


def test_make_models_skips_what_is_exported_and_redoes_what_is_broken(repo_copy: Path) -> None:
    broken = repo_copy / "lns-stations" / "1" / "model.onnx"
    broken.write_bytes(broken.read_bytes()[:-10])
    kept = sha256_file(repo_copy / "crowd-csrnet" / "1" / "model.onnx")
    proc = _make("models", f"MODEL_REPO={repo_copy}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("up to date, skipped") == 9
    assert "lns-stations (tiny): wrote" in proc.stderr
    assert read_contract(repo_copy / "lns-stations").model_sha256 == sha256_file(broken)
    assert sha256_file(repo_copy / "crowd-csrnet" / "1" / "model.onnx") == kept


def test_readme_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```")[1]
    assert "make serve" in first_block and "make test" in first_block
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
