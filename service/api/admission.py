"""Connections past `serve --max-connections`: a new one takes the place of an idle one, or is answered 503.

Both HTTP protocols call `refused` as a connection is made; the gateway's own (service/api/connection.py) keeps its
idle connections in SILENT and IDLE, in the order they became idle, for it to close."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from uvicorn.server import ServerState

from ..errors import Unavailable
from ..logsettings import OncePer
from ..watchdog import Deadline
from .closing import Linger, closing_answer

if TYPE_CHECKING:
    from .connection import InferConnection
    from .gateway import Gateway

logger = logging.getLogger(__name__)

REFUSED_LINGER_S = 2.0  # the longest a connection refused for --max-connections lingers
REFUSED_LINGERING = 64  # and how many may linger at once (a quarter of service/fds.py's RESERVE)


class Idle(Deadline):
    """The keep-alive deadline of a connection with no request begun. While it is armed the connection is among those
    a new one takes the place of when its process holds --max-connections (`refused`), as nginx reuses its idle
    keep-alive connections when it runs out: first those that have sent nothing since they were opened (SILENT, a
    silent flood's), oldest first, then those kept alive after an answer (IDLE), oldest first."""

    __slots__ = ("_owner",)

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, owner: InferConnection) -> None:
        super().__init__(loop, timeout, owner.close_idle)
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


# This process's connections with no request begun, oldest first (Idle): never sent one, and kept alive after one
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
    (`Idle`), closed now (its client sees it closed, as at the keep-alive timeout), or with none idle it is refused
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
