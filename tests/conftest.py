"""Markers by folder, where shared/ lives, and one tiny export of the whole zoo per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, ExportedRepo, Gateway, migserve

SHARED = Path(os.environ.get("MIGSERVE_SHARED", ROOT.parent / "shared"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if folder in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="session", autouse=True)
def run_slices_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's gateways keep their --cpu-run-slices-cache in a folder of its own (XDG_CACHE_HOME), not the
    user's: the first to load a model on a slice of so many cores times it, the later ones take that choice (about 2
    s less per start of all ten tiny models on two slices). Tests of the timing itself name a file or `off`."""
    folder = tmp_path_factory.mktemp("cache")
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder
    if before is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "fixtures").is_dir():
        pytest.fail(f"shared/ not found at {SHARED}; set MIGSERVE_SHARED to its path")
    return SHARED


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> ExportedRepo:
    """`migserve export --all` at tiny size, once for the whole session."""
    root = tmp_path_factory.mktemp("model_repo")
    run = migserve("export", "--all", "--size", "tiny", "--out", root)
    if run.returncode != 0:
        pytest.fail(f"export --all failed ({run.returncode}):\n{run.stderr[-4000:]}")
    return ExportedRepo(root=root, run=run)


@pytest.fixture(scope="session")
def gateway(tiny_repo: ExportedRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """`migserve serve` on two one-core CPU slices, every tiny model on both; KServe v2 over HTTP and gRPC."""
    log = tmp_path_factory.mktemp("gateway") / "serve.log"
    server = Gateway(tiny_repo.root, "--cpu-slices", "1,1", log=log, grpc=True)
    yield server
    server.close()
