"""The CPU quota and memory limit of a process's cgroup (service/cgroups.py), read from host layouts laid out in a folder.

The mountinfo and cgroup lines are as the kernel writes them: the cgroup v1 and hybrid ones were captured on this
machine (cat /proc/self/mountinfo /proc/self/cgroup); the cgroup v2 ones follow the kernel's cgroup-v2 documentation
(a container with its own cgroup namespace sees its cgroup as "/"). A real cgroup with a quota is exercised by
tests/integration/test_cgroup_limits.py where this machine lets the tests make one.
"""

from __future__ import annotations

from pathlib import Path

from service.cgroups import cpu_quota, memory_limit, memory_usage
from service.config import default_job_bytes, default_pending_bytes

V1_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
    "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
V2_MOUNTS = "24 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"


def _host(root: Path, mountinfo: str, cgroup: str, files: dict[str, str]) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(mountinfo)
    (root / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_this_machine_reads_without_error() -> None:
    quota = cpu_quota()
    assert quota is None or quota > 0


def test_a_v2_container_limited_to_two_cpus(tmp_path: Path) -> None:
    root = _host(tmp_path, V2_MOUNTS, "0::/\n", {"sys/fs/cgroup/cpu.max": "200000 100000\n"})
    assert cpu_quota(root) == 2.0


def test_v2_without_a_limit_and_a_parent_s_lower_limit(tmp_path: Path) -> None:
    files = {"sys/fs/cgroup/kubepods/cpu.max": "150000 100000\n", "sys/fs/cgroup/kubepods/pod1/app/cpu.max": "max 100000\n"}
    root = _host(tmp_path / "a", V2_MOUNTS, "0::/kubepods/pod1/app\n", files)
    assert cpu_quota(root) == 1.5, "the least limit on the way up counts"
    root = _host(tmp_path / "b", V2_MOUNTS, "0::/user.slice\n", {"sys/fs/cgroup/user.slice/cpu.max": "max 100000\n"})
    assert cpu_quota(root) is None


def test_v1_quota_over_period_and_no_quota(tmp_path: Path) -> None:
    cgroup = "3:cpuset:/\n2:cpuacct:/\n1:cpu:/migserve\n0::/\n"
    files = {"sys/fs/cgroup/cpu/migserve/cpu.cfs_quota_us": "150000\n", "sys/fs/cgroup/cpu/migserve/cpu.cfs_period_us": "100000\n"}
    files |= {"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n", "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}
    assert cpu_quota(_host(tmp_path / "a", V1_MOUNTS, cgroup, files)) == 1.5
    unlimited = {k.replace("migserve/", ""): v for k, v in files.items() if "migserve" not in k}
    assert cpu_quota(_host(tmp_path / "b", V1_MOUNTS, "3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n", unlimited)) is None


def test_v1_mounted_at_the_container_s_own_cgroup(tmp_path: Path) -> None:
    # Docker without a cgroup namespace: /proc/self/cgroup names the host's path, the mount's root is that path
    mounts = "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
    files = {"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    assert cpu_quota(_host(tmp_path, mounts, "4:cpu,cpuacct:/docker/abc\n", files)) == 0.5


def test_hybrid_hierarchies_take_the_least_and_unreadable_files_count_as_none(tmp_path: Path) -> None:
    cgroup = "1:cpu:/a\n0::/b\n"
    files = {
        "sys/fs/cgroup/cpu/a/cpu.cfs_quota_us": "300000\n",
        "sys/fs/cgroup/cpu/a/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/unified/b/cpu.max": "100000 100000\n",
    }
    assert cpu_quota(_host(tmp_path / "a", V1_MOUNTS, cgroup, files)) == 1.0
    assert cpu_quota(_host(tmp_path / "b", V1_MOUNTS, cgroup, {"sys/fs/cgroup/cpu/a/cpu.cfs_quota_us": "junk\n"})) is None
    assert cpu_quota(tmp_path / "nothing") is None


def test_memory_limits_v2_v1_and_none(tmp_path: Path) -> None:
    files = {"sys/fs/cgroup/kubepods/memory.max": "2147483648\n", "sys/fs/cgroup/kubepods/app/memory.max": "max\n"}
    assert memory_limit(_host(tmp_path / "a", V2_MOUNTS, "0::/kubepods/app\n", files)) == 2 << 30
    v1_mounts = V1_MOUNTS + "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    cgroup = "4:memory:/process_api/eacc787c6adef6e2020fcad07a7567b1\n1:cpu:/\n0::/\n"  # as on this machine
    unlimited = "9223372036854771712\n"  # what this machine's memory.limit_in_bytes holds
    files = {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": unlimited,
        "sys/fs/cgroup/memory/process_api/eacc787c6adef6e2020fcad07a7567b1/memory.limit_in_bytes": unlimited,
    }
    assert memory_limit(_host(tmp_path / "b", v1_mounts, cgroup, files)) is None
    files["sys/fs/cgroup/memory/process_api/memory.limit_in_bytes"] = "1073741824\n"
    assert memory_limit(_host(tmp_path / "c", v1_mounts, cgroup, files)) == 1 << 30
    assert memory_limit(_host(tmp_path / "d", V2_MOUNTS, "0::/\n", {"sys/fs/cgroup/memory.max": "max\n"})) is None


def test_the_default_body_bound_fits_a_memory_limit() -> None:
    mb, gib = 1 << 20, 1 << 30
    assert default_pending_bytes(256 * mb, None) == (gib, None)
    assert default_pending_bytes(256 * mb, 8 * gib) == (gib, None), "a quarter of 8 GiB is over the default"
    pending, warning = default_pending_bytes(256 * mb, 2 * gib)
    assert pending == 512 * mb and warning is not None and "bounded at 512 MB, not 1024" in warning
    assert "lower --max-body-mb" not in warning
    pending, warning = default_pending_bytes(256 * mb, 400 * mb)
    assert pending == 256 * mb, "never below one body of --max-body-mb"
    assert warning is not None and "one body of --max-body-mb 256 is over half the memory" in warning


def test_the_default_ct_job_bound_is_4_gib_or_a_quarter_of_a_memory_limit() -> None:
    mb, gib = 1 << 20, 1 << 30
    assert default_job_bytes(None) == 4 * gib
    assert default_job_bytes(32 * gib) == 4 * gib
    assert default_job_bytes(2 * gib) == 512 * mb


def _in_use(root: Path) -> int | None:
    """The working set memory_usage reads beside the limit."""
    usage = memory_usage(root)
    return None if usage is None else usage[1]


def test_memory_in_use_is_the_working_set_of_the_group_whose_limit_binds(tmp_path: Path) -> None:
    mb = 1 << 20
    files = {
        "sys/fs/cgroup/kubepods/memory.max": f"{512 * mb}\n",
        "sys/fs/cgroup/kubepods/memory.current": f"{400 * mb}\n",
        "sys/fs/cgroup/kubepods/memory.stat": f"anon {250 * mb}\nfile {150 * mb}\ninactive_file {100 * mb}\n",
        "sys/fs/cgroup/kubepods/pod1/memory.max": "max\n",
        "sys/fs/cgroup/kubepods/pod1/memory.current": f"{90 * mb}\n",
        "sys/fs/cgroup/kubepods/pod1/memory.stat": "inactive_file 0\n",
    }
    assert _in_use(_host(tmp_path / "v2", V2_MOUNTS, "0::/kubepods/pod1\n", files)) == 300 * mb, "the pod's limit binds"
    v1 = "2:memory:/migserve\n1:cpu:/\n0::/\n"
    mounts = V1_MOUNTS + "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    group = "sys/fs/cgroup/memory/migserve/"
    files = {
        group + "memory.limit_in_bytes": f"{360 * mb}\n",
        group + "memory.usage_in_bytes": f"{260 * mb}\n",
        group + "memory.stat": f"cache {20 * mb}\nrss {240 * mb}\ntotal_inactive_file {15 * mb}\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
    }
    assert _in_use(_host(tmp_path / "v1", mounts, v1, files)) == 245 * mb
    unlimited = {"sys/fs/cgroup/memory.max": "max\n", "sys/fs/cgroup/memory.current": "1000\n", "sys/fs/cgroup/memory.stat": ""}
    assert _in_use(_host(tmp_path / "none", V2_MOUNTS, "0::/\n", unlimited)) is None
