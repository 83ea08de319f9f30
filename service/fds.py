"""The gateway's limit on open files: each client connection holds one.

Past the limit a connection cannot be accepted: uvloop (libuv) then accepts it on a
descriptor kept in reserve and closes it at once, so the client sees the connection
dropped without an answer and nothing is logged. Many environments start processes
with a soft limit of 1024 under a much higher hard one; `serve` raises the soft limit
to the hard one at start (as Go's runtime does for its programs), and warns where
even that leaves room for few connections.
"""

from __future__ import annotations

import contextlib
import resource

CEILING = 1 << 20  # Linux's default nr_open: no soft limit above it can be set
FEW = 4096  # connections, roughly, below which the start-up log warns


def raise_open_files() -> None:
    """The soft limit on open files raised to the hard limit where it was lower (up to CEILING)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = CEILING if hard == resource.RLIM_INFINITY else min(hard, CEILING)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):  # a hard limit above the kernel's nr_open: keep what there is
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def few_open_files() -> str | None:
    """A warning where this process may open fewer than FEW files, else None."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= FEW:
        return None
    return (
        f"this process may open {soft} files (hard limit {hard}), so it can hold fewer than {soft} client connections at "
        "once; a client past that is disconnected without an answer. Raise the limit: ulimit -n 65536, docker run "
        "--ulimit nofile=65536:65536, LimitNOFILE= in a systemd unit"
    )
