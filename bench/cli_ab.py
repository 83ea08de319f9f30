"""How long the CLI takes to answer, this checkout against an older git revision, command by command (A and B in
turn, each a fresh interpreter as a user's shell starts it): wall seconds and the CPU seconds of the process and its
children.

    .venv/bin/python -m bench.cli_ab --rounds 5 --a-revision b7f74f7

The default commands are the ones that answer without exporting: a refused model name (export, bench train) and
`export --all --skip-existing` on a repository already exported (what `make serve` runs each time; a copy of
--repo, made beforehand, so neither side writes into the other's). A command's exit status must be the same on
both sides, or the run stops.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gateway_bench import ROOT, _children_cpu_seconds, checkout

COMMANDS = {
    "export, unknown model": ["export", "--model", "crowd-csrnt", "--out", "{tmp}/unused"],
    "export --all --skip-existing, all up to date": ["export", "--all", "--skip-existing", "--out", "{repo}"],
    "bench train, unknown model": ["bench", "train", "--models", "resnet50", "--out", "{tmp}/unused"],
}


def timed(python: str, cwd: Path, args: list[str]) -> tuple[int, float, float]:
    """Exit status, wall seconds and CPU seconds (user + system, children included) of one run."""
    cpu, started = _children_cpu_seconds(), time.perf_counter()
    done = subprocess.run([python, "-m", "migserve", *args], cwd=cwd, capture_output=True, check=False)
    return done.returncode, time.perf_counter() - started, _children_cpu_seconds() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-revision", required=True, help="run A as this git revision had the CLI")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=ROOT / "model_repo", help="an exported repository (make models)")
    args = parser.parse_args()
    if not (args.repo / "crowd-csrnet" / "contract.json").is_file():
        parser.error(f"{args.repo} has no exported models: run make models first")
    sides = {"A": checkout(args.a_revision), "B": (sys.executable, ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(args.repo, repo)
        wall: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        for name, template in COMMANDS.items():
            command = [part.format(tmp=tmp, repo=repo) for part in template]
            codes = {}
            for _ in range(args.rounds):
                for label, (python, cwd) in sides.items():
                    codes[label], seconds, cpu_seconds = timed(python, cwd, command)
                    wall.setdefault((name, label), []).append(seconds)
                    cpu.setdefault((name, label), []).append(cpu_seconds)
            if codes["A"] != codes["B"]:
                print(f"error: {name}: exit status {codes['A']} at {args.a_revision}, {codes['B']} here", file=sys.stderr)
                return 1
    print(f"\nCLI answers, A at {args.a_revision}, B this checkout, {args.rounds} rounds each, in turn\n")
    print("| command | wall s A / B (mean) | B / A | CPU s A / B (mean) | B / A |")
    print("| --- | --- | ---: | --- | ---: |")
    for name in COMMANDS:
        wa, wb = statistics.mean(wall[name, "A"]), statistics.mean(wall[name, "B"])
        ca, cb = statistics.mean(cpu[name, "A"]), statistics.mean(cpu[name, "B"])
        print(f"| {name} | {wa:.2f} / {wb:.2f} | {wb / wa:.2f} | {ca:.2f} / {cb:.2f} | {cb / ca:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
