"""A gateway in a real cgroup with limits (as under docker --cpus/--memory or a Kubernetes pod's limits) sizes its
defaults by them, though it sees every core and all the host's memory: no more CPU workers than the CPU quota can
keep busy, and no more request bodies held at once than a quarter of the memory limit.

The tests make cgroup v1 groups (this machine mounts cgroup v1 read-write for root) and start the gateway in one;
where no group can be made (not root, a read-only or v2-only cgroup mount) they are skipped, saying why. The
reading itself is unit-tested on laid-out host files (tests/unit/test_cgroups.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ExportedRepo, Gateway

CGROUP_V1 = Path("/sys/fs/cgroup")
MakeGroup = Callable[[str, dict[str, str]], Path]


@pytest.fixture
def make_group() -> Iterator[MakeGroup]:
    """make(controller, {file: value}): a cgroup v1 group of that controller with those settings; each removed at the
    end once its processes are gone."""
    made: list[Path] = []

    def make(controller: str, settings: dict[str, str]) -> Path:
        group = CGROUP_V1 / controller / f"migserve-test-{os.getpid()}-{len(made)}"
        try:
            group.mkdir()
            made.append(group)
            for name, value in settings.items():
                (group / name).write_text(value)
        except OSError as exc:
            pytest.skip(f"cannot make a cgroup v1 {controller} group here ({exc}): the reading is unit-tested only")
        return group

    yield make
    deadline = time.monotonic() + 30
    while made and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            made[-1].rmdir()  # EBUSY while a process is still in it
            made.pop()
            continue
        time.sleep(0.2)


def _entering(group: Path) -> tuple[str, ...]:
    """A command prefix that moves the gateway into `group` before it starts."""
    return ("sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh")


def test_a_gateway_under_a_one_cpu_quota_starts_one_cpu_worker(tiny_repo: ExportedRepo, make_group: MakeGroup, tmp_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 or more usable cores to see the quota take some away")
    group = make_group("cpu", {})
    (group / "cpu.cfs_quota_us").write_text((group / "cpu.cfs_period_us").read_text())  # one CPU's time per period
    server = Gateway(tiny_repo.root, "--models", "crowd-csrnet", log=tmp_path / "serve.log", prefix=_entering(group))
    try:
        partitions = httpx.get(f"http://{server.url}/v1/partitions").json()["partitions"]
        assert [(p["id"], len(p["cores"])) for p in partitions] == [("cpu-0", 1)]
        assert "may use 1 CPUs' time" in server.log.read_text()
        assert int((group / "cgroup.procs").read_text().split()[0]) > 0  # the gateway really runs in the group
    finally:
        server.close()


def test_a_gateway_under_a_memory_limit_holds_fewer_bodies_by_default(
    tiny_repo: ExportedRepo, make_group: MakeGroup, tmp_path: Path
) -> None:
    group = make_group("memory", {"memory.limit_in_bytes": str(2 << 30)})
    server = Gateway(tiny_repo.root, "--cpu-slices", "1", "--models", "crowd-csrnet", log=tmp_path / "serve.log", prefix=_entering(group))
    try:
        assert "request bodies held at once are bounded at 512 MB, not 1024" in server.log.read_text()
        assert httpx.get(f"http://{server.url}/v2/health/ready").status_code == 200
    finally:
        server.close()
    explicit = Gateway(
        tiny_repo.root,
        "--cpu-slices",
        "1",
        "--models",
        "crowd-csrnet",
        "--max-pending-mb",
        "1024",
        log=tmp_path / "explicit.log",
        prefix=_entering(group),
    )
    explicit.close()
    assert "bounded at" not in explicit.log.read_text(), "--max-pending-mb given: the user's bound stands"
