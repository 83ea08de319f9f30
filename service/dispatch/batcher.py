"""One dynamic batcher per model: a bounded queue, batches formed while replicas are busy.

Requests with the same non-batch shapes are concatenated along the batch axis
(up to max_batch_size). A replica runs one batch at a time; the next batch is
whatever queued while it ran, sent to the free replica with the least
outstanding work. When other replicas are busy (the service is under load) and
the batch is not full, the batcher waits up to max_queue_delay for more; an idle
service answers at once. Expired requests are answered 504 before dispatch; a
full queue answers 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from migserve.types import Array

from ..backends.base import Replica
from ..errors import DeadlineExpired, ServiceError, Unavailable, WorkerDied
from ..metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Pending:
    inputs: dict[str, Array]
    size: int  # rows along the batch axis
    deadline: float  # time.monotonic()
    future: asyncio.Future[dict[str, Array]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued: float = field(default_factory=time.monotonic)
    signature: tuple[tuple[str, tuple[int, ...], str], ...] = field(init=False)  # requests batch with equal signatures

    def __post_init__(self) -> None:
        self.signature = tuple((k, v.shape[1:], v.dtype.str) for k, v in self.inputs.items())


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    max_queue_delay_s: float
    queue_capacity: int


class ModelBatcher:
    def __init__(self, model: str, policy: BatchPolicy, replicas: Callable[[], Sequence[Replica]], metrics: Metrics) -> None:
        self.model = model
        self.policy = policy
        self._replicas = replicas
        self._changed = asyncio.Event()  # set by the backend whenever a replica finishes or changes state
        self._metrics = metrics
        self._depth = metrics.queue_depth.labels(model)
        self._queue: deque[Pending] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()  # batches in flight; referenced so they are not collected

    def notify(self) -> None:
        self._changed.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.model}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for item in self._queue:
            _fail(item, Unavailable("the server is shutting down"))

    def submit(self, item: Pending) -> None:
        if len(self._queue) >= self.policy.queue_capacity:
            raise Unavailable(f"model {self.model}: queue full ({self.policy.queue_capacity} requests)", retry_after_s=1.0)
        if not any(r.ready for r in self._replicas()):
            raise Unavailable(f"model {self.model}: no ready replica", retry_after_s=1.0)
        self._queue.append(item)
        self._depth.set(len(self._queue))
        self._arrived.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self._next_batch()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("batcher %s failed; continuing", self.model)

    async def _next_batch(self) -> None:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        replica = await self._acquire(exclude=None)
        if replica is None:
            return
        limit = min(self.policy.max_batch_size, replica.max_rows or self.policy.max_batch_size)
        batch = self._take(limit=limit)
        busy = any(r.outstanding for r in self._replicas() if r is not replica)
        if busy and sum(p.size for p in batch) < limit and self.policy.max_queue_delay_s > 0:
            await self._wait_for_more(batch, limit)  # under load only: an idle service answers at once
            if not replica.ready or replica.outstanding >= replica.depth:  # another model's batcher took it meanwhile
                replica = await self._acquire(exclude=None, holding=True)
                if replica is None:
                    for item in batch:
                        _fail(item, Unavailable(f"model {self.model}: no ready replica", retry_after_s=1.0))
                    return
        self._dispatch(replica, batch)

    async def _acquire(self, exclude: Replica | None, holding: bool = False) -> Replica | None:
        """The ready replica with the least outstanding work and room for a batch; None if none is ready.

        `holding`: the caller already holds a batch (a retry, or a batch formed while waiting), so it
        waits for a replica even when the queue is empty, and a lack of replicas fails only that batch.
        """
        while True:
            self._expire()
            if not self._queue and not holding:
                return None
            ready = [r for r in self._replicas() if r.ready and r is not exclude]
            if not ready:
                if not holding:
                    self._no_replica()
                return None
            free = [r for r in ready if r.outstanding < r.depth]
            if free:
                return min(free, key=lambda r: r.outstanding)
            self._changed.clear()
            earliest = min((p.deadline for p in self._queue), default=time.monotonic() + 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=max(earliest - time.monotonic(), 0.001))

    def _no_replica(self) -> None:
        while self._queue:
            _fail(self._queue.popleft(), Unavailable(f"model {self.model}: no ready replica", retry_after_s=1.0))
        self._depth.set(0)

    def _take(self, batch: list[Pending] | None = None, *, limit: int) -> list[Pending]:
        batch = batch or [self._queue.popleft()]
        rows = sum(p.size for p in batch)
        signature = batch[0].signature
        kept: deque[Pending] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.signature == signature and rows + item.size <= limit and not item.future.done():
                batch.append(item)
                rows += item.size
            else:
                kept.append(item)
        self._queue = kept
        self._depth.set(len(self._queue))
        return batch

    async def _wait_for_more(self, batch: list[Pending], limit: int) -> None:
        until = batch[0].enqueued + self.policy.max_queue_delay_s
        while sum(p.size for p in batch) < limit:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)
            except TimeoutError:
                return
            self._take(batch, limit=limit)

    def _expire(self) -> None:
        now = time.monotonic()
        for item in [p for p in self._queue if p.deadline <= now or p.future.done()]:
            self._queue.remove(item)
            _fail(item, DeadlineExpired(f"model {self.model}: deadline passed after {now - item.enqueued:.3f}s in the queue"))

    def _dispatch(self, replica: Replica, batch: list[Pending]) -> None:
        """Send the batch now, so the replica is busy before the next batch is formed."""
        batch = [p for p in batch if not p.future.done()]
        if not batch:
            return
        parts = {name: [p.inputs[name] for p in batch] for name in batch[0].inputs}
        try:
            future = replica.submit(self.model, parts)
        except WorkerDied as exc:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        except Exception as exc:  # a dispatcher bug must answer its requests, never strand them
            logger.exception("batcher %s could not dispatch to %s", self.model, replica.id)
            for item in batch:
                _fail(item, ServiceError(f"model {self.model}: dispatch failed: {exc}"))
            return
        task = asyncio.get_running_loop().create_task(self._finish(replica, batch, parts, future))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _finish(
        self, replica: Replica, batch: list[Pending], parts: dict[str, list[Array]], future: asyncio.Future[dict[str, Array]]
    ) -> None:
        """Await the batch; if its worker died, retry once on another replica, else answer 503."""
        started = time.monotonic()
        try:
            try:
                outputs = await future
            except WorkerDied as died:
                self._metrics.retries.labels(self.model).inc()
                other = await self._acquire(exclude=replica, holding=True)
                if other is None:
                    raise Unavailable(f"model {self.model}: {died}; no other replica could take the batch", retry_after_s=1.0) from None
                replica = other
                try:
                    outputs = await other.submit(self.model, parts)
                except WorkerDied as again:
                    raise Unavailable(f"model {self.model}: {again} (after one retry)", retry_after_s=1.0) from None
        except ServiceError as exc:
            for item in batch:
                _fail(item, exc)
            return
        rows = sum(p.size for p in batch)
        self._metrics.batch_size.labels(self.model, replica.id).observe(rows)
        self._metrics.batch_seconds.labels(self.model, replica.id).observe(time.monotonic() - started)
        _split(batch, outputs, rows, self.model)


def _split(batch: list[Pending], outputs: dict[str, Array], rows: int, model: str) -> None:
    bad = [name for name, value in outputs.items() if value.shape[:1] != (rows,)]
    if bad:
        error = ServiceError(f"model {model} returned {bad} without a batch dim of {rows}")
        for item in batch:
            _fail(item, error)
        return
    row = 0
    for item in batch:
        if not item.future.done():
            item.future.set_result({name: value[row : row + item.size] for name, value in outputs.items()})
        row += item.size


def _fail(item: Pending, error: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(error)
