"""Which slice a CPU worker picks from its timings (service/workers/slices.py).

The timings come from a scripted clock, so the choice and the stop rule are checked without this machine's
noise; the runs themselves are a real onnxruntime session of a one-node graph.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bench.image_memory import memory_status
from migserve.types import Array
from service.workers import slices
from service.workers.protocol import ModelSpec
from service.workers.slices import SlicedSession, fastest_rows, time_per_row


def test_the_smallest_size_within_tolerance_of_the_fastest_is_taken() -> None:
    # face-pros on one core of this host, ms per row (bench/run_slices.py): 2 is within 5% of 4, 1 is not
    assert fastest_rows({1: 0.648, 2: 0.501, 4: 0.488, 8: 0.518, 16: 0.563, 32: 0.635}) == 2
    assert fastest_rows({1: 0.619, 2: 0.514, 4: 0.479, 8: 0.498, 16: 0.551, 32: 0.624}) == 4
    assert fastest_rows({1: 4.811, 2: 4.954, 4: 5.275, 8: 5.385}) == 1


def test_no_slices_where_the_largest_size_measured_is_fastest_or_outputs_cannot_be_joined() -> None:
    assert fastest_rows({1: 0.9, 2: 0.6, 4: 0.5}) is None  # a larger batch might be faster still
    assert fastest_rows({1: 0.51, 2: 0.6, 4: 0.5}) is None  # even with a smaller size within 5% of it
    assert fastest_rows({1: 2.5}) is None  # one size measured (a slow model)
    assert fastest_rows({}) is None
    assert fastest_rows({1: 0.4, 2: 0.5}, batch_first=False) is None


def _double(path: Path, output_shape: list[str | int | None]) -> ort.InferenceSession:
    """y = x + x on `x` of shape [batch, 4]; `output_shape` is what the graph declares for y."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class _Timed:
    """A real session whose runs take `cost(rows)` seconds on a scripted clock, and are recorded."""

    def __init__(self, session: ort.InferenceSession, cost: dict[int, float]) -> None:
        self.session, self.cost, self.now = session, cost, 0.0
        self.runs: list[int] = []

    def clock(self) -> float:
        return self.now

    def run(self, names: list[str] | None, feeds: dict[str, Array]) -> list[Array]:
        rows = next(iter(feeds.values())).shape[0]
        self.runs.append(rows)
        self.now += self.cost[rows]
        return list(self.session.run(names, feeds))


def test_sizes_are_timed_in_turn_and_the_timing_stops_at_a_slow_one(tmp_path: Path) -> None:
    timed = _Timed(_double(tmp_path / "m.onnx", ["batch", 4]), {1: 0.001, 2: 0.0016, 4: 0.0028, 8: 0.2, 16: 0.5})
    warmup = {"x": ((1, 4), "float32")}
    per_row, batch_first = time_per_row(timed, warmup, 16, clock=timed.clock)
    assert per_row == pytest.approx({1: 0.001, 2: 0.0008, 4: 0.0007, 8: 0.025})
    assert batch_first
    assert timed.runs == [1, 2, 4, 8, 1, 2, 4, 1, 2, 4]  # in turns; 8 took longer than RUN_LIMIT_S: once, and no 16
    assert fastest_rows(per_row, batch_first) == 4


def test_outputs_without_the_batch_axis_first_are_not_sliced(tmp_path: Path) -> None:
    session = _double(tmp_path / "m.onnx", ["batch", 4])
    transposed = _Timed(session, {1: 0.002, 2: 0.002, 4: 0.004})
    transposed.run = lambda names, feeds: [o.T for o in session.run(names, feeds)]  # type: ignore[method-assign]
    per_row, batch_first = time_per_row(transposed, {"x": ((1, 4), "float32")}, 4, clock=transposed.clock)
    assert not batch_first and fastest_rows(per_row, batch_first) is None


def _spec(max_batch: int | None) -> ModelSpec:
    return ModelSpec(name="double", path="m.onnx", sha256="0" * 64, warmup={"x": ((1, 4), "float32")}, max_batch=max_batch)


def test_fixed_rows_slice_without_timing_and_are_left_off_where_they_cover_the_batch(tmp_path: Path) -> None:
    session = _double(tmp_path / "m.onnx", ["batch", 4])
    sliced = SlicedSession.made(session, _spec(8), 2)
    assert isinstance(sliced, SlicedSession) and sliced.rows == 2 and sliced.slice_bytes == 2 * 4 * 4
    assert SlicedSession.made(session, _spec(8), 8) is session
    assert SlicedSession.made(session, _spec(1), "auto") is session  # one row at most: nothing to time
    assert SlicedSession.made(session, _spec(None), 2) is session


def test_a_model_that_fails_at_several_rows_is_left_whole_not_a_failed_start(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "one-row",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],  # a batch axis fixed at 1 by a faulty export
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "one.onnx")
    session = ort.InferenceSession(str(tmp_path / "one.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        time_per_row(session, {"x": ((1, 4), "float32")}, 8)
    assert SlicedSession.made(session, _spec(8), "auto") is session


def test_a_sliced_run_joins_its_slices_in_order(tmp_path: Path) -> None:
    session = _double(tmp_path / "m.onnx", ["batch", 4])
    sliced = SlicedSession(session, slice_bytes=3 * 16, rows=3)
    x = np.arange(7 * 4, dtype=np.float32).reshape(7, 4)
    (y,) = sliced.run(None, {"x": x})
    np.testing.assert_array_equal(y, 2 * x)
    assert sliced.get_outputs()[0].name == "y" and sliced.get_providers() == ["CPUExecutionProvider"]


def test_auto_keeps_the_session_whole_where_larger_runs_are_faster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = _double(tmp_path / "m.onnx", ["batch", 4])
    measured: list[int] = []

    def faster_when_larger(session: object, warmup: object, max_batch: int) -> tuple[dict[int, float], bool]:
        measured.append(max_batch)
        return {1: 1.0, 2: 0.8, 4: 0.5, 8: 0.4}, True

    monkeypatch.setattr(slices, "time_per_row", faster_when_larger)
    assert SlicedSession.made(session, _spec(8), "auto") is session
    monkeypatch.setattr(slices, "time_per_row", lambda s, w, m: ({1: 1.0, 2: 0.5, 4: 0.6, 8: 0.7}, True))
    sliced = SlicedSession.made(session, _spec(8), "auto")
    assert isinstance(sliced, SlicedSession) and sliced.rows == 2
    assert measured == [8]
    monkeypatch.setattr(slices, "time_per_row", faster_when_larger)
    assert SlicedSession.made(session, _spec(8), "auto", warmup_s=1.5) is session
    assert measured == [8], "a model whose warm-up took over a second is not timed"


def _agree(path: str, key: str, rows: int, queue: Any) -> None:
    """In a process of its own: what agreed_rows gives a worker whose timing would pick `rows` after 0.3 s."""

    def decide() -> int:
        time.sleep(0.3)  # long enough for the other process to be waiting on the lock
        return rows

    queue.put(slices.agreed_rows(path, key, decide))


def test_workers_time_a_model_once_between_them_and_take_the_same_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "timings.json")
    context = mp.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_agree, args=(path, "sha/1", rows, queue)) for rows in (2, 4)]
    for worker in workers:
        worker.start()
    got = [queue.get(timeout=60), queue.get(timeout=60)]
    for worker in workers:
        worker.join(10)
    assert got[0] == got[1] in (2, 4), "the second to take the lock took the first's choice"
    assert json.loads(Path(path).read_text()) == {"sha/1": got[0]}


def test_a_recorded_choice_is_taken_without_timing_and_a_torn_file_counts_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "timings.json"

    def never() -> int:
        raise AssertionError("timed although a choice was recorded")

    assert slices.agreed_rows(str(path), "a/1", lambda: 3) == 3
    assert slices.agreed_rows(str(path), "a/1", never) == 3
    assert slices.agreed_rows(str(path), "a/2", lambda: 0) == 0, "another core count is another key"
    assert json.loads(path.read_text()) == {"a/1": 3, "a/2": 0}
    path.write_text('{"a/1": 3, "a')  # a worker killed as it wrote
    assert slices.agreed_rows(str(path), "a/1", lambda: 5) == 5


def test_a_timings_file_keeps_the_newest_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slices, "KEPT_TIMINGS", 3)
    path = tmp_path / "timings.json"
    for key in ("a", "b", "c", "d"):
        slices.agreed_rows(str(path), key, lambda: 2)
    assert list(json.loads(path.read_text())) == ["b", "c", "d"], "the oldest dropped"


def test_a_timings_file_that_cannot_be_opened_leaves_the_worker_to_decide_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The gateway's file is a memfd the workers open through /proc/<gateway>/fd/<n>: where that is out of reach
    # (a descriptor gone, /proc locked down), the worker times the model itself instead of failing to load it.
    unreachable = tmp_path / "no-such-folder" / "timings"
    with caplog.at_level(logging.WARNING):
        assert slices.agreed_rows(str(unreachable), "a/1", lambda: 4) == 4
    assert "times its models alone" in caplog.text and not unreachable.parent.exists()


def test_a_timing_is_kept_under_the_model_file_cores_cpu_and_onnxruntime_version() -> None:
    key = slices.timing_key("ab" * 32, 2, "1.32.0")
    assert key == f"{'ab' * 32}/2/{slices.cpu_model()}/onnxruntime 1.32.0"
    assert slices.cpu_model() and slices.cpu_model() != "unknown", "this host's /proc/cpuinfo names its CPU"
    assert len({key, slices.timing_key("ab" * 32, 1, "1.32.0"), slices.timing_key("ab" * 32, 2, "1.31.1")}) == 3


def test_the_timings_kept_between_starts_default_to_the_user_s_cache_directory() -> None:
    from service.config import default_run_slices_cache

    assert default_run_slices_cache({"XDG_CACHE_HOME": "/x/cache", "HOME": "/h"}) == Path("/x/cache/migserve/cpu-run-slices.json")
    assert default_run_slices_cache({"HOME": "/h"}) == Path("/h/.cache/migserve/cpu-run-slices.json")
    assert default_run_slices_cache({"XDG_CACHE_HOME": "", "HOME": "/h"}) == Path("/h/.cache/migserve/cpu-run-slices.json")


def test_the_memory_the_timing_takes_is_given_back(tmp_path: Path) -> None:
    """Timing runs the largest batch once; onnxruntime's arena would keep that run's memory (here 2 x 64 MB of
    activations at 64 rows of 1 MB) for good, where a worker slicing its batches never needs it again. What the
    process holds is read after glibc gives back the memory it keeps freed (malloc_trim): in a process that freed large
    buffers before, as a pytest-xdist process has after the integration tests, glibc's raised mmap threshold keeps up
    to some 40 MB of the timing's freed feeds in its heap (24 MB after 8 MB buffers, 41 after 30 MB ones, against 4
    in a fresh process), which failed this test in one run of several."""
    row = 1 << 18
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["t"]), helper.make_node("Mul", ["t", "x"], ["y"])],
        "twice-squared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", row])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", row])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    spec = ModelSpec(name="m", path="m.onnx", sha256="0" * 64, warmup={"x": ((1, row), "float32")}, max_batch=64)
    for _ in range(3):  # freed at once: as in a long-lived process, glibc's mmap threshold is raised to 30 MB
        np.ones(30 << 20, np.uint8)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc_trim(0)
    before = memory_status()["VmRSS"] / (1 << 20)
    SlicedSession.made(session, spec, "auto")
    libc.malloc_trim(0)
    assert memory_status()["VmRSS"] / (1 << 20) - before < 48, "the arena holds what the timing's largest runs took"


def test_a_timings_file_that_cannot_be_written_is_said_and_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from service.backends.local import timings_file_writable

    kept = tmp_path / "cache" / "migserve" / "slices.json"
    assert timings_file_writable(str(kept)) and kept.exists(), "its folders made"
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING):
        assert not timings_file_writable(str(blocked / "slices.json"))
    assert f"--cpu-run-slices-cache {blocked / 'slices.json'} cannot be written" in caplog.text
    assert "the CPU workers time their models at every start" in caplog.text
