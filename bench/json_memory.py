"""What a /v1 JSON body turns into in the gateway, per byte of it, against what --max-pending-mb counts for it
(service/api/uploads.py, json_held_bytes).

For each kind of body a child process does what read_upload does with it (parse it with the gateway's parser, take
the file out, decode base64) and reports, per byte of the body, the peak resident memory that added (VmHWM, reset
before, less VmRSS then) and what stays held once it is done (Python's allocations still alive, tracemalloc: the
decoded file or the parsed values, which the request keeps until the endpoint is done with them). The body itself is
counted apart, from its head on; json_held_bytes is what is counted beside it.

    .venv/bin/python -m bench.json_memory
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.image_memory import memory_status

KINDS = {
    "base64 file (a JPEG's bytes)": "base64",
    "features as nested lists (grounding)": "features",
    "a list of small objects": "objects",
}


def _body(kind: str, megabytes: float) -> bytes:
    import numpy as np

    rng = np.random.default_rng(0)
    if kind == "base64":
        data = rng.integers(0, 256, int(megabytes * 3 / 4 * 1e6), dtype=np.uint8).tobytes()
        return json.dumps({"image": base64.b64encode(data).decode(), "variant": "heatmap"}).encode()
    if kind == "features":
        frames = int(megabytes * 1e6 / (1024 * 21))  # a float32 written in full takes about 21 bytes with its separator
        features = rng.standard_normal((frames, 1024), dtype=np.float32).tolist()
        return json.dumps({"features": features, "sentence": "a person opens the door"}).encode()
    count = int(megabytes * 1e6 / 16)
    return json.dumps({"features": [{"a": 1} for _ in range(count)]}).encode()


def measure(body: bytes) -> dict[str, Any]:
    from service.api.kserve import json_object
    from service.families.media import from_base64

    def read() -> tuple[object, object]:  # as read_upload: the file out of the fields, decoded if it is text
        fields = json_object(body, "a JSON object")
        raw = fields.pop("image", None) if "image" in fields else fields.pop("features")
        return (from_base64(raw, field="image") if isinstance(raw, str) else raw), fields

    import tracemalloc

    read()  # libraries loaded, the allocator warm
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from what is resident now
    before = memory_status()["VmRSS"]
    kept = [read()]
    peak = memory_status()["VmHWM"] - before
    kept.clear()
    tracemalloc.start()
    kept.append(read())  # alive while its allocations are read
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    kept.clear()
    return {"peak": peak, "held": held}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=12.0, help="each body's size (default: 12, under --max-json-mb 16)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # a child: the body's file
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure).read_bytes())))
        return 0

    import tempfile

    from service.api.uploads import json_held_bytes

    print(f"bodies of about {args.megabytes:g} MB; resident memory reading one adds, per byte of it")
    print("| body | MB | peak while read | held after | counted beside the body | counted / peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for label, kind in KINDS.items():
            body = _body(kind, args.megabytes)
            path = Path(tmp) / f"{kind}.json"
            path.write_bytes(body)
            child = [sys.executable, "-m", "bench.json_memory", "--measure", str(path)]
            found = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            peak, held, counted = found["peak"] / len(body), found["held"] / len(body), json_held_bytes(body) / len(body)
            print(f"| {label} | {len(body) / 1e6:.1f} | {peak:.2f} | {held:.2f} | {counted:.2f} | {counted / peak:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
