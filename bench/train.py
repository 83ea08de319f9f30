"""`migserve bench train`: a training step (forward, backward, optimizer step) per partition.

MIGPerf measured training as well as inference on each MIG profile; this is that workload
for the zoo's models. Each point runs in a child process placed on its partition the way a
worker is: `CUDA_VISIBLE_DEVICES=<UUID>` on a GPU or MIG instance (set before torch is
imported), pinned cores and a matching torch thread count on a CPU slice. The child builds
the model at the given size with seeded random weights, trains it on one seeded batch against
seeded random targets (mean squared error over every floating output: a surrogate loss, the
same arithmetic as the paper's losses at this scale), discards the warm-up steps and reports
step times, images/s, CPU time, peak RSS and, on CUDA, peak allocated memory.

Points go to points.csv and points.json as they finish (Ctrl-C keeps them); report.md and
a plot of images/s per partition are written at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from exporters.names import MODEL_NAMES
from migserve.contract import Size
from migserve.interrupts import keeping_what_finished
from service.workers.affinity import pin_threads

from .load import milliseconds, timed_runs
from .profile import Progress, Recorder, Shapes, check_dims, environment, parse_dims, parse_list

CHILD_TIMEOUT_S = 1800


def add_parser(actions: Any) -> None:
    train = actions.add_parser(
        "train",
        help="training-step throughput (forward, backward, optimizer step) per partition, with torch",
        description="Train each model on one seeded batch on each partition; report step time and images/s.",
    )
    train.add_argument("--models", type=lambda s: s.split(","), required=True, help="comma-separated zoo model names")
    train.add_argument("--size", choices=["tiny", "paper"], default="paper", help="architecture size (default paper)")
    train.add_argument("--batch", type=parse_list, default=[8], help="batch sizes (default 8)")
    train.add_argument("--steps", type=int, default=20, help="measured steps per point (default 20)")
    train.add_argument("--warmup", type=int, default=3, help="steps run first and discarded (default 3)")
    train.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="SGD with momentum 0.9 (default) or Adam")
    train.add_argument("--dims", type=parse_dims, help="input dims other than the contract's defaults, e.g. height=64,width=64")
    train.add_argument("--partitions", default="all", help="'all' or comma-separated partition ids")
    train.add_argument("--cpu-slices", type=parse_list, help="cores per CPU slice when there is no GPU (default one per core)")
    train.add_argument("--out", type=Path, required=True, help="folder for points.csv, points.json, report.md and the plot")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    if importlib.util.find_spec("torch") is None:  # the zoo is built with torch
        print("error: bench train needs torch: pip install -e '.[export]'", file=err)
        return 2
    unknown = [m for m in args.models if m not in MODEL_NAMES]  # said before a child imports torch
    if unknown:
        print(f"error: unknown models {unknown}; the zoo has: {', '.join(MODEL_NAMES)}", file=err)
        return 2
    if args.steps < 1 or args.warmup < 0:
        print("error: --steps must be at least 1 and --warmup at least 0", file=err)
        return 2
    try:
        check_dims(args.dims or {}, zoo_shapes(args.models, args.size) if args.dims else {})
    except ValueError as exc:
        print(f"error: {exc}", file=err)
        return 2
    from service.partitions import TopologyError, discover

    try:
        parts = [p for p in discover(None, args.cpu_slices) if args.partitions == "all" or p.id in args.partitions.split(",")]
    except TopologyError as exc:
        print(f"error: {exc}", file=err)
        return 2
    if not parts:
        print(f"error: no partition matches --partitions {args.partitions}", file=err)
        return 2
    recorder = Recorder(args.out)
    plan = [(model, part, batch) for model in args.models for part in parts for batch in args.batch]
    progress = Progress(err, len(plan))
    env = environment()
    with keeping_what_finished(err, "points") as stop:  # the running point's child is gone with a stop
        for done, (model, part, batch) in enumerate(plan):
            progress.show(done, f"{model} b={batch} on {part.id}")
            row = train_point(args, model, part, batch)
            where = {"partition": part.id, "kind": part.kind.value, "profile": part.profile or ",".join(map(str, part.cores))}
            recorder.add({"model": model, "size": args.size, "batch": batch, "optimizer": args.optimizer} | where | row | env)
        progress.show(len(plan), "done", final=True)
    if not recorder.rows:
        print("no point finished", file=err)
        return stop.status(1)
    for path in write_train_report(recorder.rows, args.out):
        print(f"wrote {path}", file=out)
    failed = [r for r in recorder.rows if r.get("error")]
    for row in failed:
        print(f"{row['model']} b={row['batch']} on {row['partition']}: {row['error']}", file=err)
    return stop.status(1 if failed else 0)


def zoo_shapes(models: list[str], size: Size) -> Shapes:
    """Each zoo model's inputs and dim ranges at `size`, for check_dims (the zoo imports torch: asked only with --dims)."""
    from exporters.zoo import get

    shapes: Shapes = {}
    for model in models:
        definition = get(model)
        cfg = definition.config(size)
        shapes[model] = (definition.inputs(cfg), definition.dims(cfg))
    return shapes


def train_point(args: argparse.Namespace, model: str, partition: Any, batch: int) -> dict[str, Any]:
    """Run one point in a child process placed on `partition`; its JSON answer, or an `error`."""
    from service.partitions import PartitionKind

    spec = {
        "model": model,
        "size": args.size,
        "batch": batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "optimizer": args.optimizer,
        "dims": args.dims or {},
        "cores": list(partition.cores),
        "cuda": partition.kind in (PartitionKind.GPU, PartitionKind.MIG),
    }
    return child_answer(start_child("bench.train", spec, partition.device if spec["cuda"] else None))


def start_child(module: str, spec: dict[str, Any], cuda_device: str | None) -> subprocess.Popen[str]:
    """`python -m MODULE --child SPEC` with CUDA_VISIBLE_DEVICES set before it imports anything ("" on a CPU slice)."""
    env = dict(os.environ) | {"CUDA_VISIBLE_DEVICES": cuda_device or ""}
    if spec.get("mps_pipe"):  # a client of bench share's private MPS daemon, with its share of the SMs
        env |= {
            "CUDA_MPS_PIPE_DIRECTORY": spec["mps_pipe"],
            "CUDA_MPS_LOG_DIRECTORY": spec["mps_log"],
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(spec["mps_thread_percentage"]),
        }
    return subprocess.Popen(
        [sys.executable, "-m", module, "--child", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_start(spec: dict[str, Any]) -> float | None:
    """In a child started with a barrier: say "ready" (model loaded, warmed up), then read the common start time."""
    if not spec.get("barrier"):
        return None
    print("ready", flush=True)
    line = sys.stdin.readline()
    return float(line) if line.strip() else None


def start_together(children: list[subprocess.Popen[str]], lead_s: float = 0.2) -> None:
    """Wait until every child is ready (or gone), then give them all the same start time."""
    for process in children:
        assert process.stdout is not None
        while (line := process.stdout.readline()) and line.strip() != "ready":
            pass  # a library's chatter before the barrier
    start_at = f"{time.time() + lead_s}\n"
    for process in children:
        assert process.stdin is not None
        try:
            process.stdin.write(start_at)
            process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # it died while loading; child_answer reports why


@contextlib.contextmanager
def killed_if_interrupted(children: list[subprocess.Popen[str]]) -> Iterator[None]:
    """On a KeyboardInterrupt (Ctrl-C, or SIGTERM's Terminated) in the block, `children` are killed and waited for
    before it goes on: a point's measurement is lost anyway, and a child left would run on for minutes."""
    try:
        yield
    except KeyboardInterrupt:
        for process in children:
            process.kill()
        for process in children:
            process.communicate()
        raise


def child_answer(process: subprocess.Popen[str], timeout: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
    """The child's JSON answer (its last line starting with '{'), or an `error` saying why there is none. Ctrl-C or
    SIGTERM (Terminated) while waiting kills the child rather than leave it running on as an orphan."""
    with killed_if_interrupted([process]):
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            return {"error": f"no answer in {timeout:.0f} s"}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"child exited {process.returncode}: {tail}"}
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """The training loop, in the placed child process."""
    import resource

    if spec["cores"]:
        pin_threads(spec["cores"])
    import torch

    from exporters.zoo import get

    if spec["cores"]:
        torch.set_num_threads(len(spec["cores"]))
    device = torch.device("cuda" if spec["cuda"] else "cpu")
    if spec["cuda"] and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device (is this the CPU build of torch?)")
    torch.manual_seed(0)
    definition = get(spec["model"])
    cfg = definition.config(spec["size"])
    module = definition.build(cfg).to(device).train()
    dims = {name: r.default for name, r in definition.dims(cfg).items()} | spec["dims"] | {"batch": spec["batch"]}
    rng = np.random.default_rng(0)
    inputs = [
        torch.from_numpy(definition.random_input(cfg, s, tuple(d if isinstance(d, int) else dims[d] for d in s.shape), rng)).to(device)
        for s in definition.inputs(cfg)
    ]
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=1e-3, momentum=0.9) if spec["optimizer"] == "sgd" else torch.optim.Adam(params, lr=1e-4)
    )
    with torch.no_grad():
        shapes = [o for o in _as_tuple(module(*inputs)) if o.is_floating_point()]
    generator = torch.Generator(device="cpu").manual_seed(1)
    targets = [torch.randn(o.shape, generator=generator).to(device) for o in shapes]
    before = torch.cat([p.detach().flatten() for p in params]).clone()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        outputs = [o for o in _as_tuple(module(*inputs)) if o.is_floating_point()]
        loss = sum(torch.nn.functional.mse_loss(o, t) for o, t in zip(outputs, targets, strict=True))
        assert isinstance(loss, torch.Tensor)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        return float(loss.detach())

    def sync() -> None:
        if spec["cuda"]:
            torch.cuda.synchronize()

    losses = [step() for _ in range(spec["warmup"])]
    sync()
    if spec["cuda"]:
        torch.cuda.reset_peak_memory_stats()
    usage_before = resource.getrusage(resource.RUSAGE_SELF)

    def measured_step() -> None:
        losses.append(step())
        sync()

    times = timed_runs(measured_step, steps=spec["steps"], seconds=spec.get("seconds"), start_at=wait_for_start(spec))
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    after = torch.cat([p.detach().flatten() for p in params])
    measured = float(np.sum(times))
    cpu = (usage_after.ru_utime + usage_after.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime)
    return {
        "steps": len(times),
        "warmup": spec["warmup"],
        "dims": ",".join(f"{k}={v}" for k, v in dims.items() if k != "batch"),
        "parameters": sum(p.numel() for p in params),
        "images_per_s": spec["batch"] * len(times) / measured,
        **milliseconds(times, "step"),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "weights_moved": float((after - before).abs().max()),
        "cpu_s": cpu,
        "cpu_util": cpu / measured,
        "peak_rss_mb": usage_after.ru_maxrss / 1024,
        "cuda_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if spec["cuda"] else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device) + (f" {torch.cuda.get_device_name()}" if spec["cuda"] else ""),
    }


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def write_train_report(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if not r.get("error")]
    written = []
    if good:
        models = list(dict.fromkeys(r["model"] for r in good))
        figure, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            mine = [r for r in good if r["model"] == model]
            for partition in dict.fromkeys(r["partition"] for r in mine):
                group = sorted((r for r in mine if r["partition"] == partition), key=lambda r: r["batch"])
                ax.plot([r["batch"] for r in group], [r["images_per_s"] for r in group], marker="o", label=partition)
            ax.set(title=f"{model} training", xlabel="batch", ylabel="images/s")
            ax.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "train_images_per_s.png", dpi=100)
        plt.close(figure)
        written.append(out / "train_images_per_s.png")
    lines = [
        "# Training-step profile",
        "",
        f"{len(rows)} points ({len(rows) - len(good)} failed). One step: forward, backward, optimizer step on one seeded batch;",
        "warm-up steps discarded. CPU time and peak RSS are the child process's; peak allocated memory is torch's on CUDA.",
        "",
        "| model | size | partition | profile | batch | images/s | step p50 ms | step p99 ms | CPU util | peak RSS MB | error |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['size']} | {r['partition']} | {r['profile']} | {r['batch']} | | | | | | {r['error']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['size']} | {r['partition']} | {r['profile']} | {r['batch']} | {r['images_per_s']:.1f} "
            f"| {r['step_p50_ms']:.1f} | {r['step_p99_ms']:.1f} | {r['cpu_util']:.2f} | {r['peak_rss_mb']:.0f} | |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    written.append(out / "report.md")
    return written


def child_main(run_child: Any) -> None:
    """The entry point of a child module: `python -m bench.X --child SPEC_JSON`, JSON answer on stdout."""
    if len(sys.argv) != 3 or sys.argv[1] != "--child":
        sys.exit("usage: python -m bench.<module> --child SPEC_JSON (started by migserve bench train or share)")
    print(json.dumps(run_child(json.loads(sys.argv[2]))))


if __name__ == "__main__":
    child_main(child)
