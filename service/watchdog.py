"""Timers for "too long": since a start (`Deadline`), or with nothing new (`StallWatch`, cheap enough to stamp on every read)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """Calls `expire` once `timeout` seconds have passed since `arm()` (the first since the deadline was last
    cancelled or expired), unless cancelled first: a request's head must arrive whole within --head-timeout-s, however
    steadily it comes; a kept-alive connection with no request closes after uvicorn's keep-alive timeout
    (service/api/connection.py)."""

    __slots__ = ("_expire", "_loop", "_timer", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, expire: Callable[[], None]) -> None:
        self._loop, self.timeout, self._expire = loop, timeout, expire
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self.timeout, self._fire)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self._expire()


class StallWatch(Deadline):
    """Calls `expire` once `timeout` seconds pass with nothing new while `waiting()` holds: a client stopped in the
    middle of a request (service/api/connection.py), a worker that answers no batch (service/backends/worker.py).
    The owner stamps `last` at each sign of life (a float store); one timer, armed while something is awaited,
    re-arms itself for the quiet time left instead of being re-made at every stamp."""

    __slots__ = ("_waiting", "last")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, waiting: Callable[[], bool], expire: Callable[[], None]) -> None:
        super().__init__(loop, timeout, expire)
        self._waiting = waiting
        self.last = loop.time()

    def _fire(self) -> None:
        self._timer = None
        if not self._waiting():
            return
        quiet = self._loop.time() - self.last
        if quiet < self.timeout:
            self._timer = self._loop.call_later(self.timeout - quiet, self._fire)
        else:
            self._expire()
