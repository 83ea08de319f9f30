"""A gateway in a real cgroup with a CPU quota (as under docker --cpus or a Kubernetes CPU limit) starts no more
CPU workers than the quota can keep busy, though it sees every core.

The test makes a cgroup v1 `cpu` group with a quota of one CPU (this machine mounts cgroup v1 read-write for root)
and starts the gateway in it; where no group can be made (not root, a read-only or v2-only cgroup mount) it is
skipped, saying why. The reading itself is unit-tested on laid-out host files (tests/unit/test_cpuquota.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ExportedRepo, Gateway

CPU_HIERARCHY = Path("/sys/fs/cgroup/cpu")


@pytest.fixture
def one_cpu_group() -> Iterator[Path]:
    """A cgroup v1 cpu group limited to one CPU's time per period; removed once its processes are gone."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 or more usable cores to see the quota take some away")
    group = CPU_HIERARCHY / f"migserve-test-{os.getpid()}"
    try:
        group.mkdir()
        period = int((group / "cpu.cfs_period_us").read_text())
        (group / "cpu.cfs_quota_us").write_text(str(period))
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        pytest.skip(f"cannot make a cgroup v1 cpu group here ({exc}): the reading is unit-tested only")
    yield group
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            group.rmdir()  # EBUSY while a process is still in it
            return
        time.sleep(0.2)


def test_a_gateway_under_a_one_cpu_quota_starts_one_cpu_worker(tiny_repo: ExportedRepo, one_cpu_group: Path, tmp_path: Path) -> None:
    enter = ("sh", "-c", f'echo $$ > {one_cpu_group / "cgroup.procs"} && exec "$@"', "sh")
    server = Gateway(tiny_repo.root, "--models", "crowd-csrnet", log=tmp_path / "serve.log", prefix=enter)
    try:
        partitions = httpx.get(f"http://{server.url}/v1/partitions").json()["partitions"]
        assert [(p["id"], len(p["cores"])) for p in partitions] == [("cpu-0", 1)]
        assert "may use 1 CPUs' time" in server.log.read_text()
        assert int((one_cpu_group / "cgroup.procs").read_text().split()[0]) > 0  # the gateway really runs in the group
    finally:
        server.close()
