"""The gateway on a real GPU, in one run: what CI (no GPU) cannot check.

Stages, each recorded even when another fails:
  devices     `nvidia-smi` listings (read-only: MIG settings are never changed) and onnxruntime's providers
  discovery   the partitions NVML discovery finds, as `migserve serve` would use them
  serve       the gateway on those partitions (no topology, no --cpu-slices): which providers its workers use
  roundtrip   every model in the repository over HTTP (binary tensors), against onnxruntime on the CPU
  restart     kill -9 of a GPU worker while requests are in flight: every request answered, the worker back
  conv_search what cuDNN's EXHAUSTIVE and HEURISTIC kernel searches cost at each new batch size, in-process
  throughput  crowd-csrnet and face-pros: direct onnxruntime on the GPU at each batch size (the limit)
              against the gateway over HTTP, binary tensors, wrk at concurrency 1, 8, 32, with
              batches padded to one session per shape (binary) and on one session as they come
              (onesession, --gpu-shape-sessions 0), or N front-end processes (frontendsN); and over gRPC,
              ModelInfer from h2load with one process or two (grpc, grpc-frontends2); the gateway's own statistics
              split each point's time (queue, partition); NVML readings of the GPU over the
              concurrency-32 points; the added p50 on a tiny tensor

    python -m bench.gpu_check --repo DIR [--seconds 3] [--out results/gpu_check]
        [--modes binary,onesession,frontends2,frontends4,frontends8,grpc,grpc-frontends2] [--concurrency 1,8,32]
        [--wrk-threads 1]
        [--skip restart,conv_search]

The frontendsN modes serve with `--frontends N` (N processes take requests on the port, service/api/frontends.py);
their "gateway" CPU is all N processes'. The grpc modes need h2load (nghttp2-client) beside wrk; --wrk-threads sets
both tools' threads.

Writes gpu_check.json (every stage's record), gpu_check.md (the tables) and the raw `nvidia-smi`
captures under --out. Exits 1 if the gateway's workers do not run on CUDAExecutionProvider.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench import gateway_bench as gb
from bench.mig import MigError, Smi
from bench.nvml_probe import probe_for
from bench.ports import free_port
from migserve.types import Array
from service.partitions import discover

ROOT = Path(__file__).resolve().parents[1]
SMI_CAPTURES = {  # file -> nvidia-smi arguments; all read-only
    "smi-L.txt": ["-L"],
    "smi-q.txt": ["-q"],
    "smi-query-mig-mode.txt": ["--query-gpu=name,uuid,mig.mode.current,mig.mode.pending,memory.total", "--format=csv"],
    "smi-mig-lgip.txt": ["mig", "-lgip"],
}
NUMPY_DTYPES = {"FP32": np.float32, "INT64": np.int64, "FP16": np.float16, "INT32": np.int32, "BOOL": np.bool_}


def smi(*args: str) -> tuple[int, str]:
    """`nvidia-smi ARGS` (bench.mig's runner): its exit status and output, or 127 and why it could not run."""
    try:
        run = Smi.from_env().run(*args, check=False)
    except MigError as exc:
        return 127, str(exc)
    return run.returncode, run.stdout + (f"\n[stderr]\n{run.stderr}" if run.stderr else "")


def devices(out: Path) -> dict[str, Any]:
    record: dict[str, Any] = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers()}
    for name, args in SMI_CAPTURES.items():
        status, text = smi(*args)
        (out / name).write_text(f"{text}\n[exit {status}]\n")
        record[name] = {"exit": status, "head": text[:600]}
    return record


def discovery() -> dict[str, Any]:
    return {"partitions": [p.describe() for p in discover()]}


def infer(port: int, model: str, arrays: dict[str, Array], timeout: float = 60) -> dict[str, Array]:
    """One KServe v2 binary-tensor request; the outputs decoded from the binary answer."""
    entries = [
        {"name": k, "datatype": gb.DATATYPES[v.dtype.name], "shape": list(v.shape), "parameters": {"binary_data_size": v.nbytes}}
        for k, v in arrays.items()
    ]
    header = json.dumps({"inputs": entries, "parameters": {"binary_data_output": True}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{model}/infer",
        data=header + b"".join(np.ascontiguousarray(v).tobytes() for v in arrays.values()),
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Inference-Header-Content-Length")
        body = response.read()
    if length is None:  # a JSON answer
        answer = json.loads(body)
        return {o["name"]: np.asarray(o["data"], NUMPY_DTYPES[o["datatype"]]).reshape(o["shape"]) for o in answer["outputs"]}
    answer, offset, outputs = json.loads(body[: int(length)]), int(length), {}
    for o in answer["outputs"]:
        size = o["parameters"]["binary_data_size"]
        outputs[o["name"]] = np.frombuffer(body[offset : offset + size], NUMPY_DTYPES[o["datatype"]]).reshape(o["shape"])
        offset += size
    return outputs


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.load(response)


def roundtrip(repo: Path, port: int) -> dict[str, Any]:
    """Every served model: the gateway's (GPU) answer against onnxruntime's on the CPU, max |difference| per output."""
    record: dict[str, Any] = {}
    for contract_path in sorted(repo.glob("*/contract.json")):
        model, contract = contract_path.parent.name, json.loads(contract_path.read_text())
        arrays = gb.sample(contract, {}, 1)
        cpu = ort.InferenceSession(str(contract_path.parent / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        expected = dict(zip([o.name for o in cpu.get_outputs()], cpu.run(None, arrays), strict=True))
        try:
            got = infer(port, model, arrays)
        except urllib.error.HTTPError as exc:
            record[model] = {"error": f"{exc.code}: {exc.read().decode()[:300]}"}
            continue
        record[model] = {
            name: {
                "shape": list(got[name].shape),
                "max_abs_diff": float(np.max(np.abs(got[name].astype(np.float64) - value))),
                "max_abs_cpu": float(np.max(np.abs(value))),
            }
            for name, value in expected.items()
        }
    return record


def restart(repo: Path, port: int) -> dict[str, Any]:
    """kill -9 the worker holding crowd-csrnet under a steady closed loop of 16 clients; every request must be answered."""
    contract = json.loads((repo / "crowd-csrnet" / "contract.json").read_text())
    arrays = gb.sample(contract, {}, 1)
    (partition, *_) = [p for p in get(port, "/v1/partitions")["partitions"] if "crowd-csrnet" in p["models"]]
    stop = threading.Event()

    def client() -> list[tuple[int | str, float]]:
        answers: list[tuple[int | str, float]] = []
        while not stop.is_set():
            started = time.monotonic()
            try:
                infer(port, "crowd-csrnet", arrays, timeout=120)
                status: int | str = 200
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError as exc:
                status = f"{type(exc).__name__}: {exc}"
            answers.append((status, time.monotonic() - started))
        return answers

    with ThreadPoolExecutor(16) as pool:
        clients = [pool.submit(client) for _ in range(16)]
        time.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(partition["pid"], signal.SIGKILL)
        back_s = None
        while time.monotonic() - killed_at < 120:
            (now,) = [p for p in get(port, "/v1/partitions")["partitions"] if p["id"] == partition["id"]]
            if now["ready"] and now["restarts"] >= 1:
                back_s = time.monotonic() - killed_at
                break
            time.sleep(0.05)
        time.sleep(1.0)  # the loop goes on against the new worker
        stop.set()
        answers = [a for c in clients for a in c.result()]
    statuses = [status for status, _ in answers]
    after = infer(port, "crowd-csrnet", arrays)
    return {
        "partition": partition["id"],
        "killed_pid": partition["pid"],
        "requests": len(answers),
        "statuses": {str(s): statuses.count(s) for s in set(statuses)},
        "slowest_answer_s": max(seconds for _, seconds in answers),
        "ready_again_s": back_s,
        "restarts": now["restarts"],
        "providers_after": now["providers"],
        "new_pid": now["pid"],
        "answer_after": {k: list(v.shape) for k, v in after.items()},
    }


def conv_search(repo: Path) -> list[dict[str, Any]]:
    """What cuDNN's kernel search costs per new input shape: the first run at each batch size, in-process."""
    rows = []
    for model, dims in gb.MODELS.items():
        contract = json.loads((repo / model / "contract.json").read_text())
        for search in ("EXHAUSTIVE", "HEURISTIC"):
            session = ort.InferenceSession(
                str(repo / model / "1" / "model.onnx"),
                providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                provider_options=[{"cudnn_conv_algo_search": search}, {}],
            )
            for batch in range(1, 9):
                feeds = gb.sample(contract, dims, batch)
                started = time.perf_counter()
                session.run(None, feeds)
                first = time.perf_counter() - started
                started = time.perf_counter()
                for _ in range(20):
                    session.run(None, feeds)
                rows.append(
                    {
                        "model": model,
                        "search": search,
                        "batch": batch,
                        "first_run_ms": first * 1000,
                        "steady_ms": (time.perf_counter() - started) * 50,
                    }
                )
    return rows


def model_stats(port: int, model: str) -> dict[str, int]:
    (stats,) = get(port, f"/v2/models/{model}/stats")["model_stats"]
    infer = stats["inference_stats"]
    flat = {
        f"{k}_{field}": int(infer[k][field])
        for k in ("success", "queue", "compute_input", "compute_infer", "compute_output")
        for field in ("count", "ns")
    }
    return flat | {"rows": int(stats["inference_count"]), "batches": int(stats["execution_count"])}


def split(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Per request over one point: ms in the queue, at the partition (the batch's round trip) and in all; rows per batch."""
    delta = {k: after[k] - before[k] for k in after}
    requests = max(delta["success_count"], 1)
    return {
        "request_ms": delta["success_ns"] / requests / 1e6,
        "queue_ms": delta["queue_ns"] / requests / 1e6,
        "infer_ms": delta["compute_infer_ns"] / requests / 1e6,
        "rows_per_batch": delta["rows"] / max(delta["batches"], 1),
    }


GPU_MODES: dict[str, tuple[str, ...]] = {
    "binary": ("--gpu-shape-sessions", "8"),
    "onesession": ("--gpu-shape-sessions", "0"),
    **{name: ("--frontends", str(n)) for name, n in gb.FRONTEND_MODES.items()},
    "serial": ("--worker-threads", "1"),  # a GPU worker runs one batch at a time, as before --worker-threads
    "frontends2-serial": ("--frontends", "2", "--worker-threads", "1"),
    "frontends4-serial": ("--frontends", "4", "--worker-threads", "1"),
    "frontends2-two": ("--frontends", "2", "--batches-in-flight", "2"),  # threads, two batches in flight per process
    "frontends4-two": ("--frontends", "4", "--batches-in-flight", "2"),
    "grpc": ("--gpu-shape-sessions", "8"),
    "grpc-frontends2": ("--frontends", "2"),
}
GRPC_MODES = frozenset({"grpc", "grpc-frontends2"})  # ModelInfer from h2load (bench/grpc_bench.py) instead of HTTP from wrk


def throughput(args: argparse.Namespace, device: str | None) -> list[dict[str, Any]]:
    repo, seconds, provider, concurrency = args.repo, args.seconds, args.direct_provider, args.concurrency
    rows: list[dict[str, Any]] = []
    cuda = tuple(dict.fromkeys((provider, "CPUExecutionProvider")))
    for model, dims in gb.MODELS.items():
        rows += gb.direct(repo, model, dims, seconds, providers=cuda)
    for mode in args.modes:
        grpc_port = free_port() if mode in GRPC_MODES else None
        grpc_args = ("--grpc-port", str(grpc_port)) if grpc_port is not None else ()
        server = gb.Server(repo, "--models", *gb.MODELS, *GPU_MODES[mode], *grpc_args)
        try:
            frontends = server.frontend_pids()
            processes = {"server_pid": server.process.pid, "frontend_pids": frontends, "threads": args.wrk_threads}
            for model, dims in gb.MODELS.items():
                url = f"http://127.0.0.1:{server.port}/v2/models/{model}/infer"
                body, headers = gb.bodies(repo, model, dims)["binary"]
                grpc_url = f"http://127.0.0.1:{grpc_port}/inference.GRPCInferenceService/ModelInfer"
                for n in concurrency:
                    server.wait_idle(model)
                    probe = probe_for(device) if n == max(concurrency) else None
                    if probe is not None:
                        probe.begin()
                    before = model_stats(server.port, model)
                    if grpc_port is None:
                        result = gb.closed_loop(url, body, headers, n, seconds, **processes)
                    else:
                        from bench.grpc_bench import grpc_message, h2load_loop  # grpcio: only the grpc modes need it

                        result = h2load_loop(grpc_url, grpc_message(repo, model, dims), n, 1, seconds, **processes)
                    inside = split(before, model_stats(server.port, model))  # wrk's warm-up second included
                    nvml = probe.end() if probe is not None else {}
                    rows.append({"mode": mode, "model": model, "batch": 1, "concurrency": n, **result, **inside, **nvml})
                    rate, p50 = result["samples_per_s"], result["p50_ms"]
                    print(f"  {mode:10s} {model:14s} c={n:<3d} {rate:8.1f}/s p50 {p50:.2f} ms {inside}", flush=True)
        finally:
            server.close()
    model, tiny = gb.TINY
    rows += [{**r, "mode": "direct-tiny"} for r in gb.direct(repo, model, tiny, seconds, providers=cuda) if r["batch"] == 1]
    server = gb.Server(repo, "--models", model)
    try:
        body, headers = gb.bodies(repo, model, tiny)["binary"]
        before = model_stats(server.port, model)
        result = gb.closed_loop(f"http://127.0.0.1:{server.port}/v2/models/{model}/infer", body, headers, 1, seconds)
        rows.append(
            {
                "mode": "binary-tiny",
                "model": model,
                "batch": 1,
                "concurrency": 1,
                **result,
                **split(before, model_stats(server.port, model)),
            }
        )
    finally:
        server.close()
    return rows


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="an exported model repository (migserve export --all)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check")
    parser.add_argument(
        "--direct-provider", default="CUDAExecutionProvider", help="the limit's provider (CPUExecutionProvider: a dry run without a GPU)"
    )
    parser.add_argument(
        "--modes",
        default="binary,onesession",
        help=f"gateway modes of the throughput stage, comma-separated, of: {', '.join(GPU_MODES)} (default: binary,onesession)",
    )
    parser.add_argument("--concurrency", default="1,8,32", help="wrk's connections at each throughput point (default: 1,8,32)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk's threads (at most one per connection; default: 1)")
    parser.add_argument("--skip", default="", help="stages to leave out, comma-separated (e.g. restart,conv_search)")
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    if unknown := [m for m in args.modes if m not in GPU_MODES]:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(GPU_MODES)}")
    args.concurrency = [int(n) for n in args.concurrency.split(",")]
    args.skip = set(args.skip.split(","))
    return args


def main() -> int:
    args = options()
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {}

    def stage(name: str, run: Callable[[], Any]) -> Any:
        if name in args.skip:
            return {}
        started = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            record[name] = run()
        except Exception:
            record[name] = {"error": traceback.format_exc()[-3000:]}
            print(record[name]["error"], file=sys.stderr, flush=True)
        record.setdefault("seconds", {})[name] = round(time.monotonic() - started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str))
        return record[name]

    stage("devices", lambda: devices(args.out))
    found = stage("discovery", discovery)
    device = next((p["device"] for p in found.get("partitions", []) if p["device"]), None)
    servers: list[gb.Server] = []

    def serve() -> dict[str, Any]:
        servers.append(gb.Server(args.repo))  # discovery decides the partitions, as for a user
        # the driver's own list of processes on the GPU: the worker should be on it, not only say so
        _, apps = smi("--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader")
        return {"partitions": get(servers[0].port, "/v1/partitions")["partitions"], "compute_apps": apps}

    serving = stage("serve", serve)
    try:
        if servers:
            stage("roundtrip", lambda: roundtrip(args.repo, servers[0].port))
            stage("restart", lambda: restart(args.repo, servers[0].port))
    finally:
        for server in servers:
            server.close()
    if args.direct_provider == "CUDAExecutionProvider":
        stage("conv_search", lambda: conv_search(args.repo))
    rows = stage("throughput", lambda: throughput(args, device))
    if isinstance(rows, list):
        (args.out / "gpu_check.md").write_text(gb.report(rows) + "\n")
        print(gb.report(rows))
    on_cuda = all(p["providers"][:1] == ["CUDAExecutionProvider"] for p in serving.get("partitions", [{"providers": []}]))
    print(json.dumps({k: v for k, v in record.items() if k != "throughput"}, indent=1, default=str)[:6000])
    return 0 if on_cuda else 1


if __name__ == "__main__":
    raise SystemExit(main())
