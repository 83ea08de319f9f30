"""The gateway's limit on open files, and the client connections it takes at once.

Each client connection holds an open file, and so does much of the gateway's own work:
a worker's start (its pipes and socket), a batch's shared memory arena, an upload
spooled to disk, a CT job's files. Past the limit on open files a connection cannot be
accepted (uvloop then accepts it on a descriptor kept in reserve and closes it at once:
the client sees the connection dropped, and nothing is logged), and worse, the
gateway's own work fails: a worker that died is not started again while the table is
full. So each process takes at most `connection_limit()` client connections at once
of each protocol (`serve --max-connections`; by default its open-file limit less a
reserve for its own files, shared between HTTP and gRPC), answers an HTTP one past it
503 at once (service/api/admission.py), and has gRPC close one past it at once
(`grpc.max_allowed_incoming_connections`: the client's call fails UNAVAILABLE and it
connects again later, as gRPC clients do).

Many environments start processes with a soft limit of 1024 under a much higher hard
one; `serve` raises the soft limit to the hard one at start (as Go's runtime does for
its programs), and warns where even that leaves room for few connections.
"""

from __future__ import annotations

import contextlib
import resource

CEILING = 1 << 20  # Linux's default nr_open: no soft limit above it can be set
FEW = 4096  # open files, roughly, below which the start-up log warns
RESERVE = 256  # open files kept for the gateway's own work, at the least (a tenth of the limit where that is more)


def raise_open_files() -> None:
    """The soft limit on open files raised to the hard limit where it was lower (up to CEILING)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = CEILING if hard == resource.RLIM_INFINITY else min(hard, CEILING)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):  # a hard limit above the kernel's nr_open: keep what there is
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


RAISING = "ulimit -n 65536, docker run --ulimit nofile=65536:65536, LimitNOFILE= in a systemd unit"  # ways to raise it


def _open_files() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return CEILING if soft == resource.RLIM_INFINITY else soft


def default_connection_limit(protocols: int = 1) -> int:
    """The client connections of each protocol one process takes at once unless told: its open-file limit less the
    reserve, shared between HTTP and, where it is served, gRPC."""
    files = _open_files()
    return max(1, (files - max(RESERVE, files // 10)) // protocols)


def connection_limit(configured: int | None, protocols: int = 1) -> tuple[int, str | None]:
    """The client connections of each protocol (HTTP; gRPC too where `protocols` is 2) one process takes at once
    (`configured`, else the default), and a warning where that leaves the gateway few open files of its own, or where
    the limit on open files is low."""
    files = _open_files()
    if configured is not None and configured * protocols > files - RESERVE:
        most = max(1, (files - RESERVE) // protocols)
        return configured, (
            f"--max-connections {configured}{' (for HTTP and gRPC each)' if protocols > 1 else ''} leaves fewer than "
            f"{RESERVE} of this process's {files} open files to the gateway's own work: with that many clients connected, "
            "new ones are dropped without an answer, and a worker that dies is not started again until connections close. "
            f"Give at most {most}, or raise the limit: {RAISING}"
        )
    limit = default_connection_limit(protocols) if configured is None else configured
    if files >= FEW:
        return limit, None
    return limit, (
        f"this process may open {files} files, so it takes at most {limit} client connections at once"
        f"{' over HTTP and as many over gRPC' if protocols > 1 else ''} (--max-connections); more are refused (503 over "
        f"HTTP). Raise the limit: {RAISING}"
    )
