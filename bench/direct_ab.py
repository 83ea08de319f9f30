"""The gateway against direct onnxruntime at its best batch, in interleaved rounds (issue 3's ratio).

`gateway_bench.py` measures every gateway mode and then direct onnxruntime, minutes apart; on this host,
whose speed drifts by 10-30% within minutes, the same code's face-pros ratio came out 0.39x in one run
and 0.66x in another, with direct's best at 3586.8 and 2699.8 samples/s. Here each round measures direct
onnxruntime (every batch size for --direct-seconds each, in-process with a thread per core; the best
counts) and then the gateway under wrk's closed loop, so each round's ratio compares the two under the
same host conditions; the figure is the mean ratio over the rounds.

    .venv/bin/python -m bench.direct_ab --rounds 5                                  # face-pros, c=32, binary
    .venv/bin/python -m bench.direct_ab --model crowd-csrnet --rounds 4
    .venv/bin/python -m bench.direct_ab --serve=--cpu-worker-priority=idle         # a gateway setting
    .venv/bin/python -m bench.direct_ab --body shm                                  # inputs in shared memory

`--body shm` is a client on the gateway's host that puts its inputs in a POSIX shared memory object registered with
the gateway (KServe's system shared memory extension) and sends a small JSON body naming it, as
`tritonclient.utils.shared_memory` does: the gateway reads each input from the object instead of from the socket.
The object holds one sample for every request (as direct's input is one array per batch size); outputs come back
as binary data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import urllib.request
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

from bench.gateway_ab import _serve_args
from bench.gateway_bench import DATATYPES, Server, bodies, closed_loop, direct, export, round_options, sample

REGION = "bench-inputs"


@contextlib.contextmanager
def shm_body(server: Server, repo: Path, model: str) -> Iterator[tuple[bytes, dict[str, str]]]:
    """An infer body whose inputs are in a shared memory object registered with the gateway as REGION."""
    contract = json.loads((repo / model / "contract.json").read_text())
    arrays = sample(contract, {}, 1)
    memory = shared_memory.SharedMemory(create=True, size=sum(a.nbytes for a in arrays.values()))
    try:
        entries, offset, view = [], 0, memory.buf
        assert view is not None  # None only once closed
        for name, array in arrays.items():
            view[offset : offset + array.nbytes] = array.tobytes()
            region = {"shared_memory_region": REGION, "shared_memory_byte_size": array.nbytes, "shared_memory_offset": offset}
            entries.append(
                {
                    "name": name,
                    "datatype": DATATYPES[array.dtype.name],
                    "shape": list(array.shape),
                    "parameters": region,
                }
            )
            offset += array.nbytes
        _post(server, f"/v2/systemsharedmemory/region/{REGION}/register", {"key": f"/{memory.name}", "offset": 0, "byte_size": memory.size})
        outputs = [{"name": o["name"], "parameters": {"binary_data": True}} for o in contract["outputs"]]
        yield json.dumps({"inputs": entries, "outputs": outputs}).encode(), {"Content-Type": "application/json"}
    finally:
        memory.close()
        memory.unlink()


def _post(server: Server, path: str, body: dict[str, object]) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    round_options(parser, rounds=5)
    parser.add_argument("--serve", default="", help="the gateway's serve arguments, '='-joined, comma-separated (default: none)")
    parser.add_argument(
        "--body",
        choices=("binary", "json", "shm"),
        default="binary",
        help="tensors as binary data, JSON or in shared memory (default: binary)",
    )
    parser.add_argument("--direct-seconds", type=float, default=1.0, help="direct onnxruntime's time at each batch size (default: 1)")
    args = parser.parse_args()
    export(args.repo, args.model)
    extra = _serve_args(args.serve)
    server = Server(args.repo, "--models", args.model, *extra)
    url = f"http://127.0.0.1:{server.port}/v2/models/{args.model}/infer"
    rounds: list[tuple[float, int, float, str]] = []  # direct best samples/s, its batch, gateway samples/s, its CPU
    with contextlib.ExitStack() as stack:
        stack.callback(server.close)
        if args.body == "shm":
            body, headers = stack.enter_context(shm_body(server, args.repo, args.model))
        else:
            body, headers = bodies(args.repo, args.model, {})[args.body]
        for round_ in range(1, args.rounds + 1):
            best = max(direct(args.repo, args.model, {}, args.direct_seconds), key=lambda row: row["samples_per_s"])
            server.wait_idle(args.model)
            point = closed_loop(url, body, headers, args.concurrency, args.seconds, server_pid=server.process.pid)
            cpu = " / ".join(f"{point[k] or 0:.2f}" for k in ("gateway_cpu_ms", "workers_cpu_ms", "client_cpu_ms"))
            rounds.append((best["samples_per_s"], best["batch"], point["samples_per_s"], cpu))
            print(
                f"round {round_}: direct {best['samples_per_s']:.1f}/s (batch {best['batch']}), gateway {point['samples_per_s']:.1f}/s, "
                f"{point['samples_per_s'] / best['samples_per_s']:.2f}x",
                flush=True,
            )
    shown = " ".join(extra) or "(defaults)"
    print(f"\n{args.model}, concurrency {args.concurrency}, {args.body} tensors, gateway `{shown}`, {args.rounds} rounds\n")
    print("| round | direct best, samples/s (batch) | gateway, samples/s | x direct | CPU ms per request: gateway / workers / wrk |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for i, (limit, batch, gateway, cpu) in enumerate(rounds, 1):
        print(f"| {i} | {limit:.1f} ({batch}) | {gateway:.1f} | {gateway / limit:.2f} | {cpu} |")
    ratios = [gateway / limit for limit, _, gateway, _ in rounds]
    print(f"\nmean {statistics.mean(ratios):.2f}x direct at best batch (rounds {min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
