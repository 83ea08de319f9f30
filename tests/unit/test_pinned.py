"""Page-locking a CUDA worker's input memory and copying batches to the device (service/workers/pinned.py), with a
stand-in for the CUDA runtime (tests/fake_cudart.py): these machines have no GPU. What the H200 made of the real
calls is in bench/RESULTS.md (bench/worker_path.py)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from service.workers import shm
from service.workers.buckets import BucketedSession
from service.workers.pinned import PAGE_SIZE, CudaError, HostPinning, address
from tests.fake_cudart import FakeCudart, HostBuffers


def test_an_attached_arena_is_pinned_once_and_unpinned_before_it_is_released() -> None:
    cudart = FakeCudart()
    pinning = HostPinning(cudart)
    first, second = shm.Arena(), shm.Arena()
    reader = shm.Attachments(pinning=pinning)
    try:
        ref = first.write({"x": [np.arange(6, dtype=np.float32).reshape(2, 3)]})["x"]
        np.testing.assert_array_equal(reader.view(ref), np.arange(6).reshape(2, 3))
        reader.view(ref)  # the same arena: attached and pinned once
        where = address(reader.current[ref.segment].buf)
        assert cudart.calls == [("register", (where, first.ensure(0).size, 0))]
        assert pinning.pinned_bytes == first.ensure(0).size
        other = second.write({"x": [np.ones((1, 3), np.float32)]})["x"]
        reader.view(other)  # a new arena (the gateway grew its own): the old one is unpinned, then let go
        assert [name for name, _ in cudart.calls] == ["register", "unregister", "register"]
        assert cudart.calls[1] == ("unregister", (where,))
        reader.close()
        assert [name for name, _ in cudart.calls][-1] == "unregister" and pinning.pinned_bytes == 0
    finally:
        reader.close()
        first.close()
        second.close()


def test_a_refused_registration_stops_pinning_and_clears_the_cuda_error() -> None:
    cudart = FakeCudart(register_result=2)  # cudaErrorMemoryAllocation
    pinning = HostPinning(cudart)
    arena, reader = shm.Arena(), shm.Attachments(pinning=pinning)
    try:
        reader.view(arena.write({"x": [np.zeros((1, 4), np.float32)]})["x"])
        assert [name for name, _ in cudart.calls] == ["register", "last_error"]
        assert not pinning.enabled
        assert pinning.pin(4096, 4096) is None and len(cudart.calls) == 2, "no more attempts"
    finally:
        reader.close()
        arena.close()


class _Echo:
    """A session whose output is its input: shows what the bucketed session fed it."""

    def __init__(self) -> None:
        self.fed: list[np.ndarray[Any, Any]] = []

    def run(self, names: Any, feeds: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        self.fed.append(feeds["x"])
        return [feeds["x"] * 2]

    def get_outputs(self) -> list[Any]:
        return []

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider"]


def test_merged_and_padded_batches_go_through_pinned_page_aligned_buffers_and_a_lone_full_one_does_not() -> None:
    cudart = FakeCudart()
    echo = _Echo()
    session = BucketedSession(echo, lambda: echo, max_batch=8, keep=2, pinning=HostPinning(cudart))
    a, b = np.full((2, 3), 1.0, np.float32), np.full((1, 3), 2.0, np.float32)
    out = session.run_parts(None, {"x": [a, b]})[0]
    np.testing.assert_array_equal(out, np.concatenate([a, b]) * 2)
    staged = echo.fed[-1]
    assert staged.shape == (4, 3) and not staged[3:].any(), "padded with zero rows to the bucket"
    assert staged.ctypes.data % PAGE_SIZE == 0
    assert cudart.calls == [("register", (staged.ctypes.data, staged.nbytes, 0))]
    lone = np.ones((4, 3), np.float32)
    session.run(None, {"x": lone})
    assert echo.fed[-1] is lone, "a batch of a bucket's size runs where it is (the pinned arena)"
    session.run(None, {"x": np.ones((1, 3), np.float32)})  # bucket 1: a lone batch, no buffer
    session.run_parts(None, {"x": [b, b, b, b, b]})  # bucket 8: a second buffer
    session.run_parts(None, {"x": [a, a, a, a]})  # bucket 8 again: the same buffer
    assert [name for name, _ in cudart.calls] == ["register", "register"]
    session.run_parts(None, {"x": [b, b]})  # bucket 2, merged: past keep=2 the first buffer is unpinned, a third made
    assert [name for name, _ in cudart.calls] == ["register", "register", "unregister", "register"]
    assert cudart.calls[2] == ("unregister", (staged.ctypes.data,))


def test_device_copies_are_queued_on_the_legacy_stream_and_waited_for() -> None:
    import onnxruntime as ort

    cudart = FakeCudart()
    device = HostBuffers(ort, cudart)
    value = device.empty((3, 2), np.dtype(np.float32))
    assert value.shape() == [3, 2]
    rows = np.arange(4, dtype=np.float32).reshape(2, 2)
    device.copy_in(value.data_ptr(), rows.ctypes.data, rows.nbytes)
    device.zero(value.data_ptr() + rows.nbytes, 8)
    device.wait()
    np.testing.assert_array_equal(value.numpy(), [[0, 1], [2, 3], [0, 0]])
    assert cudart.calls == [
        ("copy", (value.data_ptr(), rows.ctypes.data, rows.nbytes, 1, None)),  # cudaMemcpyHostToDevice, stream 0
        ("memset", (value.data_ptr() + rows.nbytes, 0, 8, None)),
        ("synchronize", (None,)),
    ]


def test_a_failed_copy_raises_and_clears_the_cuda_error() -> None:
    import onnxruntime as ort

    cudart = FakeCudart(copy=700)  # cudaErrorIllegalAddress
    device = HostBuffers(ort, cudart)
    value = device.empty((1, 2), np.dtype(np.float32))
    with pytest.raises(CudaError, match="cudaMemcpyAsync failed with CUDA error 700"):
        device.copy_in(value.data_ptr(), np.zeros(2, np.float32).ctypes.data, 8)
    assert cudart.named() == ["copy", "last_error"], "cleared, or onnxruntime's next call would report it"


class _Meeting(_Echo):
    """An echo whose runs wait for each other: two batches are inside `run` at once, as in a CUDA worker's pool."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=10)

    def run(self, names: Any, feeds: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        self.fed.append(feeds["x"])
        snapshot = feeds["x"].copy()
        self.barrier.wait()  # both runs have their inputs in place; neither may have touched the other's
        self.barrier.wait()
        assert np.array_equal(feeds["x"], snapshot), "another run wrote into this run's buffers"
        return [feeds["x"] * 2]


def test_batches_of_one_shape_run_at_once_each_on_buffers_of_its_own() -> None:
    meeting = _Meeting(2)
    session = BucketedSession(meeting, lambda: meeting, max_batch=8, pinning=HostPinning(FakeCudart()))
    inputs = [np.full((3, 2), float(i + 1), np.float32) for i in range(2)]  # 3 rows each: both padded to 4
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda x: session.run_parts(None, {"x": [x[:1], x[1:]]})[0], inputs))
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(answer, x * 2)
    assert len({fed.ctypes.data for fed in meeting.fed}) == 2, "two sets of padded buffers, one per run"
    assert session.free_buffer_sets() == {4: 2}, "both sets kept for the next batches of that size"
