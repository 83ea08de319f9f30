"""The gateway against direct onnxruntime at its best batch, in interleaved rounds (issue 3's ratio).

`gateway_bench.py` measures every gateway mode and then direct onnxruntime, minutes apart; on this host,
whose speed drifts by 10-30% within minutes, the same code's face-pros ratio came out 0.39x in one run
and 0.66x in another, with direct's best at 3586.8 and 2699.8 samples/s. Here each round measures direct
onnxruntime (every batch size for --direct-seconds each, in-process with a thread per core; the best
counts) and then the gateway under wrk's closed loop, so each round's ratio compares the two under the
same host conditions; the figure is the mean ratio over the rounds.

    .venv/bin/python -m bench.direct_ab --rounds 5                                  # face-pros, c=32, binary
    .venv/bin/python -m bench.direct_ab --model crowd-csrnet --rounds 4
    .venv/bin/python -m bench.direct_ab --serve=--cpu-worker-priority=idle         # a gateway setting
"""

from __future__ import annotations

import argparse
import statistics

from bench.gateway_ab import _serve_args
from bench.gateway_bench import Server, bodies, closed_loop, direct, export, round_options


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    round_options(parser, rounds=5)
    parser.add_argument("--serve", default="", help="the gateway's serve arguments, '='-joined, comma-separated (default: none)")
    parser.add_argument("--body", choices=("binary", "json"), default="binary", help="tensors as binary data or JSON (default: binary)")
    parser.add_argument("--direct-seconds", type=float, default=1.0, help="direct onnxruntime's time at each batch size (default: 1)")
    args = parser.parse_args()
    export(args.repo, args.model)
    extra = _serve_args(args.serve)
    server = Server(args.repo, "--models", args.model, *extra)
    body, headers = bodies(args.repo, args.model, {})[args.body]
    url = f"http://127.0.0.1:{server.port}/v2/models/{args.model}/infer"
    rounds: list[tuple[float, int, float, str]] = []  # direct best samples/s, its batch, gateway samples/s, its CPU
    try:
        for round_ in range(1, args.rounds + 1):
            best = max(direct(args.repo, args.model, {}, args.direct_seconds), key=lambda row: row["samples_per_s"])
            server.wait_idle(args.model)
            point = closed_loop(url, body, headers, args.concurrency, args.seconds, server_pid=server.process.pid)
            cpu = " / ".join(f"{point[k] or 0:.2f}" for k in ("gateway_cpu_ms", "workers_cpu_ms", "client_cpu_ms"))
            rounds.append((best["samples_per_s"], best["batch"], point["samples_per_s"], cpu))
            print(
                f"round {round_}: direct {best['samples_per_s']:.1f}/s (batch {best['batch']}), gateway {point['samples_per_s']:.1f}/s, "
                f"{point['samples_per_s'] / best['samples_per_s']:.2f}x",
                flush=True,
            )
    finally:
        server.close()
    shown = " ".join(extra) or "(defaults)"
    print(f"\n{args.model}, concurrency {args.concurrency}, {args.body} tensors, gateway `{shown}`, {args.rounds} rounds\n")
    print("| round | direct best, samples/s (batch) | gateway, samples/s | x direct | CPU ms per request: gateway / workers / wrk |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for i, (limit, batch, gateway, cpu) in enumerate(rounds, 1):
        print(f"| {i} | {limit:.1f} ({batch}) | {gateway:.1f} | {gateway / limit:.2f} | {cpu} |")
    ratios = [gateway / limit for limit, _, gateway, _ in rounds]
    print(f"\nmean {statistics.mean(ratios):.2f}x direct at best batch (rounds {min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
