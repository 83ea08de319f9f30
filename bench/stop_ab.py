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
from tests.helpers import sigint_not_ignored

COMMAND = ["export", "--model", "lns-organs", "crowd-csrnet", "--size", "paper", "--jobs", "2"]
IN_THE_STEP = "lns-organs (paper): checking parity"


def stop_export(
    python: str, cwd: Path, args: list[str], scratch: Path, *, after: str, wait_s: float, how: str, timeout_s: float
) -> tuple[int | None, float, str]:
    """`migserve export ARGS` (its output in `scratch`, its TMPDIR `scratch/tmp`), stopped `wait_s` after its output
    first shows `after`: `ctrl-c`, SIGINT to its process group, as a terminal's Ctrl-C (SIGINT not ignored in it, as
    in a terminal's job), or `sigterm`, SIGTERM to the command alone. Its exit status (None if it had not ended
    `timeout_s` after the signal; it is then killed), the seconds from the signal to its end, and its output."""
    log, tmp = scratch / "export.log", scratch / "tmp"
    tmp.mkdir(exist_ok=True)
    with log.open("w") as sink, sigint_not_ignored():
        process = subprocess.Popen(
            [python, "-m", "migserve", *args],
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "TMPDIR": str(tmp)},
        )
    try:
        while after not in log.read_text():
            if process.poll() is not None:
                raise RuntimeError(f"the export ended before {after!r}:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        time.sleep(wait_s)
        started = time.perf_counter()
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        try:
            status: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            status = None
        return status, time.perf_counter() - started, log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def stopped(python: str, cwd: Path, how: str, scratch: Path) -> tuple[int, float]:
    """One export stopped in lns-organs' parity step: its exit status and the seconds from the signal to its end."""
    args = [*COMMAND, "--out", str(scratch / "repo")]
    status, took, output = stop_export(python, cwd, args, scratch, after=IN_THE_STEP, wait_s=1, how=how, timeout_s=600)
    if status is None:
        raise RuntimeError(f"the export had not ended 600 s after the stop:\n{output[-2000:]}")
    return status, took


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
