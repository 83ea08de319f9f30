"""A local worker process, one per partition, behind the Replica interface (service/backends/local.py has them all).

A worker's pipe and its process sentinel are watched by the event loop; when the
process dies every batch in flight fails with WorkerDied (the dispatcher retries
it once elsewhere) and the worker is restarted with back-off. A worker that has not
answered a batch for `hang_s` (serve --worker-hang-s) is killed, which starts the same.
A front-end process (serve --frontends) connects to the first process's workers instead (`AttachedReplica`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Client, Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

from migserve.types import Array

from ..errors import BadRequest, InferenceFailed, WorkerDied
from ..partitions import Partition, PartitionKind
from ..watchdog import StallWatch
from ..workers import shm
from ..workers.oom import OomWatch, killed_first
from ..workers.process import worker_main
from ..workers.protocol import (
    BatchDone,
    BatchFailed,
    FailureKind,
    LoadModel,
    ModelLoaded,
    ModelSpec,
    ModelUnloaded,
    RunBatch,
    Stop,
    Trim,
    UnloadModel,
    WorkerOptions,
    WorkerReady,
    WorkerSpec,
    watch,
)

DEFAULT_OPTIONS = WorkerOptions()

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)
_ids = itertools.count(1)
START_TIMEOUT_S = 120.0
ATTACH_TIMEOUT_S = 15.0  # a front-end process waiting for a restarted worker (a GPU worker restarted in 2.7 s on an H200)
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
HUNG = ".hung"  # beside a worker's socket: the pid of a worker a front-end process killed as hung


class WorkerReplica:
    read_only_outputs = False  # outputs are the gateway's own copies out of shared memory

    def __init__(
        self,
        partition: Partition,
        models: Mapping[str, ModelSpec],
        on_change: Callable[[], None],
        options: WorkerOptions = DEFAULT_OPTIONS,
        socket_path: str | None = None,
        *,
        hang_s: float = 300.0,
        held: Callable[[int], None] = lambda nbytes: None,
    ) -> None:
        self.partition = partition
        self._hang_s = hang_s
        self._hang: StallWatch | None = None  # made on the first batch, in the running loop
        self.socket_path = socket_path  # where the worker takes batches from the gateway's other front-end processes
        # SCHED_IDLE only where the worker has cores of its own to yield
        self._options = dataclasses.replace(options, idle_priority=options.idle_priority and partition.kind is PartitionKind.CPU)
        self._models = dict(models)
        self._on_change = on_change
        self._ctx = mp.get_context("spawn")
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Array]]] = {}
        self._control: asyncio.Future[ModelLoaded | ModelUnloaded] | None = None  # a load or unload awaiting its reply
        self._inputs: list[shm.Arena] = []  # ours, one per slot: the inputs of the batch in flight there
        self._outputs: list[shm.Attachments] = []  # the worker's, one per slot: its latest outputs there
        self._trim: asyncio.TimerHandle | None = None  # to release arenas over the size kept, once idle (shm.IDLE_RELEASE_S)
        self._over = 0  # bytes of our arenas over the size kept, counted with the request bodies (held)
        self._held = held  # told of each change in _over (LocalBackend.hold_arenas: the gateway's body budget)
        self._slots: dict[int, int] = {}  # batch id -> slot, for the batches in flight
        self.depth = 1  # batches in flight at once, each in an arena (slot) of its own here and in the worker
        self._ready = False
        self._stopping = False
        self.loaded: tuple[str, ...] = ()
        self.refused: dict[str, str] = {}
        self.providers: tuple[str, ...] = ()
        self.device_warning: str | None = None  # a GPU partition running on the CPU, and why
        self.slices: dict[str, int] = {}  # model -> rows per run at its default sizes, where the worker slices its batches
        self.timed: dict[str, int] = {}  # model -> what the worker's timing chose (0: whole): a restart takes it
        self.restarts = 0
        self.oom_kills = 0  # deaths the kernel's OOM killer caused (service/workers/oom.py)
        self.last_death: str | None = None  # why the worker last died, for /v1/partitions
        self._oom = OomWatch(None)
        self._hang_killed = False  # this process killed the worker as hung: its SIGKILL is no mystery
        self._ended: str | None = None  # why the current process ended, once known
        self._ended_for_memory = False  # the kernel killed it for memory
        self.compute_s = 0.0  # the worker's time running this process's batches (BatchDone.compute_s), over restarts too
        self.pid: int | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._recovering = False

    @property
    def id(self) -> str:
        return self.partition.id

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def recovering(self) -> bool:
        return self._recovering

    max_rows: int | None = None

    @property
    def assigned(self) -> tuple[str, ...]:
        return tuple(self._models)

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        spec = WorkerSpec(
            partition=self.partition.id,
            device=self.partition.device,
            cores=self.partition.cores,
            models=tuple(self._models.values()),
            options=self._options,
            listen=self.socket_path,
            timed=dict(self.timed),
        )
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=worker_main, args=(spec, child), name=f"migserve-worker-{self.id}", daemon=True)
        self._oom, self._hang_killed, self._ended, self._ended_for_memory = OomWatch.now(), False, None, False
        process.start()
        if process.pid is not None:  # raised here too: the worker raises its own only once its imports are done
            killed_first(Path(f"/proc/{process.pid}/oom_score_adj"), Path("/proc/self/oom_score_adj"))
        child.close()
        try:
            ready = await asyncio.wait_for(asyncio.to_thread(parent.recv), START_TIMEOUT_S)
        except EOFError:  # it died loading its models: say how, and why where the kernel knows
            await asyncio.to_thread(process.join, 5)
            why = self._killed_for_memory(process.exitcode)
            parent.close()
            raise RuntimeError(
                f"worker {self.id} exited with code {process.exitcode} before it was ready" + (f": {why}" if why else "")
            ) from None
        self._process = process
        self._attach(parent, ready)
        asyncio.get_running_loop().add_reader(process.sentinel, self._on_exit)
        sliced = "".join(f"; {model} in runs of {rows} row{'s' * (rows != 1)}" for model, rows in sorted(self.slices.items()))
        logger.info(
            "worker %s ready (pid %s, %s, models: %s%s)", self.id, process.pid, ",".join(self.providers), ",".join(self.loaded), sliced
        )
        self._on_change()

    def _attach(self, conn: Connection, ready: object) -> None:
        """Take batches over `conn` from now on, `ready` being the worker's first message on it."""
        if not isinstance(ready, WorkerReady):
            conn.close()
            raise RuntimeError(f"worker {self.id} sent {type(ready).__name__} before it was ready")
        self._conn, self.pid = conn, ready.pid
        self.loaded, self.refused, self.providers = ready.models, ready.refused, ready.providers
        self.device_warning, self.slices = ready.device_warning, dict(ready.slices)
        self.timed.update(ready.timed)
        # serve --batches-in-flight on a worker that runs several at once: the next batch starts while one runs
        self.depth = max(1, min(ready.threads, self._options.in_flight))
        watch(conn, self._on_message)
        self._ready, self._recovering = True, False
        for model, reason in ready.refused.items():
            logger.error("partition %s refused model %s: %s", self.id, model, reason)
        if ready.device_warning:
            logger.warning("%s", ready.device_warning)

    def submit(self, model: str, parts: Mapping[str, list[Array]]) -> asyncio.Future[dict[str, Array]]:
        if not self._ready or self._conn is None:
            raise WorkerDied(f"worker {self.id} is not running")
        if len(self._pending) >= self.depth:
            raise RuntimeError(f"worker {self.id} already has {len(self._pending)} batches in flight")  # the batcher's job
        slot = min(set(range(self.depth)) - set(self._slots.values()))
        while len(self._inputs) <= slot:
            self._inputs.append(shm.Arena(keep=self._options.arena_keep))
            self._outputs.append(shm.Attachments())
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        try:
            refs = self._inputs[slot].write(parts)
        except shm.SharedMemoryFull as exc:
            raise InferenceFailed(f"partition {self.id}: {exc}") from None
        finally:
            self._count_over()
        batch_id = next(_ids)
        future: asyncio.Future[dict[str, Array]] = asyncio.get_running_loop().create_future()
        self._pending[batch_id] = future
        self._slots[batch_id] = slot
        try:
            self._conn.send(RunBatch(batch_id=batch_id, model=model, inputs=refs, slot=slot))
        except OSError as exc:  # it died (or is dying) before the sentinel or the pipe told the loop
            self._pending.pop(batch_id)
            self._slots.pop(batch_id)
            why = self._exit_reason()
            if why is not None:
                asyncio.get_running_loop().call_soon(self._died, why)  # not from inside the batcher's dispatch
            message = f"worker {self.id} died: {why}" if why else f"worker {self.id}: {exc}"
            raise WorkerDied(message, for_memory=self._ended_for_memory) from None
        loop = asyncio.get_running_loop()
        if self._hang is None:
            self._hang = StallWatch(loop, self._hang_s, lambda: bool(self._pending) and self._ready, self._hung)
        self._hang.last = loop.time()  # the batch just sent: its wait starts now
        self._hang.arm()
        return future

    def _hung(self) -> None:
        # Killed, not asked: a hung process answers nothing. Its death is seen as any other (the process's sentinel,
        # or its socket closing in a front-end process): batches retried, the worker restarted by the first process.
        logger.error("worker %s (pid %s) has not answered a batch in %g s (--worker-hang-s): killing it", self.id, self.pid, self._hang_s)
        if self.pid is not None:
            self._hang_killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def _hung_reason(self) -> str:
        return f"killed as hung: no answer to a batch in {self._hang_s:g} s (--worker-hang-s)"

    def _killed_as_hung(self) -> bool:
        """This process killed the worker as hung, or another front-end process did (it left a note by the socket)."""
        if self._hang_killed or self.socket_path is None or self.pid is None:
            return self._hang_killed
        note = Path(self.socket_path + HUNG)
        with contextlib.suppress(OSError, ValueError):
            if int(note.read_text()) == self.pid:
                note.unlink()
                self._hang_killed = True
        return self._hang_killed

    def _on_message(self) -> None:
        assert self._conn is not None
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._died(self._exit_reason() or "its pipe closed")  # the pipe can close before the sentinel says so
            return
        if isinstance(message, ModelLoaded | ModelUnloaded):
            if self._control is not None and not self._control.done():
                self._control.set_result(message)
            return
        future = self._pending.pop(message.batch_id, None)
        slot = self._slots.pop(message.batch_id, 0)
        if future is None:
            return
        if isinstance(message, BatchDone):
            self.compute_s += message.compute_s
            outputs = {name: self._outputs[slot].view(ref).copy() for name, ref in message.outputs.items()}
            if not future.done():
                future.set_result(outputs)
        elif isinstance(message, BatchFailed) and not future.done():
            error = BadRequest if message.kind is FailureKind.BAD_INPUT else InferenceFailed
            future.set_exception(error(message.message))
        if not self._pending and self._trim is None and self._oversized():
            self._trim = asyncio.get_running_loop().call_later(shm.IDLE_RELEASE_S, self._release_oversized)
        self._on_change()

    def _oversized(self) -> bool:
        keep = self._options.arena_keep
        return any(a.size > keep for a in self._inputs) or any(a.size > keep for a in self._outputs)

    def _release_oversized(self) -> None:
        """No batch for IDLE_RELEASE_S after a burst of large ones: release the arenas over the size kept, ours and (told
        to) the worker's, whose pages would otherwise stay allocated until the next large batch."""
        self._trim = None
        if self._pending or self._conn is None:
            return
        for arena in self._inputs:
            arena.trim()
        for outputs in self._outputs:
            outputs.trim(self._options.arena_keep)
        self._count_over()
        with contextlib.suppress(OSError):  # a worker that died meanwhile takes its arenas with it
            self._conn.send(Trim())

    def _count_over(self) -> None:
        over = sum(max(0, a.size - self._options.arena_keep) for a in self._inputs)
        if over != self._over:
            self._held(over - self._over)
            self._over = over

    def _on_exit(self) -> None:
        self._died(self._exit_reason() or "it exited")

    def _exit_reason(self) -> str | None:
        """Why the worker process ended (None while it has not): killed as hung, by the kernel for memory, or its
        exit code."""
        if self._ended is not None or not self._ready:
            return self._ended  # told already, or nothing to tell
        if self._process is None:  # a front-end process's: it knows only what it did itself
            return self._hung_reason() if self._hang_killed else None
        self._process.join(0.2)  # the sentinel can close a moment before the process can be reaped
        code = self._process.exitcode
        hung = self._killed_as_hung()
        if code is None:  # a broken pipe, and no exit yet: a killed process can take longer to go on a busy host
            if not (hung or self._oom.moved()):
                return None
            code = -signal.SIGKILL
        if hung:
            self._ended = self._hung_reason()
        else:
            self._ended = self._killed_for_memory(code) or f"it exited with code {code}"
        return self._ended

    def _killed_for_memory(self, code: int | None) -> str | None:
        """Why the process that exited with `code` died, where the kernel's OOM killer took it (counted); else None."""
        why = self._oom.explain(code)
        if why is not None:
            self.oom_kills += 1
            self._ended_for_memory = True
        return why

    def _died(self, why: str) -> None:
        if not self._ready:
            return
        self._ready = False
        loop = asyncio.get_running_loop()
        if self._hang is not None:
            self._hang.cancel()
        if self._conn is not None:
            loop.remove_reader(self._conn.fileno())
            self._conn.close()
        if self._process is not None:
            loop.remove_reader(self._process.sentinel)
        pending, self._pending, self._slots = self._pending, {}, {}
        for outputs in self._outputs:
            outputs.close(unlink=True)  # the dead worker cannot unlink its arenas
        for inputs in self._inputs:
            inputs.close()  # grown to its largest batch: made again, as large as needed, when the next one is sent
        self._inputs, self._outputs = [], []
        for future in pending.values():
            if not future.done():
                future.set_exception(WorkerDied(f"worker {self.id} died: {why}", for_memory=self._ended_for_memory))
        if self._control is not None and not self._control.done():
            self._control.set_exception(WorkerDied(f"worker {self.id} died: {why}"))
        self._recovering = not self._stopping  # set before the batchers hear of it: their queues wait for the restart
        self._on_change()
        if not self._stopping:
            self.last_death = why
            logger.error("worker %s died (%s); restarting", self.id, why)
            self._restart_task = loop.create_task(self._restart())

    async def _restart(self) -> None:
        for attempt in itertools.count():
            await asyncio.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
            if self._stopping:
                return
            try:
                await self.start()
            except Exception:
                logger.exception("restarting worker %s failed", self.id)
                if self._recovering:  # it may take long now: what waits for it is answered 503
                    self._recovering = False
                    self._on_change()
                continue
            self.restarts += 1
            return

    async def load(self, spec: ModelSpec) -> str | None:
        """Load (or reload) a model in this worker, and keep it for restarts; why the worker refused it, or None.
        A reload swaps sessions between two batches, and a refused one leaves the running version in place.
        A worker that is not running loads it when it restarts."""
        previous = self._models.get(spec.name)
        self._models[spec.name] = spec
        if not self._ready:
            return None
        reply = await self._ask(LoadModel(spec))
        assert isinstance(reply, ModelLoaded)
        if reply.refused is None:
            self.learn(spec)
            self.refused.pop(spec.name, None)
            self.slices.pop(spec.name, None)
            self.timed.pop(spec.name, None)
            if reply.slice_rows is not None:
                self.slices[spec.name] = reply.slice_rows
            if reply.timed is not None:
                self.timed[spec.name] = reply.timed
        elif previous is not None and spec.name in self.loaded:
            self._models[spec.name] = previous  # the worker kept the old session
        else:
            del self._models[spec.name]
            self.refused[spec.name] = reply.refused
        self._on_change()
        return reply.refused

    async def unload(self, model: str) -> None:
        """Drop a model's session (and its memory) from this worker, restarts included. No batch of it is sent here
        from now on; those sent before run first (the worker answers its pipe in order)."""
        self.forget(model)  # first: no more batches, and if the worker dies meanwhile its restart leaves the model out
        self.refused.pop(model, None)
        self.slices.pop(model, None)
        self.timed.pop(model, None)
        self._on_change()
        if self._ready:
            await self._ask(UnloadModel(model))

    def learn(self, spec: ModelSpec) -> None:
        """The worker runs this model (loaded or reloaded): batches of it go there, and a restart loads it."""
        self._models[spec.name] = spec
        self.loaded = (*(m for m in self.loaded if m != spec.name), spec.name)

    def forget(self, model: str) -> None:
        self._models.pop(model, None)
        self.loaded = tuple(m for m in self.loaded if m != model)

    async def settled(self) -> None:
        """Once every batch sent to this worker so far is answered (or failed)."""
        if self._pending:
            await asyncio.wait(list(self._pending.values()))

    async def _ask(self, message: LoadModel | UnloadModel) -> ModelLoaded | ModelUnloaded:
        """Send a control message and wait for its reply; batches sent meanwhile run after it, in order."""
        if self._conn is None or self._control is not None:
            raise RuntimeError(f"worker {self.id}: one load or unload at a time")  # the gateway's lock ensures it
        self._control = asyncio.get_running_loop().create_future()
        try:
            self._conn.send(message)
            return await asyncio.wait_for(self._control, START_TIMEOUT_S)
        except OSError as exc:
            raise WorkerDied(f"worker {self.id}: {exc}") from None
        finally:
            self._control = None

    async def stop(self) -> None:
        self._stopping = True
        if self._conn is not None and self._ready:
            with contextlib.suppress(OSError):
                self._conn.send(Stop())
        if self._ready:
            self._died("stopped")
        if self._process is not None:
            await asyncio.to_thread(self._process.join, 5.0)
            if self._process.is_alive():
                self._process.kill()
        self._close_inputs()

    def _close_inputs(self) -> None:
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        for arena in self._inputs:
            arena.close()
        self._count_over()


class AttachedReplica(WorkerReplica):
    """A worker that the gateway's first process runs, seen from one of its other front-end processes
    (serve --frontends): this process connects to the worker's socket and sends its own batches there. When the
    worker dies the first process restarts it, and this one connects again."""

    def _hung(self) -> None:
        if self.pid is not None and self.socket_path is not None:  # the first process restarts it: tell it why it died
            with contextlib.suppress(OSError):
                Path(self.socket_path + HUNG).write_text(f"{self.pid}\n")
        super()._hung()

    async def start(self) -> None:
        assert self.socket_path is not None
        conn, ready = await asyncio.to_thread(self._connect, self.socket_path)
        self._attach(conn, ready)
        logger.info("attached to worker %s (pid %s)", self.id, self.pid)
        self._on_change()

    def _connect(self, path: str) -> tuple[Connection, object]:
        """Connect, waiting a while for the worker to (re)start, and read its WorkerReady. Past ATTACH_TIMEOUT_S the
        attempt fails, so that what waits for this replica is answered 503, as the first process answers when a
        restart fails; attempts go on with back-off."""
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while True:
            try:
                conn = Client(path, family="AF_UNIX")
            except OSError:  # not there yet, or the socket of a worker that died
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            if conn.poll(max(deadline - time.monotonic(), 0)):
                return conn, conn.recv()
            conn.close()
            raise TimeoutError(f"worker {self.id} did not answer on {path}")

    async def stop(self) -> None:
        self._stopping = True  # the worker is the first process's to stop: only this connection closes
        if self._ready:
            self._died("stopped")
        self._close_inputs()
