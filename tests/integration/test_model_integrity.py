"""A model file that no longer matches its contract is refused, by the loader and by the worker, and listed as such."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import onnxruntime as ort

from service.placement import model_spec
from service.repository import load_repository
from service.workers.process import load_sessions
from service.workers.protocol import WorkerSpec
from tests.helpers import ExportedRepo, Gateway


def _tampered_copy(tiny_repo: ExportedRepo, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    for name in ("crowd-csrnet", "face-pros"):
        shutil.copytree(tiny_repo.root / name, repo / name)
    model = repo / "crowd-csrnet" / "1" / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    return repo


def test_the_repository_loader_refuses_a_changed_model(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    loaded = load_repository(_tampered_copy(tiny_repo, tmp_path))
    assert list(loaded.models) == ["face-pros"]
    assert "does not match the contract's" in loaded.refused["crowd-csrnet"]
    assert "re-export it" in loaded.refused["crowd-csrnet"]


def test_the_repository_loader_refuses_a_broken_triton_configuration(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    repo = _tampered_copy(tiny_repo, tmp_path)
    config = repo / "face-pros" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size:", "max_batch_sise:"))
    loaded = load_repository(repo)
    assert loaded.models == {}
    assert "not a Triton model configuration" in loaded.refused["face-pros"] and "max_batch_sise" in loaded.refused["face-pros"]


def test_the_worker_refuses_a_file_changed_after_start_up(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    specs = [model_spec(e) for e in load_repository(tiny_repo.root).models.values() if e.contract.name in ("crowd-csrnet", "face-pros")]
    repo = _tampered_copy(tiny_repo, tmp_path)
    moved = [type(s)(name=s.name, path=str(repo / s.name / "1" / "model.onnx"), sha256=s.sha256, warmup=s.warmup) for s in specs]
    sessions, refused = load_sessions(ort, WorkerSpec(partition="cpu-0", device=None, cores=(0,), models=tuple(moved)))
    assert list(sessions) == ["face-pros"]
    assert "is not the contract's" in refused["crowd-csrnet"]


def test_the_gateway_serves_on_and_lists_a_refused_model_with_its_reason(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """The repository index lists every model in the repository: served, refused (and why), or left out by --models."""
    repo = _tampered_copy(tiny_repo, tmp_path)
    shutil.copytree(tiny_repo.root / "frontalize-dalgan", repo / "frontalize-dalgan")
    server = Gateway(repo, "--cpu-slices", "1", "--models", "face-pros", log=tmp_path / "serve.log")
    base = f"http://{server.url}"
    try:
        index = {m["name"]: m for m in httpx.post(f"{base}/v2/repository/index").json()}
        assert index["face-pros"] == {"name": "face-pros", "version": "1", "state": "READY"}
        assert index["crowd-csrnet"]["state"] == "UNAVAILABLE" and "re-export it" in index["crowd-csrnet"]["reason"]
        assert index["frontalize-dalgan"]["state"] == "UNAVAILABLE" and "started with --models" in index["frontalize-dalgan"]["reason"]
        assert [m["name"] for m in httpx.post(f"{base}/v2/repository/index", json={"ready": True}).json()] == ["face-pros"]
        bad = httpx.post(f"{base}/v2/repository/index", json={"ready": "yes"})
        assert bad.status_code == 400 and "'ready' must be true or false" in bad.json()["error"]
        assert httpx.get(f"{base}/v2/models/crowd-csrnet/config").status_code == 404
        assert httpx.get(f"{base}/v2/models/face-pros/config").json()["name"] == "face-pros"
    finally:
        server.close()
