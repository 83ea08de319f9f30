"""Answers written to a connection that its client has not yet taken.

An answer leaves the gateway's accounting once it is written to the connection,
but a client that reads slowly, or not at all, leaves it in the transport's
buffer: an lns-organs answer is 23 times its request, a `/v1/lns/segment` label
map as large as the volume, so clients that send small requests and read nothing
could take the gateway's memory while `--max-pending-mb` saw none of it. From the
moment a connection's buffer passes its high-water mark (the transport pauses the
protocol) until it drains, what it holds is counted with the request bodies, so new
bodies are refused (503) while answers wait for their readers; and a client that
takes none of its answer for `--send-timeout-s` is disconnected, which drops it.
What the client takes is seen in the kernel's send queue (SIOCOUTQ: bytes written to the
socket and not yet acknowledged), which shrinks as the client reads: the transport's buffer
only shrinks once the kernel has room for a third of its send buffer (up to 4 MB), so a
client reading a large answer at tens of KB/s would otherwise look stalled and be cut off.

Both HTTP protocols (service/api/connection.py, service/api/uvicorn_protocol.py) keep one `Unsent` per connection.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sys
import termios
from collections.abc import Callable

from .budget import BodyBudget

logger = logging.getLogger(__name__)

POLL_S = 0.1  # how often a paused connection's buffer is looked at: its count follows it down, a stall is seen


class Unsent:
    """What one connection's transport still holds to send, counted in `budget` while the transport is paused."""

    __slots__ = ("_budget", "_cut", "_fd", "_last", "_loop", "_quiet_since", "_timer", "_transport", "counted", "timeout")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.WriteTransport,
        budget: BodyBudget,
        timeout: float,
        cut: Callable[[], None],
    ) -> None:
        """cut: called when the connection is closed for a stalled client (the metric)."""
        self._loop, self._transport, self._budget, self.timeout, self._cut = loop, transport, budget, timeout, cut
        self.counted = 0  # bytes of the buffer counted in the budget
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0  # what the client had not taken at the last look: the buffer and the kernel's send queue
        self._quiet_since = 0.0  # when the client last took some of it
        self._fd: int | None = None  # the socket's, looked up once the connection is first paused

    def paused(self) -> None:
        """The buffer passed its high-water mark: count it, and look at it until it drains or the client stalls."""
        self._quiet_since = self._loop.time()
        if self._fd is None:
            socket = self._transport.get_extra_info("socket")
            self._fd = -1 if socket is None else socket.fileno()
        self._last = self._recount() + self._kernel_queue()
        if self._timer is None:
            self._timer = self._loop.call_later(POLL_S, self._look)

    def drained(self) -> None:
        """The buffer is below its low-water mark, or the connection is gone: give it all back."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._budget.give(self.counted)
        self.counted = 0

    def _recount(self) -> int:
        size = self._transport.get_write_buffer_size()  # a closing transport still sends what it holds
        self._budget.count(size - self.counted)  # what is there is held, within the budget or not
        self.counted = size
        return size

    def _kernel_queue(self) -> int:
        """Bytes written to the socket that the client has not acknowledged yet (0 where the socket cannot say)."""
        try:
            return int.from_bytes(fcntl.ioctl(-1 if self._fd is None else self._fd, termios.TIOCOUTQ, bytes(4)), sys.byteorder, signed=True)
        except OSError:
            return 0

    def _look(self) -> None:
        self._timer = None
        size = self._recount()
        now = self._loop.time()
        if size == 0:
            return
        untaken = size + self._kernel_queue()
        if untaken < self._last:
            self._last, self._quiet_since = untaken, now
        elif untaken > self._last:  # the buffer grew (another answer): not a sign either way
            self._last = untaken
        elif now - self._quiet_since >= self.timeout:
            logger.info(
                "closing a connection whose client took none of its answer for %g s (--send-timeout-s); %.1f MB of it dropped",
                self.timeout,
                size / (1 << 20),
            )
            self._cut()
            self._transport.abort()  # close() would wait to send it first; connection_lost gives its count back
            return
        self._timer = self._loop.call_later(POLL_S, self._look)
