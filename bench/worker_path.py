"""Where a batch's time goes between the gateway and the model: one model, a few batch sizes, several ways.

  direct   session.run on arrays made once (what gateway_bench's direct rows measure)
  fresh    session.run on a new copy of the arrays each time (not in the CPU's caches, as a batch from the gateway)
  worker   the worker's own code in this process: inputs written to a shared memory arena, read in place by
           run_batch, padded to a bucket on a GPU (service/workers/buckets.py), outputs written to an arena; on a
           GPU the arena is page-locked (service/workers/pinned.py) and a padded batch is copied from it straight
           into input buffers on the device
  merged   the batch as two halves from two arenas (two front-ends), run as one by run_merged, as the worker does
  threads2 worker, from two threads at once on the same sessions (a CUDA worker's pool, serve --worker-threads), each
           with its own arenas: ms per batch is the wall time over both threads' batches
  host     (GPU only) worker, with padded batches gathered in a page-locked host buffer first, the way before device buffers
  merged-host  (GPU only) merged, gathered on the host likewise
  unpinned (GPU only) host, with nothing page-locked, the way before page-locking
  process  a real worker process (WorkerReplica), one batch at a time over its pipe: adds the gateway's copy into
           shared memory, the pipe, the wake-ups and the gateway's copy of the outputs

Each way reports ms per batch (mean and p50) and rows/s. The gap between two adjacent ways is that step's cost.
Each worker way's answer is checked against direct's: the largest difference, as a share of the output's range,
is reported (`off`), and over 1% stops the bench.

    python -m bench.worker_path --repo DIR [--model face-pros] [--rows 8,15,32] [--seconds 2] [--device auto|cpu|GPU-UUID]

--device auto takes the first GPU NVML finds, else the CPU (one core for the process way, as a CPU slice).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.gateway_bench import sample
from migserve.types import Array
from service.backends.worker import WorkerReplica
from service.partitions import Partition, PartitionKind, discover
from service.placement import model_spec
from service.repository import load_model
from service.workers import shm
from service.workers.buckets import BucketedSession
from service.workers.pinned import HostPinning
from service.workers.process import cuda_pinning, load_sessions, run_batch, run_merged
from service.workers.protocol import BatchDone, RunBatch, WorkerSpec

Feeds = dict[str, np.ndarray[Any, Any]]


def timed(step: Callable[[], Any], seconds: float) -> list[float]:
    for _ in range(3):  # warm-up: first runs at a shape choose their kernels
        step()
    times, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def row(way: str, rows: int, times: list[float], off: float | None = None) -> dict[str, Any]:
    mean = statistics.fmean(times)
    return {
        "off": off,
        "way": way,
        "rows": rows,
        "batches": len(times),
        "mean_ms": mean * 1e3,
        "p50_ms": statistics.median(times) * 1e3,
        "rows_per_s": rows / mean,
    }


def in_process(spec: WorkerSpec, feeds: Feeds, seconds: float) -> list[dict[str, Any]]:
    import onnxruntime as ort

    sessions, refused = load_sessions(ort, spec)
    if refused:
        raise RuntimeError(f"the model was refused: {refused}")
    name = spec.models[0].name
    plain = sessions[name]
    plain = getattr(plain, "_first", plain)  # the direct way: the session without padding
    rows = next(iter(feeds.values())).shape[0]
    expected = plain.run(None, feeds)
    found = [row("direct", rows, timed(lambda: plain.run(None, feeds), seconds))]
    found.append(row("fresh", rows, timed(lambda: plain.run(None, {k: v.copy() for k, v in feeds.items()}), seconds)))
    pinning = cuda_pinning() if "CUDAExecutionProvider" in plain.get_providers() else None
    ways = [("worker", sessions, pinning, 1), ("merged", sessions, pinning, 2)]
    if pinning is not None:
        host = _gathered_on_host(load_sessions(ort, spec)[0])
        ways += [("host", host, pinning, 1), ("merged-host", host, pinning, 2)]
    for way, chosen, pinned, parts in ways:
        step = _worker_step(chosen, name, feeds, pinned, parts)
        found.append(row(way, rows, timed(step, seconds), off(step(), expected)))
        if way == "worker":
            steps = [step, _worker_step(chosen, name, feeds, pinned, parts)]
            worst: list[float] = []
            times = together(steps, seconds, functools.partial(_checked, worst, expected))
            found.append(row("threads2", rows, times, max(worst)))
    if pinning is not None:
        pinning.enabled = False  # new sessions, so that no padding buffer made above is pinned either
        unpinned = _gathered_on_host(load_sessions(ort, spec)[0])
        step = _worker_step(unpinned, name, feeds, None, 1)
        found.append(row("unpinned", rows, timed(step, seconds), off(step(), expected)))
        pinning.enabled = True
    return found


def together(steps: list[Callable[[], list[Array]]], seconds: float, check: Callable[[list[Array]], None]) -> list[float]:
    """Each step looped on a thread of its own for `seconds`, every answer checked; the wall time per batch of all of
    them together."""
    for step in steps:
        step()
    counts = [0] * len(steps)
    started = time.perf_counter()

    def loop(i: int) -> None:
        while time.perf_counter() - started < seconds:
            check(steps[i]())
            counts[i] += 1

    with ThreadPoolExecutor(len(steps)) as pool:
        list(pool.map(loop, range(len(steps))))
    elapsed = time.perf_counter() - started
    return [elapsed / max(sum(counts), 1)] * max(sum(counts), 1)


def _gathered_on_host(sessions: dict[str, Any]) -> dict[str, Any]:
    """The sessions, with padded and merged batches gathered in host buffers (the way before device buffers)."""
    for session in sessions.values():
        if isinstance(session, BucketedSession):
            session.device = None
    return sessions


def _checked(worst: list[float], expected: list[Array], got: list[Array]) -> None:
    worst.append(off(got, expected))


def off(got: list[Array], expected: list[Array]) -> float:
    """The largest difference from direct's answer, as a share of the output's range; over 1% stops the bench."""
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape, (g.shape, e.shape)
        spread = float(np.ptp(e)) or 1.0
        worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - e))) / spread)
    if worst > 0.01:
        raise AssertionError(f"the worker's answer is {worst:.2%} of the range away from direct's")
    return worst


def _worker_step(sessions: dict[str, Any], name: str, feeds: Feeds, pinning: HostPinning | None, parts: int) -> Callable[[], list[Array]]:
    """One batch as the worker runs it, its inputs written to arenas first (as the gateway's front-ends do): one
    arena, or `parts` arenas with a share of the rows each, merged by the worker. Returns the batch's outputs."""
    sent = [(shm.Arena(), shm.Attachments(pinning=pinning), shm.Arena(), shm.Attachments()) for _ in range(parts)]
    _arenas.extend(segment for ends in sent for segment in ends)
    rows = next(iter(feeds.values())).shape[0]
    cuts = [rows * i // parts for i in range(parts + 1)]

    def step() -> list[Array]:
        group: list[tuple[shm.Attachments, shm.Arena, RunBatch]] = []
        for (arena, inputs, outputs, _), (a, b) in zip(sent, itertools.pairwise(cuts), strict=True):
            refs = arena.write({k: [v[a:b]] for k, v in feeds.items()})
            group.append((inputs, outputs, RunBatch(len(group), name, refs)))
        replies = run_merged(sessions, group) if parts > 1 else [run_batch(sessions, group[0][2], *group[0][:2])]
        assert replies is not None, "the merged run failed"
        answers = []
        for (*_, reader), done in zip(sent, replies, strict=True):
            assert isinstance(done, BatchDone), done
            answers.append({k: reader.view(ref) for k, ref in done.outputs.items()})
        return [np.concatenate([a[o] for a in answers]) for o in answers[0]]

    return step


_arenas: list[shm.Arena | shm.Attachments] = []  # closed after each batch size


async def through_process(partition: Partition, repo: Path, model: str, feeds: Feeds, seconds: float) -> dict[str, Any]:
    replica = WorkerReplica(partition, {model: model_spec(load_model(repo / model))}, lambda: None)
    await replica.start()
    try:
        parts = {k: [v] for k, v in feeds.items()}
        for _ in range(3):
            await replica.submit(model, parts)
        times, started = [], time.perf_counter()
        while time.perf_counter() - started < seconds:
            t = time.perf_counter()
            await replica.submit(model, parts)
            times.append(time.perf_counter() - t)
    finally:
        await replica.stop()
    return row("process", next(iter(feeds.values())).shape[0], times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--model", default="face-pros")
    parser.add_argument("--rows", default="8,15,32", help="rows per batch, comma-separated (15 pads to 16 on a GPU)")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--device", default="auto", help="auto, cpu, or a GPU or MIG UUID")
    args = parser.parse_args()
    if args.device == "auto":
        gpu = next((p for p in discover(None, None) if p.kind in (PartitionKind.GPU, PartitionKind.MIG)), None)
        args.device = gpu.device if gpu is not None else "cpu"
    partition = (
        Partition("bench", PartitionKind.CPU, cores=(0,))
        if args.device == "cpu"
        else Partition("bench", PartitionKind.GPU, device=args.device)
    )
    entry = load_model(args.repo / args.model)
    contract = json.loads((args.repo / args.model / "contract.json").read_text())
    spec = WorkerSpec("bench", None if args.device == "cpu" else args.device, (), (model_spec(entry),))
    found = []
    for rows in (int(r) for r in args.rows.split(",")):
        feeds = sample(contract, {}, rows)
        found += in_process(spec, feeds, args.seconds)
        found.append(asyncio.run(through_process(partition, args.repo, args.model, feeds, args.seconds)))
        for segment in _arenas:
            segment.close()
        _arenas.clear()
        for r in [r for r in found if r["rows"] == rows]:
            shown = f"{r['mean_ms']:7.2f} ms/batch (p50 {r['p50_ms']:.2f})  {r['rows_per_s']:9.1f} rows/s"
            checked = f"  off {r['off']:.2e}" if r["off"] is not None else ""
            print(f"  {args.model} rows {r['rows']:3d} {r['way']:11s} {shown}{checked}", flush=True)
    print(json.dumps({"model": args.model, "device": args.device, "rows": found}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
