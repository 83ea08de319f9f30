"""What the batcher does with a batch whose worker the kernel killed for memory (service/dispatch/batcher.py).

The kernel's part is exercised for real in tests/integration/test_cgroup_limits.py; whether a second replica is
then spared depends on how much memory the gateway itself holds at that moment, so the decision is checked here,
with replicas that answer as a worker's death is reported (a WorkerDied, `for_memory` set by the local backend).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np

from migserve.types import Array
from service.dispatch.batcher import BatchPolicy, ModelBatcher, Pending
from service.errors import Unavailable, WorkerDied
from service.metrics import Metrics
from service.stats import ModelStatistics


class Replica:
    """Runs batches as told: each batch of more than `limit` rows kills it 'for memory'; others echo the input."""

    def __init__(self, name: str, limit: int) -> None:
        self.id, self.limit = name, limit
        self.ready, self.recovering, self.depth, self.max_rows, self.outstanding = True, False, 1, None, 0
        self.batches: list[int] = []

    def submit(self, model: str, parts: Mapping[str, list[Array]]) -> asyncio.Future[dict[str, Array]]:
        rows = sum(len(p) for p in parts["x"])
        self.batches.append(rows)
        future: asyncio.Future[dict[str, Array]] = asyncio.get_running_loop().create_future()
        if rows > self.limit:
            future.set_exception(WorkerDied(f"worker {self.id} died: the kernel killed it for want of memory", for_memory=True))
        else:
            future.set_result({"y": np.concatenate(parts["x"])})
        return future


async def _run(sizes: list[int], replicas: list[Replica]) -> list[object]:
    batcher = ModelBatcher("m", BatchPolicy(64, 0.05, 100), lambda: replicas, Metrics(), ModelStatistics("m"))
    for replica in replicas:
        replica.outstanding = 1  # busy while the requests queue, so that they batch together
    pending = [Pending({"x": np.zeros((n, 2), np.float32)}, n, asyncio.get_running_loop().time() + 30) for n in sizes]
    for item in pending:
        batcher.submit(item)
    for replica in replicas:
        replica.outstanding = 0
    batcher.notify()
    return list(await asyncio.gather(*(p.future for p in pending), return_exceptions=True))


def test_a_batch_killed_for_memory_is_not_sent_whole_to_another_replica() -> None:
    first, second = Replica("cpu-0", limit=4), Replica("cpu-1", limit=4)
    answers = asyncio.run(_run([8], [first, second]))
    assert isinstance(answers[0], Unavailable) and "not retried on another replica" in str(answers[0])
    assert first.batches + second.batches == [8], "run once, on one replica"


def test_its_requests_run_each_alone_so_those_batched_with_a_large_one_are_answered() -> None:
    replica = Replica("cpu-0", limit=4)
    answers = asyncio.run(_run([1, 6, 1], [replica]))
    assert replica.batches == [8, 1, 6, 1]
    assert isinstance(answers[0], dict) and isinstance(answers[2], dict)
    assert isinstance(answers[1], Unavailable) and "for want of memory" in str(answers[1])


def test_a_batch_whose_worker_died_otherwise_is_retried_on_another_replica() -> None:
    class Crashing(Replica):
        def submit(self, model: str, parts: Mapping[str, list[Array]]) -> asyncio.Future[dict[str, Array]]:
            self.batches.append(sum(len(p) for p in parts["x"]))
            self.ready = False  # as a dead worker is, until its restart
            raise WorkerDied(f"worker {self.id} died: it exited with code -9")

    crashing, other = Crashing("cpu-0", limit=64), Replica("cpu-1", limit=64)
    answers = asyncio.run(_run([8], [crashing, other]))
    assert isinstance(answers[0], dict) and crashing.batches == [8] and other.batches == [8]
