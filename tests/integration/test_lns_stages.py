"""DeepStationing's two stages by sliding window (service/families/lns.py) against the plain computation, with the real
tiny models run by onnxruntime in this process.

The service makes each tile's channels as it sends it and keeps no sum of the Gaussian weights (memory: a paper-size
CT would otherwise stack its masks whole and divide every label's score by that sum); the plain computation here stacks
the masks, pads the volume, and divides, as the papers' nnU-Net-style inference does. The labels must be the same.

What a job holds is estimated before it starts (`lns.job_bytes`, bounded by serve --max-job-mb); it is checked here
against what the stages allocate while a worker that has fallen behind answers their tiles in batches.
"""

from __future__ import annotations

import asyncio
import gzip
import tracemalloc

import nibabel as nib
import numpy as np
import onnxruntime as ort
import pytest

from migserve.contract import Contract, SegmentationPostprocessing, VolumePreprocessing, read_contract
from migserve.types import Array
from service.families import lns
from service.families.volume import Volume, back_to_grid, resample, window
from service.jobs import Progress
from tests.helpers import ExportedRepo


def _sessions(tiny_repo: ExportedRepo) -> dict[str, tuple[Contract, ort.InferenceSession]]:
    found = {}
    for name in ("lns-organs", "lns-stations"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(tiny_repo.root / name / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"])
        found[name] = (read_contract(tiny_repo.root / name), session)
    return found


def _plain_stage(channels: Array, contract: Contract, session: ort.InferenceSession) -> Array:
    """Labels of `channels` [C, z, y, x]: pad to a patch, tile, blend softmax by a Gaussian, divide by the weights."""
    pre, post = contract.preprocessing, contract.postprocessing
    assert isinstance(pre, VolumePreprocessing) and isinstance(post, SegmentationPostprocessing)
    shape = channels.shape[1:]
    padded = tuple(max(n, p) for n, p in zip(shape, pre.patch_size, strict=True))
    channels = np.pad(channels, [(0, 0)] + [(0, p - n) for n, p in zip(shape, padded, strict=True)])
    weight = lns.gaussian(pre.patch_size, pre.gaussian_sigma_scale)
    scores = np.zeros((len(post.labels), *padded), dtype=np.float32)
    weights = np.zeros(padded, dtype=np.float32)
    dz, dy, dx = pre.patch_size
    for z, y, x in lns.grid(padded, pre):
        patch = np.ascontiguousarray(channels[None, :, z : z + dz, y : y + dy, x : x + dx])
        (logits,) = session.run(None, {contract.inputs[0].name: patch})
        shifted = np.exp(logits[0] - logits[0].max(axis=0, keepdims=True))
        scores[:, z : z + dz, y : y + dy, x : x + dx] += shifted / shifted.sum(axis=0, keepdims=True) * weight
        weights[z : z + dz, y : y + dy, x : x + dx] += weight
    labels = np.argmax(scores / np.maximum(weights, 1e-6), axis=0).astype(np.uint8)
    return np.asarray(labels[: shape[0], : shape[1], : shape[2]])


def _plain(volume: Volume, models: dict[str, tuple[Contract, ort.InferenceSession]]) -> Array:
    (organs, organ_session), (stations, station_session) = models["lns-organs"], models["lns-stations"]
    pre = organs.preprocessing
    assert isinstance(pre, VolumePreprocessing) and isinstance(organs.postprocessing, SegmentationPostprocessing)
    ct = np.clip(resample(volume.hu, volume.spacing, pre.spacing_mm), *pre.hu_window)
    ct = ((ct - pre.hu_window[0]) / (pre.hu_window[1] - pre.hu_window[0])).astype(np.float32)
    organ_labels = _plain_stage(ct[None], organs, organ_session)
    extra = stations.preprocessing.extra_channels  # type: ignore[union-attr]
    masks = [(organ_labels == organs.postprocessing.labels.index(name)).astype(np.float32) for name in extra]
    return back_to_grid(_plain_stage(np.stack([ct, *masks]), stations, station_session), volume.hu.shape)


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((40, 150, 150), (2.5, 1.5, 1.5)), ((12, 60, 90), (4.0, 4.0, 4.0))],  # the second under a patch on two axes: padded
    ids=["tiled", "padded"],
)
def test_the_service_s_stages_label_as_the_plain_computation(
    tiny_repo: ExportedRepo, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> None:
    models = _sessions(tiny_repo)
    rng = np.random.default_rng(11)
    hu = rng.normal(-300, 500, shape).astype(np.float32)
    hu[:, shape[1] // 3 : shape[1] // 2] += 900  # a bright block, so that the organ stage finds more than one label
    volume = Volume(hu=hu, spacing=spacing, affine=np.eye(4), source="nifti")

    async def run(name: str, inputs: dict[str, Array]) -> dict[str, Array]:
        contract, session = models[name]
        (logits,) = session.run(None, inputs)
        return {contract.outputs[0].name: logits}

    organs, stations = models["lns-organs"][0], models["lns-stations"][0]
    _, tiles = lns.plan(volume, organs, stations, 10**9)
    progress = Progress(tiles)
    result = asyncio.run(lns.stations_of(volume, organs, stations, run=run, progress=progress, in_flight=4))
    expected = _plain(volume, models)
    served = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(result.nifti)).dataobj).transpose(2, 1, 0)
    assert progress.done == tiles and len(np.unique(expected)) > 1, "more than one station: the comparison says something"
    assert served.shape == expected.shape == shape
    assert np.array_equal(served, expected), f"{np.count_nonzero(served != expected)} of {served.size} voxels differ"
    assert window(np.array([-2000.0, 0.0, 2000.0], np.float32), -1000.0, 1000.0).tolist() == [0.0, 0.5, 1.0]


class _Kept:
    """Progress.parts in memory: what a job kept in --jobs-dir keeps of its work (service/jobfiles.py Parts)."""

    def __init__(self) -> None:
        self.parts: dict[str, Array] = {}

    def save(self, name: str, array: Array) -> None:
        self.parts[name] = array.copy()

    def load(self, name: str) -> Array | None:
        return self.parts.get(name)


def test_a_job_run_again_takes_the_organ_labels_its_last_run_kept(tiny_repo: ExportedRepo) -> None:
    """A job kept with its upload keeps stage 1's labels; run again (a gateway restarted), it takes them instead of
    running stage 1's tiles again, counts those tiles done at once, and labels the stations as the first run did. Kept
    labels of another shape (not this volume's) are not taken."""
    models = _sessions(tiny_repo)
    volume = Volume(
        hu=np.random.default_rng(3).normal(-300, 500, (12, 60, 90)).astype(np.float32),
        spacing=(4.0, 4.0, 4.0),
        affine=np.eye(4),
        source="nifti",
    )
    calls: dict[str, int] = {}

    async def run(name: str, inputs: dict[str, Array]) -> dict[str, Array]:
        calls[name] = calls.get(name, 0) + 1
        contract, session = models[name]
        (logits,) = session.run(None, inputs)
        return {contract.outputs[0].name: logits}

    organs, stations = models["lns-organs"][0], models["lns-stations"][0]
    _, tiles = lns.plan(volume, organs, stations, 10**9)
    kept = _Kept()

    def segmented() -> tuple[bytes, Progress]:
        progress = Progress(tiles, parts=kept)
        found = asyncio.run(lns.stations_of(volume, organs, stations, run=run, progress=progress, in_flight=4))
        return found.nifti, progress

    first, progress = segmented()
    assert set(kept.parts) == {"organs"} and kept.parts["organs"].dtype == np.uint8 and progress.done == tiles
    organ_tiles, calls = calls["lns-organs"], {}
    again, progress = segmented()
    assert "lns-organs" not in calls and calls["lns-stations"] == tiles - organ_tiles, calls
    assert progress.done == tiles and again == first, "the same label map, byte for byte (gzip's time stamp left out)"
    kept.parts["organs"] = kept.parts["organs"][:-1]  # another volume's
    segmented()
    assert calls.get("lns-organs") == organ_tiles, "labels of another shape are not taken"


class _Behind:
    """A worker that has fallen behind: it answers a model's tiles only once `batch` of them wait (or none has come for
    50 ms), all at once: the tiles are copied into one batch (as into the batch's shared memory), and one output for
    the batch is copied out (as the gateway copies it out of shared memory) and a row of it given to each tile
    (service/dispatch/batcher.py), so that every tile in flight holds its logits at once. With `read_only`, the
    output is read-only, as a Triton partition's answer is (service/backends/triton.py)."""

    def __init__(self, models: dict[str, tuple[Contract, ort.InferenceSession]], batch: int, read_only: bool = False) -> None:
        self.models, self.batch, self.read_only = models, batch, read_only
        self.waiting: list[tuple[str, Array, asyncio.Future[dict[str, Array]]]] = []
        self.timer: asyncio.TimerHandle | None = None

    async def run(self, name: str, inputs: dict[str, Array]) -> dict[str, Array]:
        future: asyncio.Future[dict[str, Array]] = asyncio.get_running_loop().create_future()
        self.waiting.append((name, next(iter(inputs.values())), future))
        if len(self.waiting) >= self.batch:
            self.answer()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(0.05, self.answer)
        return await future

    def answer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiting, self.waiting = self.waiting, []
        for name in {name for name, _, _ in waiting}:
            contract, session = self.models[name]
            rows = [(tile, future) for model, tile, future in waiting if model == name]
            (logits,) = session.run(None, {contract.inputs[0].name: np.concatenate([tile for tile, _ in rows])})
            logits = np.array(logits)  # onnxruntime's own buffer is not traced; the gateway's copy is
            logits.flags.writeable = not self.read_only
            for row, (_, future) in enumerate(rows):
                future.set_result({contract.outputs[0].name: logits[row : row + 1]})


@pytest.mark.parametrize(
    ("shape", "spacing", "in_flight", "read_only"),
    [
        ((80, 80, 40), (4.0, 4.0, 4.0), 2, False),
        ((80, 80, 40), (4.0, 4.0, 4.0), 32, False),
        ((40, 300, 300), (1.0, 1.0, 1.0), 8, False),
        ((80, 80, 40), (4.0, 4.0, 4.0), 8, True),
    ],
    ids=["2-in-flight", "32-in-flight", "resampled", "read-only-logits"],
)
def test_a_job_holds_no_more_than_its_estimate_and_not_far_less(
    tiny_repo: ExportedRepo, shape: tuple[int, int, int], spacing: tuple[float, float, float], in_flight: int, read_only: bool
) -> None:
    """The peak of what numpy and Python allocate while the stages run (tracemalloc), with the decoded volume, is at
    most `job_bytes` and more than 3/4 of it (over that, --max-job-mb would turn away jobs it has room for); with
    read-only logits, as from a Triton partition, each blend's copy counted."""
    models = _sessions(tiny_repo)
    hu = np.random.default_rng(3).normal(-300, 500, shape).astype(np.float32)
    hu[:, shape[1] // 3 : shape[1] // 2] += 900
    volume = Volume(hu=hu, spacing=spacing, affine=np.eye(4), source="nifti")
    organs, stations = models["lns-organs"][0], models["lns-stations"][0]
    resampled, tiles = lns.plan(volume, organs, stations, 10**9)
    estimate = lns.job_bytes(shape, resampled, organs, stations, in_flight, read_only=read_only)
    resample(hu[:2, :2, :2], spacing, spacing)  # the first resample imports scipy's ndimage: not the job's memory
    tracemalloc.start()
    try:
        run = _Behind(models, in_flight, read_only).run
        asyncio.run(lns.stations_of(volume, organs, stations, run=run, progress=Progress(tiles), in_flight=in_flight))
        peak = tracemalloc.get_traced_memory()[1] + hu.nbytes
    finally:
        tracemalloc.stop()
    assert 0.75 * estimate < peak <= estimate, f"peak {peak / 2**20:.2f} MB, estimate {estimate / 2**20:.2f} MB"
