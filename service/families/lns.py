"""DeepStationing's two stages over a whole CT volume, by sliding window.

Stage 1 (`lns-organs`) segments organs on the windowed CT; the key organs'
masks are stacked after the CT as stage 2's input (`lns-stations`), whose
labels go back to the input grid. Each stage tiles the resampled volume with
the contract's patch size and overlap, sends every tile through the
dispatcher (so tiles batch and spread over every partition hosting the model,
with at most `in_flight` tiles outstanding), and blends the tiles' softmax with
a Gaussian weight.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from migserve.contract import Contract, SegmentationPostprocessing, VolumePreprocessing
from migserve.types import Array

from ..errors import TooLarge
from ..jobs import Progress
from .volume import Volume, back_to_grid, resample, to_nifti, window

Run = Callable[[str, dict[str, Array]], Awaitable[dict[str, Array]]]


def starts(size: int, patch: int, overlap: float) -> list[int]:
    stride = max(1, int(patch * (1 - overlap)))
    positions = list(range(0, max(size - patch, 0) + 1, stride))
    if positions[-1] != max(size - patch, 0):
        positions.append(size - patch)
    return positions


def grid(shape: tuple[int, ...], pre: VolumePreprocessing) -> list[tuple[int, int, int]]:
    axes = [starts(max(n, p), p, pre.overlap) for n, p in zip(shape, pre.patch_size, strict=True)]
    return [(z, y, x) for z, y, x in itertools.product(*axes)]


def gaussian(patch: tuple[int, int, int], sigma_scale: float) -> Array:
    axes = []
    for n in patch:
        centre, sigma = (n - 1) / 2, max(n * sigma_scale, 1e-3)
        axes.append(np.exp(-((np.arange(n) - centre) ** 2) / (2 * sigma**2)))
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.asarray(np.maximum(weight / weight.max(), 1e-3), dtype=np.float32)


def _pre(contract: Contract) -> VolumePreprocessing:
    if not isinstance(contract.preprocessing, VolumePreprocessing):
        raise TypeError(f"{contract.name}: not a volume model")
    return contract.preprocessing


def _post(contract: Contract) -> SegmentationPostprocessing:
    if not isinstance(contract.postprocessing, SegmentationPostprocessing):
        raise TypeError(f"{contract.name}: not a segmentation model")
    return contract.postprocessing


async def segment(channels: Array, contract: Contract, *, run: Run, progress: Progress, in_flight: int) -> Array:
    """Labels [z, y, x] of `channels` [C, z, y, x] (already resampled and windowed) by one model."""
    pre, post = _pre(contract), _post(contract)
    shape = channels.shape[1:]
    padded = tuple(max(n, p) for n, p in zip(shape, pre.patch_size, strict=True))
    if padded != shape:
        channels = np.pad(channels, [(0, 0)] + [(0, p - n) for n, p in zip(shape, padded, strict=True)])
    weight = gaussian(pre.patch_size, pre.gaussian_sigma_scale)
    scores = np.zeros((len(post.labels), *padded), dtype=np.float32)
    weights = np.zeros(padded, dtype=np.float32)
    lock = threading.Lock()
    limit = asyncio.Semaphore(in_flight)
    input_name = contract.inputs[0].name
    dz, dy, dx = pre.patch_size

    def blend(corner: tuple[int, int, int], logits: Array) -> None:
        z, y, x = corner
        shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
        probs = shifted / shifted.sum(axis=0, keepdims=True)
        with lock:
            scores[:, z : z + dz, y : y + dy, x : x + dx] += probs * weight
            weights[z : z + dz, y : y + dy, x : x + dx] += weight

    async def tile(corner: tuple[int, int, int]) -> None:
        z, y, x = corner
        async with limit:
            patch = np.ascontiguousarray(channels[None, :, z : z + dz, y : y + dy, x : x + dx])
            outputs = await run(contract.name, {input_name: patch})
        await asyncio.to_thread(blend, corner, outputs[contract.outputs[0].name][0])
        progress.advance()

    await asyncio.gather(*(tile(c) for c in grid(padded, pre)))
    labels = np.argmax(scores / np.maximum(weights, 1e-6), axis=0).astype(np.uint8)
    return np.asarray(labels[: shape[0], : shape[1], : shape[2]])


@dataclass(frozen=True)
class Stations:
    summary: dict[str, Any]
    nifti: bytes

    @property
    def nbytes(self) -> int:  # what a finished job keeps (service/jobs.py)
        return len(self.nifti)


def plan(volume: Volume, organs: Contract, stations: Contract, max_voxels: int) -> tuple[tuple[int, int, int], int]:
    """The resampled shape and the number of tiles both stages will run; TooLarge where the resampled volume would
    be over `max_voxels` (a few voxels that claim to be a metre wide each would make one too large to hold)."""
    pre = _pre(organs)
    factors = [max(s / t, 1.0 / n) for s, t, n in zip(volume.spacing, pre.spacing_mm, volume.hu.shape, strict=True)]
    shape = tuple(max(1, round(n * f)) for n, f in zip(volume.hu.shape, factors, strict=True))
    shape3 = (shape[0], shape[1], shape[2])
    if (voxels := int(np.prod(shape3, dtype=object))) > max_voxels:
        raise TooLarge(
            f"volume: its voxels of {[round(s, 4) for s in volume.spacing[::-1]]} mm, resampled to the model's "
            f"{list(pre.spacing_mm[::-1])} mm, make {voxels} voxels, over the limit of {max_voxels}"
        )
    padded = [tuple(max(n, p) for n, p in zip(shape3, _pre(c).patch_size, strict=True)) for c in (organs, stations)]
    return shape3, sum(len(grid(p, _pre(c))) for p, c in zip(padded, (organs, stations), strict=True))


async def stations_of(volume: Volume, organs: Contract, stations: Contract, *, run: Run, progress: Progress, in_flight: int) -> Stations:
    pre = _pre(organs)
    if _pre(stations).spacing_mm != pre.spacing_mm or _pre(stations).hu_window != pre.hu_window:
        raise ValueError(f"{organs.name} and {stations.name} contracts disagree on spacing or HU window; re-export them together")
    ct = await asyncio.to_thread(lambda: window(resample(volume.hu, volume.spacing, pre.spacing_mm), *pre.hu_window))
    progress.stage = "organs"
    organ_labels = await segment(ct[None], organs, run=run, progress=progress, in_flight=in_flight)
    organ_names = _post(organs).labels
    missing = [name for name in _pre(stations).extra_channels if name not in organ_names]
    if missing:
        raise ValueError(f"{stations.name} needs organ masks {missing} that {organs.name} does not segment")
    masks = [(organ_labels == organ_names.index(name)).astype(np.float32) for name in _pre(stations).extra_channels]
    progress.stage = "stations"
    station_labels = await segment(np.stack([ct, *masks]), stations, run=run, progress=progress, in_flight=in_flight)
    progress.stage = "writing"
    labels = await asyncio.to_thread(back_to_grid, station_labels, volume.hu.shape)
    names = _post(stations).labels
    counts = np.bincount(labels.ravel(), minlength=len(names))
    summary = {
        "shape": list(volume.hu.shape[::-1]),
        "spacing_mm": [round(s, 4) for s in volume.spacing[::-1]],
        "source": volume.source,
        "stations": {
            name: {"label": i, "voxels": int(counts[i]), "volume_ml": round(float(counts[i]) * volume.voxel_ml, 3)}
            for i, name in enumerate(names)
            if i > 0
        },
        "tiles": progress.total,
    }
    return Stations(summary, await asyncio.to_thread(to_nifti, labels, volume))
