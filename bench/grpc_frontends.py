"""gRPC inference with one front-end process against two, in interleaved rounds (issue 3).

`serve --frontends 2 --grpc-port P` runs gRPC inference in both processes (service/api/grpc_service.py);
before, only the first process served gRPC. Both gateways run at once (idle between points), and each
round loads A (`--frontends 1`) then B (`--frontends 2`) with the same closed-loop gRPC load from
h2load (C, HTTP/2; `apt-get install -y nghttp2-client`): N connections with one stream each, so N
requests in flight, each a ModelInfer with raw tensors as tritonclient sends them. The report is
requests/s, B against A, and the CPU per request of the gateway's processes, its workers and h2load.
Before the rounds one request through tritonclient.grpc must equal direct onnxruntime on each gateway,
and after each point the gateway's own counts must show no failed request (h2load counts an HTTP/2
200 as a success even when its gRPC status is an error; requests cut off when h2load stops count 499).

    .venv/bin/python -m bench.grpc_frontends [--model crowd-csrnet --dims height=16,width=16]
        [--concurrency 32] [--rounds 4] [--seconds 6]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from bench.gateway_bench import DATATYPES, Server, _children, _children_cpu_seconds, _cpu_seconds, export, round_options, sample
from migserve.types import Array

SETTINGS = {"A": ("--frontends", "1"), "B": ("--frontends", "2")}
PATH = "/inference.GRPCInferenceService/ModelInfer"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    round_options(parser, rounds=4)
    parser.set_defaults(model="crowd-csrnet")
    parser.add_argument("--dims", default="height=16,width=16", help="the input's dims, e.g. height=16,width=16 ('' for the defaults)")
    args = parser.parse_args()
    dims = {k: int(v) for k, v in (item.split("=") for item in args.dims.split(",") if item)}
    export(args.repo, args.model)
    contract = json.loads((args.repo / args.model / "contract.json").read_text())
    arrays = sample(contract, dims, 1)
    servers: dict[str, tuple[Server, int]] = {}
    try:
        for label, extra in SETTINGS.items():
            grpc_port = _free_port()
            servers[label] = (Server(args.repo, "--models", args.model, "--grpc-port", str(grpc_port), *extra), grpc_port)
            _check_answer(args.repo, args.model, arrays, grpc_port)
        points: dict[str, list[dict[str, Any]]] = {label: [] for label in SETTINGS}
        with tempfile.NamedTemporaryFile(suffix=".grpc") as body:
            body.write(grpc_body(args.model, arrays))
            body.flush()
            for round_ in range(1, args.rounds + 1):
                for label, (server, grpc_port) in servers.items():
                    server.wait_idle(args.model)
                    point = h2load_point(server, grpc_port, Path(body.name), args.model, concurrency=args.concurrency, seconds=args.seconds)
                    points[label].append(point)
                    print(f"round {round_} {label}: {point['requests_per_s']:.1f}/s, cores busy {point['busy']:.2f}", flush=True)
    finally:
        for server, _ in servers.values():
            server.close()
    shape = "x".join(str(d) for d in next(iter(arrays.values())).shape)
    print(f"\n{args.model} ({shape}), gRPC, concurrency {args.concurrency}, {args.rounds} rounds of {args.seconds:g} s\n")
    print("| setting | serve arguments | requests/s (mean) | x A | cores busy | CPU ms/request: gateway / workers / h2load |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    base = statistics.mean(p["requests_per_s"] for p in points["A"])
    for label, extra in SETTINGS.items():
        rows = points[label]
        rate = statistics.mean(p["requests_per_s"] for p in rows)
        cpu = " / ".join(f"{statistics.mean(p[key] for p in rows):.2f}" for key in ("gateway_cpu_ms", "workers_cpu_ms", "client_cpu_ms"))
        cores = statistics.mean(p["busy"] for p in rows)
        print(f"| {label} | `{' '.join(extra)}` | {rate:.1f} | {rate / base:.2f} | {cores:.2f} | {cpu} |")
    return 0


def grpc_body(model: str, arrays: dict[str, Array]) -> bytes:
    """One ModelInfer request as a gRPC message on the wire: not compressed, its length, the protobuf."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=DATATYPES[array.dtype.name], shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    payload: bytes = request.SerializeToString()
    return b"\0" + struct.pack(">I", len(payload)) + payload


def h2load_point(server: Server, grpc_port: int, body: Path, model: str, *, concurrency: int, seconds: float) -> dict[str, Any]:
    """h2load's closed loop (after a 1 s warm-up) and what it cost each process per request; raises if the gateway
    failed any request of the point."""
    frontends = server.frontend_pids()
    gateway = [server.process.pid, *frontends]
    workers = [pid for pid in _children(server.process.pid) if pid not in frontends]
    failed_before = _failures(server, model)
    cpu_before, client_before, started = [_cpu_seconds(p) for p in gateway + workers], _children_cpu_seconds(), time.monotonic()
    command = [
        "h2load",
        *("-c", str(concurrency), "-m", "1", "-t", "1", "-D", f"{seconds:g}", "--warm-up-time", "1"),
        *("-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"),
        f"http://127.0.0.1:{grpc_port}{PATH}",
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    elapsed = time.monotonic() - started
    cpu = [_cpu_seconds(p) - before for p, before in zip(gateway + workers, cpu_before, strict=True)]
    client = _children_cpu_seconds() - client_before
    if (failed := _failures(server, model) - failed_before) > 0:
        raise RuntimeError(f"the gateway failed {failed:.0f} gRPC requests during the point:\n{out}")
    finished = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if finished is None or done is None or done[2] != done[3]:
        raise RuntimeError(f"h2load did not finish every request it sent:\n{out}")
    rate = float(finished[1])
    # CPU over the whole run (warm-up included) per request of the measured part, at the measured rate
    per_request = 1000 / (rate * elapsed)
    return {
        "requests_per_s": rate,
        "gateway_cpu_ms": sum(cpu[: len(gateway)]) * per_request,
        "workers_cpu_ms": sum(cpu[len(gateway) :]) * per_request,
        "client_cpu_ms": client * per_request,
        "busy": (sum(cpu) + client) / elapsed,
    }


def _failures(server: Server, model: str) -> float:
    """The gateway's requests of this model answered with anything but 200, summed over its processes (499, the
    requests in flight when h2load stops and closes its connections, are not failures)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    prefix = "migserve_requests_total{"
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(prefix) and f'model="{model}"' in line and 'status="200"' not in line and 'status="499"' not in line
    )


def _check_answer(repo: Path, model: str, arrays: dict[str, Array], grpc_port: int) -> None:
    """tritonclient.grpc's answer equals direct onnxruntime's, or the figures would measure a broken path."""
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, arrays)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), DATATYPES[array.dtype.name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(model, inputs)
    client.close()
    for output, want in zip(session.get_outputs(), expected, strict=True):
        np.testing.assert_allclose(result.as_numpy(output.name), want, rtol=1e-4, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    raise SystemExit(main())
