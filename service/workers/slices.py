"""CPU sessions that run a batch in slices of a size onnxruntime runs fastest per row.

The gateway batches requests to spend one round trip to a worker on many of them, but
on a CPU slice onnxruntime's time per row grows with the rows of a run once a run's
activations no longer fit the core's caches: face-pros (3x224x224) on one core of this
host took 0.47-0.52 ms a row at 2-8 rows and 0.56-0.64 ms at 32; crowd-csrnet
(3x256x256) 4.9 ms at 1 row and 5.5 ms at 8 (bench/run_slices.py, bench/RESULTS.md). So a
CPU worker times each model once as it loads it, at 1, 2, 4, ... rows up to the model's
largest batch, on its own cores and threads, and from then on runs a larger batch as
consecutive runs of the smallest size within TOLERANCE of the fastest per row (views of
the batch, no copy), joining their outputs. The gateway keeps each choice: a worker that
replaces a crashed one takes it rather than timing again (WorkerSpec.timed), and its
workers time a model once between them (agreed_rows), so equal slices run equal slices.

A slice is kept as input bytes, not rows: a batch of images smaller than the
contract's default size runs in slices of more rows, a larger one in fewer (at least
one). Rows are independent in these models (inference-mode batch norm), as the
dynamic batcher already assumes, so slicing changes no row's answer beyond rounding.
The timing stops at the first size whose run takes longer than `RUN_LIMIT_S`: a model
that slow (a CT volume) spends nothing on a round trip per row anyway, and is not
sliced; one whose warm-up run took over UNTIMED_AFTER_S is not timed at all, so that
its worker's start costs no run more. Nor is one whose outputs do not lead with the batch axis, nor one that runs
fastest per row at its largest size measured (a larger one might be faster still).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from migserve.types import Array

from .buckets import buckets
from .protocol import ModelSpec

logger = logging.getLogger(__name__)

RUN_LIMIT_S = 0.1  # a run at one size that takes longer ends the timing there
UNTIMED_AFTER_S = 1.0  # a model whose warm-up run took longer is not timed at all (not even one run more at start)
REPEATS = 3  # runs timed at each size, the fastest kept (the first at a new shape allocates)
TOLERANCE = 0.05  # sizes within 5% of the least time per row count as fastest; the smallest of them is taken
KEPT_TIMINGS = 1000  # choices a timings file keeps (--cpu-run-slices-cache: one per model file, core count, CPU, onnxruntime)

Warmup = Mapping[str, tuple[tuple[int, ...], str]]  # input -> (shape with batch 1, dtype), as ModelSpec.warmup


def time_per_row(
    session: Any, warmup: Warmup, max_batch: int, clock: Callable[[], float] = time.perf_counter
) -> tuple[dict[int, float], bool]:
    """Seconds per row of the fastest of REPEATS runs at 1, 2, 4, ... rows (zeros at the warm-up shape), up to
    `max_batch` or the first size slower than RUN_LIMIT_S a run (timed once); and whether every output led with the
    batch axis. The sizes take turns, a run of each per round, so a host that slows down or speeds up in the middle
    of the timing (this one drifts by 10-30% within minutes) moves every size's runs alike, not a few sizes'."""
    feeds: dict[int, dict[str, Array]] = {}
    runs: dict[int, list[float]] = {}
    batch_first = True

    def run(rows: int) -> float:
        nonlocal batch_first
        started = clock()
        outputs = session.run(None, feeds[rows])
        runs.setdefault(rows, []).append(clock() - started)
        batch_first = batch_first and all(np.ndim(o) > 0 and np.shape(o)[0] == rows for o in outputs)
        return runs[rows][-1]

    for rows in buckets(max_batch):  # the first round finds the sizes: up to the first slow one, timed once
        feeds[rows] = zeros(warmup, rows)
        if run(rows) > RUN_LIMIT_S:
            break
    again = [rows for rows, times in runs.items() if times[0] <= RUN_LIMIT_S]
    for _ in range(REPEATS - 1):
        for rows in again:
            run(rows)
    return {rows: min(times) / rows for rows, times in runs.items()}, batch_first


def _shrink_arena(session: Any, warmup: Warmup) -> None:
    """One more run at one row, after which onnxruntime gives back the arena memory the larger sizes took (a worker
    slicing its batches never needs it again): two workers of the ten tiny models held 572 MB at ready, 262 MB with
    it (`bench/restart.py --start`, bench/RESULTS.md)."""
    import onnxruntime as ort  # loaded already: `session` is one of its sessions

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session.run(None, zeros(warmup, 1), options)


def zeros(warmup: Warmup, rows: int) -> dict[str, Array]:
    """Zero inputs of `rows` rows at the warm-up shape."""
    return {name: np.zeros((rows, *shape[1:]), dtype) for name, (shape, dtype) in warmup.items()}


def fastest_rows(per_row: Mapping[int, float], batch_first: bool = True) -> int | None:
    """The rows a run should have at most: the smallest size within TOLERANCE of the least time per row; None (run
    batches whole) where the least is at the largest size measured, or where outputs cannot be joined along the
    batch axis. The smallest, because a worker under load shares the caches with the gateway and the other workers,
    and there smaller runs did better than the timing alone says (face-pros: bench/RESULTS.md)."""
    if not per_row or not batch_first:
        return None
    least = min(per_row.values())
    if per_row[max(per_row)] == least:
        return None
    return min(r for r, t in per_row.items() if t <= least * (1 + TOLERANCE))


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the machine's architecture where it says none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and value.strip():
                return value.strip()
    return platform.machine() or "unknown"


def timing_key(sha256: str, cores: int, runtime: str) -> str:
    """What a timing is kept under: the model file, the cores it ran on, the CPU and the onnxruntime version; what
    it found holds for another worker, or a later start, that runs the same file on as many cores of the same CPU
    with the same onnxruntime."""
    return f"{sha256}/{cores}/{cpu_model()}/onnxruntime {runtime}"


def agreed_rows(path: str, key: str, decide: Callable[[], int]) -> int:
    """The rows recorded under `key` in the JSON file at `path`, or `decide()`'s, recorded there: under an
    exclusive lock, so the gateway's workers time a model once between them (one at a time, each alone on its
    cores) and the others take that choice: every replica on equal slices runs the same slices. The kernel drops
    the lock of a worker killed while it holds it; a file it left half written counts as empty. A file that
    cannot be opened (the gateway's /proc entry out of reach) leaves this worker to decide alone, as it would
    without one."""
    try:
        file = Path(path).open("a+", encoding="utf-8")  # noqa: SIM115  (closed below)
    except OSError as exc:
        logger.warning("the gateway's shared timings (%s) cannot be opened (%s): this worker times its models alone", path, exc)
        return decide()
    with file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        known: dict[str, int] = {}
        with contextlib.suppress(ValueError):
            known = json.loads(file.read() or "{}")
        if key in known:
            return int(known[key])
        rows = decide()
        file.seek(0)
        file.truncate()
        kept = list((known | {key: rows}).items())[-KEPT_TIMINGS:]  # the oldest go first: a file kept for years stays small
        file.write(json.dumps(dict(kept)))
        return rows


def rows_of(session: Any) -> int:
    """Rows per run of a session made by SlicedSession.made (0: batches run whole)."""
    return session.rows if isinstance(session, SlicedSession) else 0


def _window(pieces: Sequence[Array], rows: Sequence[int], start: int, stop: int) -> Array:
    """Rows [start, stop) of `pieces` laid end to end: a view where they lie in one piece."""
    chosen, offset = [], 0
    for piece, count in zip(pieces, rows, strict=True):
        low, high = max(start - offset, 0), min(stop - offset, count)
        if low < high:
            chosen.append(piece[low:high])
        offset += count
        if offset >= stop:
            break
    return chosen[0] if len(chosen) == 1 else np.concatenate(chosen)


def warmup_row_bytes(warmup: Warmup) -> int:
    """Input bytes of one row at the warm-up (the contract's default) sizes."""
    return sum(int(np.prod(shape[1:])) * np.dtype(dtype).itemsize for shape, dtype in warmup.values())


def row_bytes(feeds: Mapping[str, Array]) -> int:
    """Input bytes of one row (every input leads with the batch axis)."""
    return sum(int(a.nbytes // max(a.shape[0], 1)) for a in feeds.values())


@dataclass
class SlicedSession:
    """A CPU session that runs at most `slice_bytes` of input per run; the rest of a session's API is the wrapped one's."""

    session: Any
    slice_bytes: int
    rows: int  # rows per slice at the warm-up shape (what /v1/partitions shows)

    @classmethod
    def made(cls, session: Any, model: ModelSpec, rows: int | Literal["auto"], warmup_s: float = 0.0) -> Any:
        """`session` sliced at `rows` at the model's default sizes, or at its fastest size per row ("auto"); or
        `session` itself where slicing gains nothing (the model takes one row, `rows` is 0 or its largest batch,
        or its warm-up run, `warmup_s`, was too slow for a round trip per row to matter)."""
        max_batch = model.max_batch or 1
        if rows == "auto" and max_batch > 1 and warmup_s <= UNTIMED_AFTER_S:
            try:
                found = fastest_rows(*time_per_row(session, model.warmup, max_batch))
            except Exception:  # onnxruntime's own types: a model that runs one row but not several runs batches as they come
                found = None
            _shrink_arena(session, model.warmup)  # one row, as its warm-up ran
        else:
            found = rows if isinstance(rows, int) else None
        if not found or found >= max_batch:
            return session
        return cls(session, found * warmup_row_bytes(model.warmup), found)

    def run(self, names: list[str] | None, feeds: Mapping[str, Array]) -> list[Array]:
        return self.run_parts(names, {name: [value] for name, value in feeds.items()})

    def run_parts(self, names: list[str] | None, parts: Mapping[str, Sequence[Array]]) -> list[Array]:
        """Batches merged from several front-ends (`parts`: each input's pieces, end to end) run in slices taken
        from the pieces where they lie, so the merged batch is never copied whole; a slice across two pieces is."""
        rows = [piece.shape[0] for piece in next(iter(parts.values()))]
        total = sum(rows)
        step = max(1, self.slice_bytes // max(row_bytes({name: pieces[0] for name, pieces in parts.items()}), 1))
        runs = [
            self.session.run(names, {name: _window(pieces, rows, start, min(start + step, total)) for name, pieces in parts.items()})
            for start in range(0, total, step)
        ]
        if len(runs) == 1:
            return list(runs[0])
        return [np.concatenate(column) for column in zip(*runs, strict=True)]

    def get_outputs(self) -> Any:
        return self.session.get_outputs()

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def get_providers(self) -> list[str]:
        return list(self.session.get_providers())
