"""Pre- and post-processing of the families on hand-built inputs whose right answer is known."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.data
import pytest

from migserve.contract import DensityPostprocessing, DimRange, GroundingPostprocessing, GroundingPreprocessing, ImagePreprocessing
from migserve.types import Array
from service.errors import Unprocessable
from service.families import crowd, grounding, lns, volume
from service.families.face import Box, crop_box

T = 50
POST = {
    head: GroundingPostprocessing(head=head, anchor_widths=(0.1, 0.2) if head == "anchors" else ())
    for head in ("anchors", "start_end", "foreground", "tree")
}
PRE = GroundingPreprocessing(
    feature_dim=4, feature_source="test", vocabulary_file="vocab.txt", token_pattern=r"[a-z0-9]+(?:'[a-z]+)?", max_words=6, max_frames=64
)


def _row(values: Array) -> Array:
    return values[None].astype(np.float32)


def test_start_end_finds_the_peaks() -> None:
    start, end = np.full(T, 0.001), np.full(T, 0.001)
    start[5], end[9] = 0.9, 0.9
    moments = grounding.moments({"start_prob": _row(start), "end_prob": _row(end)}, T, float(T), POST["start_end"], 3)
    assert (moments[0].start, moments[0].end) == (5.0, 10.0)
    assert len(moments) == 3 and moments[0].score > moments[1].score


def test_anchors_use_centre_width_and_offsets() -> None:
    scores = np.zeros((T, 2))
    scores[20, 1] = 0.9  # width 0.2 of 50 frames = 10, centred on frame 20.5
    offsets = np.zeros((T, 2, 2))
    offsets[20, 1] = (0.1, -0.1)  # start moves right by 1 frame, end left by 1
    moments = grounding.moments({"anchor_scores": _row(scores), "anchor_offsets": _row(offsets)}, T, 100.0, POST["anchors"], 1)
    assert moments[0].start == pytest.approx(2 * 16.5, abs=1e-3) and moments[0].end == pytest.approx(2 * 24.5, abs=1e-3)


def test_foreground_runs_become_moments() -> None:
    fg = np.full(T, 0.1)
    fg[20:30] = 0.95
    moments = grounding.moments({"foreground": _row(fg)}, T, float(T), POST["foreground"], 5)
    assert (moments[0].start, moments[0].end) == (20.0, 30.0)


def test_tree_merges_similar_frames_and_prunes_unrelated_nodes() -> None:
    adjacent = np.full(T, 0.9)
    adjacent[[9, 19, 29, 39]] = 0.1  # five scenes of ten frames
    query = np.full(T, -0.2)
    query[10:20] = 0.8  # the second scene matches the sentence
    moments = grounding.moments({"query_similarity": _row(query), "adjacent_similarity": _row(adjacent)}, T, float(T), POST["tree"], 3)
    assert (moments[0].start, moments[0].end) == (10.0, 20.0)
    assert moments[0].score == pytest.approx(0.9, abs=1e-3)  # (0.8 + 1) / 2


def test_nms_drops_overlapping_moments_and_clips_to_the_video() -> None:
    start, end = np.linspace(1, 0.5, T), np.linspace(0.5, 1, T)  # every long span scores high
    moments = grounding.moments({"start_prob": _row(start), "end_prob": _row(end)}, T, 10.0, POST["start_end"], 5)
    for i, a in enumerate(moments):
        assert 0 <= a.start < a.end <= 10.0
        for b in moments[i + 1 :]:
            inter = max(0.0, min(a.end, b.end) - max(a.start, b.start))
            assert inter / (max(a.end, b.end) - min(a.start, b.start)) < 0.5


def test_vocabulary_pads_masks_and_marks_unknown_words(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text("<pad>\n<unk>\nperson\nopens\na\ndoor\n")
    vocab = grounding.Vocabulary(tmp_path / "vocab.txt", PRE)
    ids, mask, unknown = vocab.encode("Person opens a Wardrobe!", DimRange(min=2, max=6, default=4))
    assert ids.tolist() == [[2, 3, 4, 1, 0, 0]] and mask.tolist() == [[1, 1, 1, 1, 0, 0]] and unknown == ["wardrobe"]
    ids, _, _ = vocab.encode("a " * 20, DimRange(min=2, max=6, default=4))
    assert ids.shape == (1, 6), "truncated to max_words"
    with pytest.raises(Unprocessable, match="no words"):
        vocab.encode("?!", DimRange(min=2, max=6, default=4))


def test_frames_pool_long_videos_and_pad_short_ones() -> None:
    limits = DimRange(min=8, max=64, default=16)
    features = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)
    video, mask, real = grounding.frames(features, PRE, limits)
    assert real == 64 and video.shape == (1, 64, 4) and mask.sum() == 64
    assert video[0, 0, 0] == pytest.approx(features[:2, 0].mean()), "average-pooled"
    video, mask, real = grounding.frames(features[:3], PRE, limits)
    assert real == 3 and video.shape == (1, 16, 4) and mask[0].tolist() == [1] * 3 + [0] * 13


def test_features_checks() -> None:
    with pytest.raises(Unprocessable, match="D is 3"):
        grounding.check_features(np.zeros((5, 3)), PRE)
    with pytest.raises(Unprocessable, match="not a \\[T, D\\] list"):
        grounding.features_from_list([[1, 2, 3, 4], [1]], PRE)


def test_crowd_tiles_cover_the_image_and_stitch_back() -> None:
    pre = ImagePreprocessing(height=None, width=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), size_multiple=8)
    rgb = np.full((50, 70, 3), 255, dtype=np.uint8)
    batch, tiling = crowd.tiles(rgb, pre, DimRange(min=8, max=32, default=16), DimRange(min=8, max=32, default=16))
    assert (tiling.rows, tiling.cols) == (2, 3) and batch.shape == (6, 3, 32, 24)
    assert batch.sum() == 50 * 70 * 3, "every pixel once, padding zero"
    density = np.stack([np.full((1, 4, 3), i, dtype=np.float32) for i in range(6)])  # tile index as its density
    stitched = crowd.stitch(density, tiling, DensityPostprocessing(output_stride=8))
    assert stitched.shape == (7, 9) and stitched[0, 0] == 0 and stitched[0, 8] == 2 and stitched[6, 0] == 3


def test_crop_box_stays_inside_the_image() -> None:
    assert crop_box(Box(0, 0, 40, 40), 0.2, 100, 80) == (0, 0, 56, 56)
    x, y, w, h = crop_box(Box(90, 60, 30, 30), 0.5, 100, 80)
    assert x + w <= 100 and y + h <= 80 and w == h == 60


def test_sliding_window_grid_covers_every_voxel() -> None:
    for size, patch in ((16, 16), (17, 16), (50, 16), (61, 32)):
        starts = lns.starts(size, patch, 0.5)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + patch] = True
        assert covered.all() and starts[-1] + patch == size
    weight = lns.gaussian((16, 32, 32), 0.125)
    assert weight.max() == 1.0 and weight.min() > 0 and weight[8, 16, 16] > weight[0, 0, 0]


def test_volume_reads_dicom_geometry_and_writes_the_affine_back(monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(str(pydicom.data.get_testdata_file("CT_small.dcm")))
    ds = pydicom.dcmread(path)
    vol = volume.read_volume(path.read_bytes(), max_bytes=1 << 26, max_voxels=1 << 24)
    assert vol.hu.shape == (1, 128, 128) and vol.spacing[1] == pytest.approx(float(ds.PixelSpacing[0]))
    assert vol.hu.min() == float(ds.pixel_array.min()) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    labels = np.zeros(vol.hu.shape, np.uint8)
    written = volume.to_nifti(labels, vol)
    image = nib.Nifti1Image.from_bytes(gzip.decompress(written))
    assert image.shape == (128, 128, 1) and np.allclose(image.affine, vol.affine)
    monkeypatch.setattr("gzip.time.time", lambda: 2e9)  # a later second: gzip would stamp it in the header
    assert volume.to_nifti(labels, vol) == written, "the same labels, the same bytes (a job run again, a client comparing)"


def test_resampling_and_back_to_the_input_grid() -> None:
    hu = np.arange(10 * 20 * 30, dtype=np.float32).reshape(10, 20, 30)
    coarse = volume.resample(hu, (2.0, 1.0, 1.0), (4.0, 4.0, 4.0))
    assert coarse.shape == (5, 5, 8)
    assert volume.back_to_grid(coarse.astype(np.int32), hu.shape).shape == hu.shape
    four_d = nib.Nifti1Image(np.zeros((2, 2, 2, 2), np.int16), np.eye(4)).to_bytes()
    with pytest.raises(Unprocessable, match="3D"):
        volume.read_volume(four_d, max_bytes=1 << 20, max_voxels=1 << 20)


def test_the_volume_readers_are_imported_at_a_volume_s_first_use_not_at_the_gateway_s_start() -> None:
    """nibabel, pydicom and scipy's ndimage take about 0.6 s of CPU to import: a gateway (and each front-end process)
    spent it at start, serving a CT model or not. Now the first volume read imports them, and quiets them then."""
    code = """
import sys
import service.api.app, service.api.v1
from service.families import volume
readers = ("nibabel", "pydicom", "scipy.ndimage")
print([name for name in readers if name in sys.modules])
try:
    volume.read_volume(int(348).to_bytes(4, "little") + bytes(400), max_bytes=10**6, max_voxels=10**6)
except Exception as exc:
    print(type(exc).__name__)
import pydicom.config
print([name for name in readers[:2] if name in sys.modules], pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.stdout.splitlines() == ["[]", "Unprocessable", "['nibabel', 'pydicom'] True"], run.stderr
