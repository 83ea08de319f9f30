"""What gRPC answers that their clients do not take hold of the gateway's memory, against what it counts. (issue 3)

Starts `migserve serve` on the tiny lns-organs (one CPU slice, `--grpc-port`, a `--max-pending-mb` that refuses
nothing here), then opens calls one after another, each on an HTTP/2 connection of its own that sends a batch of 4
CT tiles (an answer of 6 MB of logits) and takes none of the answer (bench/held_grpc.py): unary ModelInfer calls,
then one ModelStreamInfer call of several requests. After each it reads the gateway's resident memory (VmRSS) and
what `/metrics` counts as held (`migserve_request_body_bytes`), and gives both per byte of the answers held. Then
every client takes its answers, and both are read again. With `--leave` the clients take nothing and keep answering
the gateway's pings instead, until the gateway closes their connections for taking none of their answers for
`--send-timeout-s` (service/api/grpc_stalls.py): how long that took, and both read again.

    .venv/bin/python -m bench.grpc_unsent --calls 6 --stream 4
    .venv/bin/python -m bench.grpc_unsent --calls 6 --stream 4 --leave --send-timeout-s 30
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from bench.gateway_bench import ROOT, Server, export, metric, sample
from bench.grpc_bench import infer_request
from bench.held_grpc import HeldGrpcCall
from bench.image_memory import memory_status
from bench.ports import free_port
from migserve.contract import read_contract

MB = 1 << 20
BATCH = 4
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _settled(server: Server, wanted: int) -> tuple[int, int]:
    """The gateway's VmRSS and its count, once the count has stopped moving (or reached `wanted`) for 0.5 s."""
    last, steady_since = -1, time.monotonic()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        counted = int(metric(server.port, "migserve_request_body_bytes "))
        if counted != last:
            last, steady_since = counted, time.monotonic()
        elif counted >= wanted and time.monotonic() - steady_since >= 0.5:  # the stream's answers are made one by one
            break
        time.sleep(0.1)
    return memory_status(server.process.pid)["VmRSS"], last


def _dropped_after(server: Server, limit: float) -> float:
    """Seconds until the gateway counts nothing held (at most `limit`)."""
    since = time.monotonic()
    while int(metric(server.port, "migserve_request_body_bytes ")) and time.monotonic() - since < limit:
        time.sleep(0.1)
    return time.monotonic() - since


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=6, help="unary calls held at once (default: 6)")
    parser.add_argument("--stream", type=int, default=4, help="requests in the one stream held after them (default: 4)")
    parser.add_argument("--leave", action="store_true", help="take no answers: wait for the gateway to drop them")
    parser.add_argument("--send-timeout-s", default="600", help="the gateway's (default: 600, longer than the run)")
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    args = parser.parse_args()
    export(args.repo, "lns-organs")
    grpc_port = free_port()
    address = f"127.0.0.1:{grpc_port}"
    contract = read_contract(args.repo / "lns-organs")
    arrays = sample(json.loads((args.repo / "lns-organs" / "contract.json").read_text()), {}, BATCH)
    sizes = {name: r.default for name, r in contract.dims.items()} | {"batch": BATCH}
    answer = sum(math.prod(d if isinstance(d, int) else sizes[d] for d in t.shape) * np.dtype(t.dtype).itemsize for t in contract.outputs)
    serve = ("--cpu-slices", "1", "--models", "lns-organs", "--grpc-port", str(grpc_port), "--max-pending-mb", "4096")
    server = Server(args.repo, *serve, "--send-timeout-s", args.send_timeout_s)
    calls: list[HeldGrpcCall] = []
    try:
        warm = HeldGrpcCall(address, INFER, [infer_request("lns-organs", arrays, "warm")])  # gRPC's and the batcher's first allocations
        warm.take(timeout=60)
        warm.close()
        base, _ = _settled(server, 0)
        print(f"answer: {answer / MB:.2f} MB of logits; gateway after one answer taken: {base / MB:.1f} MB\n")
        print("| held | answers MB | gateway's VmRSS added, MB | per answer byte | counted, MB | per answer byte |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")

        def row(label: str, answers: int) -> None:
            rss, counted = _settled(server, answers * answer)
            added, held = rss - base, answers * answer
            per = [f"{x / held:.2f}" if held else "" for x in (added, counted)]
            print(f"| {label} | {held / MB:.1f} | {added / MB:.1f} | {per[0]} | {counted / MB:.1f} | {per[1]} |")

        for number in range(1, args.calls + 1):
            calls.append(HeldGrpcCall(address, INFER, [infer_request("lns-organs", arrays, f"u{number}")]))
            row(f"{number} unary", number)
        stream = [infer_request("lns-organs", arrays, f"s{i}") for i in range(args.stream)]
        calls.append(HeldGrpcCall(address, STREAM, stream))
        row(f"{args.calls} unary + a stream of {args.stream}", args.calls + args.stream)
        if not args.leave:
            for call in calls:
                call.take(timeout=120)
            row("all taken", 0)
            return 0
        dropped = _dropped_after(server, 3 * float(args.send_timeout_s) + 30)
        row("all left; connections closed", 0)
        ended = sum(call.ended.is_set() and b"grpc-status" not in call.headers for call in calls)
        print(
            f"\ncount at 0 {dropped:.1f} s after the last row (--send-timeout-s {args.send_timeout_s}); "
            f"{ended} of {len(calls)} connections closed with no answer taken"
        )
    finally:
        for call in calls:
            call.close()
        server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
