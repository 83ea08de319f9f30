"""uvicorn's HTTP protocol, bounded as the gateway's own is: what serves a connection that the gateway's protocol
(service/api/connection.py) hands over, and every connection with `serve --http-server uvicorn`."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..watchdog import Deadline, StallWatch
from .admission import refused
from .closing import MAX_HEAD, Linger, head_timed_out, head_too_large, timed_out, unparsable
from .unsent import Unsent

if TYPE_CHECKING:
    from .gateway import Gateway

UPGRADE = re.compile(rb"\r\nupgrade[ \t]*:[^\r\n]*", re.IGNORECASE)  # a head's Upgrade field, ignored (without_upgrade)


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
    handed_over = False  # by an InferConnection, which was let in: not refused for --max-connections
    _real: asyncio.Transport  # the transport itself
    _view: _UvicornTransport  # what uvicorn's protocol and its cycles have for it

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if not self.handed_over and refused(transport, self.server_state, self.gateway):
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
