"""A timer for "nothing has happened for too long", cheap enough to stamp on every read."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class StallWatch:
    """Calls `expire` once `timeout` seconds pass with nothing new while `waiting()` holds: a client stopped in the
    middle of a request (service/api/connection.py), a worker that answers no batch (service/backends/local.py).
    The owner stamps `last` at each sign of life (a float store); one timer, armed while something is awaited,
    re-arms itself for the quiet time left instead of being re-made at every stamp."""

    __slots__ = ("_expire", "_loop", "_timer", "_waiting", "last", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, waiting: Callable[[], bool], expire: Callable[[], None]) -> None:
        self._loop, self.timeout, self._waiting, self._expire = loop, timeout, waiting, expire
        self._timer: asyncio.TimerHandle | None = None
        self.last = loop.time()

    def arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self.timeout, self._check)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if not self._waiting():
            return
        quiet = self._loop.time() - self.last
        if quiet < self.timeout:
            self._timer = self._loop.call_later(self.timeout - quiet, self._check)
        else:
            self._expire()
