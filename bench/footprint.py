"""What placement takes each model to need (service/placement.py, footprint) against what a process running it grows by.

For each model of a repository, a child process with nothing else loaded opens an onnxruntime session on the CPU
(one thread per core given, as a CPU slice's worker has) and runs one batch at the contract's largest batch and
default sizes; its peak resident memory (ru_maxrss) is read before the session, after it, and after the run, and the inputs'
bytes (resident before, live in the estimate) are added. Beside
it: the contract's estimate of the tensors between the layers (exporters/memory.py) and placement's footprint
(SESSION_BYTES + WEIGHT_COPIES x the file + that estimate; 4x the file for an export without one). First, what a
worker and the gateway hold once they have imported what they run, against GATEWAY_BYTES and WORKER_BYTES.

    .venv/bin/python -m bench.footprint --repo model_repo
    .venv/bin/python -m bench.footprint --repo results/lns_repo_paper --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

MB = 1 << 20


def measure(directory: Path, threads: int) -> dict[str, float]:
    """In this process: MB of peak resident memory the session added, and the run."""
    import numpy as np
    import onnxruntime as ort

    from migserve.contract import read_contract

    contract = read_contract(directory)
    sizes = {name: (r.max if name == "batch" else r.default) for name, r in contract.dims.items()}
    rng = np.random.default_rng(0)
    feeds = {}  # made in place (no float64 temporaries), so that the peak before the session is what is resident
    for t in contract.inputs:
        shape = [d if isinstance(d, int) else sizes[d] for d in t.shape]
        feeds[t.name] = rng.random(shape, dtype=np.float32) if t.dtype == "float32" else np.ones(shape, dtype=t.dtype)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    session = ort.InferenceSession(str(directory / contract.model_file), options, providers=["CPUExecutionProvider"])
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    session.run(None, feeds)
    ran = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    inputs = sum(v.nbytes for v in feeds.values()) / MB  # resident before; the estimate counts them as live
    return {"load_mb": (loaded - before) / 1024, "inputs_mb": inputs, "run_mb": (ran - loaded) / 1024}  # ru_maxrss: KiB


PROCESSES = {  # what each kind of process imports before its models
    "a worker": "import numpy, onnxruntime, service.workers.process",
    "the gateway": "import service.api.app, uvicorn",
}


def processes() -> dict[str, dict[str, float]]:
    """MB resident in each kind of process once it has imported what it runs: private (RssAnon) and mapped files."""
    found = {}
    for kind, imports in PROCESSES.items():
        probe = f"{imports}\nprint(open('/proc/self/status').read())"
        status = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        found[kind] = {name: int(fields[name].split()[0]) / 1024 for name in ("RssAnon", "RssFile")}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("model_repo"))
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime's threads (default 1, as a one-core CPU slice)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.threads)))
        return 0

    from service.placement import GATEWAY_BYTES, WORKER_BYTES, footprint
    from service.repository import load_repository

    taken = {"a worker": WORKER_BYTES, "the gateway": GATEWAY_BYTES}
    for kind, resident in processes().items():
        print(
            f"{kind} before its models: {resident['RssAnon']:.0f} MB of its own, {resident['RssFile']:.0f} MB of mapped files "
            f"(shared between processes); placement takes {taken[kind] / MB:.0f} MB"
        )
    repo = load_repository(args.repo)
    print(f"{args.repo}: one CPU session of {args.threads} thread(s) per model, one run at the largest batch")
    print("| model | file MB | batch | estimated activations MB | footprint MB | measured: load + inputs + run MB | footprint / measured |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, entry in sorted(repo.models.items()):
        child = [sys.executable, "-m", "bench.footprint", "--measure", str(entry.directory), "--threads", str(args.threads)]
        found = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
        memory = entry.contract.memory
        measured = found["load_mb"] + found["inputs_mb"] + found["run_mb"]
        print(
            f"| {name} | {entry.model_path.stat().st_size / MB:.1f} | {entry.contract.dims['batch'].max} | "
            f"{'-' if memory is None else f'{memory.activation_bytes / MB:.1f}'} | {footprint(entry) / MB:.1f} | "
            f"{found['load_mb']:.0f} + {found['inputs_mb']:.0f} + {found['run_mb']:.0f} = {measured:.0f} | "
            f"{footprint(entry) / MB / measured:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
