"""HTTP/1.1 connections: inference requests served straight off the socket, everything else by uvicorn.

uvicorn costs 0.30-0.38 ms of CPU to receive a 600 KB request body on these machines
(`bench/http_floor.py`): the body is copied from the socket into a bytes object, sliced
into ASGI messages and joined again, with a Python round trip per chunk. A protocol
that has the kernel write the body straight into one buffer costs about a quarter of
that, and on a small host that CPU is taken from the models.

Each connection starts as an `InferConnection` (an asyncio BufferedProtocol). It reads each request's head itself.
`POST /v2/models/{name}[/versions/{v}]/infer` over HTTP/1.1 with a Content-Length is served here: its body lands in
one buffer, is decoded in place and answered by the same code as the ASGI fast path. Anything else (another path or
method, a query string or escapes, a chunked body, Expect, HTTP/1.0, repeated or malformed headers, lines ended by a
bare LF) hands the connection over, from that request on, to uvicorn's own protocol, which serves the whole ASGI app
as before. An Upgrade field is ignored on both sides (the gateway serves no websockets and no h2c; `without_upgrade`,
service/api/uvicorn_protocol.py). A head over 64 KiB is answered 431 and the connection closed, here and in uvicorn's
protocol (`BoundedHttpToolsProtocol`, service/api/uvicorn_protocol.py). A connection closed while its client may still
be sending (a refused body, a head that could not be read, a 408 for a client that paused for --receive-timeout-s
mid-request) lingers first (`Linger`, service/api/closing.py), so the client reads the answer instead of a reset. A
connection past --max-connections takes an idle one's place, or is answered 503 (service/api/admission.py).

Behaviour matches the ASGI path: the body limit answers 413, and the budget of bodies
held at once 503, before reading the body (which is then read and dropped, so the client
sees the answer), a client that hangs up cancels its request (499 in the metrics,
dropped from the queue), keep-alive with uvicorn's idle timeout, pipelined requests in
order, and uvicorn's graceful shutdown waits for the request in flight.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from uvicorn.config import Config
from uvicorn.server import ServerState

from ..errors import ServiceError, TooLarge
from ..watchdog import Deadline, StallWatch
from .admission import Idle, refused
from .closing import DROPPED, MAX_HEAD, STATUS_LINES, Linger, head_timed_out, head_too_large, timed_out
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
from .uvicorn_protocol import BoundedHttpToolsProtocol

if TYPE_CHECKING:
    from .gateway import Gateway

logger = logging.getLogger(__name__)

HEAD_READ = 4 << 10  # a head is a few hundred bytes: most of the body is then received straight into its buffer
JOINED_WRITE = 64 << 10  # answers up to this size go out in one write with their head
# The path as sent: no query string, no %-escapes (those requests go to uvicorn, which decodes them).
INFER_TARGET = re.compile(rb"/v2/models/(?P<name>[^/?%]+)(?:/versions/1)?/infer")  # the only version there is
HANDED_OVER = frozenset({b"transfer-encoding", b"expect"})  # framing or semantics uvicorn handles
# The fields as RFC 9110 has them, which httptools enforces: a name is a token, a value has no control character but
# tab. A head whose fields are not all so goes to uvicorn, which answers 400 naming what it found.
FIELDS = re.compile(rb"(?:\r\n[-!#$%&'*+.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*)*")
BARE_LF = re.compile(rb"(?<!\r)\n")  # a line ended without CR: no head here ends, uvicorn's parser answers it (400)
READ = WANTED | {b"connection"}  # the fast path's headers, and whether to keep the connection


@dataclass(frozen=True, slots=True)
class _Request:
    """A parsed head this protocol serves: the model, the headers it reads (lower-case names), the body's length."""

    name: str
    fields: dict[bytes, bytes]
    length: int
    head: bytes  # as received, without its blank line: what a front-end process hands over (service/api/frontend_process.py)

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


def infer_protocol(gateway: Gateway) -> type[InferConnection]:
    """The protocol class for uvicorn's `http=` setting, bound to this gateway."""
    return type("GatewayConnection", (InferConnection,), {"gateway": gateway})


class InferConnection(asyncio.BufferedProtocol):
    gateway: Gateway  # set by infer_protocol
    prelude = b""  # what a front-end process read of a connection before it handed it here (service/api/frontend_process.py)
    _head_ns = 0  # time.monotonic_ns() when the request being received had its head parsed
    answered = False  # a request has begun on it: once idle, it is closed for a new connection after silent ones (Idle)

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
        self._idle = Idle(self._loop, config.timeout_keep_alive, self)  # kept alive with no request
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
            self.answered = True  # or about to be: idle from here on, it has served a client (Idle)
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
        protocol.gateway, protocol.handed_over = self.gateway, True
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

    def close_idle(self) -> None:
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
