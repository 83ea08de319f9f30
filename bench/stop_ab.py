"""How long a stopped `migserve export` takes to end, this checkout against an older git revision (A and B in turn).

    .venv/bin/python -m bench.stop_ab --a-revision c6d7a93 --rounds 2

Each round exports lns-organs and crowd-csrnet at paper size with `--jobs 2` into a fresh folder, and once
lns-organs is checking its parity (a step of more than a minute on a 2-core host) and a second has passed, stops it:
`sigterm`, SIGTERM to the command alone (`timeout`, a supervisor's stop), or `ctrl-c`, SIGINT to its process group
(a terminal's Ctrl-C). It reports the seconds from the signal to the command's end, and its exit status.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gateway_bench import ROOT, checkout

COMMAND = ["export", "--model", "lns-organs", "crowd-csrnet", "--size", "paper", "--jobs", "2"]
IN_THE_STEP = "lns-organs (paper): checking parity"


def stopped(python: str, cwd: Path, how: str, scratch: Path) -> tuple[int, float]:
    """One export stopped in lns-organs' parity step: its exit status and the seconds from the signal to its end."""
    log = scratch / "export.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [python, "-m", "migserve", *COMMAND, "--out", str(scratch / "repo")],
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while IN_THE_STEP not in log.read_text():
            if process.poll() is not None:
                raise RuntimeError(f"the export ended before its parity step:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        time.sleep(1)
        started = time.perf_counter()
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=600)
        return status, time.perf_counter() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-revision", required=True, help="run A as this git revision had the CLI")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stops", default="sigterm,ctrl-c", help="comma-separated: sigterm, ctrl-c")
    args = parser.parse_args()
    sides = {"A": checkout(args.a_revision), "B": (sys.executable, ROOT)}
    stops = [s for s in args.stops.split(",") if s]
    if unknown := set(stops) - {"sigterm", "ctrl-c"}:
        parser.error(f"--stops: unknown {sorted(unknown)}")
    seconds: dict[tuple[str, str], list[float]] = {}
    statuses: dict[tuple[str, str], set[int]] = {}
    for how in stops:
        for _ in range(args.rounds):
            for label, (python, cwd) in sides.items():
                with tempfile.TemporaryDirectory() as tmp:
                    status, took = stopped(python, cwd, how, Path(tmp))
                print(f"{how} {label}: exit {status} after {took:.1f} s", file=sys.stderr, flush=True)
                seconds.setdefault((how, label), []).append(took)
                statuses.setdefault((how, label), set()).add(status)
    print(f"\nA stopped export's end, A at {args.a_revision}, B this checkout, {args.rounds} rounds each, in turn\n")
    print("| stop | seconds to end A / B (mean) | B / A | exit status A / B |")
    print("| --- | --- | ---: | --- |")
    for how in stops:
        a, b = statistics.mean(seconds[how, "A"]), statistics.mean(seconds[how, "B"])
        codes = " / ".join(",".join(map(str, sorted(statuses[how, label]))) for label in ("A", "B"))
        print(f"| {how} | {a:.1f} / {b:.1f} | {b / a:.3f} | {codes} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
