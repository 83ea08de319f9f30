"""Answers after which an HTTP connection closes, and the lingering close that lets its client read them.

Both HTTP protocols use them: the gateway's own (service/api/connection.py) and uvicorn's as the gateway bounds it
(service/api/uvicorn_protocol.py), and the refusal of a connection past --max-connections (service/api/admission.py)."""

from __future__ import annotations

import asyncio
import http
import sys

from ..errors import BadRequest, HeadTooLarge, ReceiveTimeout, ServiceError
from ..watchdog import StallWatch
from .fastpath import error_reply

MAX_HEAD = 64 << 10  # the longest request line and headers either protocol reads: past it, 431
STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus}
LINGER_QUIET_S = 5.0  # a lingering connection closes once its client sends nothing for this long (or --receive-timeout-s)
LINGER_MAX_S = 30.0  # and after this long in any case (nginx's lingering_timeout and lingering_time)

DROPPED = memoryview(bytearray(256 << 10))  # what a lingering connection's bytes are received into, and dropped


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


def timed_out(timeout: float, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    error = ReceiveTimeout(f"nothing received for {timeout:g} s in the middle of the request (--receive-timeout-s)")
    return closing_answer(error, default_headers)


def head_timed_out(timeout: float, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    error = ReceiveTimeout(f"the request's head (request line and headers) did not arrive whole within {timeout:g} s (--head-timeout-s)")
    return closing_answer(error, default_headers)
