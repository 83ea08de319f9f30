"""`migserve bench share`: the same workload under MIG, MPS and plain time-slicing, side by side.

N processes run the same workload (ONNX Runtime inference of a model_repo model, or torch
training steps) for the same wall-clock window:

- `mig`: one process per MIG instance of the GPU (CUDA_VISIBLE_DEVICES=<MIG UUID>);
- `mps`: the N processes on the whole GPU through a private MPS control daemon (its own pipe
  and log folders, started before and stopped after; each client gets 100/N % of the SMs);
- `timeslice`: the N processes on the whole GPU with no MPS: the driver time-slices them.

Guarded: MIG and the other two modes need different MIG states. bench share reads the state
(`nvidia-smi --query-gpu=...mig.mode...`, `nvidia-smi -L`) and refuses, before running anything,
every mode the GPU cannot run as it is; it never enables, disables or repartitions MIG (others
may rely on the layout). Compare modes across GPUs or runs by pointing them at the same --out:
rows are appended and report.md compares every mode found there.

`--device cpu` is the CPU analogue, for trying the command without a GPU: `mig` pins each
process to its own CPU slice, `timeslice` lets the same processes share all those cores; `mps`
has no CPU analogue.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from exporters.names import MODEL_NAMES
from migserve.interrupts import keeping_what_finished
from service.workers.affinity import pin_threads

from .load import milliseconds, timed_runs
from .mig import MigError, Smi
from .profile import Recorder, check_dims, contract_shapes, environment, parse_dims, parse_seconds
from .smi import parse_devices
from .train import child_answer, child_main, killed_if_interrupted, start_child, start_together, wait_for_start, zoo_shapes

MODES = ("mig", "mps", "timeslice")


def add_parser(actions: Any) -> None:
    share = actions.add_parser(
        "share",
        help="the same workload under MIG, MPS and time-slicing, side by side (guarded: never changes MIG)",
        description="Run N processes of one workload under each sharing mode and compare throughput and latency.",
    )
    share.add_argument("--modes", type=_modes, default=list(MODES), help="comma-separated: mig,mps,timeslice (default all three)")
    share.add_argument("--models", type=lambda s: s.split(","), required=True, help="model names (model_repo for infer, zoo for train)")
    share.add_argument("--workload", choices=["infer", "train"], default="infer", help="onnxruntime inference or torch training steps")
    share.add_argument("--processes", type=int, default=2, help="processes sharing the GPU (default 2)")
    share.add_argument("--batch", type=int, default=8, help="batch per call (default 8)")
    share.add_argument("--duration", type=parse_seconds, default=20.0, help="the common measured window per mode (default 20s)")
    share.add_argument("--size", choices=["tiny", "paper"], default="paper", help="train workload: architecture size (default paper)")
    share.add_argument("--dims", type=parse_dims, help="input dims other than the contract's defaults, e.g. height=64,width=64")
    share.add_argument("--gpu", type=int, default=0, help="GPU index (default 0)")
    share.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="cpu: the CPU analogue (mig = pinned slices)")
    share.add_argument("--model-repo", type=Path, default=Path("model_repo"))
    share.add_argument("--dry-run", action="store_true", help="check the guard and print the plan; run nothing")
    share.add_argument("--out", type=Path, required=True, help="folder for points.csv, points.json and report.md (appended)")


def _modes(raw: str) -> list[str]:
    modes = [m.strip() for m in raw.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"--modes {raw!r}: choose from {','.join(MODES)}")
    return list(dict.fromkeys(modes))


# --- the GPU's state and the guard ------------------------------------------------------------


@dataclass(frozen=True)
class GpuState:
    index: int
    name: str
    mig_current: str  # Enabled, Disabled, or [N/A] (no MIG on this GPU)
    mig_pending: str
    uuid: str | None = None
    mig_devices: tuple[str, ...] = field(default=())  # MIG device UUIDs, in `nvidia-smi -L` order


def parse_mig_mode(text: str) -> dict[str, str]:
    """`nvidia-smi --query-gpu=...,mig.mode.current,mig.mode.pending --format=csv` for one GPU -> {column: value}."""
    rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text.strip())) if row]
    if len(rows) < 2 or "mig.mode.current" not in rows[0]:
        raise MigError(f"unexpected nvidia-smi query output: {text.strip()[:200]!r}")
    return dict(zip(rows[0], rows[1], strict=False))


def gpu_state(smi: Smi, gpu: int) -> GpuState:
    query = smi.run("-i", str(gpu), "--query-gpu=index,name,mig.mode.current,mig.mode.pending", "--format=csv")
    mode = parse_mig_mode(query.stdout)
    devices = [d for d in parse_devices(smi.run("-L").stdout) if d.gpu == gpu]
    whole = next((d for d in devices if d.mig_index is None), None)
    return GpuState(
        index=gpu,
        name=mode.get("name") or (whole.name if whole else "?"),
        mig_current=mode["mig.mode.current"],
        mig_pending=mode.get("mig.mode.pending", mode["mig.mode.current"]),
        uuid=whole.uuid if whole else None,
        mig_devices=tuple(d.uuid for d in devices if d.mig_index is not None),
    )


def refusals(modes: list[str], state: GpuState, processes: int, mps_control: str | None, mps_running: bool) -> list[str]:
    """Why each mode cannot run on this GPU as it is, without changing MIG; empty when all can."""
    g = state.index
    if state.mig_current != state.mig_pending:
        return [
            f"GPU {g} has a MIG mode change pending (current {state.mig_current}, pending {state.mig_pending}); "
            "bench share runs only on a settled GPU"
        ]
    problems = []
    enabled = state.mig_current == "Enabled"
    for mode in modes:
        if mode == "mig" and state.mig_current == "[N/A]":
            problems.append(f"mig: GPU {g} ({state.name}) does not support MIG")
        elif mode == "mig" and not enabled:
            problems.append(
                f"mig: MIG is disabled on GPU {g}; enabling it needs a GPU reset, which bench share never does "
                f"(an administrator: nvidia-smi -i {g} -mig 1, then migserve mig apply LAYOUT --gpu {g} --yes)"
            )
        elif mode == "mig" and len(state.mig_devices) < processes:
            fewer = f"use --processes {len(state.mig_devices)}, or " if state.mig_devices else ""
            problems.append(
                f"mig: {processes} processes need {processes} MIG instances on GPU {g}, it has {len(state.mig_devices)}; "
                f"{fewer}create instances with migserve mig apply"
            )
        elif mode in ("mps", "timeslice") and enabled:
            held = f" ({len(state.mig_devices)} instances)" if state.mig_devices else ""
            problems.append(
                f"{mode}: needs the whole GPU, but MIG is enabled on GPU {g}{held} and others may rely on its layout; "
                "bench share does not disable MIG: run --modes mig here, and mps,timeslice on a GPU without MIG (same --out)"
            )
        elif mode == "mps" and mps_control is None:
            problems.append("mps: nvidia-cuda-mps-control is not on PATH")
        elif mode == "mps" and mps_running:
            problems.append("mps: an MPS control daemon already runs on this machine; bench share does not touch it")
    return problems


# --- the plan: which process runs where ---------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    mode: str
    process: int
    cuda_device: str | None  # CUDA_VISIBLE_DEVICES
    cores: tuple[int, ...] = ()  # CPU analogue only

    def describe(self) -> str:
        return self.cuda_device or ("cores " + ",".join(map(str, self.cores)))


def plan(mode: str, processes: int, state: GpuState | None, slices: list[tuple[int, ...]]) -> list[Placement]:
    if state is None:  # the CPU analogue
        if mode == "mig":
            return [Placement(mode, i, None, slices[i]) for i in range(processes)]
        shared = tuple(sorted({c for s in slices[:processes] for c in s}))
        return [Placement(mode, i, None, shared) for i in range(processes)]
    if mode == "mig":
        return [Placement(mode, i, state.mig_devices[i]) for i in range(processes)]
    return [Placement(mode, i, state.uuid) for i in range(processes)]


@contextmanager
def mps_daemon() -> Iterator[tuple[str, str]]:
    """A private MPS control daemon (own pipe and log folders); quit on the way out, whatever happened."""
    control = shutil.which("nvidia-cuda-mps-control") or "nvidia-cuda-mps-control"  # the guard checked it is there
    with tempfile.TemporaryDirectory(prefix="migserve-mps-") as root:
        pipe, log = Path(root) / "pipe", Path(root) / "log"
        pipe.mkdir()
        log.mkdir()
        env = dict(os.environ) | {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(log)}
        subprocess.run([control, "-d"], env=env, check=True, timeout=30)
        try:
            yield str(pipe), str(log)
        finally:
            subprocess.run([control], input="quit\n", text=True, env=env, check=False, timeout=30)


# --- running a mode -------------------------------------------------------------------------------


def run_mode(args: argparse.Namespace, model: str, placements: list[Placement], mps: tuple[str, str] | None) -> list[dict[str, Any]]:
    """Start every process, open the common window once all have loaded their model, collect their answers."""
    module = "bench.share" if args.workload == "infer" else "bench.train"
    children = []
    for p in placements:
        spec: dict[str, Any] = {
            "model": model,
            "batch": args.batch,
            "dims": args.dims or {},
            "cores": list(p.cores),
            "cuda": args.device == "gpu",
            "seconds": args.duration,
            "barrier": True,
            "warmup": 3,
        }
        if args.workload == "infer":
            spec["model_repo"] = str(args.model_repo.resolve())
        else:
            spec |= {"size": args.size, "steps": None, "optimizer": "sgd"}
        if mps is not None:
            spec |= {"mps_pipe": mps[0], "mps_log": mps[1], "mps_thread_percentage": 100 // len(placements)}
        children.append(start_child(module, spec, p.cuda_device))
    with killed_if_interrupted(children):
        start_together(children)
        answers = [child_answer(c, timeout=args.duration + 600) for c in children]
    return [
        {"mode": p.mode, "process": p.process, "placement": p.describe(), "model": model, "workload": args.workload, "batch": args.batch}
        | answer
        for p, answer in zip(placements, answers, strict=True)
    ]


def infer_child(spec: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime inference in a placed child: warm-up, then calls for `seconds` from `start_at`."""
    import resource

    if spec["cores"]:
        pin_threads(spec["cores"])
    import onnxruntime as ort

    from service.repository import load_repository

    from .profile import inputs_for

    entry = load_repository(Path(spec["model_repo"])).models[spec["model"]]
    options = ort.SessionOptions()
    if spec["cores"]:
        options.intra_op_num_threads = len(spec["cores"])
        options.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider"] if spec["cuda"] else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(entry.model_path), options, providers=providers)
    if spec["cuda"] and "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} has no CUDA provider here (providers: {session.get_providers()})")
    feeds = inputs_for(entry.contract, spec["batch"], spec["dims"])
    for _ in range(spec["warmup"]):
        session.run(None, feeds)
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = timed_runs(lambda: session.run(None, feeds), seconds=spec["seconds"], start_at=wait_for_start(spec))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "calls": len(times),
        "images_per_s": spec["batch"] * len(times) / float(np.sum(times)),
        **milliseconds(times, "latency"),
        "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "peak_rss_mb": after.ru_maxrss / 1024,
        "providers": ",".join(session.get_providers()),
    }


# --- the command ------------------------------------------------------------------------------------


class Refused(Exception):
    """A reason to run nothing, said to the user as it is."""


def _check_workload(args: argparse.Namespace) -> None:
    """The batch, the models and --dims (against the contracts for inference, the zoo for training), after the guard
    and before any process starts: else each process of each mode failed on its own (a KeyError for an unknown
    model)."""
    if args.batch < 1:
        raise Refused("--batch must be at least 1")
    if args.workload == "train":
        if unknown := [m for m in args.models if m not in MODEL_NAMES]:
            raise Refused(f"unknown models {unknown}; the zoo has: {', '.join(MODEL_NAMES)}")
        shapes = zoo_shapes(args.models, args.size) if args.dims else {}
    else:
        from service.repository import RepositoryError, load_repository

        try:
            repo = load_repository(args.model_repo)
        except RepositoryError as exc:
            raise Refused(str(exc)) from None
        if missing := [m for m in args.models if m not in repo.models]:
            raise Refused(f"models not in {args.model_repo}: {missing}; there: {sorted(repo.models)}")
        shapes = contract_shapes(repo, args.models)
    try:
        check_dims(args.dims or {}, shapes)
    except ValueError as exc:
        raise Refused(str(exc)) from None


def where_to_run(args: argparse.Namespace) -> tuple[GpuState | None, list[tuple[int, ...]]]:
    """The GPU's state (None for --device cpu) and the CPU slices of the analogue; Refused when the guard says no."""
    if args.processes < 1:
        raise Refused("--processes must be at least 1")
    if args.device == "cpu":
        if "mps" in args.modes:
            raise Refused("mps: MPS is a GPU feature; with --device cpu choose from mig,timeslice")
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < args.processes:
            raise Refused(f"{args.processes} processes need {args.processes} cores for --device cpu; {len(cores)} usable")
        per = len(cores) // args.processes
        return None, [tuple(cores[i * per : (i + 1) * per]) for i in range(args.processes)]
    try:
        state = gpu_state(Smi.from_env(), args.gpu)
    except MigError as exc:
        raise Refused(f"bench share needs an NVIDIA GPU: {exc}") from None
    control = shutil.which("nvidia-cuda-mps-control")
    running = subprocess.run(["pgrep", "-x", "nvidia-cuda-mps-control"], capture_output=True, check=False).returncode == 0
    problems = refusals(args.modes, state, args.processes, control, running)
    if problems:
        head = f"GPU {args.gpu} ({state.name}, MIG {state.mig_current}) cannot run every mode asked as it is:"
        raise Refused("\n  ".join([head, *problems]) + "\nnothing was run and nothing was changed")
    return state, []


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        state, slices = where_to_run(args)
        plans = {mode: plan(mode, args.processes, state, slices) for mode in args.modes}
        for mode, placements in plans.items():
            places = "; ".join(p.describe() for p in placements)
            print(f"{mode}: {args.processes} x {args.workload} {','.join(args.models)} b={args.batch} on {places}", file=out)
        if args.dry_run:  # the guard and the plan only
            print("dry run: nothing was run", file=out)
            return 0
        _check_workload(args)
    except Refused as exc:
        print(f"refused: {exc}", file=err)
        return 2
    recorder = Recorder(args.out)
    previous = json.loads((args.out / "points.json").read_text()) if (args.out / "points.json").is_file() else []
    recorder.rows = list(previous)  # appended, so modes that need different MIG states can share one report
    context = {"device": args.device, "gpu": state.name if state else "cpu", "duration_s": args.duration} | environment()
    with keeping_what_finished(err, "modes") as stop:  # the running mode's children are gone with a stop
        for model in args.models:
            for mode, placements in plans.items():
                print(f"{mode}: {model} ... (loading, then {args.duration:.0f} s measured)", file=err, flush=True)
                with mps_daemon() if mode == "mps" else nullcontext() as mps:
                    for row in run_mode(args, model, placements, mps):
                        recorder.add(row | context)
    if not recorder.rows:
        print("no mode finished", file=err)
        return stop.status(1)
    print(f"wrote {write_share_report(recorder.rows, args.out)}", file=out)
    failed = [r for r in recorder.rows[len(previous) :] if r.get("error")]
    for row in failed:
        print(f"{row['mode']} process {row['process']}: {row['error']}", file=err)
    return stop.status(1 if failed else 0)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (model, workload, gpu, mode): total images/s over its processes, their p50 and worst p99."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["workload"], row["gpu"], row["mode"]), []).append(row)
    lines = []
    for (model, workload, gpu, mode), group in groups.items():
        good = [r for r in group if not r.get("error")]
        p50 = "latency_p50_ms" if workload == "infer" else "step_p50_ms"
        p99 = "latency_p99_ms" if workload == "infer" else "step_p99_ms"
        lines.append(
            {
                "model": model,
                "workload": workload,
                "gpu": gpu,
                "mode": mode,
                "processes": len(group),
                "failed": len(group) - len(good),
                "images_per_s": sum(r["images_per_s"] for r in good),
                "p50_ms": float(np.mean([r[p50] for r in good])) if good else float("nan"),
                "worst_p99_ms": max((r[p99] for r in good), default=float("nan")),
            }
        )
    return lines


def write_share_report(rows: list[dict[str, Any]], out: Path) -> Path:
    lines = [
        "# Sharing modes: MIG, MPS, time-slicing",
        "",
        "Each line: N processes of the same workload over the same measured window. images/s is their sum;",
        "p50 is the mean of their medians (per call for infer, per step for train); worst p99 is the largest.",
        "",
        "| model | workload | GPU | mode | processes | images/s | x first mode | p50 ms | worst p99 ms | failed |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    first: dict[tuple[str, str], float] = {}
    for s in summarise(rows):
        base = first.setdefault((s["model"], s["workload"]), s["images_per_s"])
        ratio = s["images_per_s"] / base if base else float("nan")
        lines.append(
            f"| {s['model']} | {s['workload']} | {s['gpu']} | {s['mode']} | {s['processes']} | {s['images_per_s']:.1f} | {ratio:.2f} "
            f"| {s['p50_ms']:.2f} | {s['worst_p99_ms']:.2f} | {s['failed']} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


if __name__ == "__main__":
    child_main(infer_child)
