"""Where a batch's time goes between the gateway and the model: one model, a few batch sizes, four ways.

  direct   session.run on arrays made once (what gateway_bench's direct rows measure)
  fresh    session.run on a new copy of the arrays each time (not in the CPU's caches, as a batch from the gateway)
  worker   the worker's own code in this process: inputs written to a shared memory arena, read in place by
           run_batch, padded to a bucket on a GPU (service/workers/buckets.py), outputs written to an arena; on a
           GPU the arena and the padding buffers are page-locked (service/workers/pinned.py)
  unpinned (GPU only) the same with nothing page-locked, as before 2026-11-30
  process  a real worker process (WorkerReplica), one batch at a time over its pipe: adds the gateway's copy into
           shared memory, the pipe, the wake-ups and the gateway's copy of the outputs

Each way reports ms per batch (mean and p50) and rows/s. The gap between two adjacent ways is that step's cost.

    python -m bench.worker_path --repo DIR [--model face-pros] [--rows 8,15,32] [--seconds 2] [--device auto|cpu|GPU-UUID]

--device auto takes the first GPU NVML finds, else the CPU (one core for the process way, as a CPU slice).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.gateway_bench import sample
from service.backends.local import WorkerReplica
from service.partitions import Partition, PartitionKind, discover
from service.placement import model_spec
from service.repository import load_model
from service.workers import shm
from service.workers.pinned import HostPinning
from service.workers.process import cuda_pinning, load_sessions, run_batch
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


def row(way: str, rows: int, times: list[float]) -> dict[str, Any]:
    mean = statistics.fmean(times)
    return {
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
    found = [row("direct", rows, timed(lambda: plain.run(None, feeds), seconds))]
    found.append(row("fresh", rows, timed(lambda: plain.run(None, {k: v.copy() for k, v in feeds.items()}), seconds)))
    pinning = cuda_pinning() if "CUDAExecutionProvider" in plain.get_providers() else None
    found.append(row("worker", rows, timed(_worker_step(sessions, name, feeds, pinning), seconds)))
    if pinning is not None:
        pinning.enabled = False  # new sessions, so that no padding buffer made above is pinned either
        unpinned, _ = load_sessions(ort, spec)
        found.append(row("unpinned", rows, timed(_worker_step(unpinned, name, feeds, None), seconds)))
        pinning.enabled = True
    return found


def _worker_step(sessions: dict[str, Any], name: str, feeds: Feeds, pinning: HostPinning | None) -> Callable[[], None]:
    """One batch as the worker runs it, its inputs written to an arena first (as the gateway does)."""
    arena, inputs, outputs = shm.Arena(), shm.Attachments(pinning=pinning), shm.Arena()
    _arenas.extend((arena, inputs, outputs))

    def step() -> None:
        refs = arena.write({k: [v] for k, v in feeds.items()})
        done = run_batch(sessions, RunBatch(1, name, refs), inputs, outputs)
        assert isinstance(done, BatchDone), done

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
            print(f"  {args.model} rows {r['rows']:3d} {r['way']:8s} {shown}", flush=True)
    print(json.dumps({"model": args.model, "device": args.device, "rows": found}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
