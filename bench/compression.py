"""What compressing an answer costs and saves, per model: why JSON answers are compressed and binary ones are not.

Each model of the repository runs one seeded sample (batch 1, default dims) in onnxruntime; its answer is
encoded as the gateway encodes it (service/api/kserve.py), as JSON and with every output as binary data,
and compressed as the gateway would (service/api/encoding.py: zlib's fastest level, gzip framing).
Reported: bytes before and after, and the CPU milliseconds per answer (best of several runs, one core).

    .venv/bin/python -m bench.compression [--repo model_repo] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnxruntime as ort

from bench.gateway_bench import sample
from service.api.encoding import compress
from service.api.kserve import encode_response
from service.api.tensors import DecodedRequest

NO_LIMIT = 1 << 40


def best_ms(payload: bytes, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        compress(payload, "gzip")
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("model_repo"))
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print("| model | answer | bytes | gzip'd bytes | saved | CPU ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for directory in sorted(p for p in args.repo.iterdir() if (p / "contract.json").is_file()):
        contract = json.loads((directory / "contract.json").read_text())
        inputs = sample(contract, {}, 1)
        session = ort.InferenceSession(str(directory / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        names = tuple(o["name"] for o in contract["outputs"])
        outputs = dict(zip(names, session.run(list(names), inputs), strict=True))
        for kind, binary in (("JSON", frozenset()), ("binary", frozenset(names))):
            request = DecodedRequest(id=None, inputs=inputs, batch=1, outputs=names, binary_outputs=binary, timeout_s=None)
            payload, _ = encode_response(contract["name"], request, outputs, NO_LIMIT)
            packed = len(compress(payload, "gzip"))
            saved = 1 - packed / len(payload)
            print(f"| {contract['name']} | {kind} | {len(payload):,} | {packed:,} | {saved:.0%} | {best_ms(payload, args.repeat):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
