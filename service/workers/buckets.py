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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from migserve.types import Array

Shapes = tuple[tuple[str, tuple[int, ...]], ...]


def buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `max_batch`, then `max_batch` itself."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


def pad_rows(array: Array, rows: int) -> Array:
    if array.shape[0] == rows:
        return array
    padded = np.zeros((rows, *array.shape[1:]), array.dtype)
    padded[: array.shape[0]] = array
    return padded


class BucketedSession:
    """Quacks like an onnxruntime InferenceSession for the worker: run, get_outputs, get_providers."""

    def __init__(self, first: Any, make: Callable[[], Any], max_batch: int, keep: int = 8) -> None:
        self._first = first  # already loaded and warmed up: serves the first shapes it meets
        self._make = make
        self._sessions: OrderedDict[Shapes, Any] = OrderedDict()
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
        rows = next(iter(feeds.values())).shape[0]
        bucket = next((b for b in self.buckets if b >= rows), rows)  # past the largest bucket: as it comes
        padded = {name: pad_rows(value, bucket) for name, value in feeds.items()}
        key: Shapes = tuple((name, value.shape) for name, value in padded.items())
        session = self._sessions.get(key)
        if session is None:
            session = self._new_session(key)
        else:
            self._sessions.move_to_end(key)
        outputs: list[Array] = session.run(names, padded)
        return outputs if bucket == rows else [output[:rows] for output in outputs]
