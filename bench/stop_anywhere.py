"""Ctrl-C at a random point of an export's torch step: how each stop ends, this checkout against an older git
revision (A and B in turn).

    .venv/bin/python -m bench.stop_anywhere --a-revision 42a96d7 --stops 20

Each stop exports grounding-mgsl and grounding-ssrn at tiny size (`--jobs`, default 1) into a fresh folder with a
temporary directory of its own, waits for the first "exporting" line, then a uniformly random 0.1-10 s (the step
takes 10-20 s here), and sends SIGINT to the command's process group, as a terminal's Ctrl-C does. A stop ends
`clean` when the command exits by SIGINT within 60 s, its last line "migserve export: interrupted", with no model
said FAILED, no traceback, no C++ abort (c10::Error) and nothing left in the output folder or the temporary
directory; else each way it went wrong is counted.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.gateway_bench import ROOT, checkout
from bench.stop_ab import stop_export

COMMAND = ["export", "--model", "grounding-mgsl", "grounding-ssrn", "--size", "tiny"]
WAYS = ("clean", "said FAILED", "C++ abort", "traceback", "left files", "not ended in 60 s", "other status")


def stopped(python: str, cwd: Path, jobs: int, after_s: float, scratch: Path) -> set[str]:
    """One export stopped `after_s` into its first model's export step: how it ended (`WAYS`)."""
    out, tmp = scratch / "repo", scratch / "tmp"
    args = [*COMMAND, "--jobs", str(jobs), "--out", str(out)]
    status, _, text = stop_export(python, cwd, args, scratch, after="exporting", wait_s=after_s, how="ctrl-c", timeout_s=60)
    left = [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]
    left += [p.name for p in out.iterdir() if p.name.startswith(".")] if out.exists() else []
    ways = {
        way
        for way, happened in (
            ("not ended in 60 s", status is None),
            ("other status", status not in (None, -signal.SIGINT)),
            ("said FAILED", "FAILED" in text),
            ("C++ abort", "c10::Error" in text),
            ("traceback", "Traceback" in text),
            ("left files", bool(left)),
        )
        if happened
    }
    if not text.strip().endswith("migserve export: interrupted") and status is not None:
        ways.add("other status")
    return ways or {"clean"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-revision", required=True, help="run A as this git revision had the CLI")
    parser.add_argument("--stops", type=int, default=20, help="stops of each side (default: 20)")
    parser.add_argument("--jobs", type=int, default=1, help="the export's --jobs (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="of the random points (default: 0)")
    args = parser.parse_args()
    sides = {"A": checkout(args.a_revision), "B": (sys.executable, ROOT)}
    points = random.Random(args.seed)
    counts = {label: Counter[str]() for label in sides}
    for i in range(args.stops):
        after_s = round(points.uniform(0.1, 10.0), 2)
        for label, (python, cwd) in sides.items():  # both sides stopped at the same point
            with tempfile.TemporaryDirectory() as tmp:
                ways = stopped(python, cwd, args.jobs, after_s, Path(tmp))
            counts[label].update(ways)
            print(f"stop {i + 1} at {after_s} s, {label}: {', '.join(sorted(ways))}", file=sys.stderr, flush=True)
    print(f"\nCtrl-C at a random point of the export step, --jobs {args.jobs}, A at {args.a_revision}, B this checkout", end="")
    print(f", {args.stops} stops each\n")
    print("| side | " + " | ".join(WAYS) + " |")
    print("| --- |" + " ---: |" * len(WAYS))
    for label in sides:
        print(f"| {label} | " + " | ".join(str(counts[label][way]) for way in WAYS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
