"""The README's set-up path, as a user runs it: `make models` (what `make serve` runs first)."""

from __future__ import annotations

import os
import shutil
import signal
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


def test_make_serve_starts_a_gateway_that_answers(repo_copy: Path) -> None:
    import json
    import time
    import urllib.request

    from bench.ports import free_port

    port = free_port()
    venv = Path(sys.prefix)
    command = [
        "make",
        "-C",
        str(ROOT),
        f"VENV={venv}",
        "-o",
        str(venv / ".installed-stamp"),
        "serve",
        f"MODEL_REPO={repo_copy}",
        f"PORT={port}",
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        body = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.5] * 768}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/crowd-csrnet/infer", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        assert answer["outputs"][0]["shape"] == [1, 1, 2, 2]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        output = server.communicate(timeout=30)[0].decode()
    assert "up to date, skipped" in output  # make serve exported nothing: the models were there
