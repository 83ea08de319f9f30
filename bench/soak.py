"""Does the gateway's memory stay flat under a long mixed load, errors and misbehaving clients included? (issue 3)

Starts `migserve serve` on the tiny models (the default CPU slices) and runs rounds of a mixed load from several
threads at once: KServe inference (binary and JSON, HTTP and gRPC) on every model, each /v1 endpoint with real
files (JPEG and PNG images, .npy and JSON features, a gzipped NIfTI volume, base64 in JSON), bad requests (unknown
model, malformed JSON, wrong shape, truncated binary, over --max-body-mb), clients that hang up halfway through a
body, and clients that read their answer late (over HTTP, and over gRPC with the HTTP/2 window shut). After each
round it reads the resident memory of the gateway and each worker (VmRSS, of which RssShmem is shared memory) and
what /dev/shm holds for them. A leak shows as a steady
growth: the table gives each process's memory after the warm-up rounds and after the last, and the least-squares
slope over the rounds after the warm-up, in MB per round.

    .venv/bin/python -m bench.soak --rounds 12
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.gateway_bench import ROOT, Server, bodies, export, sample
from bench.grpc_bench import infer_request
from bench.held_grpc import HeldGrpcCall
from bench.image_memory import memory_status
from bench.ports import free_port

MODELS = (
    "face-pros",
    "crowd-csrnet",
    "frontalize-dalgan",
    "grounding-dscnet",
    "grounding-mgsl",
    "lns-organs",
    "lns-stations",
)
MB = 1 << 20


def _shm_of(pid: int) -> int:
    return sum(f.stat().st_size for f in Path("/dev/shm").glob(f"migserve-arena-{pid}-*"))


def _image(kind: str, size: tuple[int, int], seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size)
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def _npy(array: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _nifti() -> bytes:
    import nibabel as nib

    rng = np.random.default_rng(5)
    volume = rng.normal(-300, 400, (40, 48, 48)).astype(np.int16)
    return gzip.compress(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes())


class Load:
    """The operations of one round, each a callable that makes one request and says what came back."""

    def __init__(self, repo: Path, port: int, grpc_port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.grpc_url = f"127.0.0.1:{grpc_port}"
        self.binary = {m: bodies(repo, m, {}) for m in ("face-pros", "frontalize-dalgan", "lns-organs", "lns-stations", "grounding-mgsl")}
        self.crowd = bodies(repo, "crowd-csrnet", {"height": 64, "width": 64})
        self.face_contract = json.loads((repo / "face-pros" / "contract.json").read_text())
        self.lns_contract = json.loads((repo / "lns-organs" / "contract.json").read_text())
        self.jpeg, self.png = _image("JPEG", (640, 480), 1), _image("PNG", (320, 240), 2)
        self.gray = _image("PNG", (160, 128), 3)
        self.features = _npy(np.random.default_rng(4).standard_normal((90, 1024)).astype(np.float32))
        self.nifti = _nifti()
        self.local = threading.local()

    def client(self) -> httpx.Client:
        if not hasattr(self.local, "client"):
            self.local.client = httpx.Client(base_url=self.base, timeout=120)
        return self.local.client  # type: ignore[no-any-return]

    def operations(self) -> list[tuple[str, Callable[[], int]]]:
        ops: list[tuple[str, Callable[[], int]]] = []
        for model, encodings in self.binary.items():
            body, headers = encodings["binary"]
            ops += [(f"kserve binary {model}", self._post(f"/v2/models/{model}/infer", body, headers))] * (8 if model == "face-pros" else 2)
        body, headers = self.crowd["json"]
        ops.append(("kserve json crowd-csrnet", self._post("/v2/models/crowd-csrnet/infer", body, headers)))
        ops.append(("grpc face-pros", self._grpc))
        image = {"image": ("a.jpg", self.jpeg, "image/jpeg")}
        ops.append(("v1 face", lambda: self.client().post("/v1/face/analyze", files=image).status_code))
        as_json = {"image": base64.b64encode(self.jpeg).decode(), "detect": False}
        ops.append(("v1 face base64 json", lambda: self.client().post("/v1/face/analyze", json=as_json).status_code))
        ops.append(
            ("v1 crowd", lambda: self.client().post("/v1/crowd/count", content=self.png, headers={"Content-Type": "image/png"}).status_code)
        )
        thermal = {"image": ("t.png", self.gray, "image/png")}
        ops.append(("v1 frontalize", lambda: self.client().post("/v1/frontalize", files=thermal).status_code))
        fields = {"sentence": "a person opens the door", "duration": "30.0"}
        features = {"features": ("f.npy", self.features)}
        ops.append(("v1 grounding", lambda: self.client().post("/v1/grounding", files=features, data=fields).status_code))
        listed = {
            "features": np.random.default_rng(6).standard_normal((20, 1024)).round(3).tolist(),
            "sentence": "a person sits",
            "duration": 5.0,
        }
        ops.append(("v1 grounding json", lambda: self.client().post("/v1/grounding", json=listed).status_code))
        volume = {"volume": ("ct.nii.gz", self.nifti, "application/gzip")}
        ops.append(("v1 lns", lambda: self.client().post("/v1/lns/segment", files=volume).status_code))
        ops += self._errors()
        ops.append(("hang up mid-body", self._hang_up))
        ops.append(("late reader", self._late_reader))
        ops.append(("grpc late reader", self._grpc_late_reader))
        return ops

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> Callable[[], int]:
        return lambda: self.client().post(path, content=body, headers=headers).status_code

    def _errors(self) -> list[tuple[str, Callable[[], int]]]:
        body, headers = self.binary["face-pros"]["binary"]
        length = int(headers["Inference-Header-Content-Length"])
        wrong = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 10, 10], "data": [0.0] * 300}]}).encode()
        return [
            ("unknown model", self._post("/v2/models/nope/infer", body, headers)),
            ("malformed json", self._post("/v2/models/face-pros/infer", b'{"inputs": [', {"Content-Type": "application/json"})),
            ("wrong shape", self._post("/v2/models/face-pros/infer", wrong, {})),
            ("truncated binary", self._post("/v2/models/face-pros/infer", body[: length + 1000], headers)),
            ("over --max-body-mb", self._oversized),
        ]

    def _oversized(self) -> int:
        """A head that declares a body over the limit, with a little of it: answered 413 before the rest is read."""
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(b"POST /v2/models/face-pros/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999\r\n\r\n" + b"0" * 1000)
            return int(sock.makefile("rb").readline().split()[1])

    def _hang_up(self) -> int:
        body, headers = self.binary["face-pros"]["binary"]
        head = (
            f"POST /v2/models/face-pros/infer HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n"
            f"inference-header-content-length: {headers['Inference-Header-Content-Length']}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(head.encode() + body[: len(body) // 2])
        return 0

    def _late_reader(self) -> int:
        """An lns-organs answer as JSON (megabytes) that the client reads only after a while."""
        arrays = sample(self.lns_contract, {}, 4)
        header = json.dumps(
            {
                "inputs": [
                    {"name": k, "datatype": "FP32", "shape": list(v.shape), "parameters": {"binary_data_size": v.nbytes}}
                    for k, v in arrays.items()
                ],
                "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
            }
        ).encode()
        body = header + b"".join(v.tobytes() for v in arrays.values())
        head = (
            f"POST /v2/models/lns-organs/infer HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n"
            f"inference-header-content-length: {len(header)}\r\nconnection: close\r\n\r\n"
        )
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", self.port))
            sock.sendall(head.encode() + body)
            time.sleep(0.5)
            status = int(sock.makefile("rb").readline().split()[1])
            while sock.recv(1 << 20):
                pass
        return status

    def _grpc_late_reader(self) -> int:
        """An lns-organs answer over gRPC (5.75 MB) whose client leaves its HTTP/2 window shut for a while."""
        request = infer_request("lns-organs", sample(self.lns_contract, {}, 4))
        call = HeldGrpcCall(self.grpc_url, "/inference.GRPCInferenceService/ModelInfer", [request])
        try:
            time.sleep(0.5)
            call.take(timeout=120)
            return 200 if call.headers.get(b"grpc-status") == b"0" else 500
        finally:
            call.close()

    def _grpc(self) -> int:
        import tritonclient.grpc as grpcclient

        if not hasattr(self.local, "grpc"):
            self.local.grpc = grpcclient.InferenceServerClient(self.grpc_url)
        arrays = sample(self.face_contract, {}, 1)
        inputs = []
        for name, array in arrays.items():
            tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        self.local.grpc.infer("face-pros", inputs)
        return 200


# Installed in the gateway with --tracemalloc: SIGUSR2 writes a snapshot of Python's allocations next to this file.
SNAPSHOT_HOOK = """
import os, signal, sys, tracemalloc
if "serve" in sys.argv:
    def _snapshot(signum, frame):
        here = os.path.dirname(os.path.abspath(__file__))
        taken = len([f for f in os.listdir(here) if f.endswith(".snapshot")])
        tracemalloc.take_snapshot().dump(os.path.join(here, f"{taken}.snapshot"))
    signal.signal(signal.SIGUSR2, _snapshot)
"""


def _snapshot(server: Server, hook: Path) -> Path:
    """Ask the gateway for a tracemalloc snapshot and wait until it is written."""
    taken = len(list(hook.glob("*.snapshot")))
    os.kill(server.process.pid, signal.SIGUSR2)
    path = hook / f"{taken}.snapshot"
    for _ in range(600):
        if path.exists():
            size = path.stat().st_size
            time.sleep(0.5)
            if path.stat().st_size == size:
                return path
        time.sleep(0.1)
    raise RuntimeError("the gateway wrote no tracemalloc snapshot")


def _grown(first: Path, last: Path, top: int) -> None:
    """What Python allocations grew most between the two snapshots, by where they were made."""
    import tracemalloc

    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    a, b = (tracemalloc.Snapshot.load(str(p)).filter_traces(ignore) for p in (first, last))
    total = [sum(stat.size for stat in snap.statistics("filename")) / MB for snap in (a, b)]
    print(f"\ngateway, Python allocations (tracemalloc): {total[0]:.1f} MB after the warm-up, {total[1]:.1f} MB at the end")
    print("| grew, KiB | blocks | where (innermost frame of this project's, else innermost) |")
    print("| ---: | ---: | --- |")
    for stat in b.compare_to(a, "traceback")[:top]:
        frames = [f for f in stat.traceback if "/service/" in f.filename or "/migserve/" in f.filename] or list(stat.traceback)
        name = frames[-1].filename
        where = f"{Path(name).relative_to(ROOT) if name.startswith(str(ROOT)) else name}:{frames[-1].lineno}"
        print(f"| {stat.size_diff / 1024:+.0f} | {stat.count_diff:+d} | {where} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="rounds before the memory is taken as settled (default: 3)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES", help="trace the gateway's Python allocations (slower)")
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    args = parser.parse_args()
    export(args.repo, *MODELS)
    grpc_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        hook = Path(tmp)
        if args.tracemalloc:
            (hook / "sitecustomize.py").write_text(SNAPSHOT_HOOK)
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")]))
            os.environ["PYTHONTRACEMALLOC"] = str(args.tracemalloc)  # read by the processes started from here on
        server = Server(args.repo, "--models", *MODELS, "--grpc-port", str(grpc_port), "--max-body-mb", "64", "--max-pending-mb", "512")
        snapshots: list[Path] = []
        try:
            series = _soak(server, Load(args.repo, server.port, grpc_port), args, lambda: snapshots.append(_snapshot(server, hook)))
        finally:
            server.close()
        heads = f"MB after round {args.warmup} (shared) | MB after round {args.rounds} (shared)"
        print(f"\n| process | {heads} | slope, MB per round | /dev/shm MB |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, samples in series.items():
            settled = samples[args.warmup - 1 :]
            rss = np.array([s["VmRSS"] for s in settled], dtype=float) / MB
            slope = float(np.polyfit(np.arange(len(rss)), rss, 1)[0]) if len(rss) > 1 else 0.0
            first, last = settled[0], settled[-1]
            before, after = (f"{s['VmRSS'] / MB:.1f} ({s['RssShmem'] / MB:.1f})" for s in (first, last))
            print(f"| {label} | {before} | {after} | {slope:+.2f} | {last['shm'] / MB:.1f} |")
        if len(snapshots) == 2:
            _grown(snapshots[0], snapshots[1], top=8)
    return 0


def _soak(server: Server, load: Load, args: argparse.Namespace, snapshot: Callable[[], None]) -> dict[str, list[dict[str, int]]]:
    """The rounds: each process's memory after each, and with --tracemalloc a snapshot after the warm-up and the last."""
    operations = load.operations()
    series: dict[str, list[dict[str, int]]] = {}
    outcomes: Counter[tuple[str, int]] = Counter()
    with ThreadPoolExecutor(args.threads) as pool:
        for number in range(args.rounds):
            started = time.monotonic()
            for (name, _), status in zip(operations, pool.map(lambda op: op[1](), operations), strict=True):
                outcomes[(name, status)] += 1
            server.wait_idle("face-pros")
            time.sleep(2.5)  # arenas over --arena-keep-mb are released after 2 s idle
            if args.tracemalloc and number + 1 in (args.warmup, args.rounds):
                snapshot()
            pids = {"gateway": server.process.pid} | {f"worker {p['id']}": p["pid"] for p in server.partitions()}
            for label, pid in pids.items():
                series.setdefault(label, []).append(memory_status(pid) | {"shm": _shm_of(pid)})
            memory = ", ".join(f"{k} {v[-1]['VmRSS'] / MB:.1f} MB" for k, v in series.items())
            print(f"round {number + 1}: {time.monotonic() - started:.1f} s, {memory}", flush=True)
    print(f"\n{len(operations)} requests a round from {args.threads} threads, {args.rounds} rounds; outcomes:")
    print(", ".join(f"{name} {status}: {count}" for (name, status), count in sorted(outcomes.items())))
    return series


if __name__ == "__main__":
    sys.exit(main())
