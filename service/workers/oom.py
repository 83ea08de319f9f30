"""When memory runs out: the kernel takes a worker rather than the gateway, and the gateway says so.

Under a memory limit (docker --memory, a Kubernetes pod's limit) or on a host out of memory, the kernel's OOM killer
kills the process with the highest badness: its resident memory, plus its /proc/PID/oom_score_adj (-1000 to 1000,
in thousandths of the memory it may use). The gateway holds every client's connection and queued request, and a
worker is restarted with its batches retried; but a gateway holding large request bodies, and mapping the batch
arenas it fills, can outweigh a worker: with workers raised by 500 the kernel still took the gateway in two of three
runs of eight concurrent 12 MB requests under a 420 MB limit. So each worker raises its own adjustment by the whole
range, WORKER_OOM_SCORE_ADJ (any process may raise its own; lowering needs privilege), to 1000 at most: at an
adjustment 1000 above the gateway's a worker outweighs it whatever their sizes. Where the gateway starts above 0
(Kubernetes gives a Burstable pod's processes 2 to 999) the gap is smaller; a Guaranteed pod's -997 leaves the whole
gap, and the workers at 3 between pods.

A worker the kernel killed died of SIGKILL, as one killed by hand or by the gateway's hang check; what tells them
apart is the kernel's count of OOM kills (/proc/vmstat oom_kill) having moved while it ran. The gateway then names
the cause and the limit, and what to change, where before it said "exited with code -9" and restarted it into the
same end. Each death named an OOM kill claims one of the count's steps, so that a worker killed later by hand,
which started before that OOM kill, is not named one too (the count is the host's: an OOM kill of some other
process on the host while a worker ran still reads as the worker's, if that worker then dies of SIGKILL).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from ..cgroups import memory_limit, oom_kills

logger = logging.getLogger(__name__)

WORKER_OOM_SCORE_ADJ = 1000  # the whole range: a worker goes before the gateway, whatever their sizes
MB = 1 << 20
ADVICE = (
    "serve fewer models (--models) or on fewer CPU slices (--cpu-slices), hold fewer request bodies (--max-pending-mb), "
    "or give it more memory"
)


def killed_first(worker: Path, gateway: Path, step: int = WORKER_OOM_SCORE_ADJ) -> None:
    """A worker (its /proc/PID/oom_score_adj at `worker`) goes before the gateway (its own at `gateway`) when the
    kernel must kill one for memory: set to the gateway's plus `step`, so that the gateway (right after starting the
    process) and the worker itself (at its start) can both set it."""
    try:
        worker.write_text(str(min(1000, int(gateway.read_text()) + step)))
    except (OSError, ValueError) as exc:
        logger.warning("cannot raise this worker's oom_score_adj (%s): the kernel may take the gateway first when memory runs out", exc)


_claimed: dict[Path, int] = {}  # host root -> the count up to which OOM kills were named as some worker's death


@dataclass(frozen=True)
class OomWatch:
    """The kernel's count of OOM kills when a worker started, to tell afterwards whether its SIGKILL was one."""

    before: int | None
    root: Path = Path("/")

    @classmethod
    def now(cls, root: Path = Path("/")) -> OomWatch:
        return cls(oom_kills(root), root)

    def _since(self) -> int | None:
        """The count from which a new OOM kill is this worker's to claim: its start, or past the kills claimed."""
        return None if self.before is None else max(self.before, _claimed.get(self.root, self.before))

    def moved(self) -> bool:
        """Whether the kernel has killed a process for memory since (that no other worker's death has claimed)."""
        since, after = self._since(), oom_kills(self.root)
        return since is not None and after is not None and after > since

    def explain(self, exitcode: int | None) -> str | None:
        """Why a worker that exited with `exitcode` died, where the OOM killer took it (one kill, claimed); None
        otherwise."""
        since = self._since()
        if exitcode != -signal.SIGKILL or since is None:
            return None
        after = oom_kills(self.root)
        if after is None or after <= since:
            return None
        _claimed[self.root] = since + 1
        limit = memory_limit(self.root)
        if limit is not None:
            short = f"its cgroup's memory limit of {limit / MB:.0f} MB (docker --memory, a Kubernetes memory limit)"
        else:
            short = f"the host's memory ({_total(self.root) or '?'} MB)"
        return (
            f"the kernel killed it for want of memory (its OOM killer: /proc/vmstat oom_kill went from {self.before} to {after}): "
            f"the gateway and its workers outgrew {short}; {ADVICE}"
        )


def _total(root: Path) -> int | None:
    """MemTotal of /proc/meminfo in MB."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return None
