"""onnxruntime's time per row by rows per run on one core, as a CPU worker times it at load (issue 3).

A CPU worker runs larger batches in slices of the size fastest per row (service/workers/slices.py). This
prints the timings behind that choice, on one core and one thread as a default CPU slice has them, for each
model at its contract's default sizes, and the size chosen; with --trials N, N timings in turn, to show how
steady the choice is on a noisy host.

    .venv/bin/python -m bench.run_slices                       # crowd-csrnet and face-pros, bench exports
    .venv/bin/python -m bench.run_slices --models face-pros --trials 5
    .venv/bin/python -m bench.run_slices --trials 1 --fresh    # inputs hot in the caches or fresh each run
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.gateway_bench import MODELS, ROOT, export
from migserve.types import Array
from service.placement import model_spec
from service.repository import load_model
from service.workers.affinity import pin_threads
from service.workers.buckets import buckets
from service.workers.process import _session_options
from service.workers.protocol import ModelSpec, WorkerSpec
from service.workers.slices import Warmup, fastest_rows, time_per_row, warmup_row_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    parser.add_argument("--trials", type=int, default=3, help="timings of each model, one after another (default: 3)")
    parser.add_argument("--core", type=int, default=0, help="the core to run on (default: 0)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="also time each size for 1 s with the same input every run (as the timing does, and direct onnxruntime in "
        "gateway_bench) and with a different one every run, from a pool larger than the caches (as a worker sees requests)",
    )
    args = parser.parse_args()
    pin_threads({args.core})
    for model in args.models:
        export(args.repo, model)
        spec, session = one_core_session(args.repo, model, args.core)
        shapes = ", ".join(f"{name} {list(shape[1:])}" for name, (shape, _) in spec.warmup.items())
        print(f"\n{model}: ms per row by rows per run (fastest of 3 runs), one core, one thread; a row is {shapes}\n")
        sizes = buckets(spec.max_batch or 1)
        print("| trial | " + " | ".join(f"{rows} rows" for rows in sizes) + " | slice chosen | timing took, s |")
        print("| ---: | " + " | ".join("---:" for _ in sizes) + " | ---: | ---: |")
        chosen: collections.Counter[str] = collections.Counter()
        for trial in range(1, args.trials + 1):
            started = time.perf_counter()
            per_row, batch_first = time_per_row(session, spec.warmup, spec.max_batch or 1)
            took = time.perf_counter() - started
            rows = fastest_rows(per_row, batch_first)
            chosen[str(rows or "whole batch")] += 1
            times = " | ".join(f"{per_row[r] * 1000:.3f}" if r in per_row else "-" for r in sizes)  # - : not timed (slow)
            print(f"| {trial} | {times} | {rows or 'whole batch'} | {took:.2f} |")
        print(f"\nchosen: {', '.join(f'{rows} ({n}x)' for rows, n in chosen.most_common())}")
        if args.fresh:
            _hot_and_cold(session, spec.warmup, sizes)
    return 0


POOL_BYTES = 128 << 20  # inputs cycled through for "fresh": four times this host's 32 MiB L3


def one_core_session(repo: Path, model: str, core: int) -> tuple[ModelSpec, ort.InferenceSession]:
    """The model's spec and a CPU session with a one-core slice's options (this process pinned to `core` already)."""
    spec = model_spec(load_model(repo / model))
    options = _session_options(ort, WorkerSpec(partition="bench", device=None, cores=(core,), models=()))
    return spec, ort.InferenceSession(spec.path, options, providers=["CPUExecutionProvider"])


def fresh_pool(rng: np.random.Generator, warmup: Warmup, rows: int) -> list[dict[str, Array]]:
    """Inputs of `rows` rows, POOL_BYTES of them in all (two at least): a run through them finds each new to the caches."""
    count = max(2, POOL_BYTES // (rows * warmup_row_bytes(warmup)))
    return [{name: _random(rng, (rows, *shape[1:]), dtype) for name, (shape, dtype) in warmup.items()} for _ in range(count)]


def _hot_and_cold(session: ort.InferenceSession, warmup: Warmup, sizes: tuple[int, ...]) -> None:
    """ms per row (mean over 1 s) with the same input every run and with a different one every run."""
    rng = np.random.default_rng(0)
    hot: list[float] = []
    cold: list[float] = []
    for rows in sizes:
        pool = fresh_pool(rng, warmup, rows)
        for label, inputs in (("hot", pool[:1]), ("cold", pool)):
            session.run(None, inputs[0])
            runs, started = 0, time.perf_counter()
            while time.perf_counter() - started < 1.0:
                session.run(None, inputs[runs % len(inputs)])
                runs += 1
            (hot if label == "hot" else cold).append((time.perf_counter() - started) / runs / rows * 1000)
    print("\n| input | " + " | ".join(f"{rows} rows" for rows in sizes) + " |")
    print("| --- | " + " | ".join("---:" for _ in sizes) + " |")
    print("| the same every run | " + " | ".join(f"{t:.3f}" for t in hot) + " |")
    print("| a fresh one every run | " + " | ".join(f"{t:.3f}" for t in cold) + " |")
    print("| fresh / same | " + " | ".join(f"{c / h:.2f}" for h, c in zip(hot, cold, strict=True)) + " |")


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> Array:
    if np.dtype(dtype).kind == "i":
        return rng.integers(2, 700, shape).astype(dtype)  # token ids in these vocabularies
    return rng.standard_normal(shape).astype(dtype)


if __name__ == "__main__":
    raise SystemExit(main())
