"""Telling an OOM kill from another SIGKILL, and workers going first (service/workers/oom.py), on host files laid
out in a folder. The real thing, a cgroup whose limit the kernel enforces, is in tests/integration/test_cgroup_limits.py."""

from __future__ import annotations

import signal
from pathlib import Path

from service.cgroups import oom_kills
from service.workers.oom import OomWatch, killed_first
from tests.unit.test_cgroups import V2_MOUNTS, _host

VMSTAT = "nr_free_pages 5774453\npgfault 123\noom_kill {}\nnr_unstable 0\n"  # the lines around oom_kill as this kernel writes them


def _kills(root: Path, count: int) -> None:
    (root / "proc/vmstat").write_text(VMSTAT.format(count))


def test_the_count_of_oom_kills_is_read_from_vmstat(tmp_path: Path) -> None:
    assert isinstance(oom_kills(), int), "this machine's kernel (4.13 or later) counts them"
    (tmp_path / "proc").mkdir()
    assert oom_kills(tmp_path) is None
    _kills(tmp_path, 7)
    assert oom_kills(tmp_path) == 7


def test_a_sigkill_is_called_an_oom_kill_only_where_the_kernel_counted_one(tmp_path: Path) -> None:
    root = _host(tmp_path, V2_MOUNTS, "0::/\n", {"sys/fs/cgroup/memory.max": f"{512 << 20}\n"})
    _kills(root, 3)
    watch = OomWatch.now(root)
    assert watch.explain(-signal.SIGKILL) is None, "killed by hand, or by the hang check"
    _kills(root, 4)
    assert watch.explain(1) is None, "an exit of its own, whatever else the kernel did meanwhile"
    why = watch.explain(-signal.SIGKILL)
    assert why is not None and "the kernel killed it for want of memory" in why and "oom_kill went from 3 to 4" in why
    assert "cgroup's memory limit of 512 MB" in why and "--cpu-slices" in why


def test_each_oom_kill_names_one_death_so_a_later_kill_by_hand_is_not_one(tmp_path: Path) -> None:
    root = _host(tmp_path, V2_MOUNTS, "0::/\n", {"sys/fs/cgroup/memory.max": f"{512 << 20}\n"})
    _kills(root, 5)
    first, second = OomWatch.now(root), OomWatch.now(root)  # two workers, started before anything was killed
    _kills(root, 6)
    assert first.explain(-signal.SIGKILL) is not None  # the kernel took the first one
    assert not second.moved() and second.explain(-signal.SIGKILL) is None, "the second, killed later by hand"
    third, fourth = OomWatch.now(root), OomWatch.now(root)
    _kills(root, 8)  # one memory shortage, two workers taken
    assert third.explain(-signal.SIGKILL) is not None and fourth.moved() and fourth.explain(-signal.SIGKILL) is not None


def test_without_a_cgroup_limit_the_host_s_memory_is_named(tmp_path: Path) -> None:
    root = _host(tmp_path, V2_MOUNTS, "0::/\n", {"sys/fs/cgroup/memory.max": "max\n", "proc/meminfo": "MemTotal:       24683520 kB\n"})
    _kills(root, 0)
    watch = OomWatch.now(root)
    _kills(root, 1)
    why = watch.explain(-signal.SIGKILL)
    assert why is not None and "the host's memory (24105 MB)" in why


def test_a_worker_s_oom_score_adjustment_is_the_gateway_s_raised_within_the_kernel_s_range(tmp_path: Path) -> None:
    worker, gateway = tmp_path / "worker", tmp_path / "gateway"
    for before, after in (("0", "1000"), ("-997", "3"), ("800", "1000")):
        gateway.write_text(before)
        worker.write_text(before)
        killed_first(worker, gateway)
        killed_first(worker, gateway)  # the gateway sets it, then the worker itself: once, not twice
        assert worker.read_text() == after
