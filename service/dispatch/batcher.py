"""One dynamic batcher per model: a bounded queue, batches formed while replicas are busy.

Requests with the same non-batch shapes are concatenated along the batch axis
(up to max_batch_size). A replica runs one batch at a time (a GPU worker that
runs several takes a second while one runs: its `depth`); the next batch is
whatever queued while it ran, sent to the free replica with the least
outstanding work. When replicas are busy (the service is under load) and
the batch is smaller than the contract's smallest preferred batch size (or than
max_batch_size when it names none), the batcher holds it until max_queue_delay
after its oldest request, as Triton's dynamic batcher does; an idle service
answers at once. Holding for a full batch instead left a free CPU slice idle for
most of the delay at every turn (face-pros at concurrency 32: 1.09x throughput
with the preferred size, `bench/RESULTS.md`). Expired requests are answered
504 before dispatch; a full queue answers 503 at once. With `serve --frontends N` each process
has its own batchers, and the queue's capacity is the gateway's: a batcher publishes its queue's
length and counts every process's before it takes a request (service/shared.py).

The batcher has no task of its own: it acts when something changes (a request
arrives, a replica finishes or changes state, a held batch's delay runs out), in
that caller's turn of the event loop. So a replica that finishes a batch is
handed the next one before the finished batch's answers are written, without
waiting for a task switch: on a busy gateway those waits were milliseconds, in
which the replica sat idle with requests queued.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from migserve.types import Array

from ..backends.base import Replica
from ..errors import BadRequest, DeadlineExpired, InferenceFailed, ServiceError, Unavailable, WorkerDied
from ..metrics import Metrics
from ..shared import Published
from ..trace import Trace

if TYPE_CHECKING:
    from ..stats import ModelStatistics

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Pending:
    inputs: dict[str, Array]
    size: int  # rows along the batch axis
    deadline: float  # time.monotonic()
    future: asyncio.Future[dict[str, Array]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued: float = field(default_factory=time.monotonic)
    retried: bool = False  # its batch's worker died once already
    alone: bool = False  # its batch failed: it runs as a batch of its own, so an error reaches only the request at fault
    trace: Trace | None = None  # its timestamps, when the trace settings picked it (service/trace.py)
    signature: tuple[tuple[str, tuple[int, ...], str], ...] = field(init=False)  # requests batch with equal signatures

    def __post_init__(self) -> None:
        self.signature = tuple((k, v.shape[1:], v.dtype.str) for k, v in self.inputs.items())


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    max_queue_delay_s: float
    queue_capacity: int
    preferred_batch_sizes: tuple[int, ...] = ()  # under load, the smallest that fits `limit` goes without waiting

    def enough(self, limit: int) -> int:
        """Rows at which a batch goes at once, even while other replicas are busy."""
        return min((size for size in self.preferred_batch_sizes if size <= limit), default=limit)


class ModelBatcher:
    def __init__(
        self,
        model: str,
        policy: BatchPolicy,
        replicas: Callable[[], Sequence[Replica]],
        metrics: Metrics,
        stats: ModelStatistics,
        *,
        shared: Published | None = None,
    ) -> None:
        self.model = model
        self.policy = policy
        self._replicas = replicas
        self._metrics = metrics
        self._stats = stats
        self._depth = metrics.queue_depth.labels(model)
        self._shared = shared  # with front-ends: this queue's length in a column every process adds up
        self._queue: deque[Pending] = deque()
        self._timer: asyncio.TimerHandle | None = None  # wakes the batcher when a held batch's delay runs out
        self._timer_due = 0.0  # the time.monotonic() it is set for
        self._pumping = False
        self._stopped = False
        self._running: set[asyncio.Task[None]] = set()  # batches in flight; referenced so they are not collected

    def notify(self) -> None:
        """A replica finished a batch or changed state: hand out what is queued."""
        self._pump()

    async def drain(self, timeout_s: float) -> None:
        """Until every accepted request is answered, or `timeout_s` (the caller stops submitting first)."""
        until = time.monotonic() + timeout_s
        while (self._queue or self._running) and time.monotonic() < until:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stopped = True
        self._cancel_timer()
        while self._queue:
            _fail(self._queue.popleft(), Unavailable("the server is shutting down"))
        self._published()

    def submit(self, item: Pending) -> None:
        if self._stopped:
            raise Unavailable("the server is shutting down", retry_after_s=1.0)
        waiting = len(self._queue) if self._shared is None else self._shared.total()
        if waiting >= self.policy.queue_capacity:
            where = "" if self._shared is None else " across the front-end processes"
            raise Unavailable(f"model {self.model}: queue full ({self.policy.queue_capacity} requests{where})", retry_after_s=1.0)
        if not any(r.ready or r.recovering for r in self._replicas()):
            raise Unavailable(f"model {self.model}: no ready replica", retry_after_s=1.0)
        self._queue.append(item)
        self._published()
        self._pump()

    def _published(self) -> None:
        """The queue's length, for the metrics and, with front-ends, for every process's capacity check."""
        depth = len(self._queue)
        self._depth.set(depth)
        if self._shared is not None:
            self._shared.set(depth)

    def _pump(self) -> None:
        """Dispatch every batch that can go now; hold a partial batch under load until its delay is up."""
        if self._pumping or self._stopped:
            return  # a dispatch that calls back in: the outer call goes on with the queue
        self._pumping = True
        try:
            self._dispatch_ready()
        except Exception:  # a dispatcher bug must not fail the request or the replica that called in
            logger.exception("batcher %s failed; its queue waits for the next event", self.model)
        finally:
            self._pumping = False

    def _dispatch_ready(self) -> None:
        self._expire()
        while self._queue:
            replicas = self._replicas()
            ready = [r for r in replicas if r.ready]
            if not ready:
                if not any(r.recovering for r in replicas):
                    self._no_replica()
                return  # a replica restarting after a crash takes the queue when it is back
            free = [r for r in ready if r.outstanding < r.depth]
            if not free:
                return  # the replica that finishes next calls notify()
            replica = min(free, key=lambda r: r.outstanding)
            limit = min(self.policy.max_batch_size, replica.max_rows or self.policy.max_batch_size)
            busy = any(r.outstanding for r in replicas)  # others, or this one with a batch in flight already (depth > 1)
            due = self._queue[0].enqueued + self.policy.max_queue_delay_s
            batch = self._next_batch(limit)
            if busy and due > time.monotonic() and sum(p.size for p in batch) < self.policy.enough(limit) and not batch[0].alone:
                self._hold_until(due)  # under load only: an idle service answers at once
                return
            self._cancel_timer()
            self._remove(batch)
            self._dispatch(replica, batch)
        self._cancel_timer()

    def _hold_until(self, due: float) -> None:
        """Pump again at `due`; an armed timer for the same oldest request is kept, not re-made per arrival."""
        if self._timer is not None and self._timer_due == due:
            return
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(due - time.monotonic(), self._pump)
        self._timer_due = due

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _no_replica(self) -> None:
        while self._queue:
            _fail(self._queue.popleft(), Unavailable(f"model {self.model}: no ready replica", retry_after_s=1.0))
        self._published()

    def _next_batch(self, limit: int) -> list[Pending]:
        """The oldest request and the queued ones that batch with it (same signature, unanswered), up to `limit` rows."""
        first = self._queue[0]
        batch, rows = [first], first.size
        for item in itertools.islice(self._queue, 1, None):
            if rows == limit or first.alone:
                break
            if item.signature == first.signature and rows + item.size <= limit and not item.future.done() and not item.alone:
                batch.append(item)
                rows += item.size
        return batch

    def _remove(self, batch: list[Pending]) -> None:
        taken = set(batch)  # Pending compares by identity
        self._queue = deque(p for p in self._queue if p not in taken)
        self._published()

    def _expire(self) -> None:
        """Answer 504 to queued requests past their deadline; drop those already answered (a client that hung up)."""
        now = time.monotonic()
        gone = [p for p in self._queue if p.deadline <= now or p.future.done()]
        if not gone:
            return
        for item in gone:
            self._queue.remove(item)
            _fail(item, DeadlineExpired(f"model {self.model}: deadline passed after {now - item.enqueued:.3f}s in the queue"))
        self._published()

    def _dispatch(self, replica: Replica, batch: list[Pending]) -> None:
        """Send the batch now, so the replica is busy before the next batch is formed."""
        batch = [p for p in batch if not p.future.done()]
        if not batch:
            return
        parts = {name: [p.inputs[name] for p in batch] for name in batch[0].inputs}
        sent = time.monotonic()
        try:
            future = replica.submit(self.model, parts)
        except WorkerDied as exc:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        except ServiceError as exc:  # the replica refused the batch with a reason (e.g. no room in shared memory)
            for item in batch:
                _fail(item, exc)
            return
        except Exception as exc:  # a dispatcher bug must answer its requests, never strand them
            logger.exception("batcher %s could not dispatch to %s", self.model, replica.id)
            for item in batch:
                _fail(item, ServiceError(f"model {self.model}: dispatch failed: {exc}"))
            return
        task = asyncio.get_running_loop().create_task(self._finish(replica, batch, future, sent, time.monotonic()))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _finish(
        self, replica: Replica, batch: list[Pending], future: asyncio.Future[dict[str, Array]], sent: float, copied: float
    ) -> None:
        """Await the batch; if its worker died, queue it again at the front for another replica (once), else 503.
        `sent`: when the gateway began copying the batch to the replica; `copied`: when the copy was done."""
        try:
            outputs = await future
        except WorkerDied as died:
            if died.for_memory:
                self._after_memory_kill(batch, died)
            else:
                self._retry(replica, batch, died)
            return
        except (BadRequest, InferenceFailed) as exc:  # the model refused or failed on the batch's values
            if len(batch) > 1:
                self._run_alone(batch, exc)  # one request's bad values must not fail the others batched with it
                return
            _fail(batch[0], exc)
            return
        except ServiceError as exc:
            for item in batch:
                _fail(item, exc)
            return
        answered = time.monotonic()
        rows = sum(p.size for p in batch)
        self._metrics.batch_size.labels(self.model, replica.id).observe(rows)
        self._metrics.batch_seconds.labels(self.model, replica.id).observe(answered - sent)
        if _split(batch, outputs, rows, self.model):
            split = time.monotonic()
            queued = (sent - p.enqueued for p in batch)
            self._stats.batch_done(rows, queued, copied - sent, answered - copied, split - answered)
            for item in batch:
                if item.trace is not None:
                    for name, at in (("COMPUTE_START", sent), ("COMPUTE_INPUT_END", copied), ("COMPUTE_OUTPUT_START", answered)):
                        item.trace.stamp(name, int(at * 1e9))  # time.monotonic(): the clock of monotonic_ns
                    item.trace.stamp("COMPUTE_END", int(split * 1e9))

    def _after_memory_kill(self, batch: list[Pending], died: WorkerDied) -> None:
        """A batch whose worker the kernel killed for memory is not sent whole to another replica: the batch may be what
        outgrew the memory, and would take that replica down too. Its requests run each alone instead, so that those
        batched with a large one are answered; a request that ran alone is answered 503 saying why, not retried."""
        if len(batch) > 1 and not self._stopped:
            self._run_alone(batch, died)
            return
        for item in batch:
            _fail(item, Unavailable(f"model {self.model}: {died}; not retried on another replica, which this request could take down too"))

    def _run_alone(self, batch: list[Pending], error: Exception) -> None:
        """Queue a failed batch's requests again at the front, each to run as a batch of its own: onnxruntime's error
        (a token id past the vocabulary, say) names no row, so only running them apart tells whose values it was."""
        logger.info("batcher %s: a batch of %d requests failed (%s); running each alone", self.model, len(batch), error)
        self._metrics.isolated.labels(self.model).inc(len(batch))
        for item in reversed(batch):
            item.alone = True
            self._queue.appendleft(item)  # ahead of newer requests, past the queue's capacity if need be
        self._published()
        self._pump()

    def _retry(self, replica: Replica, batch: list[Pending], died: WorkerDied) -> None:
        others = any(r.ready for r in self._replicas() if r is not replica)
        if not others or any(p.retried for p in batch) or self._stopped:
            why = "after one retry" if others else "no other replica could take the batch"
            for item in batch:
                _fail(item, Unavailable(f"model {self.model}: {died}; {why}", retry_after_s=1.0))
            return
        self._metrics.retries.labels(self.model).inc()
        for item in reversed(batch):
            item.retried = True
            self._queue.appendleft(item)  # ahead of newer requests, past the queue's capacity if need be
        self._published()
        self._pump()


def _split(batch: list[Pending], outputs: dict[str, Array], rows: int, model: str) -> bool:
    """Each request's rows of the outputs; False (and each request failed) if they have no such rows."""
    bad = [name for name, value in outputs.items() if value.shape[:1] != (rows,)]
    if bad:
        error = ServiceError(f"model {model} returned {bad} without a batch dim of {rows}")
        for item in batch:
            _fail(item, error)
        return False
    row = 0
    for item in batch:
        if not item.future.done():
            item.future.set_result({name: value[row : row + item.size] for name, value in outputs.items()})
        row += item.size
    return True


def _fail(item: Pending, error: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(error)
