"""HTTP and gRPC into the same gateway, side by side in interleaved rounds (issue 3).

One gateway serves both (`--grpc-port`); each round loads it, one after the other,
with the same closed-loop load of one-sample requests at the same concurrency N:
  http          wrk, N keep-alive HTTP/1.1 connections, KServe v2 binary tensors
  grpc          h2load, N HTTP/2 connections with one ModelInfer call in flight each
  grpc-streams  h2load, one HTTP/2 connection with N calls in flight (what one
                `tritonclient.grpc` channel shared by N threads does)
and with --shm, a client on the same host that keeps its inputs in a shared memory region
(Triton's system shared memory extension) and sends only their names:
  http-shm      wrk, a JSON request naming the region; outputs binary as in `http`
  grpc-shm      h2load as in `grpc`, a ModelInferRequest naming the region
Both load generators are C (`apt-get install -y wrk nghttp2-client`): a Python gRPC
client would cost more CPU than the gateway on these two cores. h2load sends a
prepared ModelInferRequest (raw contents, as tritonclient sends) as a unary gRPC call;
it sees HTTP/2 status 200 even when the call fails with a gRPC status, so every
point is checked against the gateway's own count of answered (200) requests.
The comparison is the mean over rounds (this machine's speed drifts within minutes).
With --frontends 1,2 one gateway per count runs at once (`serve --frontends N`, where every
process serves HTTP and gRPC inference), idle between points, and each round loads every mode
on each in turn; every figure is then against the first gateway's http.

    .venv/bin/python -m bench.grpc_bench [--model face-pros] [--concurrency 32] [--rounds 3] [--seconds 6]
    .venv/bin/python -m bench.grpc_bench --model crowd-csrnet --dims height=16,width=16   # a tiny tensor
    .venv/bin/python -m bench.grpc_bench --shm                                             # and shared memory
    .venv/bin/python -m bench.grpc_bench --frontends 1,2                                   # one process or two
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import shared_memory

from bench.gateway_bench import (
    DATATYPES,
    Server,
    _children,
    _children_cpu_seconds,
    _cpu_seconds,
    bodies,
    busy,
    closed_loop,
    export,
    metric,
    round_options,
    sample,
)
from bench.ports import free_port
from migserve.types import Array

FINISHED = re.compile(r"finished in ([\d.]+)s")
REQUESTS = re.compile(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout")


def infer_request(model: str, arrays: dict[str, Array], request_id: str = "", region: str | None = None) -> bytes:
    """A serialized ModelInferRequest: raw contents, as tritonclient sends them, or with `region` each input named in
    that shared memory region, one after another."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    offset = 0
    for name, array in arrays.items():
        tensor = request.inputs.add(name=name, datatype=DATATYPES[array.dtype.name], shape=array.shape)
        if region is None:
            request.raw_input_contents.append(array.tobytes())
            continue
        tensor.parameters["shared_memory_region"].string_param = region
        tensor.parameters["shared_memory_byte_size"].int64_param = array.nbytes
        tensor.parameters["shared_memory_offset"].int64_param = offset
        offset += array.nbytes
    payload: bytes = request.SerializeToString()
    return payload


def grpc_message(repo: Path, model: str, dims: dict[str, int], region: str | None = None) -> bytes:
    """One request of a sample, framed as a gRPC message (flag byte, big-endian length) for h2load (`infer_request`)."""
    contract = json.loads((repo / model / "contract.json").read_text())
    payload = infer_request(model, sample(contract, dims, 1), region=region)
    return b"\0" + struct.pack(">I", len(payload)) + payload


def region_body(repo: Path, model: str, dims: dict[str, int], region: str) -> tuple[bytes, dict[str, str], list[Array]]:
    """A KServe v2 JSON request whose inputs are in `region` (one after another), outputs binary; and the inputs."""
    contract = json.loads((repo / model / "contract.json").read_text())
    arrays = sample(contract, dims, 1)
    inputs, offset = [], 0
    for name, array in arrays.items():
        where = {"shared_memory_region": region, "shared_memory_byte_size": array.nbytes, "shared_memory_offset": offset}
        inputs.append({"name": name, "datatype": "FP32", "shape": list(array.shape), "parameters": where})
        offset += array.nbytes
    outputs = [{"name": o["name"], "parameters": {"binary_data": True}} for o in contract["outputs"]]
    header = json.dumps({"inputs": inputs, "outputs": outputs}).encode()
    return header, {"Content-Type": "application/json"}, list(arrays.values())


def h2load_loop(
    url: str,
    message: bytes,
    connections: int,
    streams: int,
    seconds: float,
    *,
    server_pid: int,
    frontend_pids: Sequence[int] = (),
    threads: int = 1,
) -> dict[str, Any]:
    """A closed loop of unary gRPC calls from h2load (`threads` of them, at most one per connection); the same fields as
    gateway_bench.closed_loop (the gateway's CPU is that of its first process and of its other front-ends)."""
    with tempfile.TemporaryDirectory() as tmp:
        body, log = Path(tmp) / "request.grpc", Path(tmp) / "requests.log"
        body.write_bytes(message)
        base = ["h2load", f"-c{connections}", f"-m{streams}", f"-t{min(threads, connections)}"]
        base += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        base += ["-d", str(body)]
        subprocess.run([*base, "-D1", url], check=True, capture_output=True)  # warm-up, excluded
        front = [server_pid, *frontend_pids]
        server = front + [pid for pid in _children(server_pid) if pid not in frontend_pids]
        cpu_before, client_before = [_cpu_seconds(pid) for pid in server], _children_cpu_seconds()
        out = subprocess.run([*base, f"-D{seconds:g}", f"--log-file={log}", url], check=True, capture_output=True, text=True).stdout
        cpu = [_cpu_seconds(pid) - before for pid, before in zip(server, cpu_before, strict=True)]
        client_cpu = _children_cpu_seconds() - client_before
        durations = [int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.split("\t")[1] == "200"]
    finished, counts = FINISHED.search(out), REQUESTS.search(out)
    if finished is None or counts is None:
        raise RuntimeError(f"h2load printed no summary:\n{out}")
    succeeded = int(counts[3])
    per_request = 1000 / max(succeeded, 1)
    latencies = np.array(durations or [0]) / 1000
    return {
        "samples_per_s": succeeded / float(finished[1]),
        "requests": succeeded,
        "errors": int(counts[4]) + int(counts[5]) + int(counts[6]),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "gateway_cpu_ms": sum(cpu[: len(front)]) * per_request,
        "workers_cpu_ms": sum(cpu[len(front) :]) * per_request,
        "client_cpu_ms": client_cpu * per_request,
    }


def answered(port: int, model: str) -> float:
    """The gateway's count of requests it answered 200 for this model (both protocols)."""
    return metric(port, f'migserve_requests_total{{model="{model}",status="200"}} ')


Load = Callable[[], dict[str, Any]]
Modes = dict[str, tuple[Server, Load]]  # a mode's label -> the gateway it loads, and its load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    round_options(parser, rounds=3)
    parser.add_argument("--dims", default="", help="named dims other than the contract's defaults, e.g. height=16,width=16")
    parser.add_argument("--shm", action="store_true", help="also http-shm and grpc-shm: inputs in a shared memory region")
    parser.add_argument("--frontends", default="1", help="front-end process counts, one gateway each, e.g. 1,2 (default: 1)")
    args = parser.parse_args()
    dims = {k: int(v) for k, v in (item.split("=", 1) for item in filter(None, args.dims.split(",")))}
    counts = [int(n) for n in args.frontends.split(",") if n]
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        print(f"needs {' and '.join(missing)}: apt-get install -y wrk nghttp2-client", file=sys.stderr)
        return 2
    export(args.repo, args.model)
    servers: dict[int, tuple[Server, int]] = {}
    regions: list[Any] = []
    try:
        modes: Modes = {}
        for count in counts:
            grpc_port = free_port()
            server = Server(args.repo, "--models", args.model, "--grpc-port", str(grpc_port), "--frontends", str(count))
            servers[count] = server, grpc_port
            label = f" fe{count}" if len(counts) > 1 else ""
            these, region = _modes(args, dims, server, grpc_port, region=f"bench{count}")
            modes |= {mode + label: (server, load) for mode, load in these.items()}
            regions += [region] if region is not None else []
        points = _rounds(args.model, modes, args.rounds)
    finally:
        for server, _ in servers.values():
            server.close()
        for region in regions:
            shared_memory.destroy_shared_memory_region(region)
    size = f" at {args.dims}" if dims else ""
    print(f"\n{args.model}{size}, concurrency {args.concurrency}, {args.rounds} rounds of {args.seconds:g} s, one sample per request\n")
    print(_table(points))
    return 0


def _modes(args: argparse.Namespace, dims: dict[str, int], server: Server, grpc_port: int, *, region: str) -> tuple[dict[str, Load], Any]:
    """Each mode's load on this gateway, and the shared memory region its -shm modes read (None without --shm)."""
    http_url = f"http://127.0.0.1:{server.port}/v2/models/{args.model}/infer"
    grpc_url = f"http://127.0.0.1:{grpc_port}/inference.GRPCInferenceService/ModelInfer"
    n, seconds = args.concurrency, args.seconds
    pid, fronts = server.process.pid, server.frontend_pids()
    body, headers = bodies(args.repo, args.model, dims)["binary"]
    message = grpc_message(args.repo, args.model, dims)
    modes: dict[str, Load] = {
        "http": lambda: closed_loop(http_url, body, headers, n, seconds, server_pid=pid, frontend_pids=fronts),
        "grpc": lambda: h2load_loop(grpc_url, message, n, 1, seconds, server_pid=pid, frontend_pids=fronts),
        "grpc-streams": lambda: h2load_loop(grpc_url, message, 1, n, seconds, server_pid=pid, frontend_pids=fronts),
    }
    if not args.shm:
        return modes, None
    import tritonclient.http as httpclient  # here: it needs gevent, which a GPU machine's bare Python may lack

    # The inputs sit in one region, written once; every request names it (a client would write each request's).
    shm_body, shm_headers, arrays = region_body(args.repo, args.model, dims, region)
    nbytes = sum(a.nbytes for a in arrays)
    key = f"/migserve_bench_{os.getpid()}_{region}_inputs"  # this run's own: another bench on the host has its own
    handle = shared_memory.create_shared_memory_region(region, key, nbytes)
    shared_memory.set_shared_memory_region(handle, arrays)
    httpclient.InferenceServerClient(f"127.0.0.1:{server.port}").register_system_shared_memory(region, key, nbytes)
    shm_message = grpc_message(args.repo, args.model, dims, region=region)
    modes["http-shm"] = lambda: closed_loop(http_url, shm_body, shm_headers, n, seconds, server_pid=pid, frontend_pids=fronts)
    modes["grpc-shm"] = lambda: h2load_loop(grpc_url, shm_message, n, 1, seconds, server_pid=pid, frontend_pids=fronts)
    return modes, handle


def count_answered(server: Server, model: str, before: float, point: dict[str, Any], label: str) -> None:
    """The point's `answered`: requests the gateway answered 200 since `before` (its warm-up included), once idle. h2load
    counts a call that failed with a gRPC status as done (HTTP/2 status 200): fewer answered than it counted is an error."""
    time.sleep(0.5)  # the last answers of the point are counted
    server.wait_idle(model)
    point["answered"] = answered(server.port, model) - before
    if "requests" in point and point["answered"] < point["requests"]:
        raise RuntimeError(f"{label}: h2load counted {point['requests']} calls, the gateway answered {point['answered']:.0f}")


def _rounds(model: str, modes: Modes, rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Every mode once per round, in order; a point with failed requests stops the run."""
    points: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for round_ in range(1, rounds + 1):
        for mode, (server, load) in modes.items():
            server.wait_idle(model)
            before = answered(server.port, model)
            point = load()
            count_answered(server, model, before, point, mode)
            points[mode].append(point)
            print(
                f"round {round_} {mode:12s} {point['samples_per_s']:8.1f}/s p50 {point['p50_ms']:.2f} ms "
                f"p99 {point['p99_ms']:.2f} ms, gateway {point['gateway_cpu_ms']:.2f} ms CPU/request",
                flush=True,
            )
            if point["errors"]:
                raise RuntimeError(f"{mode}: {point['errors']} requests failed")
    return points


def _table(points: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| mode | samples/s (mean) | x http | p50 ms | p99 ms | CPU ms/request: gateway / workers / client | cores busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = statistics.mean(p["samples_per_s"] for p in next(iter(points.values())))  # the first gateway's http
    for mode, rows in points.items():
        rate = statistics.mean(p["samples_per_s"] for p in rows)
        p50, p99 = (statistics.mean(p[key] for p in rows) for key in ("p50_ms", "p99_ms"))
        cpu = " / ".join(f"{statistics.mean(p[key] for p in rows):.2f}" for key in ("gateway_cpu_ms", "workers_cpu_ms", "client_cpu_ms"))
        cores = statistics.mean(busy(p) for p in rows)
        lines.append(f"| {mode} | {rate:.1f} | {rate / base:.2f} | {p50:.2f} | {p99:.2f} | {cpu} | {cores:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
