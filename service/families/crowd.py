"""crowd-csrnet: any image size in, a count and a density heatmap out.

Images larger than the contract's largest height or width are cut into a grid
of equal tiles (so they batch together); every tile is padded to the contract's
size multiple, and the stitched density map is cropped back to the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from migserve.contract import DensityPostprocessing, DimRange, ImagePreprocessing
from migserve.types import Array


@dataclass(frozen=True)
class Tiling:
    rows: int
    cols: int
    tile_height: int
    tile_width: int
    image_height: int
    image_width: int


def _split(size: int, limit: DimRange, multiple: int) -> tuple[int, int]:
    """(tiles, tile size): the fewest tiles of at most limit.max, each a multiple, at least limit.min."""
    count = math.ceil(size / limit.max)
    tile = math.ceil(math.ceil(size / count) / multiple) * multiple
    return count, max(tile, math.ceil(limit.min / multiple) * multiple)


def tiles(rgb: Array, pre: ImagePreprocessing, height: DimRange, width: DimRange) -> tuple[Array, Tiling]:
    """[N, 3, th, tw] normalised tiles, row-major, and how they cover the image."""
    image_height, image_width = rgb.shape[:2]
    rows, tile_height = _split(image_height, height, pre.size_multiple)
    cols, tile_width = _split(image_width, width, pre.size_multiple)
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    canvas = np.zeros((rows * tile_height, cols * tile_width, 3), dtype=np.float32)  # zero is the mean colour once normalised
    canvas[:image_height, :image_width] = (rgb.astype(np.float32) / 255.0 - mean) / std
    batch = canvas.reshape(rows, tile_height, cols, tile_width, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, tile_height, tile_width)
    return np.ascontiguousarray(batch), Tiling(rows, cols, tile_height, tile_width, image_height, image_width)


def stitch(density: Array, tiling: Tiling, post: DensityPostprocessing) -> Array:
    """[N, 1, h, w] tile densities -> [ceil(H/stride), ceil(W/stride)] for the image."""
    _, _, h, w = density.shape
    grid = density.reshape(tiling.rows, tiling.cols, h, w).transpose(0, 2, 1, 3).reshape(tiling.rows * h, tiling.cols * w)
    stride = post.output_stride
    return grid[: math.ceil(tiling.image_height / stride), : math.ceil(tiling.image_width / stride)]


def heatmap(density: Array, height: int, width: int) -> Array:
    """uint8 RGB [height, width]: the density scaled to its maximum, in the JET colour map."""
    peak = float(density.max()) if density.size else 0.0
    unit = np.clip(density / peak, 0, 1) if peak > 0 else np.zeros_like(density)
    gray = cv2.resize(np.asarray(unit * 255, dtype=np.uint8), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.asarray(cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB))
