"""A front-end process (`serve --frontends N`): its own gateway and batchers over the first process's workers, on the
shared port; what it does not serve it hands to the first process (service/api/frontends.py has the first process's
side, and the messages between them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest

from ..trace import Tracer
from ..workers.protocol import Stop, watch  # a front-end stops as a worker does
from .connection import InferConnection
from .encoding import is_identity
from .fastpath import BINARY_HEADER_LENGTH, CONTENT_ENCODING
from .frontends import (
    LENGTH,
    Counts,
    Done,
    FrontendSpec,
    Ready,
    ServeModel,
    SetLogs,
    Snapshot,
    SyncTraces,
    TracesTaken,
    UnserveModel,
)
from .sockets import reuse_port_socket

if TYPE_CHECKING:
    from .gateway import Gateway

logger = logging.getLogger(__name__)


class HandOff:
    """A front-end's end of the hand-over socket: sends a client's connection, and what it has read of it."""

    def __init__(self, path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self.count = 0

    def send(self, fd: int, data: bytes) -> None:
        socket.send_fds(self._sock, [LENGTH.pack(len(data))], [fd])  # the kernel gives the first process its own copy
        if data:
            self._sock.sendall(data)
        self.count += 1

    def close(self) -> None:
        self._sock.close()


class FrontendConnection(InferConnection):
    """A front-end's HTTP connection: inference as in the first process; anything else goes to the first process."""

    handoff: HandOff  # set by frontend_protocol
    _leaving = False  # handing the connection over: nothing more is read or answered here

    def _advance(self) -> None:
        if not self._leaving:
            super()._advance()

    def _hand_over(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the client went away meanwhile
        self._leaving = True
        transport.pause_reading()
        self._state.connections.discard(self)
        self._idle.cancel()
        if transport.get_write_buffer_size():  # an answer still going out: hand over once it has
            self._loop.call_later(0.002, self._hand_over)
            return
        data, self._pending = bytes(self._pending), bytearray()
        sock = transport.get_extra_info("socket")
        try:
            self.handoff.send(sock.fileno(), data)
        except OSError as exc:  # the first process is going away
            logger.warning("could not hand a connection to the gateway's first process: %s", exc)
        transport.abort()  # closes this process's descriptor only: the connection lives on in the first process

    def _start(self) -> None:
        request, body = self._request, self._body
        assert request is not None and body is not None
        length, encoding = request.fields.get(BINARY_HEADER_LENGTH), request.fields.get(CONTENT_ENCODING)
        header = body[: int(length)] if length is not None and length.isdigit() else body
        if is_identity(None if encoding is None else encoding.decode("latin-1")) and header.tobytes().find(b'"shared_memory_region"') < 0:
            super()._start()
            return
        # regions are registered with the first process: it serves this request, and the connection from here on
        # (and a compressed body, which may name one: rare enough to leave to the first process)
        self._body, self._request = None, None
        self.gateway.bodies.give(self._held)
        self._held = 0
        self._pending[:0] = request.head + b"\r\n\r\n" + body.tobytes()
        self._hand_over()


def frontend_protocol(gateway: Gateway, handoff: HandOff) -> type[FrontendConnection]:
    return type("FrontendGatewayConnection", (FrontendConnection,), {"gateway": gateway, "handoff": handoff})


def frontend_main(spec: FrontendSpec, conn: Connection) -> None:
    """A front-end process: its own batchers over the first process's workers, on the shared port."""
    os.setpgid(0, 0)  # as the workers: the first process stops its front-ends in order
    logging.basicConfig(level=spec.log_level.upper(), format=f"%(asctime)s %(levelname)s %(name)s[frontend {spec.index}]: %(message)s")
    from ..heap import keep_request_buffers_in_heap

    keep_request_buffers_in_heap()
    try:
        import uvloop

        uvloop.run(_frontend(spec, conn))
    except ImportError:
        asyncio.run(_frontend(spec, conn))


async def _frontend(spec: FrontendSpec, conn: Connection) -> None:
    import uvicorn

    gateway = _gateway(spec)
    await gateway.start()
    handoff = HandOff(spec.handoff)
    server = uvicorn.Server(
        uvicorn.Config(
            _nothing,
            http=frontend_protocol(gateway, handoff),  # type: ignore[arg-type]  # a BufferedProtocol works; uvicorn types Protocol
            lifespan="off",
            access_log=False,
            log_level=spec.log_level,
        )
    )
    watch(conn, _Control(spec.index, conn, gateway, handoff, server).on_message)
    sock = reuse_port_socket(spec.config.host, spec.config.port)
    try:
        async with _grpc(spec, gateway):
            conn.send(Ready(os.getpid()))
            await server.serve(sockets=[sock])
    finally:
        await gateway.stop()
        handoff.close()
        _send_last_traces(conn, gateway.tracer)


def _gateway(spec: FrontendSpec) -> Gateway:
    """This process's gateway, over the first process's workers (connected to, not started)."""
    from ..backends.local import LocalBackend
    from .gateway import Gateway, worker_options

    # the first process's options: a front-end sends batches as it does (--batches-in-flight, --arena-keep-mb)
    backend = LocalBackend(
        spec.partitions, spec.placement, worker_options(spec.config), sockets=spec.sockets, attached=True, hang_s=spec.config.worker_hang_s
    )
    return Gateway(
        spec.config,
        dict(spec.models),
        spec.partitions,
        spec.placement,
        backend,
        not_served=dict(spec.not_served),
        shared=spec.shared,
        index=spec.index,
    )


@dataclass
class _Control:
    """What the first process asks of this front-end over its pipe: its counts, log and trace settings, a model served
    or no longer, and the stop."""

    index: int
    conn: Connection
    gateway: Gateway
    handoff: HandOff
    server: Any  # uvicorn's Server: told to exit at Stop
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # model changes being applied

    def on_message(self) -> None:
        gateway, conn = self.gateway, self.conn
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = Stop()  # the first process is gone
        if isinstance(message, Snapshot):
            stats = dict(gateway.stats)
            level = logging.getLevelName(gateway.logs.level())
            gateway.metrics.body_bytes.set(gateway.bodies.held)  # the first process adds it to its own
            metrics = generate_latest(gateway.metrics.registry)
            conn.send(Counts(self.index, os.getpid(), metrics, stats, self.handoff.count, level, gateway.bodies.held))
        elif isinstance(message, SetLogs):
            gateway.logs.update(message.changes)  # checked by the first process already
            conn.send(Done("logging"))
        elif isinstance(message, SyncTraces):
            gateway.tracer.adopt(message.state)
            conn.send(TracesTaken(gateway.tracer.take()))
        elif isinstance(message, ServeModel | UnserveModel):
            task = asyncio.get_running_loop().create_task(self._apply(message))  # the first process waits for its Done
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            asyncio.get_running_loop().remove_reader(conn.fileno())
            self.server.should_exit = True

    async def _apply(self, message: ServeModel | UnserveModel) -> None:
        if isinstance(message, ServeModel):
            await self.gateway.serve_attached(message.name, message.entry, message.specs, message.column)
        else:
            await self.gateway.unserve_attached(message.name, message.reason)
        self.conn.send(Done(message.name))


def _send_last_traces(conn: Connection, tracer: Tracer) -> None:
    """The requests a front-end answered as it stopped, traced after the first process's last sync."""
    with contextlib.suppress(OSError):  # the first process is gone
        conn.send(TracesTaken(tracer.take()))


@contextlib.asynccontextmanager
async def _grpc(spec: FrontendSpec, gateway: Gateway) -> AsyncIterator[None]:
    """A front-end's gRPC service on the shared port while it serves (none without --grpc-port)."""
    if spec.grpc is None or spec.config.grpc_port is None:
        yield
        return
    from .grpc_service import FrontendInferenceService, grpc_server

    service = FrontendInferenceService(gateway, spec.grpc)
    server, _ = grpc_server(gateway, spec.config.host, spec.config.grpc_port, service=service, shared=True)
    await server.start()
    try:
        yield
    finally:
        await server.stop(grace=5)
        await service.close()


async def _nothing(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI app of a front-end: never called, as every request it does not serve is handed over."""
    raise RuntimeError("a front-end process serves no ASGI requests")
