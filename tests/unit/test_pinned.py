"""Page-locking a CUDA worker's input memory (service/workers/pinned.py), with a stand-in for the CUDA runtime.

These machines have no GPU, so the CUDA runtime is replaced by an object with the same three C functions that
records its calls; what the H200 made of real registration is in bench/RESULTS.md (bench/worker_path.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.workers import shm
from service.workers.buckets import BucketedSession
from service.workers.pinned import PAGE_SIZE, HostPinning, address


class _Function:
    def __init__(self, calls: list[tuple[str, tuple[Any, ...]]], name: str, result: int = 0) -> None:
        self.calls, self.name, self.result = calls, name, result
        self.argtypes: list[Any] = []
        self.restype: Any = None

    def __call__(self, *args: Any) -> int:
        self.calls.append((self.name, args))
        return self.result


class FakeCudart:
    """cudaHostRegister, cudaHostUnregister and cudaGetLastError, recorded."""

    def __init__(self, register_result: int = 0) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.cudaHostRegister = _Function(self.calls, "register", register_result)
        self.cudaHostUnregister = _Function(self.calls, "unregister")
        self.cudaGetLastError = _Function(self.calls, "last_error")


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
    session.run_parts(None, {"x": [b, b]})  # bucket 2, merged: a third buffer, past keep=2: the first is unpinned
    assert [name for name, _ in cudart.calls] == ["register", "register", "register", "unregister"]
    assert cudart.calls[-1] == ("unregister", (staged.ctypes.data,))
