"""A gRPC stream whose client sends many requests and takes none of the answers: what the gateway does and holds. (issue 3)

Starts `migserve serve` on the tiny crowd-csrnet (one CPU slice, `--grpc-port`, a `--send-timeout-s` longer than the
run), then one ModelStreamInfer call over a raw HTTP/2 connection (bench/held_grpc.py) that sends `--requests` small
requests (a 16x16 image each, 3 KB) as fast as the gateway reads them and keeps its window shut. Every two seconds it
prints how many requests the gateway has answered (`migserve_requests_total`), its resident memory (VmRSS) above what
it had before the call, and what `/metrics` counts as held (`migserve_request_body_bytes`). Then the client takes every
answer, and the bench checks that each request got one.

    .venv/bin/python -m bench.grpc_flood --requests 100000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tritonclient.grpc import service_pb2

from bench.gateway_bench import ROOT, Server, export, metric
from bench.grpc_bench import infer_request
from bench.held_grpc import HeldGrpcCall
from bench.image_memory import memory_status
from bench.ports import free_port

MB = 1 << 20
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests the stream sends (default: 100000)")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long the answers are left untaken (default: 6)")
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    args = parser.parse_args()
    export(args.repo, "crowd-csrnet")
    grpc_port = free_port()
    server = Server(args.repo, "--cpu-slices", "1", "--models", "crowd-csrnet", "--grpc-port", str(grpc_port), "--send-timeout-s", "600")
    answered = 'migserve_requests_total{model="crowd-csrnet",status="200"}'
    try:
        request = infer_request("crowd-csrnet", {"image": np.ones((1, 3, 16, 16), np.float32)}, "r")
        base = memory_status(server.process.pid)["VmRSS"]
        call = HeldGrpcCall(f"127.0.0.1:{grpc_port}", STREAM, [request] * args.requests)
        print(f"{args.requests} requests of {len(request)} bytes ({args.requests * len(request) / MB:.0f} MB), answers not taken\n")
        print("| seconds | requests sent | answered | gateway's VmRSS added, MB | counted, MB |")
        print("| ---: | --- | ---: | ---: | ---: |")
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < args.seconds:
            time.sleep(2)
            rss = (memory_status(server.process.pid)["VmRSS"] - base) / MB
            counted = float(metric(server.port, "migserve_request_body_bytes ")) / MB
            sent = "all" if call.sent.is_set() else "not all"
            print(f"| {elapsed + 2:.0f} | {sent} | {metric(server.port, answered):.0f} | {rss:.1f} | {counted:.2f} |")
        answers = [service_pb2.ModelStreamInferResponse.FromString(m) for m in call.take(timeout=600)]
        failed = sum(bool(a.error_message) for a in answers)
        print(f"\nthen taken: {len(answers)} answers, {failed} of them errors")
        call.close()
        return 0 if len(answers) == args.requests and not failed else 1
    finally:
        server.close()


if __name__ == "__main__":
    raise SystemExit(main())
