"""grounding-*: a sentence and clip features in, ranked moments in seconds out.

Words are the contract's token pattern matched in the (lower-cased) sentence and
looked up in the artifact's vocabulary (unknown words become `unk_id`). Words
are padded to `max_words` and frames to a multiple of FRAME_BUCKET so requests
for different videos batch together; the masks keep the padding out of the
answer. Videos longer than `max_frames` are average-pooled down to it.

Each head has its own decoder, giving candidate moments in frame units; all of
them go through the same temporal non-maximum suppression.
"""

from __future__ import annotations

import io
import math
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from migserve.contract import DimRange, GroundingPostprocessing, GroundingPreprocessing
from migserve.types import Array

from ..errors import Unprocessable

FRAME_BUCKET = 16
CANDIDATES = 256  # best-scoring candidates kept before NMS


@dataclass(frozen=True)
class Moment:
    start: float
    end: float
    score: float


class Vocabulary:
    def __init__(self, path: Path, pre: GroundingPreprocessing) -> None:
        tokens = path.read_text(encoding="utf-8").splitlines()
        self.ids = {token: i for i, token in enumerate(tokens)}
        self.pre = pre
        self.pattern = re.compile(pre.token_pattern)

    def encode(self, sentence: str, words: DimRange) -> tuple[Array, Array, list[str]]:
        """words [1, max_words] int64, word_mask [1, max_words] float32, and the words not in the vocabulary."""
        text = sentence.lower() if self.pre.lowercase else sentence
        tokens = self.pattern.findall(text)
        if not tokens:
            raise Unprocessable("sentence: no words in it (expected letters or digits)")
        tokens = tokens[: self.pre.max_words]
        width = max(self.pre.max_words, words.min)
        ids = np.full((1, width), self.pre.pad_id, dtype=np.int64)
        ids[0, : len(tokens)] = [self.ids.get(t, self.pre.unk_id) for t in tokens]
        mask = np.zeros((1, width), dtype=np.float32)
        mask[0, : len(tokens)] = 1.0
        return ids, mask, [t for t in tokens if t not in self.ids]


def load_features(data: bytes, pre: GroundingPreprocessing) -> Array:
    """A .npy file of [T, D] clip features, checked: numeric, finite, D as the contract says, T >= 1."""
    try:
        _check_npy_size(data)
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, tokenize.TokenError) as exc:  # TokenError: numpy's reading of a damaged header
        raise Unprocessable(f"features: not a readable .npy array ({type(exc).__name__}: {exc})") from None
    if not isinstance(array, np.ndarray):
        raise Unprocessable("features: expected one .npy array, got an archive")
    return check_features(array, pre)


def _check_npy_size(data: bytes) -> None:
    """ValueError where a .npy header gives a shape its bytes do not hold: numpy allocates the array before it reads
    them, so a 128-byte file claiming 10^14 values raised MemoryError, and one claiming a few GB would take them."""
    stream = io.BytesIO(data)
    if data[:6] != b"\x93NUMPY":
        return  # an archive, or not .npy at all: np.load says which
    version = np.lib.format.read_magic(stream)  # type: ignore[no-untyped-call]  # numpy's stubs leave these untyped
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = header(stream)  # type: ignore[no-untyped-call]
    if dtype.hasobject:
        return  # refused by np.load without pickle
    needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if needed > len(data) - stream.tell():
        raise ValueError(f"its header gives shape {list(shape)} of {dtype}, {needed} bytes, but {len(data) - stream.tell()} follow it")


def features_from_list(value: object, pre: GroundingPreprocessing) -> Array:
    """Features given in JSON as a list of T rows of D numbers."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise Unprocessable(f"features: not a [T, D] list of numbers ({exc})") from None
    return check_features(array, pre)


def check_features(array: Array, pre: GroundingPreprocessing) -> Array:
    if array.ndim != 2:
        raise Unprocessable(f"features: expected shape [T, {pre.feature_dim}], got {list(array.shape)}")
    if array.shape[1] != pre.feature_dim:
        raise Unprocessable(f"features: D is {array.shape[1]}, the model takes {pre.feature_dim} ({pre.feature_source})")
    if array.shape[0] == 0:
        raise Unprocessable("features: zero frames (T = 0)")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise Unprocessable(f"features: dtype {array.dtype} is not numeric")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise Unprocessable("features: contains NaN or infinity")
    return array


def frames(features: Array, pre: GroundingPreprocessing, limits: DimRange) -> tuple[Array, Array, int]:
    """video [1, T', D] and video_mask [1, T'] padded to the bucket, and the number of real frames."""
    if len(features) > pre.max_frames:  # average-pool into max_frames equal spans
        edges = np.linspace(0, len(features), pre.max_frames + 1).round().astype(int)
        features = np.add.reduceat(features, edges[:-1], axis=0) / np.diff(edges)[:, None]
    real = len(features)
    padded = min(max(math.ceil(real / FRAME_BUCKET) * FRAME_BUCKET, limits.min), max(limits.max, real))
    video = np.zeros((1, padded, features.shape[1]), dtype=np.float32)
    video[0, :real] = features
    mask = np.zeros((1, padded), dtype=np.float32)
    mask[0, :real] = 1.0
    return video, mask, real


# --- decoders: outputs of one request (batch row 0) -> candidates (start, end, score) in frames ---


def _anchors(outputs: dict[str, Array], n: int, post: GroundingPostprocessing) -> Array:
    scores = outputs["anchor_scores"][0, :n]  # [T, K]
    offsets = outputs["anchor_offsets"][0, :n]  # [T, K, 2]
    width = np.asarray(post.anchor_widths, dtype=np.float32)[None, :] * n
    centre = np.arange(n, dtype=np.float32)[:, None] + 0.5
    start = centre - width / 2 + offsets[..., 0] * width
    end = centre + width / 2 + offsets[..., 1] * width
    return np.stack([start.ravel(), end.ravel(), scores.ravel()], axis=1)


def _start_end(outputs: dict[str, Array], n: int, post: GroundingPostprocessing) -> Array:
    start, end = outputs["start_prob"][0, :n], outputs["end_prob"][0, :n]
    longest = max(1, math.ceil(post.max_moment_fraction * n))
    i, j = np.triu_indices(n)
    keep = j - i < longest
    i, j = i[keep], j[keep]
    return np.asarray(np.stack([i, j + 1, start[i] * end[j]], axis=1), dtype=np.float32)


def _runs(above: Array) -> list[tuple[int, int]]:
    """[start, end) of every run of True."""
    edges = np.diff(np.concatenate([[0], above.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _foreground(outputs: dict[str, Array], n: int, post: GroundingPostprocessing) -> Array:
    fg = outputs["foreground"][0, :n]
    low, high = float(fg.min()), float(fg.max())
    candidates = [(0, n, float(fg.mean()))] if high == low else []
    for level in post.foreground_levels if high > low else ():
        for a, b in _runs(fg >= low + level * (high - low)):
            candidates.append((a, b, float(fg[a:b].mean())))
    return np.asarray(candidates, dtype=np.float32).reshape(-1, 3)


def _tree(outputs: dict[str, Array], n: int, post: GroundingPostprocessing) -> Array:
    """MHST: merge adjacent segments by similarity into a tree, prune query-irrelevant nodes, rank the roots left.

    A node is relevant when its mean query similarity is above the contract's quantile of the
    frames' similarities; pruning a node cuts its ancestors too, so the roots left are the largest
    subtrees relevant throughout.
    """
    query = outputs["query_similarity"][0, :n].astype(np.float64)
    adjacent = outputs["adjacent_similarity"][0, :n].astype(np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(query)])
    threshold = float(np.quantile(query, post.tree_relevance_quantile))

    def relevance(node: tuple[int, int]) -> float:
        return float((cumulative[node[1]] - cumulative[node[0]]) / (node[1] - node[0]))

    segments = [(t, t + 1) for t in range(n)]
    kept = {leaf: relevance(leaf) > threshold for leaf in segments}  # relevant throughout, in creation order
    parent: dict[tuple[int, int], tuple[int, int]] = {}
    links = adjacent[: n - 1].tolist()  # similarity across the boundary after segments[k]
    while links:
        k = int(np.argmax(links))
        left, right = segments[k], segments[k + 1]
        merged = (left[0], right[1])
        parent[left] = parent[right] = merged
        kept[merged] = kept[left] and kept[right] and relevance(merged) > threshold
        segments[k : k + 2] = [merged]
        del links[k]
    roots = [node for node, ok in kept.items() if ok and (node not in parent or not kept[parent[node]])]
    if not roots:  # nothing stands out: the whole video is the only hypothesis
        roots = [(0, n)]
    return np.asarray([(a, b, (relevance((a, b)) + 1) / 2) for a, b in roots], dtype=np.float32).reshape(-1, 3)  # cosine -> [0, 1]


DECODERS = {"anchors": _anchors, "start_end": _start_end, "foreground": _foreground, "tree": _tree}


def _iou(a: Array, b: Array) -> Array:
    inter = np.clip(np.minimum(a[1], b[:, 1]) - np.maximum(a[0], b[:, 0]), 0, None)
    union = np.maximum(a[1], b[:, 1]) - np.minimum(a[0], b[:, 0])
    return np.asarray(inter / np.maximum(union, 1e-9))


def moments(outputs: dict[str, Array], real_frames: int, duration: float, post: GroundingPostprocessing, top_k: int) -> list[Moment]:
    """Ranked moments in seconds within [0, duration], after temporal NMS."""
    candidates = DECODERS[post.head](outputs, real_frames, post)
    candidates[:, :2] = np.clip(candidates[:, :2], 0, real_frames)
    candidates = candidates[(candidates[:, 1] - candidates[:, 0] > 1e-6) & np.isfinite(candidates[:, 2])]
    candidates = candidates[np.argsort(-candidates[:, 2], kind="stable")[:CANDIDATES]]
    kept: list[Array] = []
    for row in candidates:
        if len(kept) == top_k:
            break
        if not kept or _iou(row, np.asarray(kept)).max() < post.nms_iou:
            kept.append(row)
    seconds = duration / real_frames
    return [Moment(round(float(a) * seconds, 3), round(min(float(b) * seconds, duration), 3), round(float(s), 4)) for a, b, s in kept]
