"""gRPC answers that a client takes none of: their connection is closed after `--send-timeout-s`, as over HTTP.

gRPC holds an answer until the client's HTTP/2 windows let it out, and tells the servicer nothing of the write's
progress: a client that answers the keepalive pings but never opens its window keeps its answers (counted in
`--max-pending-mb`, so others are refused meanwhile) for as long as it stays connected. Neither cancelling the
servicer's task nor aborting the call frees them (grpc 1.85: the pending write keeps the call and refuses the
status). The connection's socket does say: TCP_INFO's `tcpi_bytes_acked` grows as the client takes what gRPC writes.
So an answer not out after half of `--send-timeout-s` is watched on its connection (the socket found among the
process's descriptors by the client's address, `context.peer()`), and once the client has taken less than
`PROGRESS_BYTES` of anything in `--send-timeout-s`, the socket is shut down: gRPC drops the connection and every
answer it holds for it, as the HTTP side closes a connection whose client took none of its answer
(service/api/unsent.py). A client that reads slowly keeps its connection, however long its answer takes.

What a client takes of any call on a connection counts for all of them: gRPC multiplexes calls on one connection
and the socket cannot tell them apart. Clients over a Unix socket (a front-end passing a call to the first
process) are not watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote

logger = logging.getLogger(__name__)

# Less than this taken in --send-timeout-s is no progress: the acknowledgement of a keepalive ping is 17 bytes.
PROGRESS_BYTES = 1024
BYTES_ACKED = struct.Struct("=Q")
BYTES_ACKED_AT = 120  # tcpi_bytes_acked's offset in Linux's struct tcp_info (since 4.2)
Address = tuple[str, int]


class Call(Protocol):
    """What is watched of a call: its ServicerContext."""

    def peer(self) -> str: ...  # gRPC's name of the client: "ipv4:10.0.0.5:41234", "ipv6:%5B::1%5D:41234", "unix:..."


@dataclass(slots=True)
class _Connection:
    fd: int  # the socket's descriptor when last found (gRPC's; checked against the address before each use)
    acked: int  # bytes the client had taken when it last took some
    since: float  # when that was


class StalledCalls:
    """The gRPC answers of one process that are not out yet, and their connections' progress. Per answer it costs a
    dictionary entry; the client's name is read, and its socket looked at, only for answers still there a sweep later.
    """

    def __init__(self, timeout: float, cut: Callable[[], None] = lambda: None) -> None:
        """cut: called for each connection closed (the metric)."""
        self.timeout, self._cut = timeout, cut
        self._calls: dict[Call, tuple[int, int]] = {}  # what gRPC holds of each call's answer, and the sweep it came in
        self._connections: dict[Address, _Connection] = {}
        self._sweeps = 0  # a sweep every half of the timeout while answers are out
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, call: Call, nbytes: int) -> None:
        """An answer of `nbytes` was handed to gRPC (a call has one at a time)."""
        self._calls[call] = (nbytes, self._sweeps)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout / 2, self._look)

    def done(self, call: Call) -> None:
        """The call's answer is out, or the call is over."""
        self._calls.pop(call, None)

    def _look(self) -> None:
        self._timer = None
        if not self._calls:
            self._connections.clear()
            return
        self._sweeps += 1
        waiting: dict[Address, int] = {}  # the connections with answers out since the sweep before last, what they hold
        for call, (nbytes, sweep) in self._calls.items():
            if sweep < self._sweeps - 1 and (address := _address(call.peer())) is not None:
                waiting[address] = waiting.get(address, 0) + nbytes
        for address in list(self._connections):
            if address not in waiting:
                del self._connections[address]
        found = functools.cache(_sockets)  # the process's descriptors, read at most once a sweep
        loop = asyncio.get_running_loop()
        now = loop.time()
        for address, nbytes in waiting.items():
            self._check(address, nbytes, found, now)
        self._timer = loop.call_later(self.timeout / 2, self._look)

    def _check(self, address: Address, nbytes: int, found: Callable[[], dict[Address, int]], now: float) -> None:
        known = self._connections.get(address)
        fd = known.fd if known is not None else found().get(address, -1)
        acked = _acked(fd, address)
        if acked is None and known is not None:  # its descriptor was closed, or taken by another socket
            acked = _acked(fd := found().get(address, -1), address)
        if acked is None:  # the connection is gone (gRPC ends its calls), or the kernel does not say
            self._connections.pop(address, None)
            return
        if known is None or known.fd != fd or acked - known.acked >= PROGRESS_BYTES:
            self._connections[address] = _Connection(fd, acked, now)
        elif now - known.since >= self.timeout:
            logger.info(
                "closing a gRPC connection whose client took none of its answers for %g s (--send-timeout-s); %.1f MB of them dropped",
                self.timeout,
                nbytes / (1 << 20),
            )
            self._cut()
            _acked(fd, address, cut=True)
            del self._connections[address]


class _Quieter(logging.Filter):
    """gRPC logs a call whose answer could not be written (its client hung up, or its connection was closed here) as an
    error of the servicer, with a traceback (ExecuteBatchError): a line at debug level instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage().startswith("ExecuteBatchError raised in core"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = "%s: the call's client was gone before its answer was written", (record.getMessage(),)
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("grpc._cython.cygrpc").addFilter(_Quieter())


def _address(peer: str) -> Address | None:
    """gRPC's name of a TCP client ("ipv4:10.0.0.5:41234", "ipv6:%5B::1%5D:41234" from grpc 1.85, "ipv6:[::1]:41234"),
    as the socket names it; None for others (unix:)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = unquote(rest).rpartition(":")
    try:
        return _plain(host.strip("[]")), int(port)
    except ValueError:
        return None


def _plain(host: str) -> str:
    """An address as one string per host: IPv4 clients of a dual-stack socket are named "::ffff:10.0.0.5" there."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _sockets() -> dict[Address, int]:
    """The process's TCP sockets by their peers' addresses."""
    found: dict[Address, int] = {}
    for entry in Path("/proc/self/fd").iterdir():
        try:
            if entry.readlink().name.startswith("socket:"):
                with _borrowed(int(entry.name)) as sock:
                    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                        found[_peer(sock)] = int(entry.name)
        except (OSError, ValueError):  # closed meanwhile, not connected (a listener)
            continue
    return found


@contextlib.contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket]:
    """Descriptor `fd` as a socket object, left open: not a copy, which would keep a socket gRPC closes meanwhile in
    its poller's set."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def _peer(sock: socket.socket) -> Address:
    host, port = sock.getpeername()[:2]
    return _plain(host), int(port)


def _acked(fd: int, address: Address, cut: bool = False) -> int | None:
    """Bytes the client at `address` has acknowledged on descriptor `fd` (and shut the socket down, with `cut`); None
    where `fd` is no longer that client's socket, or the kernel does not say."""
    try:
        with _borrowed(fd) as sock:
            if _peer(sock) != address:
                return None
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            if cut:
                sock.shutdown(socket.SHUT_RDWR)  # gRPC sees the connection fail and drops it and its calls
    except (OSError, ValueError):
        return None
    if len(info) < BYTES_ACKED_AT + BYTES_ACKED.size:
        return None
    return int(BYTES_ACKED.unpack_from(info, BYTES_ACKED_AT)[0])
