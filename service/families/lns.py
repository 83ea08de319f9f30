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
import math
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from migserve.contract import Contract, SegmentationPostprocessing, VolumePreprocessing
from migserve.types import Array

from ..errors import TooLarge
from ..jobs import Progress
from .volume import Volume, back_to_grid, resample, to_nifti, window

Run = Callable[[str, dict[str, Array]], Awaitable[dict[str, Array]]]
T = TypeVar("T")
BLEND_THREADS = min(32, (os.cpu_count() or 1) + 4)  # asyncio.to_thread's executor: tiles blended at once, at most
ARGMAX_VOXELS = 1 << 20  # voxels of one slab of the labels' argmax (5 bytes each while it runs)
PART = "organs"  # what a job kept in --jobs-dir keeps of its work: stage 1's labels (1 byte a resampled voxel)


def starts(size: int, patch: int, overlap: float) -> list[int]:
    stride = max(1, int(patch * (1 - overlap)))
    positions = list(range(0, max(size - patch, 0) + 1, stride))
    if positions[-1] != max(size - patch, 0):
        positions.append(size - patch)
    return positions


def padded(shape: tuple[int, ...], pre: VolumePreprocessing) -> tuple[int, ...]:
    """`shape` grown to at least one patch along every axis (a volume smaller than a patch is padded with zeros)."""
    return tuple(max(n, p) for n, p in zip(shape, pre.patch_size, strict=True))


def grid(shape: tuple[int, ...], pre: VolumePreprocessing) -> list[tuple[int, int, int]]:
    """The corners of the patches tiling `shape`, padded as `padded` pads it."""
    axes = [starts(n, p, pre.overlap) for n, p in zip(padded(shape, pre), pre.patch_size, strict=True)]
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


class Channels:
    """A stage's input, one patch at a time: the windowed CT, and after it a mask per organ label of `organs` (stage 1's
    labels), so that the masks are never stacked whole: each patch's channels are made as it is sent. Past the
    volume's edge a patch is zero, as np.pad would make it."""

    def __init__(self, ct: Array, organs: Array | None = None, labels: tuple[int, ...] = ()) -> None:
        self.ct, self.organs, self.labels = ct, organs, labels
        self.shape: tuple[int, int, int] = (ct.shape[0], ct.shape[1], ct.shape[2])

    def patch(self, corner: tuple[int, int, int], size: tuple[int, int, int]) -> Array:
        """[1, C, *size] float32 at `corner`."""
        (z, y, x), (dz, dy, dx) = corner, size
        out = np.zeros((1, 1 + len(self.labels), dz, dy, dx), dtype=np.float32)
        region = (slice(z, z + dz), slice(y, y + dy), slice(x, x + dx))
        ct = self.ct[region]
        a, b, c = ct.shape
        out[0, 0, :a, :b, :c] = ct
        if self.organs is not None:
            organs = self.organs[region]
            for channel, label in enumerate(self.labels, start=1):
                np.equal(organs, label, out=out[0, channel, :a, :b, :c], casting="unsafe")
        return out


async def segment(channels: Channels, contract: Contract, *, run: Run, progress: Progress, in_flight: int) -> Array:
    """Labels [z, y, x] of `channels` (resampled and windowed) by one model.

    Memory: each label's blended score over the volume (float32) and at most `in_flight` tiles with their logits. The
    Gaussian weights' sum per voxel is not kept: dividing every label's score by the same positive number does not
    change which label is largest."""
    pre, post = _pre(contract), _post(contract)
    shape = channels.shape
    grown = padded(shape, pre)
    weight = gaussian(pre.patch_size, pre.gaussian_sigma_scale)
    scores = [np.zeros((len(post.labels), *grown), dtype=np.float32)]  # in a list, to be handed over (_handed_over)
    lock = threading.Lock()
    limit = asyncio.Semaphore(in_flight)
    input_name, output_name = contract.inputs[0].name, contract.outputs[0].name
    dz, dy, dx = pre.patch_size

    def blend(corner: tuple[int, int, int], logits: Array) -> None:
        """The tile's softmax, weighted, into the scores; in the logits' own memory (96 MB a tile at paper size), which
        this tile alone uses: a copy where they are read-only (a Triton partition's answer)."""
        z, y, x = corner
        probs = logits if logits.flags.writeable else logits.copy()
        probs -= probs.max(axis=0, keepdims=True)
        np.exp(probs, out=probs)
        probs /= probs.sum(axis=0, keepdims=True)
        probs *= weight
        with lock:
            scores[0][:, z : z + dz, y : y + dy, x : x + dx] += probs

    async def tile(corner: tuple[int, int, int]) -> None:
        async with limit:  # the tile and its logits are let go before another tile starts
            patch = await asyncio.to_thread(channels.patch, corner, pre.patch_size)  # off the loop: 29 MB at paper size
            outputs = await run(contract.name, {input_name: patch})
            del patch
            logits = [outputs.pop(output_name)[0]]
            del outputs
            await _handed_over(logits, lambda mine: blend(corner, mine))
        progress.advance()

    await asyncio.gather(*(tile(c) for c in grid(shape, pre)))
    return await _handed_over(scores, lambda mine: _argmax(mine, shape))  # before the next stage makes its own


async def _handed_over(box: list[Array], work: Callable[[Array], T]) -> T:
    """`work` on the array in `box`, its only item, in a thread that takes the only reference to it. Passed as an
    argument to asyncio.to_thread, the array would stay alive in the thread's work item until the thread next ran,
    which may be well after the caller has gone on (a stage's scores, a tile's logits with its batch's output)."""
    return await asyncio.to_thread(lambda: work(box.pop()))


def _argmax(scores: Array, shape: tuple[int, int, int]) -> Array:
    """uint8 labels [z, y, x] of the largest score (the first of equal ones, as argmax), cropped to `shape`, a slab of
    about ARGMAX_VOXELS at a time, by a running maximum over the labels: numpy's argmax along the first axis copies the
    slab's scores of every label to take them along its last, and answers in int64."""
    labels = np.zeros(shape, dtype=np.uint8)
    step = _slab(shape)
    for z in range(0, shape[0], step):
        stop = min(z + step, shape[0])  # the scores run past the volume where it was padded to a patch
        slab, out = scores[:, z:stop, : shape[1], : shape[2]], labels[z:stop]
        best, higher = slab[0].copy(), np.empty(out.shape, dtype=bool)
        for label in range(1, len(slab)):
            np.greater(slab[label], best, out=higher)
            np.copyto(out, label, where=higher)
            np.maximum(best, slab[label], out=best)
    return labels


def _slab(shape: tuple[int, ...]) -> int:
    """Planes of `shape` in one slab of the argmax: about ARGMAX_VOXELS."""
    return max(1, ARGMAX_VOXELS // max(1, shape[1] * shape[2]))


def job_bytes(
    shape: tuple[int, int, int],
    resampled: tuple[int, int, int],
    organs: Contract,
    stations: Contract,
    in_flight: int,
    *,
    read_only: bool = False,
) -> int:
    """About the most a job on a volume of `shape` (resampled to `resampled`, both [z, y, x]) holds at once with
    `in_flight` tiles outstanding, its decoded volume included and its request's body not (--max-pending-mb counts
    that). What holds it, in the order `stations_of` makes it, per voxel of the volume (v) or of the resampled
    volume (r): the volume, float32 (4v); the resampled CT and its windowed copy (8r); in each stage, the CT (4r,
    and in stage 2 the organ labels, 1r), every label's score (4 bytes a label and padded voxel) and the Gaussian
    weight, then either each outstanding tile's input (twice: the patch, and its copy in the batch's shared memory)
    and logits, and the blends' temporaries (two of a patch's size: a blend works in the logits' memory), or the
    labels (1r) with one slab's running maximum and mask (5 bytes a voxel); last the station labels (1r) back on the
    input grid (1v) and the NIfTI's bytes before and after gzip (at most 2v). A tile's logits are a view of its
    batch's output, which the batch's other rows keep alive until they are blended too; those rows are other
    outstanding tiles, counted already. With `read_only` logits (a Triton partition's answer) each blend works in a
    copy of its tile's logits: one more per blend at once. Not counted: the worker's side of a batch (its outputs are
    among the activations placement counts for the model)."""
    voxels = math.prod(resampled)

    def stage(contract: Contract, held: int) -> int:
        pre, labels = _pre(contract), len(_post(contract).labels)
        tiles, patch = min(in_flight, len(grid(resampled, pre))), math.prod(pre.patch_size)
        blend = (2 + (labels if read_only else 0)) * patch * 4  # two of a patch's size, and a copy of read-only logits
        running = tiles * (2 * (1 + len(pre.extra_channels)) + labels) * patch * 4 + min(tiles, BLEND_THREADS) * blend
        ending = voxels + 5 * min(_slab(resampled), resampled[0]) * resampled[1] * resampled[2]
        return held + 4 * labels * math.prod(padded(resampled, pre)) + 4 * patch + max(running, ending)

    prepare, writing = 8 * voxels, 6 * voxels + 3 * math.prod(shape)
    return 4 * math.prod(shape) + max(prepare, stage(organs, 4 * voxels), stage(stations, 5 * voxels), writing)


@dataclass(frozen=True)
class Stations:
    summary: dict[str, Any]
    nifti: bytes


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
    return shape3, sum(len(grid(shape3, _pre(c))) for c in (organs, stations))


async def _organs(ct: Array, organs: Contract, *, run: Run, progress: Progress, in_flight: int) -> Array:
    """Stage 1's labels: those a job run again kept from its last run (Progress.parts: its tiles counted done at once),
    else segmented, and kept for a run after this one."""
    parts = progress.parts
    kept = await asyncio.to_thread(parts.load, PART) if parts is not None else None
    if kept is not None and kept.shape == ct.shape and kept.dtype == np.uint8:
        progress.done += len(grid(ct.shape, _pre(organs)))
        return kept
    labels = await segment(Channels(ct), organs, run=run, progress=progress, in_flight=in_flight)
    if parts is not None:
        await asyncio.to_thread(parts.save, PART, labels)
    return labels


async def stations_of(volume: Volume, organs: Contract, stations: Contract, *, run: Run, progress: Progress, in_flight: int) -> Stations:
    pre = _pre(organs)
    if _pre(stations).spacing_mm != pre.spacing_mm or _pre(stations).hu_window != pre.hu_window:
        raise ValueError(f"{organs.name} and {stations.name} contracts disagree on spacing or HU window; re-export them together")
    ct = await asyncio.to_thread(lambda: window(resample(volume.hu, volume.spacing, pre.spacing_mm), *pre.hu_window))
    progress.stage = "organs"
    organ_labels = await _organs(ct, organs, run=run, progress=progress, in_flight=in_flight)
    organ_names = _post(organs).labels
    missing = [name for name in _pre(stations).extra_channels if name not in organ_names]
    if missing:
        raise ValueError(f"{stations.name} needs organ masks {missing} that {organs.name} does not segment")
    mask_labels = tuple(organ_names.index(name) for name in _pre(stations).extra_channels)
    progress.stage = "stations"
    station_labels = await segment(Channels(ct, organ_labels, mask_labels), stations, run=run, progress=progress, in_flight=in_flight)
    progress.stage = "writing"
    labels = await asyncio.to_thread(back_to_grid, station_labels, volume.hu.shape)
    names = _post(stations).labels
    # a slice at a time: bincount takes its input as int64, 8 bytes a voxel of the whole volume at once
    counts = sum((np.bincount(plane.ravel(), minlength=len(names)) for plane in labels), np.zeros(len(names), dtype=np.int64))
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
