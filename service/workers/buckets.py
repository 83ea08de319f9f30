"""GPU sessions that see one input shape each: batches padded to a few sizes.

onnxruntime's CUDA convolutions (the cuDNN frontend path) build their execution plan
again whenever a run's input shape differs from the previous run's, with no cache
per shape. On an H200 that cost crowd-csrnet 30-34 ms per change with the heuristic
search and 165-250 ms with the exhaustive one (bench/RESULTS.md), and a dynamic
batcher changes the batch size from one batch to the next: at concurrency 8 the
gateway answered 80 requests/s where it answers 1,883 with the padding (same run).

So a GPU model runs each batch padded with zero rows up to the next bucket (powers of
two, and the model's largest batch), on a session kept for that exact set of input
shapes; the padding rows are cut from the outputs. Rows are independent in these
models (inference-mode batch norm), so padding changes no real row's answer. Sessions
are made on first use and the least recently used is dropped past `keep`, since each
holds its own copy of the weights on the device; where the device has no room for one
more, batches of a new shape run on an existing session (and pay the plan rebuild).

A batch that is padded or merged is copied part by part, from wherever its rows are,
into input buffers kept on the device per shape (`Device`, service/workers/pinned.py),
and run on them with an IOBinding; without a device to copy to, it is gathered into
page-locked host buffers instead.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from migserve.types import Array

from .pinned import PAGE_SIZE, HostPinning, Unpin, address

Shapes = tuple[tuple[str, tuple[int, ...]], ...]


def buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `max_batch`, then `max_batch` itself."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


def page_aligned(shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array:
    """An uninitialised array that starts on a page boundary (for cudaHostRegister)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + PAGE_SIZE, np.uint8)
    start = -raw.ctypes.data % PAGE_SIZE
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class _Staging:
    """One padded shape's input buffers, page-locked with `pinning` while they live."""

    def __init__(self, key: Shapes, dtypes: Mapping[str, np.dtype[Any]], pinning: HostPinning | None) -> None:
        self.arrays = {name: page_aligned(shape, dtypes[name]) for name, shape in key}
        self._unpin: list[Unpin] = []
        for array in self.arrays.values():
            if pinning is not None and (unpin := pinning.pin(address(array), array.nbytes)) is not None:
                self._unpin.append(unpin)

    def fill(self, parts: Mapping[str, Sequence[Array]], rows: int) -> dict[str, Array]:
        for name, pieces in parts.items():
            target, start = self.arrays[name], 0
            for piece in pieces:
                target[start : start + piece.shape[0]] = piece
                start += piece.shape[0]
            target[rows:] = 0
        return self.arrays

    def run(self, session: Any, names: list[str] | None, parts: Mapping[str, Sequence[Array]], rows: int) -> list[Array]:
        outputs: list[Array] = session.run(names, self.fill(parts, rows))
        return outputs

    def release(self) -> None:
        while self._unpin:
            self._unpin.pop()()


class Device(Protocol):
    """Where input buffers live and how host bytes get there: pinned.DeviceBuffers on a GPU."""

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any: ...  # an onnxruntime OrtValue
    def copy_in(self, target: int, source: int, size: int) -> None: ...
    def zero(self, target: int, size: int) -> None: ...
    def wait(self) -> None: ...


class _DeviceStaging:
    """One padded shape's input buffers on the device."""

    def __init__(self, key: Shapes, dtypes: Mapping[str, np.dtype[Any]], device: Device) -> None:
        self.device = device
        self.values = {name: device.empty(shape, dtypes[name]) for name, shape in key}
        self.sizes = {name: int(np.prod(shape)) * dtypes[name].itemsize for name, shape in key}

    def fill(self, parts: Mapping[str, Sequence[Array]], rows: int) -> dict[str, Any]:
        for name, pieces in parts.items():
            start = self.values[name].data_ptr()
            end, at = start + self.sizes[name], start
            for piece in pieces:
                piece = np.ascontiguousarray(piece)  # a view of an arena already is: no copy
                self.device.copy_in(at, piece.ctypes.data, piece.nbytes)
                at += piece.nbytes
            if at < end:
                self.device.zero(at, end - at)  # padding rows: zero, as on the host
        self.device.wait()
        return self.values

    def run(self, session: Any, names: list[str] | None, parts: Mapping[str, Sequence[Array]], rows: int) -> list[Array]:
        return run_bound(session, names, self.fill(parts, rows))

    def release(self) -> None:
        self.values.clear()


def run_bound(session: Any, names: list[str] | None, values: Mapping[str, Any]) -> list[Array]:
    """A run on inputs already on the device (OrtValues), with the outputs on the host."""
    binding = session.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for name in names if names is not None else [o.name for o in session.get_outputs()]:
        binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    outputs: list[Array] = binding.copy_outputs_to_cpu()
    return outputs


class BucketedSession:
    """Quacks like an onnxruntime InferenceSession for the worker: run, get_outputs, get_providers; and run_parts,
    which runs several batches as one. Padded or merged batches are copied into buffers kept per shape: on `device`
    where there is one, else on the host (page-locked with `pinning`, service/workers/pinned.py); a lone batch of a
    bucket's exact size runs where it is. Threads may run batches at once (a CUDA worker's pool): each takes a shape's
    buffers for itself while it runs, so two batches of one shape use two sets."""

    def __init__(
        self,
        first: Any,
        make: Callable[[], Any],
        max_batch: int,
        *,
        keep: int = 8,
        pinning: HostPinning | None = None,
        device: Device | None = None,
    ) -> None:
        self._first = first  # already loaded and warmed up: serves the first shapes it meets
        self._make = make
        self._sessions: OrderedDict[Shapes, Any] = OrderedDict()
        self._staging: OrderedDict[Shapes, list[_Staging | _DeviceStaging]] = OrderedDict()  # the sets not in use
        self._lock = threading.Lock()  # the two dicts; held while a session is made
        self._pinning = pinning
        self.device = device  # None: padded and merged batches are gathered on the host (bench/worker_path.py compares)
        self.buckets = buckets(max_batch)
        self.keep = keep
        self._full = False  # a session could not be made: no more are tried

    def get_outputs(self) -> Any:
        return self._first.get_outputs()

    def get_providers(self) -> list[str]:
        providers: list[str] = self._first.get_providers()
        return providers

    @property
    def shapes(self) -> list[Shapes]:
        """The input shapes that have a session now, least recently used first."""
        return list(self._sessions)

    def free_buffer_sets(self) -> dict[int, int]:
        """Batch size -> sets of padding buffers kept and not in use now."""
        with self._lock:
            return {key[0][1][0]: len(free) for key, free in self._staging.items()}

    def _new_session(self, key: Shapes) -> Any:
        """A session for a new shape. Where the device has no room for one more (onnxruntime raises), the most
        recently used session runs it instead, at the cost of a plan rebuild, and the pool stops growing."""
        if not self._sessions:
            session = self._first
        elif self._full:
            return next(reversed(self._sessions.values()))
        else:
            try:
                session = self._make()
            except Exception:  # onnxruntime's own types: out of device memory, mostly
                self._full, self.keep = True, len(self._sessions)
                return next(reversed(self._sessions.values()))
        self._sessions[key] = session
        while len(self._sessions) > self.keep:
            self._sessions.popitem(last=False)
        return session

    def run(self, names: list[str] | None, feeds: Mapping[str, Array]) -> list[Array]:
        return self.run_parts(names, {name: [value] for name, value in feeds.items()})

    def run_parts(self, names: list[str] | None, parts: Mapping[str, Sequence[Array]]) -> list[Array]:
        """Each input's parts, concatenated along the batch axis and padded to a bucket, run as one batch."""
        pieces = next(iter(parts.values()))
        rows = sum(piece.shape[0] for piece in pieces)
        bucket = next((b for b in self.buckets if b >= rows), rows)  # past the largest bucket: as it comes
        key: Shapes = tuple((name, (bucket, *p[0].shape[1:])) for name, p in parts.items())
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._new_session(key)
            else:
                self._sessions.move_to_end(key)
        outputs: list[Array]
        if len(pieces) == 1 and bucket == rows:
            outputs = session.run(names, {name: p[0] for name, p in parts.items()})
        else:
            staging = self._take(key, {name: p[0].dtype for name, p in parts.items()})
            try:
                outputs = staging.run(session, names, parts, rows)
            finally:
                self._give_back(key, staging)
        return outputs if bucket == rows else [output[:rows] for output in outputs]

    def _take(self, key: Shapes, dtypes: Mapping[str, np.dtype[Any]]) -> _Staging | _DeviceStaging:
        """A set of buffers of this shape for one run, reused where one is free; `keep` shapes are kept."""
        with self._lock:
            free = self._staging.get(key)
            if free is None:
                free = self._staging[key] = []
                while len(self._staging) > max(self.keep, 1):
                    for dropped in self._staging.popitem(last=False)[1]:
                        dropped.release()
            else:
                self._staging.move_to_end(key)
            if free:
                return free.pop()
        return _DeviceStaging(key, dtypes, self.device) if self.device is not None else _Staging(key, dtypes, self._pinning)

    def _give_back(self, key: Shapes, staging: _Staging | _DeviceStaging) -> None:
        with self._lock:
            free = self._staging.get(key)
            if free is None:
                staging.release()  # its shape was dropped while it ran
            else:
                free.append(staging)
