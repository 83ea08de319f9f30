"""The gateway's decoding of one request body (`decode_request`), this checkout against a git revision (issue 3).

No server and no load: each side runs in its own process (the revision's tree, with this environment's packages)
and times `decode_request` on the same body, the fastest of `--repeats` runs of `--calls` calls, in interleaved
rounds. What a change to the decoding costs, without the noise of a whole gateway under load.

    .venv/bin/python -m bench.decode --a-revision 54ba31b --rounds 3               # face-pros, JSON tensors
    .venv/bin/python -m bench.decode --a-revision 54ba31b --body binary --calls 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.gateway_bench import ROOT, bodies, checkout, export

# Run in the side's own Python: argv = repo, model, body kind, calls, repeats; prints ms per call.
TIMER = """
import sys, timeit
from pathlib import Path
from bench.gateway_bench import bodies
from migserve.contract import read_contract
from service.api.kserve import decode_request
from service.regions import Regions
repo, model, kind, calls, repeats = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
body, headers = bodies(repo, model, {})[kind]
contract, regions, length = read_contract(repo / model), Regions(), headers.get("Inference-Header-Content-Length")
decode_request(memoryview(body), length, contract, regions, 1 << 30)
best = min(timeit.repeat(lambda: decode_request(memoryview(body), length, contract, regions, 1 << 30), number=calls, repeat=repeats))
print(best / calls * 1e3)
"""


def _time(python: str, cwd: Path, args: argparse.Namespace) -> float:
    command = [python, "-c", TIMER, str(args.repo.resolve()), args.model, args.body, str(args.calls), str(args.repeats)]
    out = subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-revision", required=True, help="A: the service as this git revision had it; B: this checkout")
    parser.add_argument("--model", default="face-pros")
    parser.add_argument("--body", choices=("binary", "json"), default="json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    args = parser.parse_args()
    export(args.repo, args.model)
    sides = {"A": checkout(args.a_revision), "B": (sys.executable, ROOT)}
    size = len(bodies(args.repo, args.model, {})[args.body][0])
    times: dict[str, list[float]] = {label: [] for label in sides}
    for round_ in range(1, args.rounds + 1):
        for label, (python, cwd) in sides.items():
            times[label].append(_time(python, cwd, args))
            print(f"round {round_} {label}: {times[label][-1]:.4f} ms a call", flush=True)
    print(f"\ndecode_request, {args.model}, {args.body} body of {size} bytes, best of {args.repeats} x {args.calls} calls\n")
    print("| side | ms a call, by round | mean | x A |")
    print("| --- | --- | ---: | ---: |")
    base = statistics.mean(times["A"])
    for label, values in times.items():
        shown = f"{label}: {args.a_revision}" if label == "A" else f"{label}: this checkout"
        rounds = ", ".join(f"{v:.4g}" for v in values)
        print(f"| {shown} | {rounds} | {statistics.mean(values):.4g} | {statistics.mean(values) / base:.2f} |")
    print(json.dumps({label: values for label, values in times.items()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
