"""What the gateway holds for each pixel of an image sent to /v1/crowd/count, /v1/face/analyze and /v1/frontalize,
against what it counts in --max-pending-mb for it (service/api/v1.py, IMAGE_BYTES_PER_PIXEL).

For each endpoint a child process decodes a JPEG of --megapixels (the gateway's decoder, media.decode_image) and runs
the endpoint's steps around the model as service/api/v1.py does: the model's outputs are zeros of the contract's
shapes, since the model runs in a worker, not in the gateway. It reports the peak resident memory those steps added
(VmHWM, reset before them, less VmRSS then; after a warm-up on a small image), per pixel of the image.

    .venv/bin/python -m bench.image_memory --repo model_repo
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

FAMILIES = ("crowd", "face", "frontalize")


def _steps(family: str, repo: Path, data: bytes) -> None:
    """The endpoint's work on `data` in this process, its model's outputs made up."""
    import numpy as np

    from migserve.contract import read_contract
    from service.families import crowd, face, frontalize, media

    name = {"crowd": "crowd-csrnet", "face": "face-pros", "frontalize": "frontalize-dalgan"}[family]
    contract = read_contract(repo / name)
    pre, post = contract.preprocessing, contract.postprocessing
    if family == "crowd":
        rgb = media.decode_image(data, field="image", max_pixels=10**9)
        batch, tiling = crowd.tiles(rgb, pre, contract.dims["height"], contract.dims["width"])  # type: ignore[arg-type]
        stride = post.output_stride  # type: ignore[union-attr]
        density = np.zeros((len(batch), 1, tiling.tile_height // stride, tiling.tile_width // stride), np.float32)
        stitched = np.clip(crowd.stitch(density, tiling, post), 0, None)  # type: ignore[arg-type]
        media.encode_png(crowd.heatmap(stitched, *rgb.shape[:2]))
    elif family == "face":
        rgb = media.decode_image(data, field="image", max_pixels=10**9)
        boxes = face.detect(rgb, face.DetectionSettings()) or [face.whole_image(rgb)]
        face.preprocess(rgb, boxes, pre, False)  # type: ignore[arg-type]
    else:
        gray = media.decode_image(data, field="image", max_pixels=10**9, mode="L")
        frontalize.preprocess(gray, pre)  # type: ignore[arg-type]
        height, width = pre.height, pre.width  # type: ignore[union-attr]
        media.encode_png(frontalize.to_pixels(np.zeros((3, height, width), np.float32), post))  # type: ignore[arg-type]


def memory_status(pid: int | str = "self") -> dict[str, int]:
    """A process's memory figures from /proc/PID/status (VmRSS, VmHWM, RssShmem, ...), bytes."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            figures[name] = int(value.split()[0]) * 1024
    return figures


def measure(family: str, repo: Path, image: Path) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from service.families import media

    small = media.encode_png(np.full((64, 64, 3), 128, np.uint8))
    _steps(family, repo, small)  # libraries loaded, caches made
    data = image.read_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from what is resident now
    before = memory_status()["VmRSS"]
    _steps(family, repo, data)
    with Image.open(io.BytesIO(data)) as header:  # the size only: nothing more is decoded
        width, height = header.size
    return {"added_bytes": memory_status()["VmHWM"] - before, "pixels": width * height}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("model_repo"))
    parser.add_argument("--megapixels", type=float, default=12.0, help="the test image's size (default: 12, 4000x3000)")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # a child: FAMILY IMAGE
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.repo, Path(args.measure[1]))))
        return 0

    import tempfile

    import cv2
    import numpy as np

    from service.api.v1 import IMAGE_BYTES_PER_PIXEL

    width = round((args.megapixels * 1e6 * 4 / 3) ** 0.5)
    height = round(width * 3 / 4)
    rng = np.random.default_rng(0)  # smooth noise, as a photo is: a JPEG of a few MB, not of white noise
    small = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    pixels = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.jpg"
        image.write_bytes(cv2.imencode(".jpg", pixels)[1].tobytes())
        print(f"a {width}x{height} JPEG, {image.stat().st_size / 1e6:.1f} MB; peak resident memory the endpoint's steps add")
        print("| endpoint's family | bytes a pixel, measured | counted in --max-pending-mb | counted / measured |")
        print("| --- | ---: | ---: | ---: |")
        for family in FAMILIES:
            child = [sys.executable, "-m", "bench.image_memory", "--repo", str(args.repo), "--measure", family, str(image)]
            found = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            measured = found["added_bytes"] / found["pixels"]
            counted = IMAGE_BYTES_PER_PIXEL[family]
            print(f"| {family} | {measured:.1f} | {counted} | {counted / measured:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
