"""A worker that runs several batches at once (serve --worker-threads; the default on a GPU), as a real process.

The gateway-level behaviour with threaded workers (answers, killed workers, model control) runs in
tests/integration/test_frontends.py, whose gateway starts its workers with --worker-threads 2."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
from collections.abc import Iterator
from multiprocessing.connection import Connection

import numpy as np
import onnxruntime as ort
import pytest

from bench.gateway_bench import sample
from migserve.contract import read_contract
from service.placement import model_spec
from service.repository import load_model
from service.workers import shm
from service.workers.process import worker_main
from service.workers.protocol import BatchDone, BatchFailed, FailureKind, RunBatch, Stop, WorkerOptions, WorkerReady, WorkerSpec
from tests.helpers import ExportedRepo

MODEL = "crowd-csrnet"


@pytest.fixture
def threaded_worker(tiny_repo: ExportedRepo) -> Iterator[Connection]:
    spec = WorkerSpec("threads", None, (0,), (model_spec(load_model(tiny_repo.root / MODEL)),), WorkerOptions(threads=2))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=worker_main, args=(spec, child), daemon=True)
    process.start()
    child.close()
    try:
        assert parent.poll(120), "the worker did not start"
        assert isinstance(parent.recv(), WorkerReady)
        yield parent
        parent.send(Stop())
        process.join(30)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
        parent.close()


def _reply(conn: Connection) -> object:
    assert conn.poll(30), "no answer: the batch hangs"
    return conn.recv()


def test_a_batch_that_fails_on_a_thread_is_answered_and_the_worker_keeps_serving(
    threaded_worker: Connection, tiny_repo: ExportedRepo
) -> None:
    """On a thread an unexpected exception would be lost and its batch never answered; it is answered 500 instead.
    (A worker that runs batches itself dies of it, and the gateway restarts it.)"""
    feeds = sample(read_contract(tiny_repo.root / MODEL).model_dump(mode="json"), {"height": 32, "width": 32}, 2)
    arena, outputs = shm.Arena(), shm.Attachments()
    try:
        refs = arena.write({name: [value] for name, value in feeds.items()})
        gone = {name: dataclasses.replace(ref, segment="migserve-test-no-such-segment") for name, ref in refs.items()}
        threaded_worker.send(RunBatch(1, MODEL, gone))
        failed = _reply(threaded_worker)
        assert isinstance(failed, BatchFailed) and failed.batch_id == 1 and failed.kind is FailureKind.RUNTIME
        assert "FileNotFoundError" in failed.message and "migserve-test-no-such-segment" in failed.message
        threaded_worker.send(RunBatch(2, MODEL, refs))
        done = _reply(threaded_worker)
        assert isinstance(done, BatchDone) and done.batch_id == 2
        session = ort.InferenceSession(str(tiny_repo.root / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        (expected,) = session.run(None, feeds)
        np.testing.assert_allclose(outputs.view(done.outputs["density"]), expected, rtol=1e-4, atol=1e-5)
    finally:
        outputs.close()
        arena.close()
