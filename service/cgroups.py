"""The CPU time and memory this process may use, from its cgroup's limits.

`docker run --cpus 2 --memory 2g` and a Kubernetes pod's limits give a process a quota of CPU time per period and a
memory ceiling, not fewer cores or less RAM: `os.sched_getaffinity` still lists every core of the host and
/proc/meminfo its whole memory. A gateway that started one worker per listed core there would run 64 workers (each
with every model loaded) on a quota of 2 CPUs, and one that held its default 1 GiB of request bodies in a 2 GiB
container would be killed by the kernel before it answered 503. So the default CPU slices count the quota
(service/partitions.py) and the default --max-pending-mb the memory limit (service/config.py).

Read as the kernel exposes them: /proc/self/mountinfo says where each cgroup hierarchy is mounted, /proc/self/cgroup
where this process sits in each; a limit is the least of those on the way from there up to the mount's root. cgroup
v2: `cpu.max` ("max 100000" or "200000 100000"), `memory.max` ("max" or bytes); v1: `cpu.cfs_quota_us` (-1 for
none) over `cpu.cfs_period_us`, `memory.limit_in_bytes` (a number near 2**63 for none). `root` prefixes every path,
for tests that lay out a host's files in a folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

UNLIMITED_V1_MEMORY = 1 << 62  # v1 reports "no limit" as the largest page-aligned count, 9223372036854771712

Reader = Callable[[Path, int], float | None]  # a cgroup folder, its version -> its own limit


def cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs' worth of time per second this process may use (2.0 for `--cpus 2`); None when nothing limits it or the
    files cannot be read."""
    return _least_of(root, "cpu", _cpu_limit)


def memory_limit(root: Path = Path("/")) -> int | None:
    """Bytes of memory this process's cgroup may use; None when nothing limits it or the files cannot be read."""
    limit = _least_of(root, "memory", _memory_limit)
    return None if limit is None else int(limit)


def oom_kills(root: Path = Path("/")) -> int | None:
    """Processes the kernel has killed for want of memory since boot: on the whole host, its cgroups' limits included
    (/proc/vmstat's `oom_kill`, Linux 4.13 and later, also inside a container); None where it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        for line in (root / "proc/vmstat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    return None


def memory_usage(root: Path = Path("/")) -> tuple[int, int] | None:
    """(limit, working set) of the cgroup whose memory limit binds this process (the least on the way up), read in one
    walk: the working set is its usage less the page cache the kernel can drop to make room, what `docker stats` and
    Kubernetes show against the limit. None where nothing limits this process's memory or the files cannot be read."""
    limits = _limits(root, "memory", _memory_limit)
    if not limits:
        return None
    limit, folder, version = min(limits, key=lambda found: found[0])
    with contextlib.suppress(OSError, ValueError):
        usage = int((folder / ("memory.current" if version == 2 else "memory.usage_in_bytes")).read_text())
        stat = dict(line.split(maxsplit=1) for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
        return int(limit), max(usage - int(stat.get("inactive_file" if version == 2 else "total_inactive_file", "0")), 0)
    return None


def _least_of(root: Path, controller: str, reader: Reader) -> float | None:
    return min((limit for limit, _, _ in _limits(root, controller, reader)), default=None)


def _limits(root: Path, controller: str, reader: Reader) -> list[tuple[float, Path, int]]:
    """(limit, its cgroup folder, cgroup version) of every limit from the process's cgroups up to their mounts' roots."""
    found = []
    for mount, path, version in _hierarchies(root, controller):
        here = root / mount.relative_to("/") / path.strip("/")
        top = root / mount.relative_to("/")
        while True:
            limit = reader(here, version)
            if limit is not None:
                found.append((limit, here, version))
            if here == top or top not in here.parents:
                break
            here = here.parent
    return found


def _hierarchies(root: Path, controller: str) -> list[tuple[Path, str, int]]:
    """(mount point, this process's cgroup path below the mount's root, cgroup version) of the v2 hierarchy and of a
    v1 hierarchy with `controller`."""
    try:
        mountinfo = (root / "proc/self/mountinfo").read_text()
        membership = (root / "proc/self/cgroup").read_text()
    except OSError:
        return []
    mounts: dict[int, tuple[Path, str]] = {}  # version -> (mount point, mount root)
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")
        parts, kinds = fields.split(), rest.split()
        if len(parts) < 5 or len(kinds) < 3:
            continue
        if kinds[0] == "cgroup2":
            mounts[2] = (Path(parts[4]), parts[3])
        elif kinds[0] == "cgroup" and controller in kinds[2].split(","):
            mounts[1] = (Path(parts[4]), parts[3])
    found = []
    for line in membership.splitlines():
        number, _, tail = line.partition(":")
        controllers, _, path = tail.partition(":")
        version = 2 if number == "0" and controllers == "" else 1 if controller in controllers.split(",") else None
        if version is None or version not in mounts:
            continue
        mount, mount_root = mounts[version]
        relative = path[len(mount_root) :] if path.startswith(mount_root) and mount_root != "/" else path
        found.append((mount, relative, version))
    return found


def _cpu_limit(folder: Path, version: int) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        if version == 2:
            quota, period = (folder / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((folder / "cpu.cfs_quota_us").read_text())
        return None if quota_us < 0 else quota_us / int((folder / "cpu.cfs_period_us").read_text())
    return None


def _memory_limit(folder: Path, version: int) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        if version == 2:
            text = (folder / "memory.max").read_text().strip()
            return None if text == "max" else int(text)
        limit = int((folder / "memory.limit_in_bytes").read_text())
        return None if limit >= UNLIMITED_V1_MEMORY else limit
    return None


def memory_available(root: Path = Path("/")) -> int | None:
    """Bytes the host can give without swapping (/proc/meminfo's MemAvailable: free memory and the page cache it can
    drop); None where it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        for line in (root / "proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemAvailable":
                number, *unit = value.split()
                return int(number) * (1024 if unit == ["kB"] else 1)
    return None
