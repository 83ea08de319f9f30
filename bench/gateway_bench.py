"""Gateway overhead, side by side in one run (issue 3).

For each model, the same closed-loop load (concurrency 1, 8, 32; one request = one sample):
  direct    in-process onnxruntime on all cores, at each batch size; the best is the limit
  binary    the gateway over HTTP, KServe v2 binary tensors
  json      the gateway over HTTP, KServe v2 JSON tensors
  nobatch   the gateway, binary tensors, --max-batch-size 1
  uvicorn   the gateway, binary tensors, --http-server uvicorn (every request through uvicorn)
  idle      the gateway, binary tensors, --cpu-worker-priority idle (workers under SCHED_IDLE)
Load comes from wrk (C, one thread, N keep-alive connections; `apt-get install -y wrk`):
a Python client spent 2.2 ms of CPU per request here, more than the gateway itself, on
the same two cores. wrk still shares the machine: ratios, not absolute figures, are the
result. A last point measures the gateway's added latency on a tiny tensor (16x16 image).
Direct runs minutes after the gateway modes, so on a host whose speed drifts its ratios
drift too: bench/direct_ab.py measures the ratio at concurrency 32 in interleaved rounds.

    .venv/bin/python -m bench.gateway_bench [--seconds 5] [--out results/gateway_bench.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.load import process_usage
from bench.ports import free_port
from migserve.types import Array

ROOT = Path(__file__).resolve().parents[1]
MODELS: dict[str, dict[str, int]] = {"crowd-csrnet": {}, "face-pros": {}}  # each at its contract's default size
TINY = ("crowd-csrnet", {"height": 16, "width": 16})  # for the added-latency figure
WRK_SCRIPT = Path(__file__).with_name("wrk_report.lua")
CONCURRENCY = (1, 8, 32)
BATCHES = (1, 2, 4, 8, 16, 32)
DATATYPES = {"float32": "FP32", "int64": "INT64"}
FRONTEND_MODES = {f"frontends{n}": n for n in (2, 4, 8)}  # serve --frontends N (bench/gpu_check.py)
# --worker-threads 1, and --batches-in-flight 2 (bench/gpu_check.py)
SERIAL_MODES = ("serial", "frontends2-serial", "frontends4-serial", "frontends2-two", "frontends4-two")
# onesession, the serial and the grpc modes: bench/gpu_check.py
GATEWAY_MODES = ("binary", "json", "nobatch", "uvicorn", "idle", "onesession", *FRONTEND_MODES, *SERIAL_MODES, "grpc", "grpc-frontends2")


def export(repo: Path, *models: str) -> None:
    """The tiny exports the bench needs, made once (`migserve export --skip-existing`)."""
    subprocess.run(
        [sys.executable, "-m", "migserve", "export", "--model", *models, "--out", str(repo), "--skip-existing"], check=True, cwd=ROOT
    )


def round_options(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The options of the interleaved A/B benches: one model, one concurrency, N rounds of S seconds."""
    parser.add_argument("--model", default="face-pros")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")


def percentiles(latencies: list[float]) -> dict[str, float]:
    values = np.array(latencies) * 1000
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


def sample(contract: dict[str, Any], dims: dict[str, int], batch: int) -> dict[str, Array]:
    """Seeded inputs at the contract's default dims (or `dims`): token ids in the vocabulary, masks all ones."""
    sizes = {k: v["default"] for k, v in contract["dims"].items()} | dims | {"batch": batch}
    rng = np.random.default_rng(0)
    arrays: dict[str, Array] = {}
    for t in contract["inputs"]:
        shape = [d if isinstance(d, int) else sizes[d] for d in t["shape"]]
        if t["dtype"] == "int64":
            arrays[t["name"]] = rng.integers(2, 700, shape, dtype=np.int64)
        elif "mask" in t["name"]:
            arrays[t["name"]] = np.ones(shape, np.float32)
        else:
            arrays[t["name"]] = rng.standard_normal(shape).astype(np.float32)
    return arrays


def direct(
    repo: Path, model: str, dims: dict[str, int], seconds: float, providers: tuple[str, ...] = ("CPUExecutionProvider",)
) -> list[dict[str, Any]]:
    contract = json.loads((repo / model / "contract.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"), options, providers=list(providers))
    if session.get_providers()[0] != providers[0]:  # onnxruntime falls back without an error: never report CPU figures as GPU
        raise RuntimeError(f"{model}: onnxruntime runs it on {session.get_providers()[0]}, not {providers[0]}")
    rows = []
    for batch in (b for b in BATCHES if b <= contract["batching"]["max_batch_size"]):
        feeds = sample(contract, dims, batch)
        for _ in range(3):  # warm-up: on a GPU the first runs at a new shape choose their kernels
            session.run(None, feeds)
        latencies, started = [], time.perf_counter()
        while time.perf_counter() - started < seconds:
            t = time.perf_counter()
            session.run(None, feeds)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        rows.append(
            {
                "mode": "direct",
                "model": model,
                "batch": batch,
                "concurrency": 1,
                "samples_per_s": batch * len(latencies) / elapsed,
                **percentiles(latencies),
            }
        )
    return rows


def bodies(repo: Path, model: str, dims: dict[str, int]) -> dict[str, tuple[bytes, dict[str, str]]]:
    contract = json.loads((repo / model / "contract.json").read_text())
    arrays = sample(contract, dims, 1)
    entries: list[dict[str, Any]] = [{"name": k, "datatype": DATATYPES[v.dtype.name], "shape": list(v.shape)} for k, v in arrays.items()]
    as_json = json.dumps({"inputs": [e | {"data": arrays[k].ravel().tolist()} for e, k in zip(entries, arrays, strict=True)]}).encode()
    header = json.dumps(
        {
            "inputs": [e | {"parameters": {"binary_data_size": arrays[k].nbytes}} for e, k in zip(entries, arrays, strict=True)],
            "outputs": [{"name": o["name"], "parameters": {"binary_data": True}} for o in contract["outputs"]],
        }
    ).encode()
    binary = header + b"".join(a.tobytes() for a in arrays.values())
    return {
        "json": (as_json, {"Content-Type": "application/json"}),
        "binary": (binary, {"Inference-Header-Content-Length": str(len(header))}),
    }


def closed_loop(
    url: str,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    seconds: float,
    *,
    server_pid: int | None = None,
    frontend_pids: Sequence[int] = (),
    threads: int = 1,
) -> dict[str, Any]:
    """wrk's closed loop at `concurrency`; with `server_pid`, the CPU per request of the gateway (that process and
    its other front-ends, `frontend_pids`), of its workers and of wrk."""
    with tempfile.NamedTemporaryFile(suffix=".body") as file:
        file.write(body)
        file.flush()
        env = os.environ | {
            "BENCH_BODY": file.name,
            "BENCH_CONTENT_TYPE": headers.get("Content-Type", "application/octet-stream"),
            "BENCH_HEADER_LENGTH": headers.get("Inference-Header-Content-Length", ""),
        }
        base = ["wrk", f"-t{min(threads, concurrency)}", f"-c{concurrency}", "-s", str(WRK_SCRIPT), "--timeout", "10s", url]
        subprocess.run([*base[:3], "-d1s", *base[3:]], env=env, check=True, capture_output=True)  # warm-up, excluded
        front = [server_pid, *frontend_pids] if server_pid else []
        server = front + [pid for pid in _children(server_pid) if pid not in frontend_pids] if server_pid else []
        cpu_before, wrk_before = [_cpu_seconds(pid) for pid in server], _children_cpu_seconds()
        out = subprocess.run([*base[:3], f"-d{seconds:g}s", *base[3:]], env=env, check=True, capture_output=True, text=True).stdout
        cpu = [_cpu_seconds(pid) - before for pid, before in zip(server, cpu_before, strict=True)]
        wrk_cpu = _children_cpu_seconds() - wrk_before
    result = json.loads(next(line for line in out.splitlines() if line.startswith("BENCH ")).removeprefix("BENCH "))
    per_request = 1000 / max(result["requests"], 1)
    return {
        "samples_per_s": result["requests"] / (result["duration_us"] / 1e6),
        "errors": result["errors"],
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        # CPU per request while the point ran: what the HTTP path costs beside the model itself
        "gateway_cpu_ms": sum(cpu[: len(front)]) * per_request if cpu else None,
        "workers_cpu_ms": sum(cpu[len(front) :]) * per_request if cpu else None,
        "client_cpu_ms": wrk_cpu * per_request,
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (0 once it is gone)."""
    return process_usage(pid)[0] or 0.0


def _children(pid: int) -> list[int]:
    """The gateway's worker processes."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def checkout(revision: str) -> tuple[str, Path]:
    """A Python that runs the service as it was at a git revision: its tree checked out under results/, and an
    environment that finds that tree first and this one's packages next (not this checkout's editable install)."""
    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    tree = ROOT / "results" / "revisions" / commit
    if not tree.exists():
        tree.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True, capture_output=True)
    venv = tree.parent / f"{commit}-venv"
    if not venv.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next(Path(p) for p in sys.path if p.endswith("site-packages"))
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        (venv / "lib" / version / "site-packages" / "revision.pth").write_text(f"{tree}\n{site}\n")
    return str(venv / "bin" / "python"), tree


def metric(port: int, prefix: str) -> float:
    """The sum of the gateway's /metrics samples whose line starts with `prefix` (a name, with labels or a space)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


class Server:
    def __init__(self, repo: Path, *args: str, revision: str | None = None, log: Path | None = None, prefix: tuple[str, ...] = ()) -> None:
        """`migserve serve` on a free port, as this checkout has it or, with `revision`, as that git revision had it;
        its output in `log` if given; `prefix`: a command that execs it (e.g. prlimit)."""
        python, cwd = checkout(revision) if revision else (sys.executable, ROOT)
        self.port = free_port()
        command = [
            *prefix,
            python,
            "-m",
            "migserve",
            "serve",
            "--model-repo",
            str(repo),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *args,
        ]
        output = None if log is None else log.open("wb")
        self.process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=None if output is None else subprocess.STDOUT)
        if output is not None:
            output.close()  # the gateway has it
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.process.returncode} before it was ready") from None
                time.sleep(0.2)
        self.process.kill()
        raise RuntimeError("gateway did not become ready in 2 minutes")

    def wait_idle(self, model: str, limit_s: float = 60.0) -> None:
        """Until no request of an earlier point is still queued or running for this model."""
        stop = time.monotonic() + limit_s
        while time.monotonic() < stop:
            busy = sum(p["outstanding_batches"] for p in self.partitions())
            if busy == 0 and metric(self.port, "migserve_queue_depth{") == 0:
                return
            time.sleep(0.2)

    def frontend_pids(self) -> list[int]:
        """The gateway's other front-end processes (serve --frontends; none from a revision before them)."""
        return [f["pid"] for f in self._v1_partitions().get("frontends", [])]

    def partitions(self) -> list[dict[str, Any]]:
        """GET /v1/partitions: each partition with its worker (pid, ready, restarts, run_slices, ...)."""
        return list(self._v1_partitions()["partitions"])

    def _v1_partitions(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/partitions", timeout=5) as response:
            return dict(json.load(response))

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def gateway_rows(repo: Path, label: str, args: tuple[str, ...], encodings: tuple[str, ...], seconds: float) -> list[dict[str, Any]]:
    server = Server(repo, "--models", *MODELS, *args)
    rows = []
    try:
        for encoding in encodings:  # JSON last: its slow requests must not overlap a binary point
            for model, dims in MODELS.items():
                url = f"http://127.0.0.1:{server.port}/v2/models/{model}/infer"
                body, headers = bodies(repo, model, dims)[encoding]
                for concurrency in CONCURRENCY:
                    server.wait_idle(model)
                    result = closed_loop(url, body, headers, concurrency, seconds, server_pid=server.process.pid)
                    rows.append(
                        {
                            "mode": label if label != "gateway" else encoding,
                            "model": model,
                            "batch": 1,
                            "concurrency": concurrency,
                            **result,
                        }
                    )
                    rate, p50 = result["samples_per_s"], result["p50_ms"]
                    print(f"  {rows[-1]['mode']:8s} {model:14s} c={concurrency:<3d} {rate:8.1f}/s p50 {p50:.2f} ms", flush=True)
    finally:
        server.close()
    return rows


def tiny_overhead(repo: Path, seconds: float) -> list[dict[str, Any]]:
    model, dims = TINY
    rows = [{**r, "mode": "direct-tiny"} for r in direct(repo, model, dims, seconds) if r["batch"] == 1]
    server = Server(repo, "--models", model)
    try:
        body, headers = bodies(repo, model, dims)["binary"]
        result = closed_loop(f"http://127.0.0.1:{server.port}/v2/models/{model}/infer", body, headers, 1, seconds)
        rows.append({"mode": "binary-tiny", "model": model, "batch": 1, "concurrency": 1, **result})
    finally:
        server.close()
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    """The markdown tables of RESULTS.md, of whatever points finished."""
    lines = []
    for model, dims in MODELS.items():
        directs = [r for r in rows if r["model"] == model and r["mode"] == "direct"]
        if not directs:
            continue
        best = max(directs, key=lambda r: r["samples_per_s"])
        rows_here = [r for r in rows if r["model"] == model and r["mode"] in GATEWAY_MODES]
        single = next(r for r in directs if r["batch"] == 1)
        lines += [
            f"### {model} ({'x'.join(map(str, dims.values())) or 'default size'})",
            f"direct onnxruntime: best batch {best['batch']}, {best['samples_per_s']:.1f} samples/s; "
            f"batch 1: p50 {single['p50_ms']:.2f} ms",
            "",
            "| mode | concurrency | samples/s | x direct best | p50 ms | p99 ms | errors "
            "| CPU ms/request: gateway / workers / wrk | cores busy |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows_here:
            lines.append(
                f"| {r['mode']} | {r['concurrency']} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / best['samples_per_s']:.2f} "
                f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} "
                f"| {r['gateway_cpu_ms']:.2f} / {r['workers_cpu_ms']:.2f} / {r['client_cpu_ms']:.2f} | {busy(r):.2f} |"
            )
        lines.append("")
        for c32 in (r for r in rows_here if r["mode"] in ("binary", "idle", *FRONTEND_MODES, *SERIAL_MODES) and r["concurrency"] == 32):
            ratio = c32["samples_per_s"] / best["samples_per_s"]
            lines.append(f"concurrency 32, {c32['mode']}: {ratio:.2f}x direct at best batch (measured apart: see bench/direct_ab.py)")
        lines.append("")
    tiny = {r["mode"]: r for r in rows if r["mode"] in ("direct-tiny", "binary-tiny")}
    if len(tiny) < 2:
        return "\n".join(lines)
    d, g = tiny["direct-tiny"], tiny["binary-tiny"]
    lines.append(
        f"tiny tensor ({TINY[0]} {'x'.join(map(str, TINY[1].values()))}), concurrency 1: direct p50 {d['p50_ms']:.2f} ms, "
        f"gateway p50 {g['p50_ms']:.2f} ms, added {g['p50_ms'] - d['p50_ms']:.2f} ms"
    )
    return "\n".join(lines)


def busy(row: dict[str, Any]) -> float:
    """Cores the gateway, its workers and wrk kept busy together during the point (at most os.cpu_count())."""
    return float(row["samples_per_s"] * (row["gateway_cpu_ms"] + row["workers_cpu_ms"] + row["client_cpu_ms"]) / 1000)


def save(rows: list[dict[str, Any]], out: Path) -> None:
    """The raw rows as JSON (under results/, not committed), after every stage."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gateway_bench.json")
    args = parser.parse_args()
    export(args.repo, *MODELS)
    stages: list[Callable[[], list[dict[str, Any]]]] = [
        *(functools.partial(direct, args.repo, model, dims, args.seconds) for model, dims in MODELS.items()),
        functools.partial(gateway_rows, args.repo, "gateway", (), ("binary", "json"), args.seconds),
        functools.partial(gateway_rows, args.repo, "nobatch", ("--max-batch-size", "1"), ("binary",), args.seconds),
        functools.partial(gateway_rows, args.repo, "uvicorn", ("--http-server", "uvicorn"), ("binary",), args.seconds),
        functools.partial(gateway_rows, args.repo, "idle", ("--cpu-worker-priority", "idle"), ("binary",), args.seconds),
        functools.partial(tiny_overhead, args.repo, args.seconds),
    ]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a timeout or kill ends it like Ctrl-C: what finished is kept
    rows: list[dict[str, Any]] = []
    try:
        for stage in stages:
            rows += stage()
            save(rows, args.out)
    except KeyboardInterrupt:
        print(f"interrupted: the report covers the {len(rows)} points that finished", file=sys.stderr)
    print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
