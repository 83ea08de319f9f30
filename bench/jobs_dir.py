"""What keeping CT jobs in a directory (`serve --jobs-dir`) costs a /v1/lns/segment request, and the memory it gives back.

Two gateways up at once, each with one CPU slice and the tiny lns models: A keeps jobs in memory (the default), B in
a directory. Each round sends the same CT volume to A, then to B, `--requests` times each, one request at a time
(synchronous: a synchronous request is a job too, its label map kept for its URL); the comparison is the mean of the
rounds' ratios B / A of the mean seconds a request took. Then the gateways' resident memory, with every answer's
label map still kept (in A's memory, in B's files), and what B's directory holds. With `--mode job` each request is
sent as a job (202), whose upload B keeps in its directory until the job ends (to run it again after a restart), and
then long-polled to its end: the seconds to the 202 and to the end are compared. `--raw` sends the NIfTI ungzipped
(an upload four times larger, written to B's directory as it is).

    .venv/bin/python -m bench.jobs_dir --rounds 5
    .venv/bin/python -m bench.jobs_dir --rounds 5 --mode job --raw
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.gateway_bench import ROOT, Server, export
from bench.image_memory import memory_status

MB = 1 << 20
MODELS = ("lns-organs", "lns-stations")


def volume(size: int, raw: bool = False) -> bytes:
    """A NIfTI CT of size x size x size/2 voxels at 2 mm, HU in [-1000, 400] (random: its label map does not compress to
    nothing), gzipped unless `raw`."""
    import nibabel as nib  # here, not in every bench

    hu = np.random.default_rng(0).uniform(-1000, 400, (size, size, size // 2)).astype(np.int16)
    data: bytes = nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes()
    return data if raw else gzip.compress(data)


def answer(server: Server, path: str, body: bytes | None = None) -> dict[str, Any]:
    """The gateway's JSON answer to a GET of `path`, or to a POST of `body` (a CT volume, gzipped or not)."""
    media = "application/gzip" if body is not None and body[:2] == b"\x1f\x8b" else "application/octet-stream"
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=body, headers={"Content-Type": media})
    with urllib.request.urlopen(request, timeout=300) as response:
        found: dict[str, Any] = json.loads(response.read())
    return found


def ended(server: Server, job: dict[str, Any]) -> dict[str, Any]:
    """An answer of /v1/lns/segment once its job has ended (long polls, where it is a running job); RuntimeError where
    the job failed."""
    while job.get("state") == "running":
        job = answer(server, f"{job['status_url']}?wait_s=60")
    if job.get("state", "done") != "done":
        raise RuntimeError(f"the job failed: {job}")
    return job


def segment_seconds(server: Server, body: bytes, mode: str = "sync") -> tuple[float, float]:
    """One /v1/lns/segment of `body`: seconds to its answer (the 200, or a job's 202), and to its end (a job long-polled
    until it is done)."""
    started = time.monotonic()
    first = answer(server, f"/v1/lns/segment?mode={mode}", body)
    answered = time.monotonic() - started
    ended(server, first)
    return answered, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=4, help="requests to each gateway in a round (default: 4)")
    parser.add_argument("--size", type=int, default=96, help="the volume's width and height in voxels (default: 96)")
    parser.add_argument("--mode", choices=("sync", "job"), default="sync", help="sync (200) or job (202, then polled)")
    parser.add_argument("--raw", action="store_true", help="send the NIfTI ungzipped")
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    args = parser.parse_args()
    export(args.repo, *MODELS)
    body = volume(args.size, args.raw)
    with tempfile.TemporaryDirectory(prefix="migserve-jobs-") as jobs:
        common = ["--models", *MODELS, "--cpu-slices", "1"]
        servers = {"A": Server(args.repo, *common), "B": Server(args.repo, *common, "--jobs-dir", jobs)}
        try:
            for server in servers.values():
                segment_seconds(server, body, args.mode)  # each once untimed: the first request after a start is slower
            ratios, answered = [], []
            for round_ in range(1, args.rounds + 1):
                means, firsts = {}, {}
                for label, server in servers.items():
                    times = [segment_seconds(server, body, args.mode) for _ in range(args.requests)]
                    firsts[label], means[label] = (statistics.mean(t) for t in zip(*times, strict=True))
                ratios.append(means["B"] / means["A"])
                answered.append(firsts["B"] / firsts["A"])
                print(f"round {round_}: A {means['A']:.3f} s, B {means['B']:.3f} s a request, B / A {ratios[-1]:.3f}", flush=True)
                if args.mode == "job":
                    print(f"  to the 202: A {firsts['A']:.3f} s, B {firsts['B']:.3f} s, B / A {answered[-1]:.3f}", flush=True)
            resident = {label: memory_status(server.process.pid)["VmRSS"] / MB for label, server in servers.items()}
        finally:
            for server in servers.values():
                server.close()
        files = list(Path(jobs).glob("*.result"))
        held = sum(f.stat().st_size for f in files) / MB
    answers = 1 + args.rounds * args.requests
    packed = "raw" if args.raw else "gzipped"
    shape = f"{args.size}x{args.size}x{args.size // 2}"
    print(f"\nvolume {len(body) / MB:.2f} MB {packed} ({shape}), {answers} {args.mode} answers to each gateway")
    print(f"B / A, mean of {args.rounds} rounds: {statistics.mean(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    if args.mode == "job":
        print(f"to the 202, B / A: {statistics.mean(answered):.3f} (min {min(answered):.3f}, max {max(answered):.3f})")
    print(f"gateway VmRSS at the end: A {resident['A']:.1f} MB, B {resident['B']:.1f} MB")
    print(f"B's directory: {len(files)} label maps, {held:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
