"""Where a CPU worker's time goes under load, against onnxruntime alone on one core (issue 3).

The workers take most of the CPU a face-pros request costs behind the gateway (bench/RESULTS.md). This measures, in
one run: onnxruntime alone in this process on one core, one thread, at the rows a worker runs at once (its run
slice, from /v1/partitions), for `--seconds`, fresh inputs every run (CPU ms per row); then a gateway's worker under
wrk's closed loop at `--concurrency` (its CPU ms per request, as bench/gateway_bench.py counts it), with `perf stat`
(page faults, context switches) and `perf record` (CPU samples by library) of the first worker meanwhile.

    .venv/bin/python -m bench.worker_profile --model face-pros    # needs wrk and perf (linux-perf)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.gateway_bench import ROOT, Server, bodies, closed_loop, export
from bench.run_slices import fresh_pool, one_core_session
from service.workers.affinity import pin_threads


def alone_ms_per_row(repo: Path, model: str, rows: int, seconds: float, core: int) -> float:
    """CPU ms per row of onnxruntime on `core`, one thread, `rows` rows a run, a fresh input every run."""
    pin_threads({core})
    spec, session = one_core_session(repo, model, core)
    pool = fresh_pool(np.random.default_rng(0), spec.warmup, rows)
    session.run(None, pool[0])
    runs, cpu, wall = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - wall < seconds:
        session.run(None, pool[runs % len(pool)])
        runs += 1
    return (time.process_time() - cpu) / (runs * rows) * 1000


def perf_of(pid: int, seconds: float, data: Path) -> tuple[dict[str, float], dict[str, float]]:
    """`perf stat` (events per second) then `perf record` of `pid`, `seconds` each; the samples' shares by library."""
    events = "page-faults,context-switches,cpu-migrations"
    stat = subprocess.run(
        ["perf", "stat", "-x,", "-e", events, "-p", str(pid), "sleep", str(seconds)], check=False, capture_output=True, text=True
    )
    rates = {line.split(",")[2]: float(line.split(",")[0]) / seconds for line in stat.stderr.splitlines() if line.count(",") >= 3}
    record = ["perf", "record", "-F", "999", "-o", str(data), "-p", str(pid), "--", "sleep", str(seconds)]
    subprocess.run(record, check=False, capture_output=True)
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio"], check=False, capture_output=True, text=True
    ).stdout
    shares = {}
    for line in report.splitlines():
        if (found := re.match(r"\s+([\d.]+)%\s+(\S+)", line)) and not line.lstrip().startswith("#"):
            shares[found[2]] = float(found[1])
    return rates, shares


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="face-pros")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="each measurement (default: 5)")
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    args = parser.parse_args()
    export(args.repo, args.model)
    server = Server(args.repo, "--models", args.model)
    try:
        (first, *_) = server.partitions()
        rows = int(first["run_slices"].get(args.model, 0)) if isinstance(first["run_slices"], dict) else 0
        cores = os.sched_getaffinity(0)
        alone = alone_ms_per_row(args.repo, args.model, rows or 1, args.seconds, max(cores))
        os.sched_setaffinity(0, cores)  # wrk, started below, runs where it likes
        body, headers = bodies(args.repo, args.model, {})["binary"]
        url = f"http://127.0.0.1:{server.port}/v2/models/{args.model}/infer"
        load: dict[str, Any] = {}
        seconds = 2 * args.seconds + 3
        loading = threading.Thread(
            target=lambda: load.update(closed_loop(url, body, headers, args.concurrency, seconds, server_pid=server.process.pid))
        )
        loading.start()
        time.sleep(2)  # wrk's warm-up second, and one more
        with tempfile.TemporaryDirectory() as scratch:
            pid = first["pid"]
            assert isinstance(pid, int)
            rates, shares = perf_of(pid, args.seconds, Path(scratch) / "perf.data")
        loading.join()
    finally:
        server.close()
    slices = f"a worker runs {rows} rows at once" if rows else "a worker runs batches whole"
    print(f"\n{args.model}, concurrency {args.concurrency}, the gateway's default CPU slices; {slices}\n")
    print("| measured | CPU ms per row |")
    print("| --- | ---: |")
    print(f"| onnxruntime alone, one core, {rows or 1} rows a run, fresh inputs | {alone:.3f} |")
    print(f"| the workers under load, per request | {load['workers_cpu_ms']:.3f} |")
    print(f"| ratio | {load['workers_cpu_ms'] / alone:.2f} |")
    print(
        f"\nthe load: {load['samples_per_s']:.1f} samples/s, CPU ms per request gateway {load['gateway_cpu_ms']:.3f}, wrk "
        f"{load['client_cpu_ms']:.3f}"
    )
    print("first worker, per second: " + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()))
    print("its CPU samples by library: " + ", ".join(f"{dso} {share:.1f}%" for dso, share in list(shares.items())[:6]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
