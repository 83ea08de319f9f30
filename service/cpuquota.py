"""The CPU time this process may use, from its cgroup's CFS bandwidth limit.

`docker run --cpus 2` and a Kubernetes CPU limit give a process a quota of CPU time per period, not fewer cores:
`os.sched_getaffinity` still lists every core of the host. A gateway that started one worker per listed core there
would run 64 workers (each with every model loaded) on a quota of 2 CPUs. So the default CPU slices count the quota
too (service/partitions.py).

Read as the kernel exposes it: /proc/self/mountinfo says where each cgroup hierarchy is mounted, /proc/self/cgroup
where this process sits in each; the limit is the least of those on the way from there up to the mount's root
(cgroup v2 `cpu.max`: "max 100000" or "200000 100000"; v1 `cpu.cfs_quota_us` (-1 for none) over
`cpu.cfs_period_us`). `root` prefixes every path, for tests that lay out a host's files in a folder.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs' worth of time per second this process may use (2.0 for `--cpus 2`); None when nothing limits it or the
    files cannot be read."""
    limits = [limit for mount, path, version in _hierarchies(root) if (limit := _least(root, mount, path, version)) is not None]
    return min(limits, default=None)


def _hierarchies(root: Path) -> list[tuple[Path, str, int]]:
    """(mount point, this process's cgroup path below the mount's root, cgroup version) of each hierarchy with the
    cpu controller."""
    try:
        mountinfo = (root / "proc/self/mountinfo").read_text()
        membership = (root / "proc/self/cgroup").read_text()
    except OSError:
        return []
    mounts: dict[tuple[int, str], tuple[Path, str]] = {}  # (version, controllers) -> (mount point, mount root)
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")
        parts, kinds = fields.split(), rest.split()
        if len(parts) < 5 or len(kinds) < 3:
            continue
        if kinds[0] == "cgroup2":
            mounts[(2, "")] = (Path(parts[4]), parts[3])
        elif kinds[0] == "cgroup" and "cpu" in kinds[2].split(","):
            mounts[(1, "cpu")] = (Path(parts[4]), parts[3])
    found = []
    for line in membership.splitlines():
        number, _, tail = line.partition(":")
        controllers, _, path = tail.partition(":")
        key = (2, "") if number == "0" and controllers == "" else (1, "cpu") if "cpu" in controllers.split(",") else None
        if key is None or key not in mounts:
            continue
        mount, mount_root = mounts[key]
        relative = path[len(mount_root) :] if path.startswith(mount_root) and mount_root != "/" else path
        found.append((mount, relative, key[0]))
    return found


def _least(root: Path, mount: Path, path: str, version: int) -> float | None:
    """The least limit from the process's cgroup up to the mount's root."""
    here = root / mount.relative_to("/") / path.strip("/")
    top = root / mount.relative_to("/")
    least: float | None = None
    while True:
        limit = _limit(here, version)
        if limit is not None:
            least = limit if least is None else min(least, limit)
        if here == top or top not in here.parents:
            return least
        here = here.parent


def _limit(folder: Path, version: int) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        if version == 2:
            quota, period = (folder / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((folder / "cpu.cfs_quota_us").read_text())
        return None if quota_us < 0 else quota_us / int((folder / "cpu.cfs_period_us").read_text())
    return None
