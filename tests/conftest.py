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
