"""HTTP/1.1 connections: inference requests served straight off the socket, everything else by uvicorn.

uvicorn costs 0.30-0.38 ms of CPU to receive a 600 KB request body on these machines
(`bench/http_floor.py`): the body is copied from the socket into a bytes object, sliced
into ASGI messages and joined again, with a Python round trip per chunk. A protocol
that has the kernel write the body straight into one buffer costs about a quarter of
that, and on a small host that CPU is taken from the models.

Each connection starts as an `InferConnection` (an asyncio BufferedProtocol). It reads
each request's head itself. `POST /v2/models/{name}[/versions/{v}]/infer` over HTTP/1.1
with a Content-Length is served here: its body lands in one buffer, is decoded in place
and answered by the same code as the ASGI fast path. Anything else (another path or
method, a query string or escapes, a chunked body, Expect, HTTP/1.0, repeated
or malformed headers, lines ended by a bare LF) hands the connection over, from that request on, to uvicorn's own
protocol, which serves the whole ASGI app as before. An Upgrade field is ignored on both sides (the gateway
serves no websockets and no h2c; `without_upgrade`). A head over 64 KiB is answered 431 and the
connection closed, here and in uvicorn's protocol (`BoundedHttpToolsProtocol`). A connection closed while its
client may still be sending (a refused body, a head that could not be read, a 408 for a client that paused for
--receive-timeout-s mid-request) lingers first (`Linger`), so the client reads the answer instead of a reset.

Behaviour matches the ASGI path: the body limit answers 413, and the budget of bodies
held at once 503, before reading the body (which is then read and dropped, so the client
sees the answer), a client that hangs up cancels its request (499 in the metrics,
dropped from the queue), keep-alive with uvicorn's idle timeout, pipelined requests in
order, and uvicorn's graceful shutdown waits for the request in flight.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from ..errors import BadRequest, HeadTooLarge, ReceiveTimeout, ServiceError, TooLarge, Unavailable
from ..logsettings import OncePer
from ..watchdog import Deadline, StallWatch
from .errors import internal_error
from .fastpath import (
    ACCEPT_ENCODING,
    BINARY_HEADER_LENGTH,
    CONTENT_ENCODING,
    CONTENT_LENGTH,
    TIMEOUT,
    WANTED,
    Received,
    Reply,
    answer_infer,
    error_reply,
)
from .unsent import Unsent

if TYPE_CHECKING:
    from .gateway import Gateway

logger = logging.getLogger(__name__)

MAX_HEAD = 64 << 10
HEAD_READ = 4 << 10  # a head is a few hundred bytes: most of the body is then received straight into its buffer
JOINED_WRITE = 64 << 10  # answers up to this size go out in one write with their head
# The path as sent: no query string, no %-escapes (those requests go to uvicorn, which decodes them).
INFER_TARGET = re.compile(rb"/v2/models/(?P<name>[^/?%]+)(?:/versions/1)?/infer")  # the only version there is
HANDED_OVER = frozenset({b"transfer-encoding", b"expect"})  # framing or semantics uvicorn handles
UPGRADE = re.compile(rb"\r\nupgrade[ \t]*:[^\r\n]*", re.IGNORECASE)  # a head's Upgrade field, ignored (without_upgrade)
# The fields as RFC 9110 has them, which httptools enforces: a name is a token, a value has no control character but
# tab. A head whose fields are not all so goes to uvicorn, which answers 400 naming what it found.
FIELDS = re.compile(rb"(?:\r\n[-!#$%&'*+.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*)*")
BARE_LF = re.compile(rb"(?<!\r)\n")  # a line ended without CR: no head here ends, uvicorn's parser answers it (400)
READ = WANTED | {b"connection"}  # the fast path's headers, and whether to keep the connection
STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus}
LINGER_QUIET_S = 5.0  # a lingering connection closes once its client sends nothing for this long (or --receive-timeout-s)
LINGER_MAX_S = 30.0  # and after this long in any case (nginx's lingering_timeout and lingering_time)
REFUSED_LINGER_S = 2.0  # the longest a connection refused for --max-connections lingers
REFUSED_LINGERING = 64  # and how many may linger at once (a quarter of service/fds.py's RESERVE)
DROPPED = memoryview(bytearray(256 << 10))  # what a lingering connection's bytes are received into, and dropped


@dataclass(frozen=True, slots=True)
class _Request:
    """A parsed head this protocol serves: the model, the headers it reads (lower-case names), the body's length."""

    name: str
    fields: dict[bytes, bytes]
    length: int
    head: bytes  # as received, without its blank line: what a front-end process hands over (service/api/frontends.py)

    @property
    def close(self) -> bool:
        return self.fields.get(b"connection", b"").lower() == b"close"


def parse_head(head: bytes) -> _Request | None:
    """The request if this protocol serves it, else None (uvicorn will: it also judges malformed heads)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        return None
    target = INFER_TARGET.fullmatch(parts[1])
    if target is None:
        return None
    if not FIELDS.fullmatch(head, len(lines[0])):
        return None  # malformed, or an obsolete folded line
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.lower()
        if key in HANDED_OVER:
            return None
        if key in READ:
            if key in fields:
                return None  # repeated: uvicorn decides what that means
            fields[key] = value.strip(b" \t")
    length = fields.get(CONTENT_LENGTH)
    if length is None or not length.isdigit():
        return None
    return _Request(target["name"].decode("latin-1"), fields, int(length), head)


def without_upgrade(data: bytes, end: int | None = None) -> bytes:
    """`data` (beginning with a request's head) without the head's Upgrade field. The gateway serves no websockets
    and no HTTP/2 over cleartext, so it answers a request asking to upgrade (`curl --http2` asks for h2c) as HTTP/1.1,
    as a server may; but httptools, seeing Upgrade and Connection: upgrade, ends the request at its head and takes
    its body for the new protocol's bytes, which uvicorn then drops: a POST's body was lost (answered as empty). A
    head not yet whole in `data` is left as it is. `end`: where the head ends in `data` (-1: not in it), if known."""
    if end is None:
        end = data.find(b"\r\n\r\n")
    if end < 0 or not UPGRADE.search(data, 0, end + 2):
        return data
    return UPGRADE.sub(b"", data[: end + 2]) + data[end + 2 :]


def closing_answer(error: ServiceError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """An error answer after which the connection closes: the rest of the request is never read."""
    reply = error_reply(error)
    lines = [STATUS_LINES[reply.status], *(b"%s: %s\r\n" % h for h in [*default_headers, *reply.headers()])]
    return b"".join([*lines, b"connection: close\r\n\r\n", reply.payload])


def head_too_large(default_headers: list[tuple[bytes, bytes]]) -> bytes:
    return closing_answer(HeadTooLarge(f"request line and headers are over {MAX_HEAD} bytes"), default_headers)


def unparsable(default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's 400 for a request httptools cannot parse, as JSON like every other error and naming what was wrong:
    called while its parser's error is being handled, so the error is sys.exception()."""
    reason = sys.exception()
    detail = f": {str(reason)[:200]}" if reason is not None and str(reason) else ""
    return closing_answer(BadRequest(f"the request's HTTP could not be parsed{detail}"), default_headers)


class Linger:
    """A connection closed while its client may still be sending: the rest of a body refused before it was read
    (413, or 503 for the budget, on a request asking to close the connection), or whatever follows a head that could
    not be read (400, 431). Closed at once, bytes that arrive after the close, or wait unread at it, make the kernel
    reset the connection, and a client still sending its body (Python's http.client and urllib, which asks to close)
    gets "connection reset" where the answer was. So, as nginx does, the answer is followed by the end of the
    gateway's side (FIN), what the client sends is received and dropped, and the connection closes when the client
    closes its side, or sends nothing for LINGER_QUIET_S (--receive-timeout-s if shorter), or after LINGER_MAX_S."""

    __slots__ = ("_end", "_transport", "_watch")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, receive_timeout_s: float, longest_s: float = LINGER_MAX_S
    ) -> None:
        self._transport = transport
        self._watch = StallWatch(loop, min(LINGER_QUIET_S, receive_timeout_s, longest_s), self._open, transport.close)
        self._end = loop.call_later(longest_s, transport.close)
        transport.write_eof()  # once what was written is sent
        transport.resume_reading()
        self._watch.arm()

    def _open(self) -> bool:
        return not self._transport.is_closing()

    def received(self, now: float) -> None:
        self._watch.last = now

    def cancel(self) -> None:
        self._watch.cancel()
        self._end.cancel()


class _UvicornTransport:
    """The transport as uvicorn's protocol and its request cycles see it: each of uvicorn's close() calls goes to
    BoundedHttpToolsProtocol._close, which lingers while a request's bytes may still come. Once `ended` (lingering)
    it is closing to them, and what they write is dropped: a "100 Continue" a request still running would send, a
    pipelined request's answer."""

    __slots__ = ("_close", "ended", "transport")

    def __init__(self, transport: asyncio.Transport, close: Callable[[], None]) -> None:
        self.transport, self._close, self.ended = transport, close, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def close(self) -> None:
        self._close()

    def is_closing(self) -> bool:
        return self.ended or self.transport.is_closing()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.ended:
            self.transport.write(data)


class _Idle(Deadline):
    """The keep-alive deadline of a connection with no request begun. While it is armed the connection is among those
    a new one takes the place of when its process holds --max-connections (`refused`), as nginx reuses its idle
    keep-alive connections when it runs out: first those that have sent nothing since they were opened (SILENT, a
    silent flood's), oldest first, then those kept alive after an answer (IDLE), oldest first."""

    __slots__ = ("_owner",)

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, owner: InferConnection) -> None:
        super().__init__(loop, timeout, owner._close_idle)
        self._owner = owner

    def arm(self) -> None:
        super().arm()
        (IDLE if self._owner.answered else SILENT)[self._owner] = None

    def cancel(self) -> None:
        super().cancel()
        self._forget()

    def _fire(self) -> None:
        self._forget()
        super()._fire()

    def _forget(self) -> None:
        SILENT.pop(self._owner, None)
        IDLE.pop(self._owner, None)


# This process's connections with no request begun, oldest first (_Idle): never sent one, and kept alive after one
SILENT: dict[InferConnection, None] = {}
IDLE: dict[InferConnection, None] = {}


class Refused(asyncio.Protocol):
    """A connection that came while its process held --max-connections others: answered 503 at once, before its
    request is read (an HTTP client reads the answer once it has sent its request), and closed once the client has
    closed its side, or after REFUSED_LINGER_S, what the client sends received and dropped meanwhile (Linger). Its
    open file is soon given back, so that the gateway keeps the ones its own work needs (service/fds.py): while
    REFUSED_LINGERING refused connections linger already (a flood of connections), one is closed as soon as its answer
    is written, and its client may read a reset instead."""

    __slots__ = ("_gateway", "_linger", "_state")
    lingering = 0  # refused connections lingering in this process

    def __init__(self, gateway: Gateway, state: ServerState) -> None:
        self._gateway, self._state = gateway, state
        self._linger: Linger | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        gateway = self._gateway
        held = len(self._state.connections)
        error = Unavailable(
            f"the gateway holds {held} client connections, its limit (--max-connections {gateway.connection_limit}); retry later",
            retry_after_s=1,
        )
        transport.write(closing_answer(error, self._state.default_headers))
        gateway.metrics.disconnection("http", "max_connections")()
        if _refusals.due():
            logger.warning("answering new connections 503: %d are open, the limit (--max-connections)", held)
        if Refused.lingering >= REFUSED_LINGERING:
            transport.close()
            return
        Refused.lingering += 1
        self._linger = Linger(asyncio.get_running_loop(), transport, gateway.config.receive_timeout_s, REFUSED_LINGER_S)

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            self._linger.received(asyncio.get_running_loop().time())

    def eof_received(self) -> bool | None:
        return None  # close: the client has read the answer, or gone

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            Refused.lingering -= 1


_refusals = OncePer(60.0)  # a flood of refusals logs a line a minute


def refused(transport: asyncio.BaseTransport, state: ServerState, gateway: Gateway) -> bool:
    """A connection just accepted, when its process holds --max-connections others: it takes the place of an idle one
    (`_Idle`), closed now (its client sees it closed, as at the keep-alive timeout), or with none idle it is refused
    (`Refused` serves it from here on)."""
    if len(state.connections) < gateway.connection_limit:
        return False
    for idle in (SILENT, IDLE):
        while idle:
            if next(iter(idle)).make_room():
                gateway.metrics.disconnection("http", "made_room")()
                return False
    protocol = Refused(gateway, state)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return True


def timed_out(timeout: float, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    error = ReceiveTimeout(f"nothing received for {timeout:g} s in the middle of the request (--receive-timeout-s)")
    return closing_answer(error, default_headers)


def head_timed_out(timeout: float, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    error = ReceiveTimeout(f"the request's head (request line and headers) did not arrive whole within {timeout:g} s (--head-timeout-s)")
    return closing_answer(error, default_headers)


def bounded_protocol(gateway: Gateway) -> type[BoundedHttpToolsProtocol]:
    """uvicorn's `http=` setting for --http-server uvicorn."""
    return type("BoundedProtocol", (BoundedHttpToolsProtocol,), {"gateway": gateway})


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on each request's head. httptools keeps a header's bytes until
    the header ends, with no limit: one client sending an endless header grew the gateway by what it sent. Past
    MAX_HEAD bytes of head it answers 431 and closes, as uvicorn's h11 protocol does past 16 KiB. A client that
    sends nothing for --receive-timeout-s in the middle of a request is disconnected (408 if still in the head);
    uvicorn itself waits for ever. An answer the client is slow to take is counted in the gateway's budget of
    bodies while it waits (unsent.py). A connection uvicorn closes in the middle of a request (an answer before the
    body, to a request asking to close) or after a head it cannot parse lingers (Linger); the latter's 400 says what
    httptools found wrong."""

    gateway: Gateway  # set on the instance or by bounded_protocol
    _stall: StallWatch | None = None
    _unsent: Unsent | None = None
    _mid = False  # from a request's first byte until its last
    _in_head = True  # between requests, or in one's head: the bytes received count towards MAX_HEAD
    _head_bytes = 0
    _ended = False  # a request ended during this data_received: the bytes after it are the next head's, uncounted
    _linger: Linger | None = None
    _head_deadline: Deadline  # from a request's first byte until its head is whole
    _shutting_down = False
    _handed_over = False  # by an InferConnection, which was let in: not refused for --max-connections
    _real: asyncio.Transport  # the transport itself
    _view: _UvicornTransport  # what uvicorn's protocol and its cycles have for it

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if not self._handed_over and refused(transport, self.server_state, self.gateway):
            return
        self._real, self._view = transport, _UvicornTransport(transport, self._close)
        super().connection_made(cast(asyncio.Transport, self._view))
        # a connection that sends nothing closes after the keep-alive timeout, as one idle after an answer does
        # (uvicorn's protocol armed it only after an answer: a client that never sent a byte was held for ever)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        config = self.gateway.config
        self._stall = StallWatch(self.loop, config.receive_timeout_s, self._waiting_for_client, self._stalled)
        self._head_deadline = Deadline(self.loop, config.head_timeout_s, self._head_too_slow)
        self._unsent = Unsent(
            self.loop, transport, self.gateway.bodies, config.send_timeout_s, self.gateway.metrics.disconnection("http", "send_timeout")
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stall is not None:
            self._stall.cancel()
        if self._linger is not None:
            self._linger.cancel()
        self._head_deadline.cancel()
        if self._unsent is not None:
            self._unsent.drained()
        super().connection_lost(exc)

    def _close(self) -> None:
        """uvicorn closes the connection: after an answer that asked to (a request with Connection: close, HTTP/1.0),
        at its keep-alive timeout, an app's failure or the server's shutdown. Mid-request the client may be sending
        still, so it lingers; a lingering connection ends by Linger's rules."""
        if self._linger is not None and not self._shutting_down:
            return
        if self._mid and not self._shutting_down and not self._real.is_closing():
            self._linger_now()
        else:
            self._real.close()

    def _linger_now(self) -> None:
        """Answered and ending: a request still running is told the client left (its answer could not follow this
        one), its body's budget given back; pipelined ones are not started; what the client sends is dropped."""
        self._view.ended = True
        self.pipeline.clear()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self._unset_keepalive_if_required()
        if self._stall is not None:
            self._stall.cancel()
        self._linger = Linger(self.loop, self._real, self.gateway.config.receive_timeout_s)

    def shutdown(self) -> None:
        self._shutting_down = True
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        if self._linger is None:
            self._real.write(unparsable(self.server_state.default_headers))
            self._linger_now()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._unsent is not None:
            self._unsent.paused()

    def resume_writing(self) -> None:
        if self._unsent is not None:
            self._unsent.drained()
        super().resume_writing()

    def _waiting_for_client(self) -> bool:
        return self._mid and self._linger is None and not self.flow.read_paused and not self._real.is_closing()

    def _stalled(self) -> None:
        self.gateway.metrics.disconnection("http", "receive_timeout")()
        # in the head, or in the body with no answer begun (the app waits for the rest of it): 408, as the fast path
        # answers; a client cut off mid-body got no answer here before
        if self._in_head or (self.cycle is not None and not self.cycle.response_started):
            self._real.write(timed_out(self.gateway.config.receive_timeout_s, self.server_state.default_headers))
        # the app is told the client is gone (its body's budget given back); lingering, so that a client that sends
        # again gets the 408 and not a reset
        self._linger_now()

    def on_message_begin(self) -> None:
        self._mid = True
        self._head_deadline.arm()
        super().on_message_begin()

    def _head_too_slow(self) -> None:
        """--head-timeout-s since the request began, and its head is not whole: 408, then the lingering close."""
        if self._in_head and self._linger is None and not self._real.is_closing():
            self.gateway.metrics.disconnection("http", "head_timeout")()
            self._real.write(head_timed_out(self.gateway.config.head_timeout_s, self.server_state.default_headers))
            self._linger_now()

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            self._linger.received(self.loop.time())
            return
        if self._stall is not None:
            self._stall.last = self.loop.time()
        if self._in_head:  # the head ends at the first blank line, if it is in `data`
            end = data.find(b"\r\n\r\n")
            if self._head_bytes + (len(data) if end < 0 else end) > MAX_HEAD:
                self._real.write(head_too_large(self.server_state.default_headers))
                self._linger_now()
                return
            if not self._head_bytes:  # `data` begins a head
                data = without_upgrade(data, end)
        self._ended = False
        super().data_received(data)
        if self._in_head and self._linger is None and not self._real.is_closing():
            # all of `data` was head, unless a request ended in it: a head that begins within one read goes uncounted
            self._head_bytes = 0 if self._ended else self._head_bytes + len(data)
        if self._mid and self._stall is not None:
            self._stall.arm()

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        self._head_deadline.cancel()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._ended, self._mid = True, True, False
        super().on_message_complete()


def infer_protocol(gateway: Gateway) -> type[InferConnection]:
    """The protocol class for uvicorn's `http=` setting, bound to this gateway."""
    return type("GatewayConnection", (InferConnection,), {"gateway": gateway})


class InferConnection(asyncio.BufferedProtocol):
    gateway: Gateway  # set by infer_protocol
    prelude = b""  # what a front-end process read of a connection before it handed it here (service/api/frontends.py)
    _head_ns = 0  # time.monotonic_ns() when the request being received had its head parsed
    answered = False  # a request has begun on it: once idle, it is closed for a new connection after silent ones (_Idle)

    def __init__(
        self, config: Config, server_state: ServerState, app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._config = config
        self._state = server_state
        self._app_state = app_state
        self._loop = _loop or asyncio.get_event_loop()
        self._transport: asyncio.Transport | None = None
        self._unsent: Unsent | None = None
        self._scratch = bytearray(HEAD_READ)  # heads (and whatever arrives with them) are read here
        self._pending = bytearray()  # bytes received but not yet parsed: a head, or pipelined requests
        self._request: _Request | None = None
        self._body: np.ndarray[Any, np.dtype[np.uint8]] | None = None  # the body being received, uninitialised until written
        self._received = 0
        self._discard = 0  # bytes of a refused body still to read and drop
        self._held = 0  # bytes of the body being received, counted in the gateway's budget (Gateway.bodies)
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # close once the request in flight is answered
        self._writing_paused = False
        self._idle = _Idle(self._loop, config.timeout_keep_alive, self)  # kept alive with no request
        self._linger: Linger | None = None  # answered and ending: what the client still sends is dropped
        self._stall = StallWatch(self._loop, self.gateway.config.receive_timeout_s, self._waiting_for_client, self._stalled)
        # from the wait for a head's rest until it is whole
        self._head_deadline = Deadline(self._loop, self.gateway.config.head_timeout_s, self._head_too_slow)

    # asyncio protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if refused(transport, self._state, self.gateway):
            return
        self._transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport does not subclass asyncio's
        cut = self.gateway.metrics.disconnection("http", "send_timeout")
        self._unsent = Unsent(self._loop, self._transport, self.gateway.bodies, self.gateway.config.send_timeout_s, cut)
        self._state.connections.add(self)  # type: ignore[arg-type]  # uvicorn calls shutdown() on each
        self._idle.arm()  # one that sends nothing closes as one kept alive with no request does
        if self.prelude:
            self._feed(self.prelude)

    def _feed(self, data: bytes) -> None:
        """Take `data` as if it had been received, before anything the socket delivers."""
        view = memoryview(data)
        transport = self._transport
        assert transport is not None
        while view and transport.get_protocol() is self and not transport.is_closing():
            buffer = self.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)
        if view and transport.get_protocol() is not self:
            cast(asyncio.Protocol, transport.get_protocol()).data_received(bytes(view))  # handed over to uvicorn meanwhile

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._linger is not None:
            return DROPPED
        if self._body is not None:
            return memoryview(self._body)[self._received :]  # type: ignore[arg-type]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self._linger is not None:
            self._linger.received(self._loop.time())
            return
        self._stall.last = self._loop.time()
        self._idle.cancel()
        if self._body is not None:
            self._received += nbytes
            if self._received == len(self._body):
                self._start()
            return
        self._pending += memoryview(self._scratch)[:nbytes]
        if self._task is None:
            self._advance()
        elif len(self._pending) > MAX_HEAD and self._transport is not None:
            self._transport.pause_reading()  # pipelined requests wait for the one in flight

    def eof_received(self) -> bool | None:
        # close: a client that ends its side is taken for gone, as uvicorn and nginx do, and its request cancelled
        # (TCP does not tell a half-close from a hang-up, and a client that gave up should cost nothing more)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._state.connections.discard(self)
        self._idle.cancel()
        self._stall.cancel()
        self._head_deadline.cancel()
        if self._linger is not None:
            self._linger.cancel()
        if self._task is not None:
            self._task.cancel()  # the request leaves its queue; Gateway.infer counts it as 499
        self._give_back_body()  # a body cut off before it was complete
        if self._unsent is not None:
            self._unsent.drained()

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._unsent is not None:
            self._unsent.paused()  # an answer waits for a slow reader: counted in the budget of bodies meanwhile

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._unsent is not None:
            self._unsent.drained()
        if self._task is None and self._transport is not None and not self._transport.is_closing():
            self._advance()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close now if idle or lingering, else after the answer in flight."""
        if self._transport is not None and (self._linger is not None or (self._task is None and self._body is None)):
            self._transport.close()
        else:
            self._closing = True

    # requests

    def _advance(self) -> None:
        """Work through the received bytes: drop a refused body, take a head, start a body or hand over."""
        transport = self._transport
        assert transport is not None
        while self._task is None and self._linger is None and not self._writing_paused and not transport.is_closing():
            if self._discard:
                dropped = min(self._discard, len(self._pending))
                del self._pending[:dropped]
                self._discard -= dropped
                if self._discard:
                    self._stall.arm()
                    return
                continue
            end = self._pending.find(b"\r\n\r\n")
            if end > MAX_HEAD or (end < 0 and len(self._pending) > MAX_HEAD):
                transport.write(head_too_large(self._state.default_headers))
                self._linger_now()
                return
            if end < 0 and BARE_LF.search(self._pending):
                self._hand_over()  # it waited for a CRLF CRLF that never came: the receive timeout's 408, not a 400
                return
            if end < 0:
                self._wait_for_head()
                return
            self._head_deadline.cancel()
            request = parse_head(bytes(self._pending[:end]))
            self.answered = True  # or about to be: idle from here on, it has served a client (_Idle)
            if request is None:
                self._hand_over()
                return
            del self._pending[: end + 4]
            limit = self.gateway.config.max_body_bytes
            if request.length > limit:
                self._discard = request.length
                self._respond(error_reply(TooLarge(f"request body of {request.length} bytes is over the limit of {limit}")), request)
                continue
            try:
                self.gateway.bodies.take(request.length)
            except ServiceError as exc:  # too many bodies held at once: 503 before this one is read
                self._discard = request.length
                self._respond(error_reply(exc), request)
                continue
            self._held = request.length
            self._request = request
            self._head_ns = time.monotonic_ns()
            body = np.empty(request.length, dtype=np.uint8)
            arrived = min(len(self._pending), request.length)
            body[:arrived] = np.frombuffer(self._pending, dtype=np.uint8, count=arrived)
            del self._pending[:arrived]
            self._body, self._received = body, arrived
            if arrived < request.length:
                self._stall.arm()
                return  # the rest is received straight into the body
            self._start()

    def _start(self) -> None:
        """The body is complete: answer it in a task (so a hang-up can cancel it)."""
        request, body = self._request, self._body
        assert request is not None and body is not None
        self._body = None
        fields = request.fields
        header_length, timeout, encoding, accept = (
            None if (value := fields.get(f)) is None else value.decode("latin-1")
            for f in (BINARY_HEADER_LENGTH, TIMEOUT, CONTENT_ENCODING, ACCEPT_ENCODING)
        )
        work = answer_infer(
            self.gateway,
            request.name,
            memoryview(body),  # type: ignore[arg-type]
            header_length,
            timeout,
            encoding=encoding,
            accept=accept,
            received=(received := Received(self._head_ns, time.monotonic_ns())),
        )
        self._task = self._loop.create_task(self._answer(work, request, received))
        self._state.tasks.add(self._task)
        self._task.add_done_callback(self._state.tasks.discard)
        held, self._held = self._held, 0  # the task holds the body now; given back when it ends, cancelled or not
        self._task.add_done_callback(lambda _: self.gateway.bodies.give(held))

    async def _answer(self, work: Awaitable[Reply], request: _Request, received: Received) -> None:
        try:
            reply = await work
        except asyncio.CancelledError:
            received.dropped(self.gateway.tracer)
            return  # the client hung up; nobody is left to answer
        except Exception as exc:  # a gateway bug must still answer, and leave the connection usable
            logger.exception("infer %s failed", request.name)
            reply = error_reply(internal_error(exc))
        self._task = None
        self._request = None
        sending = time.monotonic_ns()
        self._respond(reply, request)
        received.sent(self.gateway.tracer, sending)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            self._advance()

    def _respond(self, reply: Reply, request: _Request) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        close = request.close or self._closing
        lines = [STATUS_LINES.get(reply.status) or f"HTTP/1.1 {reply.status} \r\n".encode()]
        lines += [b"%s: %s\r\n" % header for header in [*self._state.default_headers, *reply.headers()]]
        if close:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        if len(reply.payload) < JOINED_WRITE:
            lines.append(reply.payload)
            transport.write(b"".join(lines))
        else:
            transport.write(b"".join(lines))
            transport.write(reply.payload)
        self._state.total_requests += 1
        if close and (self._discard or self._pending) and not self._closing:
            self._linger_now()  # the client may be sending still: a refused body, or requests after this one
        elif close:
            transport.close()

    def _linger_now(self) -> None:
        assert self._transport is not None
        self._pending, self._discard = bytearray(), 0
        self._stall.cancel()
        self._head_deadline.cancel()
        self._idle.cancel()
        self._linger = Linger(self._loop, self._transport, self.gateway.config.receive_timeout_s)

    def _hand_over(self) -> None:
        """From this request on, uvicorn's own protocol serves the connection."""
        transport = self._transport
        assert transport is not None
        protocol = BoundedHttpToolsProtocol(config=self._config, server_state=self._state, app_state=self._app_state, _loop=self._loop)
        protocol.gateway, protocol._handed_over = self.gateway, True
        if self._unsent is not None:
            self._unsent.drained()  # the new protocol watches the buffer from here on
        self._stall.cancel()
        self._head_deadline.cancel()
        self._state.connections.discard(self)
        self._idle.cancel()
        data, self._pending = bytes(self._pending), bytearray()
        protocol.connection_made(transport)
        transport.set_protocol(protocol)
        transport.resume_reading()
        if data:
            protocol.data_received(data)

    def _waiting_for_client(self) -> bool:
        """A request begun and not yet received whole (or a refused body still being read and dropped)."""
        transport = self._transport
        if transport is None or transport.is_closing() or transport.get_protocol() is not self:
            return False
        if self._linger is not None:
            return False
        return self._task is None and (self._body is not None or self._discard > 0 or bool(self._pending))

    def _stalled(self) -> None:
        transport = self._transport
        assert transport is not None
        logger.info("closing a connection that sent nothing for %g s in the middle of a request", self._stall.timeout)
        self.gateway.metrics.disconnection("http", "receive_timeout")()
        if not self._writing_paused and not self._discard:  # a refused body was answered already
            transport.write(timed_out(self._stall.timeout, self._state.default_headers))
        self._give_back_body()  # now, not when the lingering ends
        self._linger_now()  # so that a client that sends again gets the 408 and not a reset

    def _wait_for_head(self) -> None:
        """No whole head received: a head begun waits for its rest (--receive-timeout-s between reads, --head-timeout-s
        in all), and with none the connection is idle."""
        if not self._pending:
            self._idle.arm()
            return
        self._stall.arm()
        self._head_deadline.arm()

    def _head_too_slow(self) -> None:
        """--head-timeout-s since this connection began waiting for a head's rest, and it is not whole: 408, then the
        lingering close (uvicorn's protocol, which a connection may be handed to, keeps its own deadline)."""
        transport = self._transport
        if transport is None or transport.is_closing() or transport.get_protocol() is not self or self._linger is not None:
            return
        self.gateway.metrics.disconnection("http", "head_timeout")()
        if not self._writing_paused:
            transport.write(head_timed_out(self.gateway.config.head_timeout_s, self._state.default_headers))
        self._linger_now()

    def _give_back_body(self) -> None:
        """The body being received is dropped, and its share of the budget of bodies given back."""
        self._body = None
        self.gateway.bodies.give(self._held)
        self._held = 0

    def _close_idle(self) -> None:
        if self._task is None and self._body is None and self._transport is not None:
            self._transport.close()

    def make_room(self) -> bool:
        """Closed now, for a new connection at --max-connections, if still idle; no longer counted either way."""
        self._idle.cancel()
        transport = self._transport
        if transport is None or transport.is_closing() or self._task is not None or self._body is not None or self._pending:
            return False
        self._state.connections.discard(self)
        transport.close()
        return True
