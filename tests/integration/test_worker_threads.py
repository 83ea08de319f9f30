"""A worker that runs several batches at once (serve --worker-threads; the default on a GPU), as a real process.

The gateway-level behaviour with threaded workers (answers, killed workers, model control) runs in
tests/integration/test_frontends.py, whose gateway starts its workers with --worker-threads 2."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import shutil
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Client, Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench.gateway_bench import sample
from migserve.contract import read_contract
from migserve.types import Array
from service.backends.worker import WorkerReplica
from service.partitions import Partition, PartitionKind
from service.placement import model_spec
from service.repository import load_model
from service.workers import shm
from service.workers.process import worker_main
from service.workers.protocol import BatchDone, BatchFailed, FailureKind, RunBatch, Stop, WorkerOptions, WorkerReady, WorkerSpec
from tests.helpers import ExportedRepo

MODEL = "crowd-csrnet"


@dataclasses.dataclass
class _Worker:
    conn: Connection  # the gateway's side
    listen: str  # where front-end processes connect
    process: BaseProcess

    def stop(self) -> None:
        self.conn.send(Stop())
        self.process.join(30)
        assert self.process.exitcode == 0


@pytest.fixture
def threaded_worker(tiny_repo: ExportedRepo) -> Iterator[_Worker]:
    listen = tempfile.mkdtemp(prefix="mw-", dir="/tmp") + "/w.sock"  # a Unix socket's path has room for 107 bytes
    model = model_spec(load_model(tiny_repo.root / MODEL))
    spec = WorkerSpec("threads", None, (0,), (model,), WorkerOptions(threads=2), listen=listen)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=worker_main, args=(spec, child), daemon=True)
    process.start()
    child.close()
    try:
        assert parent.poll(120), "the worker did not start"
        assert isinstance(parent.recv(), WorkerReady)
        yield _Worker(parent, listen, process)
    finally:
        if process.is_alive():
            process.kill()
        parent.close()
        shutil.rmtree(Path(listen).parent, ignore_errors=True)


def _reply(conn: Connection) -> object:
    assert conn.poll(30), "no answer: the batch hangs"
    return conn.recv()


def test_a_batch_that_fails_on_a_thread_is_answered_and_the_worker_keeps_serving(threaded_worker: _Worker, tiny_repo: ExportedRepo) -> None:
    """On a thread an unexpected exception would be lost and its batch never answered; it is answered 500 instead.
    (A worker that runs batches itself dies of it, and the gateway restarts it.)"""
    feeds = sample(read_contract(tiny_repo.root / MODEL).model_dump(mode="json"), {"height": 32, "width": 32}, 2)
    arena, outputs = shm.Arena(), shm.Attachments()
    try:
        refs = arena.write({name: [value] for name, value in feeds.items()})
        gone = {name: dataclasses.replace(ref, segment="migserve-test-no-such-segment") for name, ref in refs.items()}
        threaded_worker.conn.send(RunBatch(1, MODEL, gone))
        failed = _reply(threaded_worker.conn)
        assert isinstance(failed, BatchFailed) and failed.batch_id == 1 and failed.kind is FailureKind.RUNTIME
        assert "FileNotFoundError" in failed.message and "migserve-test-no-such-segment" in failed.message
        threaded_worker.conn.send(RunBatch(2, MODEL, refs))
        done = _reply(threaded_worker.conn)
        assert isinstance(done, BatchDone) and done.batch_id == 2
        session = ort.InferenceSession(str(tiny_repo.root / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        (expected,) = session.run(None, feeds)
        np.testing.assert_allclose(outputs.view(done.outputs["density"]), expected, rtol=1e-4, atol=1e-5)
    finally:
        outputs.close()
        arena.close()
    threaded_worker.stop()


def test_a_front_end_that_leaves_while_its_batch_runs_leaves_no_shared_memory_behind(
    threaded_worker: _Worker, tiny_repo: ExportedRepo
) -> None:
    """The worker sees the front-end's connection close while one of its threads still runs the batch: the arenas
    go once the batch is done, not before (the answer would then be written to a new arena that nobody unlinks)."""
    feeds = sample(read_contract(tiny_repo.root / MODEL).model_dump(mode="json"), {"height": 512, "width": 512}, 8)
    arena = shm.Arena()
    try:
        front_end = Client(threaded_worker.listen, family="AF_UNIX")
        assert front_end.poll(30) and isinstance(front_end.recv(), WorkerReady)
        front_end.send(RunBatch(1, MODEL, arena.write({name: [value] for name, value in feeds.items()})))
        time.sleep(0.05)  # the worker has it, and one of its threads runs it (8 rows of 512x512: most of a second)
        front_end.close()
        threaded_worker.conn.send(RunBatch(2, MODEL, arena.write({name: [value[:1]] for name, value in feeds.items()})))
        assert isinstance(_reply(threaded_worker.conn), BatchDone), "the worker goes on serving the others"
    finally:
        arena.close()
    threaded_worker.stop()
    left = sorted(Path("/dev/shm").glob(f"{shm.ARENA_PREFIX}{threaded_worker.process.pid}-*"))
    assert not left, f"the worker left shared memory behind: {left}"


def test_one_process_has_two_batches_in_flight_on_a_threaded_worker_each_in_arenas_of_its_own(tiny_repo: ExportedRepo) -> None:
    """A worker that runs several batches at once takes a second from the same process while the first runs (depth
    2): the second's inputs must not overwrite the first's, nor its outputs the first's answer."""
    contract = read_contract(tiny_repo.root / MODEL).model_dump(mode="json")
    first = sample(contract, {"height": 32, "width": 32}, 3)
    second = {name: np.ascontiguousarray(value[:2][::-1]) * 2 for name, value in first.items()}
    session = ort.InferenceSession(str(tiny_repo.root / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    async def main() -> list[dict[str, Array]]:
        partition = Partition("threads", PartitionKind.CPU, cores=(0,))
        replica = WorkerReplica(
            partition, {MODEL: model_spec(load_model(tiny_repo.root / MODEL))}, lambda: None, WorkerOptions(threads=2, in_flight=2)
        )
        await replica.start()
        try:
            assert replica.depth == 2
            answers = [replica.submit(MODEL, {k: [v] for k, v in arrays.items()}) for arrays in (first, second)]
            with pytest.raises(RuntimeError, match="2 batches in flight"):
                replica.submit(MODEL, {k: [v] for k, v in first.items()})
            return list(await asyncio.gather(*answers))
        finally:
            await replica.stop()

    for arrays, got in zip((first, second), asyncio.run(main()), strict=True):
        (expected,) = session.run(None, arrays)
        np.testing.assert_allclose(got["density"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "depth"),
    [
        (WorkerOptions(in_flight=2), 1),
        (WorkerOptions(threads=3), 1),
        (WorkerOptions(threads=3, in_flight=2), 2),
        (WorkerOptions(threads=3, in_flight=5), 3),
    ],
    ids=["one-thread", "threads", "in-flight-2", "at-most-threads"],
)
def test_batches_in_flight_follow_the_worker_s_threads_and_the_setting(tiny_repo: ExportedRepo, options: WorkerOptions, depth: int) -> None:
    """Each process keeps one batch in flight on a worker by default; --batches-in-flight more on a worker that runs
    several at once, never more than its threads (a CPU slice's worker runs one)."""

    async def main() -> int:
        partition = Partition("depth", PartitionKind.CPU, cores=(0,))
        replica = WorkerReplica(partition, {MODEL: model_spec(load_model(tiny_repo.root / MODEL))}, lambda: None, options)
        await replica.start()
        try:
            return replica.depth
        finally:
            await replica.stop()

    assert asyncio.run(main()) == depth
