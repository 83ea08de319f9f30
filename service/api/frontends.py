"""Front-end processes (`serve --frontends N`): N processes take inference requests on the same port.

One Python process answers at most about 3,000 requests/s (0.33 ms of CPU each on an H200 host,
`bench/RESULTS.md`), far less than a GPU runs. With N front-ends, the first process is the gateway as
before (it starts and restarts the workers, and serves everything); the N-1 others each bind the same
port with SO_REUSEPORT, so the kernel spreads connections over all N, and each runs its own batchers
and sends its batches straight to the workers over their Unix sockets (a worker takes batches from
every front-end, merging batches of one model that arrive together).

A front-end serves only `POST /v2/models/{name}/infer` over HTTP/1.1 (binary or JSON tensors). A
connection that asks anything else (health, metadata, /v1, /metrics, shared memory registration, a
request that names a shared memory region, a chunked or compressed body) is handed, with the bytes it has sent so
far, to the first process (the socket itself, over SCM_RIGHTS), which serves it from then on. With
`--grpc-port`, every front-end serves gRPC on that port too: ModelInfer and ModelStreamInfer with its
own batchers, and every other call, or an inference that names a region, passed to the first process
over its Unix socket (`service/api/grpc_service.py`). So every piece of state (regions, jobs,
readiness, logs) lives in one process; /metrics and the
statistics extension add the other front-ends' counts to the first's. With explicit model control
the first process tells every front-end of a load (after the workers have the model) and of an
unload (before they drop it), and answers once each has applied it. `--max-pending-mb` bounds the
bodies all processes hold together, and `--queue-capacity` the requests all processes queue for a model
(service/shared.py); each process batches its own. A front-end that dies is started again.

Here: the first process's side (`Frontends`, `adopter`) and the messages between the processes; the front-end
process itself is service/api/frontend_process.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from ..backends.worker import RESTART_BACKOFF_S, START_TIMEOUT_S
from ..config import ServeConfig
from ..partitions import Partition
from ..repository import ModelEntry
from ..shared import SharedCounts
from ..stats import ModelStatistics
from ..trace import TraceState
from ..workers import shm
from ..workers.protocol import ModelSpec, Stop, watch

logger = logging.getLogger(__name__)
SNAPSHOT_TIMEOUT_S = 2.0
STOP_WAIT_S = 10.0  # a stopping front-end finishes the requests it holds; then it is killed
LENGTH = struct.Struct("!Q")
GRPC_SOCKET = "grpc.sock"  # in the run directory: the first process's gRPC service, for its front-ends


@dataclass(frozen=True)
class FrontendSpec:
    """What a front-end process needs: the first process's models, partitions and placement, and where to reach it."""

    index: int
    config: ServeConfig  # its port is the one the first process bound (serve --port 0 included)
    models: dict[str, ModelEntry]
    not_served: dict[str, str]
    partitions: list[Partition]
    placement: dict[str, dict[str, ModelSpec]]
    sockets: dict[str, str]  # partition id -> its worker's Unix socket
    handoff: str  # the first process's Unix socket for connections it should serve
    grpc: str | None  # the first process's Unix socket for the gRPC calls a front-end passes on (None: no gRPC)
    shared: SharedCounts  # every process's bodies and queues: --max-pending-mb and --queue-capacity bound their sums
    log_level: str


@dataclass(frozen=True)
class Snapshot:
    """Asks a front-end for its counts."""


@dataclass(frozen=True)
class Counts:
    """A front-end's metrics (Prometheus text) and statistics, for the first process to add to its own."""

    index: int
    pid: int
    metrics: bytes
    stats: dict[str, ModelStatistics]
    handed_over: int
    log_level: str  # the front-end's own, as Triton's logging extension set it
    bodies_held: int  # bytes of request bodies it holds now


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class ServeModel:
    """Explicit model control: the first process loaded (or reloaded) a model on these partitions."""

    name: str
    entry: ModelEntry
    specs: dict[str, ModelSpec]
    column: int | None  # of its queue's length in the shared counts (None: each process bounds its own queue)


@dataclass(frozen=True)
class UnserveModel:
    """Explicit model control: the first process unloads a model once every front-end has stopped sending it."""

    name: str
    reason: str


@dataclass(frozen=True)
class SetLogs:
    """Triton's logging extension: the first process's log settings changed; the same changes here."""

    changes: dict[str, Any]


@dataclass(frozen=True)
class SyncTraces:
    """Triton's trace extension: the first process's trace settings; the answer is the front-end's finished traces."""

    state: TraceState


@dataclass(frozen=True)
class TracesTaken:
    """A front-end's finished traces: its answer to SyncTraces, and its last words as it stops."""

    records: list[dict[str, Any]]


@dataclass(frozen=True)
class Done:
    """A front-end has applied a ServeModel, UnserveModel or SetLogs."""

    name: str


def run_dir() -> Path:
    """A private directory (0700) for the workers' and the hand-over sockets."""
    return Path(tempfile.mkdtemp(prefix="migserve-"))


def adopter(server: Any) -> Callable[[socket.socket, bytes], None]:
    """How the first process serves a handed-over connection: as one its uvicorn `server` accepted, the bytes
    the front-end had read of it first."""

    def adopt(sock: socket.socket, data: bytes) -> None:
        sock.setblocking(False)

        def protocol() -> asyncio.BaseProtocol:
            config = server.config
            connection = config.http_protocol_class(config=config, server_state=server.server_state, app_state=server.lifespan.state)
            connection.prelude = data
            return connection  # type: ignore[no-any-return]

        task = asyncio.get_running_loop().create_task(asyncio.get_running_loop().connect_accepted_socket(protocol, sock))
        _background.add(task)
        task.add_done_callback(_background.discard)

    return adopt


_background: set[asyncio.Task[Any]] = set()  # adoptions and restarts, kept until done (the loop holds weak references)


@dataclass
class _Child:
    index: int
    process: BaseProcess
    conn: Connection
    restarts: int = 0
    reply: asyncio.Future[object] | None = None  # the answer to the question asked now


@dataclass
class Frontends:
    """The first process's side: starts the other front-ends, restarts them, serves what they hand over, and
    collects their counts."""

    count: int  # front-end processes besides this one
    directory: Path
    spec: Callable[[int, str], FrontendSpec]  # index, hand-over path -> the spec
    shared: SharedCounts  # each process's bodies and queues (service/shared.py)
    grpc_path: str | None = None  # the first process's Unix socket for what front-ends pass on over gRPC (None: no gRPC)
    adopt: Callable[[socket.socket, bytes], None] | None = None  # serve a handed-over connection (set by `serve`)
    children: dict[int, _Child] = field(default_factory=dict)
    latest: list[Counts] = field(default_factory=list)
    _stopping: bool = False
    _listener: socket.socket | None = None
    _asking: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def handoff_path(self) -> str:
        return str(self.directory / "handoff.sock")

    async def start(self) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.handoff_path)
        self._listener.listen(64)
        threading.Thread(target=self._accept, args=(asyncio.get_running_loop(),), name="migserve-handoff", daemon=True).start()
        await asyncio.gather(*(self._spawn(i) for i in range(1, self.count + 1)))

    async def _spawn(self, index: int, restarts: int = 0) -> None:
        from .frontend_process import frontend_main  # which imports this module's messages

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=frontend_main, args=(self.spec(index, self.handoff_path), child), name=f"migserve-frontend-{index}", daemon=True
        )
        process.start()
        child.close()
        try:
            ready = await asyncio.wait_for(asyncio.to_thread(parent.recv), START_TIMEOUT_S)
        except BaseException:
            process.kill()
            raise
        if not isinstance(ready, Ready):
            process.kill()
            raise RuntimeError(f"front-end {index} sent {type(ready).__name__} before it was ready")
        self.children[index] = entry = _Child(index, process, parent, restarts)
        loop = asyncio.get_running_loop()
        watch(parent, self._on_message, entry)
        loop.add_reader(process.sentinel, self._on_exit, entry)
        logger.info("front-end %d ready (pid %s)", index, process.pid)

    def _on_message(self, child: _Child) -> None:
        try:
            message = child.conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(child.conn.fileno())
            return
        if child.reply is not None and not child.reply.done():
            child.reply.set_result(message)

    def _on_exit(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(child.process.sentinel)
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(child.conn.fileno())
        child.process.join(1)
        child.conn.close()
        if child.reply is not None and not child.reply.done():
            child.reply.cancel()
        if self.children.get(child.index) is child:
            del self.children[child.index]
        _remove_arenas(child.process.pid)
        self.shared.clear(child.index)  # the bodies and requests it held went with its connections
        if not self._stopping:
            logger.error("front-end %d (pid %s) exited with code %s; restarting", child.index, child.process.pid, child.process.exitcode)
            task = loop.create_task(self._restart(child.index, child.restarts + 1))
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def _restart(self, index: int, restarts: int) -> None:
        for attempt in itertools.count():
            await asyncio.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
            if self._stopping:
                return
            try:
                await self._spawn(index, restarts)
            except Exception:
                logger.exception("restarting front-end %d failed", index)
                continue
            return

    def _accept(self, loop: asyncio.AbstractEventLoop) -> None:
        """A thread: take each front-end's hand-over connection, and read from it (blocking) until it closes."""
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed: the gateway stops
            threading.Thread(target=self._receive_connections, args=(sock, loop), name="migserve-handoff-read", daemon=True).start()

    def _receive_connections(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        with sock:
            while True:
                try:
                    head, fds, _, _ = socket.recv_fds(sock, LENGTH.size, 1)
                except OSError:
                    return
                if len(head) < LENGTH.size or not fds:
                    for fd in fds:
                        os.close(fd)
                    return  # the front-end went away
                (length,) = LENGTH.unpack(head)
                data = _read_exactly(sock, length)
                client = socket.socket(fileno=fds[0])
                if data is None or self.adopt is None or loop.is_closed():
                    client.close()
                    return
                loop.call_soon_threadsafe(self.adopt, client, data)

    async def refresh(self) -> list[Counts]:
        """Every live front-end's counts, asked now (one that does not answer in time is left out)."""
        self.latest = [c for _, c in await self._ask_all(Snapshot(), SNAPSHOT_TIMEOUT_S) if isinstance(c, Counts)]
        return self.latest

    async def tell(self, message: ServeModel | UnserveModel | SetLogs, timeout_s: float = SNAPSHOT_TIMEOUT_S) -> None:
        """Every live front-end applies `message` (model control, log settings) before this returns; one that does not
        in time is restarted, and starts with the first process's models and log level as they are then."""
        for child, answer in await self._ask_all(message, timeout_s):
            if not isinstance(answer, Done):
                logger.error("front-end %d did not apply %s in %.0f s; restarting it", child.index, type(message).__name__, timeout_s)
                child.process.kill()

    async def sync_traces(self, state: TraceState) -> list[list[dict[str, Any]]]:
        """Every live front-end takes up the trace settings `state` and gives its finished traces."""
        return [
            answer.records for _, answer in await self._ask_all(SyncTraces(state), SNAPSHOT_TIMEOUT_S) if isinstance(answer, TracesTaken)
        ]

    async def _ask_all(self, message: object, timeout_s: float) -> list[tuple[_Child, object]]:
        """Each live front-end with its answer to `message` (an exception where it gave none in time)."""
        async with self._asking:  # one question at a time: each front-end has one reply slot
            loop = asyncio.get_running_loop()
            asked: list[asyncio.Future[object]] = []
            children = list(self.children.values())
            for child in children:
                child.reply = reply = loop.create_future()
                try:
                    child.conn.send(message)
                except OSError as exc:
                    reply.set_exception(exc)
                asked.append(reply)
            answers = await asyncio.gather(*(asyncio.wait_for(f, timeout_s) for f in asked), return_exceptions=True)
            return list(zip(children, answers, strict=True))

    def view(self) -> list[dict[str, Any]]:
        """The front-ends besides the first process, with their counts as of the last refresh."""
        counts = {c.index: c for c in self.latest}
        view = []
        for child in sorted(self.children.values(), key=lambda c: c.index):
            latest = counts.get(child.index)
            view.append(
                {
                    "index": child.index,
                    "pid": child.process.pid,
                    "restarts": child.restarts,
                    "requests": sum(s.success.count + s.fail.count for s in latest.stats.values()) if latest else None,
                    "handed_over": latest.handed_over if latest else None,
                    "log_level": latest.log_level if latest else None,
                    "bodies_held": latest.bodies_held if latest else None,
                }
            )
        return view

    async def stop(self) -> list[list[dict[str, Any]]]:
        """Every front-end finishes the requests it holds and stops; the traces they finished since the last sync."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        for child in list(self.children.values()):
            loop.remove_reader(child.process.sentinel)
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(child.conn.fileno())
            with contextlib.suppress(OSError):
                child.conn.send(Stop())
        traces = []
        for child in list(self.children.values()):
            traces += await asyncio.to_thread(_last_traces, child, time.monotonic() + STOP_WAIT_S)
            if child.process.is_alive():
                child.process.kill()
        self.children.clear()
        if self._listener is not None:
            self._listener.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        return traces


def _last_traces(child: _Child, deadline: float) -> list[list[dict[str, Any]]]:
    """What a stopping front-end sends until it exits (or the deadline passes): its last traces are kept, answers
    to questions asked before the stop are dropped. Read as it goes, so that no send of its blocks on a full pipe."""
    traces = []
    while (left := deadline - time.monotonic()) > 0 and child.conn.poll(left):
        try:
            message = child.conn.recv()
        except (EOFError, OSError):  # it has exited
            break
        if isinstance(message, TracesTaken):
            traces.append(message.records)
    child.process.join(max(0.0, deadline - time.monotonic()))
    return traces


def _remove_arenas(pid: int | None) -> None:
    """The batch arenas of a front-end that died: nobody else unlinks them (its workers' outputs for it they do)."""
    for leftover in shm.SHM_DIR.glob(f"{shm.ARENA_PREFIX}{pid}-*"):
        with contextlib.suppress(FileNotFoundError):
            shm.release(shared_memory.SharedMemory(name=leftover.name), unlink=True)  # unregisters it from the resource tracker


def _read_exactly(sock: socket.socket, length: int) -> bytes | None:
    chunks, left = [], length
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
