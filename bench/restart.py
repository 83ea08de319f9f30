"""How long a killed worker takes to serve again, two gateways side by side (issue 3).

Both gateways run at once, each with one CPU worker and the same models; each round kills A's worker (SIGKILL),
times until /v1/partitions shows its replacement ready, then does the same to B. The time runs from the kill to
the first poll (every 20 ms) that sees the new worker: the gateway's backoff before a restart (0.5 s), the new
process's start, imports, sessions, warm-up runs and, with `--cpu-run-slices auto`, the slice timing.

    .venv/bin/python -m bench.restart --rounds 5 --a-revision 54ba31b    # this code against an older commit
    .venv/bin/python -m bench.restart --rounds 5 --a=--cpu-run-slices=off
    .venv/bin/python -m bench.restart --start --cpu-slices 1,1 --rounds 3 --a-revision a614cea   # a gateway's start
    .venv/bin/python -m bench.restart --start --warm --cpu-slices 1,1 --rounds 4 --models all \\
        --a=--cpu-run-slices-cache=off --b=--cpu-run-slices-cache=results/slices.json   # timed at start, or kept

--start times a whole gateway's start instead: from launching `migserve serve` to its first ready answer
(polled every 0.2 s), A and B in turn, one gateway up at a time. With --first-ct it then times the first and the
second `/v1/lns/segment` of a small NIfTI volume (the CT family's endpoint: what its first request pays at once).

    .venv/bin/python -m bench.restart --start --warm --first-ct --rounds 5 --models lns-organs lns-stations --a-revision REV
"""

from __future__ import annotations

import argparse
import gzip
import os
import signal
import statistics
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.gateway_ab import _serve_args
from bench.gateway_bench import ROOT, Server, export
from bench.image_memory import memory_status
from exporters.names import MODEL_NAMES

POLL_S = 0.02
MB = 1 << 20


def _worker(server: Server) -> dict[str, object]:
    """The first partition's worker (the one a restart round kills)."""
    return server.partitions()[0]


def restart_seconds(server: Server, limit_s: float = 120.0) -> tuple[float, dict[str, int]]:
    """Kill the server's worker; seconds until its replacement is ready, and the slices it runs."""
    before = _worker(server)
    pid = before["pid"]
    assert isinstance(pid, int) and before["ready"], before
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while time.monotonic() - killed < limit_s:
        now = _worker(server)
        if now["ready"] and now["pid"] != pid:
            slices = now["run_slices"]
            assert isinstance(slices, dict)
            return time.monotonic() - killed, slices
        time.sleep(POLL_S)
    raise RuntimeError(f"the worker of the gateway on port {server.port} did not come back in {limit_s:g} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["face-pros", "crowd-csrnet"], help="or all: the whole zoo")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    parser.add_argument("--a", default="", help="serve arguments of A, '='-joined, comma-separated (default: none)")
    parser.add_argument("--b", default="", help="serve arguments of B (default: none)")
    parser.add_argument("--a-revision", help="run A as this git revision had the service (default: this checkout)")
    parser.add_argument("--start", action="store_true", help="time a gateway's start, not a worker's restart")
    parser.add_argument("--cpu-slices", default="1", help="the gateway's CPU slices (default: one worker on one core)")
    parser.add_argument("--warm", action="store_true", help="--start: start A and B once, untimed, before the rounds")
    parser.add_argument("--first-ct", action="store_true", help="--start: then time the first two /v1/lns/segment requests")
    args = parser.parse_args()
    if args.models == ["all"]:
        args.models = list(MODEL_NAMES)
    export(args.repo, *args.models)
    settings = {"A": _serve_args(args.a), "B": _serve_args(args.b)}
    revisions = {"A": args.a_revision, "B": None}
    common = ["--cpu-slices", args.cpu_slices, "--models", *args.models]
    if args.start:
        return _starts(args, settings, revisions, common)
    servers = {label: Server(args.repo, *common, *extra, revision=revisions[label]) for label, extra in settings.items()}
    times: dict[str, list[float]] = {label: [] for label in servers}
    try:
        for round_ in range(1, args.rounds + 1):
            for label, server in servers.items():
                seconds, slices = restart_seconds(server)
                times[label].append(seconds)
                print(f"round {round_} {label}: back in {seconds:.3f} s, slices {slices}", flush=True)
    finally:
        for server in servers.values():
            server.close()
    _table(f"worker restart, {', '.join(args.models)}, CPU slices {args.cpu_slices}", args.rounds, settings, revisions, times)
    return 0


def _starts(args: argparse.Namespace, settings: dict[str, list[str]], revisions: dict[str, str | None], common: list[str]) -> int:
    times: dict[str, list[float]] = {label: [] for label in settings}
    resident: dict[str, list[float]] = {label: [] for label in settings}
    first_ct: dict[str, list[tuple[float, float]]] = {label: [] for label in settings}
    volume = _small_ct() if args.first_ct else b""
    if args.warm:  # one untimed start of each first, e.g. to fill a --cpu-run-slices-cache the rounds then find
        for label, extra in settings.items():
            Server(args.repo, *common, *extra, revision=revisions[label]).close()
    for round_ in range(1, args.rounds + 1):
        for label, extra in settings.items():
            started = time.monotonic()
            server = Server(args.repo, *common, *extra, revision=revisions[label])
            times[label].append(time.monotonic() - started)
            partitions = server.partitions()
            resident[label].append(sum(memory_status(p["pid"])["VmRSS"] for p in partitions if isinstance(p["pid"], int)) / MB)
            print(
                f"round {round_} {label}: ready in {times[label][-1]:.2f} s, workers resident {resident[label][-1]:.1f} MB, "
                f"slices {[p['run_slices'] for p in partitions]}",
                flush=True,
            )
            if args.first_ct:
                first_ct[label].append((_segment_seconds(server, volume), _segment_seconds(server, volume)))
                print(f"round {round_} {label}: first CT request {first_ct[label][-1][0]:.3f} s, second {first_ct[label][-1][1]:.3f} s")
            server.close()
    _table(f"gateway start, {', '.join(args.models)}, CPU slices {args.cpu_slices}", args.rounds, settings, revisions, times)
    if args.first_ct:
        for nth, title in enumerate(("first", "second")):
            seconds = {label: [pair[nth] for pair in pairs] for label, pairs in first_ct.items()}
            _table(f"the {title} /v1/lns/segment after the start", args.rounds, settings, revisions, seconds)
    print("\nworkers' resident memory at ready, MB (mean): " + ", ".join(f"{k} {statistics.mean(v):.1f}" for k, v in resident.items()))
    return 0


def _small_ct() -> bytes:
    """A gzipped NIfTI CT of 24x48x48 voxels at 4 mm (the tiny lns models' spacing), HU in [-1000, 400]."""
    import nibabel as nib  # here, not in every run of this bench

    hu = np.random.default_rng(0).uniform(-1000, 400, (48, 48, 24)).astype(np.int16)
    return gzip.compress(nib.Nifti1Image(hu, np.diag([4.0, 4.0, 4.0, 1.0])).to_bytes())


def _segment_seconds(server: Server, volume: bytes) -> float:
    """One synchronous /v1/lns/segment of the volume, as the request body: seconds to its 200."""
    url = f"http://127.0.0.1:{server.port}/v1/lns/segment?mode=sync"
    request = urllib.request.Request(url, data=volume, headers={"Content-Type": "application/gzip"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return time.monotonic() - started


def _table(
    title: str, rounds: int, settings: dict[str, list[str]], revisions: dict[str, str | None], times: dict[str, list[float]]
) -> None:
    print(f"\n{title}, {rounds} rounds\n")
    print("| setting | serve arguments | seconds (mean) | min | max | x A |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    base = statistics.mean(times["A"])
    for label, extra in settings.items():
        shown = " ".join(extra) or "(defaults)"
        if revisions[label]:
            shown += f" at {revisions[label]}"
        values = times[label]
        mean = statistics.mean(values)
        print(f"| {label} | `{shown}` | {mean:.3f} | {min(values):.3f} | {max(values):.3f} | {mean / base:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
