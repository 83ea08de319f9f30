"""Typed messages between the gateway and a worker process.

Only these small dataclasses cross the pipe (pickled); tensor bytes travel in
shared memory (`TensorRef` names a segment and an offset), so a CT volume is
written once by the gateway and read in place by onnxruntime.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection
from typing import Any, Literal


@dataclass(frozen=True)
class TensorRef:
    segment: str
    offset: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    sha256: str  # the contract's; the worker refuses a file that differs
    warmup: dict[str, tuple[tuple[int, ...], str]]  # input -> (shape at default dims, batch 1; dtype)
    max_batch: int | None = None  # the contract's largest batch; GPU sessions pad batches to buckets up to it
    memory_bytes: int = 0  # what placement takes the model to need on a partition (service/placement.py, footprint)


@dataclass(frozen=True)
class WorkerOptions:
    """How `serve` asks its workers to run models."""

    idle_priority: bool = False  # a CPU slice's worker under SCHED_IDLE: its cores run anything else first
    run_slices: Literal["auto", "off"] | int = "auto"  # CPU: batches run in slices of rows, timed at load or fixed (slices.py)
    conv_algo_search: str = "HEURISTIC"  # CUDA: how cuDNN picks convolution kernels (serve --cudnn-conv-algo-search)
    shape_sessions: int = 8  # CUDA: sessions per model, one per padded batch shape; 0: one session, no padding
    threads: int = 0  # batches a worker runs at once (serve --worker-threads); 0: GPU_THREADS on a GPU, 1 on a CPU slice
    in_flight: int = 1  # batches each process may have in flight on a worker running several (serve --batches-in-flight)
    timings: str | None = None  # CPU, run_slices auto: where the gateway's workers share what they timed (its memfd, slices.py)
    timings_cache: str | None = None  # the file kept between starts for `timings`, where it can be written (--cpu-run-slices-cache)
    arena_keep: int = 64 << 20  # shared memory arenas up to this size are kept between batches (serve --arena-keep-mb, shm.py)


@dataclass(frozen=True)
class WorkerSpec:
    partition: str
    device: str | None  # CUDA_VISIBLE_DEVICES for this process, None on a CPU slice
    cores: tuple[int, ...]
    models: tuple[ModelSpec, ...]
    options: WorkerOptions = field(default_factory=WorkerOptions)
    listen: str | None = None  # a Unix socket where the gateway's other front-end processes connect (serve --frontends)
    timed: Mapping[str, int] = field(default_factory=dict)  # model -> rows per run an earlier worker here chose (0: whole)


@dataclass(frozen=True)
class RunBatch:
    batch_id: int
    model: str
    inputs: dict[str, TensorRef]
    slot: int = 0  # which of the sender's arenas (one per batch it may have in flight) the inputs are in, and outputs go to


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Trim:
    """No batch of the sender's is in flight and none has come for a while: release its output arenas larger than
    WorkerOptions.arena_keep (the sender has let go of them)."""


@dataclass(frozen=True)
class LoadModel:
    """Load (or load again, replacing the running session) one model in a running worker."""

    model: ModelSpec


@dataclass(frozen=True)
class UnloadModel:
    model: str


@dataclass(frozen=True)
class ModelLoaded:
    model: str
    refused: str | None  # why the worker did not load it (sha256, onnxruntime); None: loaded and warmed up
    slice_rows: int | None = None  # rows per run at the model's default sizes where its batches run in slices
    timed: int | None = None  # what its timing chose (0: whole), for a restart to take; None where none ran


@dataclass(frozen=True)
class ModelUnloaded:
    model: str


class FailureKind(StrEnum):
    BAD_INPUT = "bad_input"  # onnxruntime rejected the tensors: the request's fault
    RUNTIME = "runtime"  # the model failed on valid input


@dataclass(frozen=True)
class WorkerReady:
    partition: str
    models: tuple[str, ...]
    providers: tuple[str, ...]  # what the loaded sessions run on (onnxruntime falls back to the CPU silently)
    refused: dict[str, str]  # model -> why it was not loaded (e.g. sha256 mismatch)
    device_warning: str | None = None  # a GPU or MIG partition whose models run on the CPU, and why
    pid: int | None = None  # the worker's, for a front-end process that did not start it
    threads: int = 1  # batches it runs at once
    slices: dict[str, int] = field(default_factory=dict)  # model -> rows per run at its default sizes, where sliced
    timed: dict[str, int] = field(default_factory=dict)  # model -> what its timing chose (0: whole), for a restart to take


@dataclass(frozen=True)
class BatchDone:
    batch_id: int
    outputs: dict[str, TensorRef]
    compute_s: float  # the model run's time; of a run merged with other front-ends' batches, this batch's rows' share


@dataclass(frozen=True)
class BatchFailed:
    batch_id: int
    kind: FailureKind
    message: str


ToWorker = RunBatch | Stop
FromWorker = WorkerReady | BatchDone | BatchFailed


def watch(conn: Connection, callback: Callable[..., None], *args: Any) -> None:
    """Call `callback(*args)` whenever `conn` has a message, in the running event loop.

    uvloop (libuv) makes a watched descriptor non-blocking, and a Connection reads and writes a
    message in several system calls: a message larger than the socket's buffer (a front-end's
    metrics for ten models) then failed halfway with BlockingIOError, an OSError that reads as a
    closed connection. The descriptor is made blocking again: messages are small and the other
    side writes them at once, so a read waits microseconds at most."""
    asyncio.get_running_loop().add_reader(conn.fileno(), callback, *args)
    os.set_blocking(conn.fileno(), True)
