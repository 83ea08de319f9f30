"""What a gateway's restart costs a CT job kept in `--jobs-dir`: the job run whole, against the same job stopped
(SIGTERM) part of the way through and finished by the next gateway on the directory.

Each round runs one job whole on a gateway (seconds from its submission to its end), then submits the same volume
again, stops that gateway once the job has done `--at` of its tiles, starts another on the directory, and times it
from ready to the job's end: the rerun. rerun / whole is what the restart left to do. A job stopped in its station
stage keeps its organ labels and is run again from its station stage (about 1 - organ tiles / all tiles); one stopped
in its organ stage is run again from the start (about 1). The progress the rerun showed at its first poll, half a
second after ready, says which.

    .venv/bin/python -m bench.job_restart --rounds 3 --at 0.75
    .venv/bin/python -m bench.job_restart --rounds 3 --at 0.25
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.gateway_bench import ROOT, Server, export
from bench.jobs_dir import MODELS, answer, ended, volume


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--at", type=float, default=0.75, help="stop the gateway once this share of the job's tiles is done")
    parser.add_argument("--size", type=int, default=320, help="the volume's width and height in voxels (default: 320)")
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    args = parser.parse_args()
    export(args.repo, *MODELS)
    body = volume(args.size, raw=True)
    ratios = []
    with tempfile.TemporaryDirectory(prefix="migserve-restart-") as jobs:
        serve = ["--models", *MODELS, "--cpu-slices", "1", "--jobs-dir", jobs]
        for round_ in range(1, args.rounds + 1):
            server = Server(args.repo, *serve)
            try:
                started = time.monotonic()
                ended(server, answer(server, "/v1/lns/segment?mode=job", body))
                whole = time.monotonic() - started
                job = answer(server, "/v1/lns/segment?mode=job", body)
                while job["progress"]["done"] < args.at * job["progress"]["total"]:
                    time.sleep(0.05)
                    job = answer(server, job["status_url"])
            finally:
                server.close()
            again = Server(args.repo, *serve)
            try:
                ready = time.monotonic()
                time.sleep(0.5)
                first = answer(again, job["status_url"])
                ended(again, first)
                rerun = time.monotonic() - ready
            finally:
                again.close()
            ratios.append(rerun / whole)
            print(
                f"round {round_}: whole {whole:.2f} s; stopped at {job['progress']['done']}/{job['progress']['total']} tiles "
                f"({job['stage']}); run again: {first['progress']['done']} tiles done at 0.5 s, ended in {rerun:.2f} s: "
                f"{ratios[-1]:.2f} of the whole",
                flush=True,
            )
    print(f"\nvolume {len(body) / (1 << 20):.2f} MB raw ({args.size}x{args.size}x{args.size // 2}), stopped at {args.at:.0%}")
    print(f"rerun / whole, mean of {args.rounds} rounds: {statistics.mean(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
