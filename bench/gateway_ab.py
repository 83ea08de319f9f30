"""Two gateway settings side by side, in interleaved rounds (issue 3).

This machine's speed drifts by 10-30% within minutes (neighbours on the host), so
two settings measured one after the other, as in `gateway_bench.py`, can differ by
more than the setting does. Here both gateways run at once (idle between points) and
each round loads A, then B, with the same closed-loop wrk load; the comparison is
the mean over rounds, and "cores busy" (CPU of gateway + workers + wrk per second),
which says how much of the machine a setting keeps working, with the machine's idle
share (/proc/stat) and the gateway's run-queue wait (/proc/PID/schedstat) during each
point (its 1 s warm-up included).

    .venv/bin/python -m bench.gateway_ab --rounds 5 --b=--cpu-worker-priority=idle
    .venv/bin/python -m bench.gateway_ab --rounds 6 --b= --a-revision cf18f99    # this code against an older commit
    .venv/bin/python -m bench.gateway_ab --rounds 4 --b= --a-revision fc56202 --body json --concurrency 8   # JSON tensors
    .venv/bin/python -m bench.gateway_ab --rounds 4 --b= --a-revision 71242c5 --protocol grpc   # unary gRPC calls (h2load)

--a-revision runs A's gateway as that git revision had it (a worktree under results/revisions/,
with this environment's packages): whether a change made the gateway slower.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gateway_bench import Server, bodies, busy, closed_loop, export, round_options
from bench.grpc_bench import answered, count_answered, grpc_message, h2load_loop
from bench.ports import free_port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    round_options(parser, rounds=5)
    parser.add_argument("--a", default="", help="serve arguments of A, '='-joined, comma-separated (default: none)")
    parser.add_argument("--b", default="--cpu-worker-priority=idle", help="serve arguments of B (default: %(default)s)")
    parser.add_argument("--a-revision", help="run A as this git revision had the service (default: this checkout)")
    parser.add_argument("--body", choices=("binary", "json"), default="binary", help="tensors as binary data or JSON (default: binary)")
    parser.add_argument(
        "--protocol",
        choices=("http", "grpc"),
        default="http",
        help="http: wrk, KServe v2 over HTTP/1.1; grpc: h2load, one unary ModelInfer call in flight per connection, raw contents "
        "(needs nghttp2-client; default: http)",
    )
    args = parser.parse_args()
    export(args.repo, args.model)
    settings = {"A": _serve_args(args.a), "B": _serve_args(args.b)}
    revisions = {"A": args.a_revision, "B": None}
    grpc_ports = {label: free_port() for label in settings}
    grpc = {label: ["--grpc-port", str(port)] if args.protocol == "grpc" else [] for label, port in grpc_ports.items()}
    servers = {
        label: Server(args.repo, "--models", args.model, *extra, *grpc[label], revision=revisions[label])
        for label, extra in settings.items()
    }
    load = _loader(args)
    points: dict[str, list[dict[str, Any]]] = {label: [] for label in settings}
    try:
        for round_ in range(1, args.rounds + 1):
            for label, server in servers.items():
                server.wait_idle(args.model)
                answered_before = answered(server.port, args.model)
                idle_before, wait_before, clock_before = _idle_ticks(), _run_queue_wait_ns(server.process.pid), time.monotonic()
                point = load(server, grpc_ports[label])
                elapsed = time.monotonic() - clock_before
                point["idle"] = (_idle_ticks() - idle_before) / (os.sysconf("SC_CLK_TCK") * elapsed * (os.cpu_count() or 1))
                point["gateway_wait"] = (_run_queue_wait_ns(server.process.pid) - wait_before) / 1e9 / elapsed
                if args.protocol == "grpc":  # outside the point's time: idle and run-queue figures are of the load alone
                    count_answered(server, args.model, answered_before, point, label)
                points[label].append(point)
                rate, idle, wait = point["samples_per_s"], point["idle"], point["gateway_wait"]
                print(
                    f"round {round_} {label}: {rate:.1f}/s, cores busy {busy(point):.2f}, idle {idle:.1%}, gateway waits {wait:.3f}",
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.close()
    what = "unary gRPC calls" if args.protocol == "grpc" else f"{args.body} tensors"
    print(f"\n{args.model}, concurrency {args.concurrency}, {args.rounds} rounds of {args.seconds:g} s, {what}\n")
    print(
        "| setting | serve arguments | samples/s (mean) | x A | cores busy | machine idle | gateway run-queue wait, s/s "
        f"| CPU ms/request: gateway / workers / {'h2load' if args.protocol == 'grpc' else 'wrk'} |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = statistics.mean(p["samples_per_s"] for p in points["A"])
    for label, extra in settings.items():
        rows = points[label]
        rate = statistics.mean(p["samples_per_s"] for p in rows)
        cpu = " / ".join(f"{statistics.mean(p[key] for p in rows):.2f}" for key in ("gateway_cpu_ms", "workers_cpu_ms", "client_cpu_ms"))
        shown = " ".join(extra) or "(defaults)"
        if revisions[label]:
            shown += f" at {revisions[label]}"
        idle, wait = statistics.mean(p["idle"] for p in rows), statistics.mean(p["gateway_wait"] for p in rows)
        cores = statistics.mean(busy(p) for p in rows)
        print(f"| {label} | `{shown}` | {rate:.1f} | {rate / base:.2f} | {cores:.2f} | {idle:.1%} | {wait:.3f} | {cpu} |")
    return 0


def _loader(args: argparse.Namespace) -> Callable[[Server, int], dict[str, Any]]:
    """One point of the closed-loop load on a gateway (given its gRPC port): wrk over HTTP, or h2load's unary calls."""
    body, headers = bodies(args.repo, args.model, {})[args.body]
    message = grpc_message(args.repo, args.model, {})

    def load(server: Server, grpc_port: int) -> dict[str, Any]:
        pid, frontends = server.process.pid, server.frontend_pids()  # with --frontends: gateway processes, not workers
        if args.protocol == "http":
            url = f"http://127.0.0.1:{server.port}/v2/models/{args.model}/infer"
            return closed_loop(url, body, headers, args.concurrency, args.seconds, server_pid=pid, frontend_pids=frontends)
        url = f"http://127.0.0.1:{grpc_port}/inference.GRPCInferenceService/ModelInfer"
        return h2load_loop(url, message, args.concurrency, 1, args.seconds, server_pid=pid, frontend_pids=frontends)

    return load


def _idle_ticks() -> int:
    """Idle + iowait clock ticks of the whole machine (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return int(fields[3]) + int(fields[4])


def _run_queue_wait_ns(pid: int) -> int:
    """Time the process has spent runnable but waiting for a CPU (/proc/PID/schedstat, second field)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])


def _serve_args(raw: str) -> list[str]:
    """'--x=1,--y=2' -> ['--x', '1', '--y', '2']."""
    found: list[str] = []
    for item in filter(None, raw.split(",")):
        found += item.split("=", 1)
    return found


if __name__ == "__main__":
    raise SystemExit(main())
