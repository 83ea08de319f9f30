"""face-pros: find faces, crop and normalise them, and read the heads back in image pixels.

Detection uses OpenCV's frontal-face Haar cascade (shipped in
opencv-python-headless, no download). Crop size, margin, mean and std come
from the contract's preprocessing; label names from its postprocessing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from migserve.contract import FacePostprocessing, ImagePreprocessing
from migserve.types import Array

CASCADE = Path(cv2.__file__).parent / "data" / "haarcascade_frontalface_default.xml"  # cv2.data.haarcascades
_local = threading.local()  # a CascadeClassifier is not safe to share between threads


@dataclass(frozen=True)
class DetectionSettings:
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_face_fraction: float = 0.05  # of the image's shorter side
    max_side: int = 1024  # larger images are scaled down for detection only


@dataclass(frozen=True)
class Box:
    """Pixel box in the input image: x, y of the top-left corner, width, height."""

    x: float
    y: float
    width: float
    height: float

    def as_list(self) -> list[float]:
        return [round(self.x, 2), round(self.y, 2), round(self.width, 2), round(self.height, 2)]


def _cascade() -> cv2.CascadeClassifier:
    cascade: cv2.CascadeClassifier | None = getattr(_local, "cascade", None)
    if cascade is None:
        cascade = cv2.CascadeClassifier(str(CASCADE))
        if cascade.empty():
            raise RuntimeError(f"OpenCV could not load {CASCADE}")
        _local.cascade = cascade
    return cascade


def detect(rgb: Array, settings: DetectionSettings) -> list[Box]:
    """Faces, largest first."""
    height, width = rgb.shape[:2]
    scale = min(1.0, settings.max_side / max(height, width))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    smallest = max(16, int(min(gray.shape) * settings.min_face_fraction))
    found = _cascade().detectMultiScale(
        cv2.equalizeHist(gray), scaleFactor=settings.scale_factor, minNeighbors=settings.min_neighbors, minSize=(smallest, smallest)
    )
    boxes = [Box(x / scale, y / scale, w / scale, h / scale) for x, y, w, h in np.asarray(found).reshape(-1, 4).tolist()]
    return sorted(boxes, key=lambda b: b.width * b.height, reverse=True)


def whole_image(rgb: Array) -> Box:
    return Box(0.0, 0.0, float(rgb.shape[1]), float(rgb.shape[0]))


def crop_box(box: Box, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The square around the box grown by margin on each side, moved (and shrunk) to lie inside the image."""
    side = min(round(max(box.width, box.height) * (1 + 2 * margin)), width, height)
    cx, cy = box.x + box.width / 2, box.y + box.height / 2
    x0 = int(min(max(round(cx - side / 2), 0), width - side))
    y0 = int(min(max(round(cy - side / 2), 0), height - side))
    return x0, y0, side, side


def preprocess(rgb: Array, boxes: list[Box], pre: ImagePreprocessing, whole: bool) -> tuple[Array, list[tuple[int, int, int, int]]]:
    """[N, 3, H, W] float32 crops normalised with the contract's mean/std, and each crop's (x, y, w, h)."""
    if pre.height is None or pre.width is None:
        raise ValueError("face-pros contracts have a fixed input size")
    height, width = rgb.shape[:2]
    crops = [(0, 0, width, height)] if whole else [crop_box(b, pre.face_crop_margin, width, height) for b in boxes]
    batch = np.empty((len(crops), 3, pre.height, pre.width), dtype=np.float32)
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    for i, (x, y, w, h) in enumerate(crops):
        patch = cv2.resize(rgb[y : y + h, x : x + w], (pre.width, pre.height), interpolation=cv2.INTER_AREA)
        batch[i] = ((patch.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
    return batch, crops


def describe(
    outputs: dict[str, Array], post: FacePostprocessing, boxes: list[Box], crops: list[tuple[int, int, int, int]], embedding: bool
) -> list[dict[str, Any]]:
    """One dict per face: box, attributes, expression, landmarks in image pixels, and the embedding on request."""
    faces = []
    for i, (box, (x, y, w, h)) in enumerate(zip(boxes, crops, strict=True)):
        probs = outputs["expression"][i]
        points = outputs["landmarks"][i].astype(np.float64) * [w, h] + [x, y]
        face: dict[str, Any] = {
            "box": box.as_list(),
            "crop": [x, y, w, h],
            "attributes": {name: round(float(p), 4) for name, p in zip(post.attribute_names, outputs["attributes"][i], strict=True)},
            "expression": {
                "label": post.expression_labels[int(np.argmax(probs))],
                "probabilities": {label: round(float(p), 4) for label, p in zip(post.expression_labels, probs, strict=True)},
            },
            "landmarks": np.round(points, 2).tolist(),
        }
        if embedding:
            face["embedding"] = outputs["embedding"][i].astype(float).tolist()
        faces.append(face)
    return faces
