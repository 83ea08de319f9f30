"""frontalize-dalgan: a thermal face in, the visible frontal face out."""

from __future__ import annotations

import cv2
import numpy as np

from migserve.contract import ImageOutPostprocessing, ThermalPreprocessing
from migserve.types import Array


def preprocess(gray: Array, pre: ThermalPreprocessing) -> Array:
    """uint8 [H, W] -> float32 [1, 1, height, width] scaled to the contract's value range."""
    resized = cv2.resize(gray, (pre.width, pre.height), interpolation=cv2.INTER_AREA if gray.shape[0] > pre.height else cv2.INTER_LINEAR)
    low, high = pre.value_range
    scaled = resized.astype(np.float32) / 255.0 * (high - low) + low
    return scaled[None, None]


def to_pixels(visible: Array, post: ImageOutPostprocessing) -> Array:
    """float [3, H, W] in the contract's value range -> uint8 [H, W, 3]."""
    low, high = post.value_range
    unit = (np.nan_to_num(visible.astype(np.float32)) - low) / (high - low)
    return np.asarray(np.clip(unit * 255.0 + 0.5, 0, 255), dtype=np.uint8).transpose(1, 2, 0).copy()
