"""The gateway's memory for one CT volume through DeepStationing's two stages, this checkout against a git revision.

/v1/lns/segment resamples the volume to the contract's spacing, runs lns-organs over it tile by tile, then
lns-stations over the CT and six organ masks, and maps the labels back: all of it in the gateway process, while the
workers run the tiles. This runs those stages (service/families/lns.py, `stations_of`) in a child process per side,
with the real exported models run by onnxruntime in that process, and reports the peak of the memory Python and
numpy allocate during them (tracemalloc: every numpy array, not onnxruntime's own arena, which lives in the workers),
above the decoded volume that both sides hold before they start. The two sides' label maps must be the same. It
also prints what this checkout estimates a job holds (`lns.job_bytes`, which serve --max-job-mb bounds), beside its
peak with the volume: here tiles are answered as they come, so fewer hold their logits at once than behind a busy
worker, the case the estimate is for (tests/integration/test_lns_stages.py checks that case).

    .venv/bin/python -m bench.lns_memory --a-revision 1c45242                       # tiny models (4 mm spacing, 16x32x32 patches)
    .venv/bin/python -m bench.lns_memory --a-revision 1c45242 --size paper --shape 60 200 200 --spacing 2.5 0.8 0.8
    .venv/bin/python -m bench.lns_memory --size paper --shape 150 512 512 --spacing 2.5 0.7 0.7 --estimate-only
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

MB = 1 << 20


def measure(repo: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], in_flight: int) -> dict[str, Any]:
    """One side, in this process: peak traced bytes during `stations_of`, seconds, and a digest of the labels."""
    import nibabel  # noqa: F401  (the volume readers: imported at a volume's first use, not the job's memory)
    import numpy as np
    import onnxruntime as ort
    import pydicom  # noqa: F401
    import scipy.ndimage  # noqa: F401

    from migserve.contract import read_contract
    from migserve.types import Array
    from service.families import lns
    from service.families.volume import Volume
    from service.jobs import Progress

    contracts, sessions = {}, {}
    for name in ("lns-organs", "lns-stations"):
        contracts[name] = read_contract(repo / name)
        sessions[name] = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    async def run(name: str, inputs: dict[str, Array]) -> dict[str, Array]:
        (logits,) = await asyncio.to_thread(sessions[name].run, None, inputs)
        return {contracts[name].outputs[0].name: np.array(logits)}  # a copy, traced, as the gateway copies it from shared memory

    rng = np.random.default_rng(5)
    hu = rng.normal(-300, 500, shape).astype(np.float32)
    hu[:, shape[1] // 3 : shape[1] // 2] += 900
    volume = Volume(hu=hu, spacing=spacing, affine=np.diag([*spacing[::-1], 1.0]), source="nifti")
    organs, stations = contracts["lns-organs"], contracts["lns-stations"]
    resampled, tiles = lns.plan(volume, organs, stations, 10**10)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    result = asyncio.run(lns.stations_of(volume, organs, stations, run=run, progress=Progress(tiles), in_flight=in_flight))
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {
        "peak_bytes": peak,
        "seconds": seconds,
        "tiles": tiles,
        "resampled": list(resampled),
        "labels_sha256": hashlib.sha256(gzip.decompress(result.nifti)).hexdigest(),  # not the gzip header's time
    }


def _estimate(repo: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], in_flight: int) -> int:
    import numpy as np

    from migserve.contract import read_contract
    from service.families import lns
    from service.families.volume import Volume

    organs, stations = read_contract(repo / "lns-organs"), read_contract(repo / "lns-stations")
    volume = Volume(hu=np.empty(shape, np.float32), spacing=spacing, affine=np.eye(4), source="nifti")
    return lns.job_bytes(shape, lns.plan(volume, organs, stations, 10**10)[0], organs, stations, in_flight)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-revision", help="A: the service as this git revision had it; B: this checkout (needed unless --estimate-only)")
    parser.add_argument("--size", choices=("tiny", "paper"), default="tiny", help="the lns exports to use (made once)")
    parser.add_argument("--shape", type=int, nargs=3, default=(120, 256, 256), help="the CT's voxels, z y x")
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.5, 0.8, 0.8), help="its voxel spacing in mm, z y x")
    parser.add_argument("--tiles-in-flight", type=int, default=32, help="as serve --tiles-in-flight (default 32)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--estimate-only", action="store_true", help="print this checkout's estimate for 1 to --tiles-in-flight tiles; run nothing"
    )
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # a child: measure with this repo, print JSON
    args = parser.parse_args()
    shape, spacing = (args.shape[0], args.shape[1], args.shape[2]), (args.spacing[0], args.spacing[1], args.spacing[2])
    if args.measure:
        print(json.dumps(measure(args.measure, shape, spacing, args.tiles_in_flight)))
        return 0

    from bench.gateway_bench import ROOT, checkout

    repo = ROOT / "results" / f"lns_repo_{args.size}"
    command = [sys.executable, "-m", "migserve", "export", "--model", "lns-organs", "lns-stations", "--size", args.size]
    subprocess.run([*command, "--out", str(repo), "--skip-existing"], check=True, cwd=ROOT)
    if not args.a_revision and not args.estimate_only:
        parser.error("--a-revision is needed to compare (or --estimate-only)")
    if args.estimate_only:
        for in_flight in range(1, args.tiles_in_flight + 1):
            print(f"{in_flight} tiles in flight: {_estimate(repo, shape, spacing, in_flight) / MB:.1f} MB")
        return 0
    pythons = {"A": checkout(args.a_revision)[0], "B": sys.executable}
    child = [str(Path(__file__).resolve()), "--a-revision", args.a_revision, "--measure", str(repo), "--shape", *map(str, shape)]
    child += ["--spacing", *map(str, spacing), "--tiles-in-flight", str(args.tiles_in_flight)]
    found: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    for _ in range(args.rounds):
        for label, python in pythons.items():
            out = subprocess.run([python, *child], check=True, cwd=ROOT, capture_output=True, text=True).stdout
            found[label].append(json.loads(out.strip().splitlines()[-1]))
    first = found["A"][0]
    print(
        f"CT {list(shape)} voxels at {list(spacing)} mm, {args.size} lns models: resampled to {first['resampled']}, "
        f"{first['tiles']} tiles, --tiles-in-flight {args.tiles_in_flight}, {args.rounds} round(s)"
    )
    print("| side | peak MB above the volume (per round) | seconds (per round) |")
    print("| --- | --- | --- |")
    for label, runs in found.items():
        shown = f"A: {args.a_revision}" if label == "A" else "B: this checkout"
        peaks = ", ".join(f"{int(r['peak_bytes']) / MB:.1f}" for r in runs)
        seconds = ", ".join(f"{float(r['seconds']):.1f}" for r in runs)
        print(f"| {shown} | {peaks} | {seconds} |")
    ratio = min(int(r["peak_bytes"]) for r in found["B"]) / min(int(r["peak_bytes"]) for r in found["A"])
    estimate = _estimate(repo, shape, spacing, args.tiles_in_flight)
    peak = max(int(r["peak_bytes"]) for r in found["B"]) + 4 * shape[0] * shape[1] * shape[2]
    print(f"B's estimate of a job (lns.job_bytes): {estimate / MB:.1f} MB; B's peak with the volume {peak / MB:.1f} MB", end="")
    print(f" ({peak / estimate:.2f} of it)")
    same = len({r["labels_sha256"] for runs in found.values() for r in runs}) == 1
    print(f"B / A peak: {ratio:.2f}; label maps {'the same' if same else 'DIFFER'}")
    return 0 if same else 1


if __name__ == "__main__":
    if __package__ in (None, ""):  # run by path as a child under another revision's tree: that tree's service
        sys.path.pop(0)
    sys.exit(main())
