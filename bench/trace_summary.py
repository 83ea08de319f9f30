"""Where a request's time goes inside the gateway, from trace files (Triton's trace extension, service/trace.py).

Reads trace files (the gateway's, or tritonserver's whose entries hold one timestamp each) and prints, per
model, the mean, p50 and p99 in ms of each step between two timestamps:

  receive  HTTP_RECV_START -> HTTP_RECV_END    the body arriving, from its head to its last byte (HTTP only)
  start    HTTP_RECV_END -> REQUEST_START      waiting for the event loop to take the request up
  decode   REQUEST_START -> QUEUE_START        the body checked and turned into arrays
  queue    QUEUE_START -> COMPUTE_START        waiting for a free replica and a batch
  copy     COMPUTE_START -> COMPUTE_INPUT_END  the batch written into the worker's shared memory
  run      COMPUTE_INPUT_END -> COMPUTE_OUTPUT_START  the worker's round trip: the model run, pipe and wake-ups
  split    COMPUTE_OUTPUT_START -> COMPUTE_END  the request's rows cut out of the batch's outputs
  answer   COMPUTE_END -> REQUEST_END          the request's task woken and its answer encoded
  send     REQUEST_END -> HTTP_SEND_END        the answer handed to the socket (HTTP only)
  total    from the first stamp to the last

    .venv/bin/python -m bench.trace_summary TRACE_FILE [TRACE_FILE ...]
    .venv/bin/python -m bench.trace_summary --run face-pros [--concurrency 32] [--seconds 8] [--rate 10]

--run starts a gateway (`serve --trace-file` in a temporary directory, the model alone), traces every
--rate-th request while wrk keeps --concurrency binary requests in flight for --seconds, and summarises.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bench.gateway_bench import Server, bodies, closed_loop, export

STEPS = [
    ("receive", "HTTP_RECV_START", "HTTP_RECV_END"),
    ("start", "HTTP_RECV_END", "REQUEST_START"),
    ("decode", "REQUEST_START", "QUEUE_START"),
    ("queue", "QUEUE_START", "COMPUTE_START"),
    ("copy", "COMPUTE_START", "COMPUTE_INPUT_END"),
    ("run", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"),
    ("split", "COMPUTE_OUTPUT_START", "COMPUTE_END"),
    ("answer", "COMPUTE_END", "REQUEST_END"),
    ("send", "REQUEST_END", "HTTP_SEND_END"),
]


def read_traces(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Each trace as {"model_name", "stamps": {name: ns}}; tritonserver's one-timestamp entries merged by id."""
    merged: dict[tuple[Path, int], dict[str, Any]] = {}
    for path in paths:
        for entry in json.loads(path.read_text()):
            trace = merged.setdefault((path, entry["id"]), {"model_name": None, "stamps": {}})
            trace["model_name"] = entry.get("model_name", trace["model_name"])
            for stamp in entry.get("timestamps", []):
                trace["stamps"][stamp["name"]] = stamp["ns"]
    return list(merged.values())


def summary(traces: list[dict[str, Any]]) -> str:
    steps: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for trace in traces:
        stamps = trace["stamps"]
        for step, start, end in STEPS:
            if start in stamps and end in stamps:
                steps[trace["model_name"]][step].append((stamps[end] - stamps[start]) / 1e6)
        if len(stamps) > 1:
            steps[trace["model_name"]]["total"].append((max(stamps.values()) - min(stamps.values())) / 1e6)
    lines = ["| model | step | traces | mean ms | p50 ms | p99 ms |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for model, found in sorted(steps.items()):
        for step in [*(s for s, _, _ in STEPS), "total"]:
            values = np.array(found.get(step, []))
            if values.size:
                p50, p99 = np.percentile(values, [50, 99])
                lines.append(f"| {model} | {step} | {values.size} | {values.mean():.3f} | {p50:.3f} | {p99:.3f} |")
    return "\n".join(lines)


def run(model: str, concurrency: int, seconds: float, rate: int) -> tuple[list[Path], dict[str, Any]]:
    """A traced gateway under wrk's closed loop: the trace files it wrote, and the load's figures."""
    repo = Path("model_repo")
    export(repo, model)
    directory = Path(tempfile.mkdtemp(prefix="migserve-traces-"))
    trace_file = directory / "trace.json"
    server = Server(repo, "--models", model, "--trace-file", str(trace_file))
    try:
        settings = {"trace_level": ["TIMESTAMPS"], "trace_rate": str(rate), "log_frequency": "100"}
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/v2/trace/setting", data=json.dumps(settings).encode(), method="POST"
        )
        urllib.request.urlopen(request, timeout=10).close()
        body, headers = bodies(repo, model, {})["binary"]
        load = closed_loop(f"http://127.0.0.1:{server.port}/v2/models/{model}/infer", body, headers, concurrency, seconds)
    finally:
        server.close()  # what is still held goes to the next file
    time.sleep(0.1)
    return sorted(directory.iterdir()), load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--run", metavar="MODEL", help="trace a gateway under load instead of reading files")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=10, help="trace every N-th request (default: 10)")
    args = parser.parse_args()
    if args.run:
        files, load = run(args.run, args.concurrency, args.seconds, args.rate)
        print(f"{args.run}, concurrency {args.concurrency}: {load['samples_per_s']:.1f} requests/s, p50 {load['p50_ms']:.2f} ms")
    else:
        files = args.files
    if not files:
        parser.error("give trace files, or --run MODEL")
    print(summary(read_traces(files)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
