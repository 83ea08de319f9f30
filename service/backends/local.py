"""The gateway's backend: its partitions' replicas, a local worker process per partition (service/backends/worker.py)
or a client per Triton partition (service/backends/triton.py), and loading and unloading models on them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import Unavailable, WorkerDied
from ..partitions import Partition, PartitionKind
from ..workers.protocol import ModelSpec, WorkerOptions
from .worker import DEFAULT_OPTIONS, AttachedReplica, WorkerReplica

if TYPE_CHECKING:
    from .triton import TritonReplica

logger = logging.getLogger(__name__)


def timings_file_writable(cache: str) -> bool:
    """Whether the timings file kept between starts (and its directory) can be made and written; if not, the gateway
    says so once and its workers share their timings for this start only."""
    try:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        with Path(cache).open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        logger.warning("--cpu-run-slices-cache %s cannot be written (%s): the CPU workers time their models at every start", cache, exc)
        return False
    logger.info("CPU workers take the run slices timed at earlier starts from %s and add what they time (--cpu-run-slices-cache)", cache)
    return True


class LocalBackend:
    """The partitions' replicas: a worker process per local partition, a client per Triton partition.

    `placement` maps partition id -> the models there; `options` says how workers run their models. With `sockets`
    (partition id -> a Unix socket path, serve --frontends), the gateway's first process starts workers that also
    listen there, and its other front-end processes (`attached`) connect to them instead of starting their own.
    """

    def __init__(
        self,
        partitions: list[Partition],
        placement: Mapping[str, Mapping[str, ModelSpec]],
        options: WorkerOptions = DEFAULT_OPTIONS,
        sockets: Mapping[str, str] | None = None,
        attached: bool = False,
        *,
        hang_s: float = 300.0,
    ) -> None:
        from .triton import TritonReplica

        self._listeners: list[Callable[[], None]] = []
        self._held: Callable[[int], None] = lambda nbytes: None  # hold_arenas
        self._timings: int | None = None
        timing = not attached and options.run_slices == "auto" and options.timings is None
        if timing and any(p.kind is PartitionKind.CPU and placement.get(p.id) for p in partitions):
            # The workers time each model once between them (service/workers/slices.py): in the file kept between
            # starts, else in one with no name that they open through this process's descriptor, which goes with the
            # gateway, even one killed with -9.
            if options.timings_cache is not None and timings_file_writable(options.timings_cache):
                options = dataclasses.replace(options, timings=options.timings_cache)
            else:
                self._timings = os.memfd_create("migserve-timings")
                options = dataclasses.replace(options, timings=f"/proc/{os.getpid()}/fd/{self._timings}")
        self._options = options
        self._hang_s = hang_s
        self._sockets = dict(sockets or {})
        self._partitions = {p.id: p for p in partitions}
        self.workers: dict[str, WorkerReplica | TritonReplica] = {}
        for p in partitions:
            if placement.get(p.id):
                models = placement[p.id]
                path = self._sockets.get(p.id)
                if p.kind is PartitionKind.TRITON:
                    self.workers[p.id] = TritonReplica(p, list(models), self._notify, hang_s=hang_s)
                elif attached:
                    assert path is not None, f"front-end process without a socket for partition {p.id}"
                    self.workers[p.id] = AttachedReplica(p, models, self._notify, options, path, hang_s=hang_s, held=self._count_held)
                else:
                    self.workers[p.id] = WorkerReplica(p, models, self._notify, options, path, hang_s=hang_s, held=self._count_held)

    def hold_arenas(self, held: Callable[[int], None]) -> None:
        """Tell `held` of each change in the bytes of the workers' input arenas over the size kept (--arena-keep-mb): a
        large batch's copy in shared memory, held while it runs and until the arena is released."""
        self._held = held

    def _count_held(self, nbytes: int) -> None:  # every replica's, made now or later
        self._held(nbytes)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Called whenever a replica finishes a batch or changes state."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.remove(callback)

    async def load_model(self, specs: Mapping[str, ModelSpec]) -> dict[str, str | None]:
        """Load one model on local partitions (partition id -> its spec), starting a worker where a partition had
        none; partition id -> why it refused, or None where it loaded (or will, as its worker restarts)."""
        outcome: dict[str, str | None] = {}
        for pid, spec in specs.items():
            worker = self.workers.get(pid)
            if worker is None:
                fresh = WorkerReplica(
                    self._partitions[pid], {spec.name: spec}, self._notify, self._options, self._sockets.get(pid), hang_s=self._hang_s
                )
                try:
                    await fresh.start()
                except Exception as exc:
                    outcome[pid] = f"its worker did not start: {type(exc).__name__}: {exc}"
                    await fresh.stop()
                    continue
                self.workers[pid] = fresh
                outcome[pid] = fresh.refused.get(spec.name)
            elif isinstance(worker, WorkerReplica):
                try:
                    outcome[pid] = await worker.load(spec)
                except WorkerDied as exc:  # its restart loads the model
                    logger.warning("partition %s: %s while loading %s; it restarts with the model", pid, exc, spec.name)
                    outcome[pid] = None
        return outcome

    async def unload_model(self, model: str, partitions: Iterable[str] | None = None) -> None:
        """Drop a model from every local worker that has it, or from those of these partitions (Triton partitions
        keep theirs)."""
        chosen = self.workers.values() if partitions is None else [self.workers[pid] for pid in partitions if pid in self.workers]
        for worker in chosen:
            if isinstance(worker, WorkerReplica) and model in worker.assigned:
                with contextlib.suppress(WorkerDied):  # then its restart no longer loads the model
                    await worker.unload(model)

    async def attach_model(self, model: str, specs: Mapping[str, ModelSpec]) -> None:
        """A front-end process: the first process loaded a model on these partitions (partition id -> its spec);
        send it batches there from now on, connecting to a worker the first process started for it. A partition
        that ran it before and is not among these (one a reload left out) gets no more batches of it, and this
        returns once those sent there are answered: the first process drops it there next."""
        dropped = [w for pid, w in self.workers.items() if pid not in specs and isinstance(w, AttachedReplica) and model in w.loaded]
        for replica in dropped:
            replica.forget(model)
        for pid, spec in specs.items():
            worker = self.workers.get(pid)
            if worker is None:
                fresh = AttachedReplica(
                    self._partitions[pid],
                    {spec.name: spec},
                    self._notify,
                    self._options,
                    self._sockets[pid],
                    hang_s=self._hang_s,
                    held=self._count_held,
                )
                await fresh.start()
                self.workers[pid] = fresh
            elif isinstance(worker, AttachedReplica):
                worker.learn(spec)
        self._notify()
        await asyncio.gather(*(replica.settled() for replica in dropped))

    def detach_model(self, model: str) -> None:
        """A front-end process: the first process is unloading a model; no more batches of it from here."""
        for worker in self.workers.values():
            if isinstance(worker, AttachedReplica):
                worker.forget(model)
        self._notify()

    def _notify(self) -> None:
        for callback in self._listeners:
            callback()

    async def start(self) -> None:
        results = await asyncio.gather(*(w.start() for w in self.workers.values()), return_exceptions=True)
        failed = [(w.id, r) for w, r in zip(self.workers.values(), results, strict=True) if isinstance(r, BaseException)]
        if failed:
            raise Unavailable("workers failed to start: " + "; ".join(f"{pid}: {type(err).__name__}: {err}" for pid, err in failed))

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers.values()))
        if self._timings is not None:
            os.close(self._timings)
            self._timings = None

    def compute_seconds(self) -> dict[str, float]:
        """Seconds each local partition's worker spent running this process's batches (Triton partitions: Triton's
        own metrics have it)."""
        return {pid: worker.compute_s for pid, worker in self.workers.items() if isinstance(worker, WorkerReplica)}

    def replicas(self, model: str) -> list[WorkerReplica | TritonReplica]:
        return [w for w in self.workers.values() if model in w.loaded or (not w.ready and model in w.assigned)]
