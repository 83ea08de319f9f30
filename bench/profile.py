"""`migserve bench profile`: sweep model x batch x concurrency x partition and record every point.

Modes: `direct` drives a worker process on the partition (the gateway's own worker, no HTTP);
`gateway` starts `migserve serve` on that one partition (or uses --url) and sends binary KServe v2
over HTTP; `triton` sends to a Triton server at --url. Warm-up before each point is discarded.
Each point is appended to points.csv and points.json as soon as it is measured, so Ctrl-C keeps
what finished; plots and report.md are written at the end (also after Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import numpy as np
import yaml

import migserve
from migserve.contract import Contract, DimRange, TensorSpec
from migserve.interrupts import Terminated, keeping_what_finished
from migserve.types import Array

from .load import closed_loop, open_loop, process_usage
from .nvml_probe import NvmlProbe, probe_for

if TYPE_CHECKING:
    from service.repository import Repository

WARMUP_S = 0.5
Shapes = dict[str, tuple[Sequence[TensorSpec], Mapping[str, DimRange]]]  # each model's inputs and dim ranges, for check_dims


def parse_list(raw: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]: whole numbers of 1 or more (a batch, a concurrency or a slice of 0 measures nothing)."""
    try:
        values = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers of 1 or more, comma-separated, e.g. 1,8,32; got {raw!r}")
    return values


def parse_seconds(raw: str) -> float:
    """'10s' or '10' -> 10.0: above 0 and finite."""
    return _positive(raw.removesuffix("s"), "seconds above 0, e.g. 10s", raw)


def parse_rate(raw: str) -> float:
    return _positive(raw, "requests per second above 0, e.g. 50", raw)


def _positive(text: str, what: str, raw: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected {what}; got {raw!r}")
    return value


def parse_dims(raw: str) -> dict[str, int]:
    """'height=64,width=64' -> {'height': 64, 'width': 64}."""
    pairs = [part.split("=", 1) for part in raw.split(",") if part.strip()]
    if any(len(p) != 2 or not p[1].isdigit() for p in pairs):
        raise argparse.ArgumentTypeError(f"--dims {raw!r}: expected NAME=INT pairs, e.g. height=64,width=64")
    return {name.strip(): int(value) for name, value in pairs}


def inputs_for(contract: Contract, batch: int, overrides: dict[str, int] | None = None) -> dict[str, Array]:
    """Seeded inputs at the contract's default dims (or `overrides`): normal floats, ones for masks and word ids (<unk>)."""
    dims = {name: r.default for name, r in contract.dims.items()} | (overrides or {}) | {"batch": batch}
    rng = np.random.default_rng(0)
    arrays = {}
    for spec in contract.inputs:
        shape = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
        if spec.dtype == "int64" or "mask" in spec.name:
            arrays[spec.name] = np.ones(shape, dtype=spec.dtype)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return arrays


class Target(Protocol):
    label: str
    profile: str

    async def start(self) -> None: ...
    async def call(self, inputs: dict[str, Array]) -> None: ...
    def pid(self) -> int | None: ...
    async def stop(self) -> None: ...


class DirectTarget:
    """A worker process on one partition, driven as the gateway drives it (one batch at a time)."""

    def __init__(self, partition: Any, entry: Any) -> None:
        self.label = partition.id
        self.profile = partition.profile or ",".join(map(str, partition.cores))
        self._partition, self._entry = partition, entry
        self._lock = asyncio.Lock()
        self._replica: Any = None

    async def start(self) -> None:
        from service.backends.worker import WorkerReplica
        from service.placement import model_spec

        self._replica = WorkerReplica(self._partition, {self._entry.contract.name: model_spec(self._entry)}, lambda: None)
        await self._replica.start()

    async def call(self, inputs: dict[str, Array]) -> None:
        async with self._lock:
            await self._replica.submit(self._entry.contract.name, {k: [v] for k, v in inputs.items()})

    def pid(self) -> int | None:
        return self._replica.pid if self._replica else None

    async def stop(self) -> None:
        if self._replica:
            await self._replica.stop()


class HttpTarget:
    """KServe v2 binary requests to a gateway or Triton; starts a gateway on the partition unless given a URL."""

    def __init__(self, label: str, profile: str, model: str, *, url: str | None, repo: Path, partition: Any = None) -> None:
        self.label, self.profile, self.model = label, profile, model
        self._url, self._repo, self._partition = url, repo, partition
        self._server: Any = None
        self._client: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    async def start(self) -> None:
        import httpx

        if self._url is None:
            from .gateway_bench import Server

            self._tmp = tempfile.TemporaryDirectory()
            topology = Path(self._tmp.name) / "topology.yaml"
            entry = {"id": self._partition.id, "kind": self._partition.kind.value, "cores": list(self._partition.cores)}
            if self._partition.device:
                entry |= {"device": self._partition.device, "profile": self._partition.profile}
            topology.write_text(yaml.safe_dump({"partitions": [entry]}))
            self._server = await asyncio.to_thread(Server, self._repo, "--models", self.model, "--topology", str(topology))
            self._url = f"127.0.0.1:{self._server.port}"
        self._client = httpx.AsyncClient(base_url=f"http://{self._url}", timeout=60, limits=httpx.Limits(max_connections=256))
        await self._check_ready()

    async def _check_ready(self) -> None:
        """The server answers and has the model ready (KServe v2's model readiness, which Triton serves too): else
        one error now, not a sweep of points that are all errors."""
        import httpx

        try:
            response = await self._client.get(f"/v2/models/{self.model}/ready", timeout=10)
        except httpx.HTTPError as exc:
            raise ValueError(f"--url {self._url}: cannot reach a server there: {exc or type(exc).__name__}") from None
        if response.status_code != 200:
            raise ValueError(f"--url {self._url}: model {self.model} is not ready there (HTTP {response.status_code} to its ready check)")

    async def call(self, inputs: dict[str, Array]) -> None:
        header = json.dumps(
            {
                "inputs": [
                    {"name": k, "datatype": _V2[v.dtype.name], "shape": list(v.shape), "parameters": {"binary_data_size": size}}
                    for k, v, size in ((k, v, v.nbytes) for k, v in inputs.items())
                ]
            }
        ).encode()
        body = header + b"".join(v.tobytes() for v in inputs.values())
        response = await self._client.post(
            f"/v2/models/{self.model}/infer", content=body, headers={"Inference-Header-Content-Length": str(len(header))}
        )
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

    def pid(self) -> int | None:
        if self._server is None:
            return None
        import urllib.request

        with urllib.request.urlopen(f"http://{self._url}/v1/partitions", timeout=5) as answer:
            pids = [p["pid"] for p in json.load(answer)["partitions"] if p["pid"]]
        return pids[0] if pids else None

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._server is not None:
            await asyncio.to_thread(self._server.close)
        if self._tmp is not None:
            self._tmp.cleanup()


_V2 = {"float32": "FP32", "float16": "FP16", "int64": "INT64"}


@dataclass(frozen=True)
class Point:
    model: str
    partition: int
    batch: int
    concurrency: int


def environment() -> dict[str, Any]:
    import onnxruntime

    return {
        "versions": {
            "migserve": migserve.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "host": {"hostname": socket.gethostname(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }


class Recorder:
    """Appends each point to points.csv and points.json as it finishes."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        flat = [{k: v for k, v in r.items() if not isinstance(v, dict | list)} for r in self.rows]  # nested values: JSON only
        with (self.out / "points.csv").open("w", newline="") as fh:
            columns = list(dict.fromkeys(k for r in flat for k in r))  # rows may differ (a failed point, another workload)
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(flat)
        (self.out / "points.json").write_text(json.dumps(self.rows, indent=1))


async def measure(
    target: Target, inputs: dict[str, Array], args: argparse.Namespace, concurrency: int, batch: int, *, probe: NvmlProbe | None
) -> dict[str, Any]:
    async def call() -> None:
        await target.call(inputs)

    await closed_loop(call, concurrency, WARMUP_S)  # warm-up, discarded
    pid = target.pid()
    cpu_before, _ = process_usage(pid)
    if probe is not None:
        probe.begin()
    if args.arrival == "poisson":
        result = await open_loop(call, args.rate, args.duration)
    else:
        result = await closed_loop(call, concurrency, args.duration)
    cpu_after, rss = process_usage(pid)
    cpu = cpu_after - cpu_before if cpu_after is not None and cpu_before is not None else None
    row = result.summary(batch) | {
        "worker_cpu_s": cpu,
        "worker_cpu_util": cpu / result.seconds if cpu is not None else None,
        "worker_rss_mb": rss,
        "first_error": result.first_error,
    }
    if probe is not None:
        row |= probe.end()
    if args.dcgm_url:
        row |= await asyncio.to_thread(scrape_dcgm, args.dcgm_url)
    return row


def scrape_dcgm(url: str) -> dict[str, Any]:
    """DCGM activity at the end of a point: per GPU instance, and whole-GPU values labelled board-level."""
    import urllib.request

    from .dcgm import activity, parse_samples

    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            groups = activity(parse_samples(answer.read().decode()))
    except (OSError, ValueError) as exc:
        return {"dcgm_error": f"{type(exc).__name__}: {exc}"}
    described = [{"gpu": g.gpu, "uuid": g.uuid, "gpu_instance": g.gpu_instance, "profile": g.profile, **g.values} for g in groups]
    return {
        "dcgm_instances": [d for d, g in zip(described, groups, strict=True) if not g.board_level],
        "dcgm_board_level": [d for d, g in zip(described, groups, strict=True) if g.board_level],
    }


def points(models: list[str], partitions: int, batches: list[int], concurrencies: list[int]) -> Iterator[Point]:
    for model in models:
        for partition in range(partitions):
            for batch in batches:
                for concurrency in concurrencies:
                    yield Point(model, partition, batch, concurrency)


async def sweep(args: argparse.Namespace, err: TextIO) -> Recorder:
    from service.partitions import Partition, discover
    from service.repository import load_repository

    repo = load_repository(args.model_repo)
    missing = [m for m in args.models if m not in repo.models]
    if missing:
        raise ValueError(f"models not in {args.model_repo}: {missing}; served there: {sorted(repo.models)}")
    check_dims(args.dims or {}, contract_shapes(repo, args.models))
    parts: list[Partition | None] = [None]  # a given URL: the remote server is the one "partition"
    if args.url is None:
        parts = [p for p in discover(None, args.cpu_slices) if args.partitions == "all" or p.id in args.partitions.split(",")]
        if not parts:
            raise ValueError(f"no partition matches --partitions {args.partitions}")
    recorder = Recorder(args.out)
    plan = list(points(args.models, len(parts), args.batch, args.concurrency))
    env = environment()
    probes = [probe_for(p.device if p is not None else None) for p in parts]  # NVML handles, once per partition
    target: Target | None = None
    current: tuple[str, int] | None = None
    progress = Progress(err, len(plan))
    try:
        for done, point in enumerate(plan):
            entry = repo.models[point.model]
            if target is None or current != (point.model, point.partition):
                if target is not None:
                    await target.stop()
                target = _target(args, parts[point.partition], entry)
                await target.start()
                current = (point.model, point.partition)
            progress.show(done, f"{point.model} b={point.batch} c={point.concurrency} on {target.label}")
            inputs = inputs_for(entry.contract, point.batch, args.dims)
            row = await measure(target, inputs, args, point.concurrency, point.batch, probe=probes[point.partition])
            recorder.add(
                {"mode": args.mode, "arrival": args.arrival, "rate": args.rate if args.arrival == "poisson" else None}
                | {
                    "model": point.model,
                    "family": entry.contract.family,
                    "size": entry.contract.size,
                    "contract_sha256": entry.contract.model_sha256,
                }
                | {"partition": target.label, "profile": target.profile, "batch": point.batch, "concurrency": point.concurrency}
                | {"duration_s": args.duration, "dims": ",".join(f"{k}={v}" for k, v in (args.dims or {}).items()) or "default"}
                | row
                | env
            )
        progress.show(len(plan), "done", final=True)
    finally:
        if target is not None:
            await target.stop()
    return recorder


def contract_shapes(repo: Repository, models: Sequence[str]) -> Shapes:
    """Each model's inputs and dim ranges as its contract declares them, for check_dims."""
    return {m: (repo.models[m].contract.inputs, repo.models[m].contract.dims) for m in models}


def check_dims(dims: dict[str, int], shapes: Shapes) -> None:
    """--dims against each model's inputs and dim ranges (a contract's, or the zoo's for training): each name some
    model's input dim, each value in its range where it is one."""
    inputs = {model: {d for t in specs for d in t.shape if isinstance(d, str) and d != "batch"} for model, (specs, _) in shapes.items()}
    for name, value in dims.items():
        having = {model: ranges[name] for model, (_, ranges) in shapes.items() if name in inputs[model]}
        if not having:
            known = sorted(set().union(*inputs.values()))
            raise ValueError(
                f"--dims {name}: not an input dim of {', '.join(shapes)} (theirs: {', '.join(known) or 'none'}; the batch is --batch)"
            )
        for model, dim in having.items():
            if not dim.min <= value <= dim.max:
                raise ValueError(f"--dims {name}={value}: {model} takes {name} from {dim.min} to {dim.max}")


def _target(args: argparse.Namespace, partition: Any, entry: Any) -> Target:
    if args.mode == "direct":
        return DirectTarget(partition, entry)
    if partition is None:
        return HttpTarget(args.mode, "remote", entry.contract.name, url=args.url, repo=args.model_repo)
    profile = partition.profile or ",".join(map(str, partition.cores))
    return HttpTarget(partition.id, profile, entry.contract.name, url=None, repo=args.model_repo, partition=partition)


class Progress:
    """A one-line progress bar on stderr: points done, elapsed seconds, the current point."""

    def __init__(self, err: TextIO, total: int, width: int = 30) -> None:
        self.err, self.total, self.width = err, total, width
        self.started = time.monotonic()

    def show(self, done: int, what: str, final: bool = False) -> None:
        filled = round(self.width * done / self.total) if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.started
        print(f"\r[{bar}] {done}/{self.total} {elapsed:5.0f}s {what:<60}", end="\n" if final else "", file=self.err, flush=True)


def add_parser(actions: Any) -> None:
    profile = actions.add_parser("profile", help="sweep model x batch x concurrency x partition; CSV, JSON, plots, report")
    profile.add_argument("--models", type=lambda s: s.split(","), required=True, help="comma-separated model names")
    profile.add_argument("--batch", type=parse_list, default=[1, 8, 32], help="batch sizes (default 1,8,32)")
    profile.add_argument("--concurrency", type=parse_list, default=[1, 8, 32], help="concurrent callers (default 1,8,32)")
    profile.add_argument("--partitions", default="all", help="'all' or comma-separated partition ids (direct mode)")
    profile.add_argument("--cpu-slices", type=parse_list, help="cores per CPU slice when there is no GPU (default one per core)")
    profile.add_argument("--duration", type=parse_seconds, default=10.0, help="measured seconds per point, e.g. 10s (default)")
    profile.add_argument("--mode", choices=["direct", "gateway", "triton"], default="direct")
    profile.add_argument("--url", help="host:port of a running gateway (gateway mode) or Triton server (triton mode)")
    profile.add_argument("--arrival", choices=["closed", "poisson"], default="closed")
    profile.add_argument("--rate", type=parse_rate, default=50.0, help="requests per second with --arrival poisson")
    profile.add_argument("--dcgm-url", help="a dcgm-exporter /metrics URL scraped after each point (fields 1001, 1002, 1005, 252)")
    profile.add_argument("--dims", type=parse_dims, help="input dims other than the contract's defaults, e.g. height=8,width=8")
    profile.add_argument("--model-repo", type=Path, default=Path("model_repo"))
    profile.add_argument("--out", type=Path, required=True, help="folder for points.csv, points.json, plots and report.md")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    from .report import write_report

    if args.mode == "triton" and args.url is None:
        print("error: --mode triton needs --url of a Triton server", file=err)
        return 2
    if args.mode == "direct" and args.url is not None:
        print("error: --url is for --mode gateway or triton; direct mode starts its own workers", file=err)
        return 2
    try:
        with keeping_what_finished(err, "points") as stop:  # reported all the same
            asyncio.run(_stopped_by_sigterm(sweep(args, err)))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=err)
        return 2
    rows = json.loads((args.out / "points.json").read_text()) if (args.out / "points.json").is_file() else []
    if not rows:
        print("no point finished", file=err)
        return stop.status(1)
    for path in write_report(rows, args.out):
        print(f"wrote {path}", file=out)
    return stop.status(0)


async def _stopped_by_sigterm(work: Coroutine[Any, Any, Recorder]) -> Recorder:
    """`work`, which SIGTERM (`timeout`, a supervisor's stop) cancels as asyncio's runner cancels it on Ctrl-C (its
    clean-up runs: the workers it started are stopped), then raised as Terminated."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    terminated = False

    def stop() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop)
    try:
        return await work
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
