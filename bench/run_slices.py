"""onnxruntime's time per row by rows per run on one core, as a CPU worker times it at load (issue 3).

A CPU worker runs larger batches in slices of the size fastest per row (service/workers/slices.py). This
prints the timings behind that choice, on one core and one thread as a default CPU slice has them, for each
model at its contract's default sizes, and the size chosen; with --trials N, N timings in turn, to show how
steady the choice is on a noisy host.

    .venv/bin/python -m bench.run_slices                       # crowd-csrnet and face-pros, bench exports
    .venv/bin/python -m bench.run_slices --models face-pros --trials 5
"""

from __future__ import annotations

import argparse
import collections
import os
import time
from pathlib import Path

import onnxruntime as ort

from bench.gateway_bench import MODELS, ROOT, export
from service.placement import model_spec
from service.repository import load_model
from service.workers.buckets import buckets
from service.workers.slices import fastest_rows, time_per_row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    parser.add_argument("--trials", type=int, default=3, help="timings of each model, one after another (default: 3)")
    parser.add_argument("--core", type=int, default=0, help="the core to run on (default: 0)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    for model in args.models:
        export(args.repo, model)
        spec = model_spec(load_model(args.repo / model))
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(spec.path, options, providers=["CPUExecutionProvider"])
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
