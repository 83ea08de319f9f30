"""Markers by folder, where shared/ lives, and one tiny export of the whole zoo per session.

`make test` runs the suite in two pytest-xdist processes (`--dist loadgroup`): each test file is a group that one
process runs whole, so a file's module-scoped gateway starts once; the files that start a tritonserver share a group,
since a killed server's shared memory is cleaned up by name. The two processes share the session's export."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, CliRun, ExportedRepo, Gateway, migserve

SHARED = Path(os.environ.get("MIGSERVE_SHARED", ROOT.parent / "shared"))


# Files that start a tritonserver: run by one xdist process, one after the other (see tests/triton_server.py's kill).
TRITON_FILES = {"test_triton_partition.py", "test_offline.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath)).relative_to(ROOT / "tests")
        if path.parts[0] in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, path.parts[0]))
        item.add_marker(pytest.mark.xdist_group("tritonserver" if path.name in TRITON_FILES else path.as_posix()))


@pytest.fixture(scope="session", autouse=True)
def run_slices_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's gateways keep their --cpu-run-slices-cache in a folder of its own (XDG_CACHE_HOME), not the
    user's: the first to load a model on a slice of so many cores times it, the later ones take that choice (about 2
    s less per start of all ten tiny models on two slices). Tests of the timing itself name a file or `off`."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "fixtures").is_dir():
        pytest.fail(f"shared/ not found at {SHARED}; set MIGSERVE_SHARED to its path")
    return SHARED


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> ExportedRepo:
    """`migserve export --all` at tiny size, once for the whole session: under xdist, by the first process to ask,
    into the run's folder (the parent of each process's own), the others waiting for it and taking its outcome."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        exported = _shared_tiny_export(tmp_path_factory)
    else:
        exported = _tiny_export(tmp_path_factory.mktemp("model_repo"))
    if exported.run.returncode != 0:
        pytest.fail(f"export --all failed ({exported.run.returncode}):\n{exported.run.stderr[-4000:]}")
    return exported


def _shared_tiny_export(tmp_path_factory: pytest.TempPathFactory) -> ExportedRepo:
    run_folder = tmp_path_factory.getbasetemp().parent
    record = run_folder / "model_repo.json"
    with (run_folder / "model_repo.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.exists():
            outcome = json.loads(record.read_text())
            return ExportedRepo(root=Path(outcome["root"]), run=CliRun(**outcome["run"]))
        exported = _tiny_export(run_folder / "model_repo")
        record.write_text(json.dumps({"root": str(exported.root), "run": dataclasses.asdict(exported.run)}))
        return exported


def _tiny_export(root: Path) -> ExportedRepo:
    root.mkdir(exist_ok=True)
    return ExportedRepo(root=root, run=migserve("export", "--all", "--size", "tiny", "--out", root))


@pytest.fixture(scope="session")
def gateway(tiny_repo: ExportedRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """`migserve serve` on two one-core CPU slices, every tiny model on both; KServe v2 over HTTP and gRPC."""
    log = tmp_path_factory.mktemp("gateway") / "serve.log"
    server = Gateway(tiny_repo.root, "--cpu-slices", "1,1", log=log, grpc=True)
    yield server
    server.close()
