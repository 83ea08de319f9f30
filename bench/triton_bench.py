"""Local partition vs Triton partition, and who should batch for Triton, side by side in one run (issue 5).

Same model, same closed-loop load (wrk, binary KServe v2 tensors, concurrency 1, 8, 32) through the gateway:
  local           a local worker on a CPU partition of both cores
  triton-gateway  a Triton partition (the nvidia-pytriton tritonserver, python twin running onnxruntime on
                  both cores); the gateway batches and sends one batch at a time
  triton-triton   the same Triton partition with `batching: triton`: every request goes on at once and
                  Triton's dynamic batcher (config.pbtxt: preferred sizes, max queue delay) forms the batches
All three share the machine with wrk: compare ratios, not absolute figures.

    .venv/bin/python -m bench.triton_bench [--seconds 5] [--out results/triton_bench.json]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.gateway_bench import CONCURRENCY, ROOT, Server, bodies, closed_loop, save
from tests.triton_server import TritonServer

MODELS = ("crowd-csrnet", "face-pros")


def export(repo: Path, *extra: str) -> None:
    command = [sys.executable, "-m", "migserve", "export", "--model", *MODELS, "--out", str(repo), "--skip-existing", *extra]
    subprocess.run(command, check=True, cwd=ROOT)


def run_mode(repo: Path, label: str, partition: dict[str, Any], seconds: float, work: Path) -> list[dict[str, Any]]:
    topology = work / f"{label}.yaml"
    topology.write_text(yaml.safe_dump({"partitions": [partition]}))
    server = Server(repo, "--models", *MODELS, "--topology", str(topology))
    rows = []
    try:
        for model in MODELS:
            body, headers = bodies(repo, model, {})["binary"]
            for concurrency in CONCURRENCY:
                server.wait_idle(model)
                result = closed_loop(f"http://127.0.0.1:{server.port}/v2/models/{model}/infer", body, headers, concurrency, seconds)
                rows.append({"mode": label, "model": model, "concurrency": concurrency, **result})
                print(
                    f"  {label:15s} {model:14s} c={concurrency:<3d} {result['samples_per_s']:8.1f}/s p99 {result['p99_ms']:.2f} ms",
                    flush=True,
                )
    finally:
        server.close()
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    lines = []
    for model in MODELS:
        lines += [
            f"### {model} (default size)",
            "",
            "| mode | concurrency | samples/s | x local | p50 ms | p99 ms | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in (r for r in rows if r["model"] == model):
            local = next(x for x in rows if x["model"] == model and x["mode"] == "local" and x["concurrency"] == r["concurrency"])
            lines.append(
                f"| {r['mode']} | {r['concurrency']} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / local['samples_per_s']:.2f} "
                f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "triton_bench.json")
    args = parser.parse_args()
    repo, twins = ROOT / "results" / "bench_repo", ROOT / "results" / "bench_triton_repo"
    export(repo)
    export(twins, "--triton-backend", "python")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows += run_mode(repo, "local", {"id": "cpu", "kind": "cpu", "cores": [0, 1]}, args.seconds, work)
        triton = TritonServer(twins, work, log=work / "triton.log")
        triton.start()
        try:
            for batching in ("gateway", "triton"):
                partition = {"id": "triton", "kind": "triton", "url": triton.url, "batching": batching}
                rows += run_mode(repo, f"triton-{batching}", partition, args.seconds, work)
        finally:
            triton.stop()
    save(rows, args.out)
    print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
