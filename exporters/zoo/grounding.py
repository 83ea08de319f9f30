"""Temporal sentence grounding: five variants behind one input contract.

Inputs (all variants): `video` f32 [B, T, D] clip features, `video_mask` f32
[B, T], `words` i64 [B, L] ids into the vocabulary stored with the artifact,
`word_mask` f32 [B, L]. Each variant keeps its paper's inference-time structure;
heads are masked so padded frames score 0:

- MGSL-Net: memory slots read by video and query, co-attention, anchor head
  (`anchor_scores` [B, T, K], `anchor_offsets` [B, T, K, 2] as fractions of width).
- SSRN: siamese context sampling (shifted copies of the video through the same
  encoder), reasoning over them, soft start/end head (`start_prob`, `end_prob`).
- ECRL: joint video-query encoder and one span head shared by start and end.
- DSCNet: soft clustering of frames, query-relevant clusters, `foreground` [B, T].
- MHST: `query_similarity` [B, T] and `adjacent_similarity` [B, T] (frame t with
  t+1) from which the gateway builds the segment tree.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from migserve.contract import DimRange, GroundingPostprocessing, GroundingPreprocessing, Size, TensorSpec
from migserve.types import Array

from ..vocab import TOKEN_PATTERN, VOCAB_FILE, load_vocabulary
from .base import ModelDef, OptionError, Sample, batch_dim, mask_from_lengths
from .grounding_layers import EncoderLayer, GroundingConfig, QueryEncoder, VideoEncoder, masked_mean, masked_softmax, shift

VOCAB_NAME = "vocab.txt"


class _Backbone(nn.Module):
    def __init__(self, cfg: GroundingConfig) -> None:
        super().__init__()
        self.video_encoder = VideoEncoder(cfg)
        self.query_encoder = QueryEncoder(cfg)


class MGSLNet(_Backbone):
    def __init__(self, cfg: GroundingConfig) -> None:
        super().__init__(cfg)
        self.memory = nn.Parameter(torch.randn(cfg.memory_slots, cfg.hidden) * 0.02)
        self.video_memory = EncoderLayer(cfg.hidden, cfg.heads)
        self.query_memory = EncoderLayer(cfg.hidden, cfg.heads)
        self.video_to_query = EncoderLayer(cfg.hidden, cfg.heads)
        self.query_to_video = EncoderLayer(cfg.hidden, cfg.heads)
        self.fuse = nn.Conv1d(2 * cfg.hidden, cfg.hidden, 3, padding=1)
        self.scores = nn.Conv1d(cfg.hidden, len(cfg.anchor_widths), 1)
        self.offsets = nn.Conv1d(cfg.hidden, 2 * len(cfg.anchor_widths), 1)

    def forward(
        self, video: torch.Tensor, video_mask: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.video_encoder(video, video_mask)
        q = self.query_encoder(words, word_mask)
        memory = self.memory.unsqueeze(0).expand(v.shape[0], -1, -1)
        slots = torch.ones_like(memory[..., 0])
        v = self.video_memory(v, video_mask, memory, slots)
        q = self.query_memory(q, word_mask, memory, slots)
        v2 = self.video_to_query(v, video_mask, q, word_mask)
        q2 = self.query_to_video(q, word_mask, v, video_mask)
        fused = torch.cat([v2, v2 * masked_mean(q2, word_mask).unsqueeze(1)], dim=-1).transpose(1, 2)
        h = self.fuse(fused).relu()
        mask = video_mask.unsqueeze(-1)
        scores = self.scores(h).transpose(1, 2).sigmoid() * mask
        offsets = self.offsets(h).transpose(1, 2).tanh() * mask
        return scores, offsets.reshape(offsets.shape[0], offsets.shape[1], -1, 2)


class SSRN(_Backbone):
    def __init__(self, cfg: GroundingConfig) -> None:
        super().__init__(cfg)
        self.shifts = cfg.context_shifts
        self.context = EncoderLayer(cfg.hidden, cfg.heads)  # shared by every sampled context: siamese
        self.reason = nn.Linear(cfg.hidden * (1 + 2 * len(cfg.context_shifts)), cfg.hidden)
        self.cross = EncoderLayer(cfg.hidden, cfg.heads)
        self.head = nn.Linear(cfg.hidden, 2)

    def forward(
        self, video: torch.Tensor, video_mask: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.video_encoder(video, video_mask)
        q = self.query_encoder(words, word_mask)
        views = [self.context(v, video_mask, q, word_mask)]
        m = video_mask.unsqueeze(-1)
        for s in self.shifts:
            for offset in (-s, s):
                sampled = shift(v, offset) * m
                views.append(self.context(sampled, video_mask, q, word_mask))
        h = self.reason(torch.cat(views, dim=-1)).relu() * m
        h = self.cross(h, video_mask, q, word_mask)
        logits = self.head(h)
        return masked_softmax(logits[..., 0], video_mask), masked_softmax(logits[..., 1], video_mask)


class ECRL(_Backbone):
    def __init__(self, cfg: GroundingConfig) -> None:
        super().__init__(cfg)
        self.joint = nn.ModuleList(EncoderLayer(cfg.hidden, cfg.heads) for _ in range(cfg.layers))
        self.boundary = nn.Parameter(torch.randn(2, cfg.hidden) * 0.02)  # start, end queries
        self.span_head = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 1))

    def forward(
        self, video: torch.Tensor, video_mask: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.video_encoder(video, video_mask)
        q = self.query_encoder(words, word_mask)
        x = torch.cat([v, q], dim=1)
        mask = torch.cat([video_mask, word_mask], dim=1)
        for layer in self.joint:
            x = layer(x, mask)
        frames = x[:, : v.shape[1]]
        start = self.span_head(frames + self.boundary[0]).squeeze(-1)
        end = self.span_head(frames + self.boundary[1]).squeeze(-1)
        return masked_softmax(start, video_mask), masked_softmax(end, video_mask)


class DSCNet(_Backbone):
    def __init__(self, cfg: GroundingConfig) -> None:
        super().__init__(cfg)
        self.centers = nn.Parameter(torch.randn(cfg.clusters, cfg.hidden) * 0.1)
        self.cross = EncoderLayer(cfg.hidden, cfg.heads)
        self.relevance = nn.Linear(cfg.hidden, cfg.hidden)
        self.foreground = nn.Sequential(nn.Linear(2 * cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1))

    def forward(self, video: torch.Tensor, video_mask: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        v = self.video_encoder(video, video_mask)
        q = self.query_encoder(words, word_mask)
        v = self.cross(v, video_mask, q, word_mask)
        assign = (F.normalize(v, dim=-1) @ F.normalize(self.centers, dim=-1).t() * 10.0).softmax(dim=-1)
        assign = assign * video_mask.unsqueeze(-1)  # [B, T, C]
        clusters = assign.transpose(1, 2) @ v / assign.sum(dim=1).unsqueeze(-1).clamp(min=1e-6)  # [B, C, H]
        query = self.relevance(masked_mean(q, word_mask)).unsqueeze(-1)  # [B, H, 1]
        relevant = (clusters @ query).sigmoid()  # [B, C, 1]
        context = assign @ (clusters * relevant)  # [B, T, H]
        logits = self.foreground(torch.cat([v, context], dim=-1)).squeeze(-1)
        return logits.sigmoid() * video_mask


class MHST(_Backbone):
    def __init__(self, cfg: GroundingConfig) -> None:
        super().__init__(cfg)
        self.cross = EncoderLayer(cfg.hidden, cfg.heads)
        self.frame_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.query_proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(
        self, video: torch.Tensor, video_mask: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.video_encoder(video, video_mask)
        q = self.query_encoder(words, word_mask)
        frames = F.normalize(self.frame_proj(self.cross(v, video_mask, q, word_mask)), dim=-1)
        query = F.normalize(self.query_proj(masked_mean(q, word_mask)), dim=-1)
        query_similarity = (frames * query.unsqueeze(1)).sum(dim=-1) * video_mask
        pair_mask = video_mask * shift(video_mask.unsqueeze(-1), 1).squeeze(-1)
        adjacent = (frames * shift(frames, 1)).sum(dim=-1) * pair_mask
        return query_similarity, adjacent


class _GroundingBase(ModelDef[GroundingConfig]):
    family = "grounding"
    head: ClassVar[Literal["anchors", "start_end", "foreground", "tree"]]
    module: ClassVar[type[_Backbone]]

    def config(self, size: Size) -> GroundingConfig:
        vocab = len(load_vocabulary())
        if size == "paper":
            return GroundingConfig(vocab_size=vocab)
        return GroundingConfig(hidden=32, word_dim=32, heads=2, layers=1, vocab_size=vocab, memory_slots=8, clusters=4)

    def validate(self, cfg: GroundingConfig) -> None:
        if cfg.hidden % cfg.heads:
            raise OptionError("hidden must divide by heads")
        if cfg.vocab_size != len(load_vocabulary()):
            raise OptionError("vocab_size comes from the vocabulary file and cannot be set")
        if max(cfg.context_shifts) >= 8:
            raise OptionError("context_shifts must be below the minimum of 8 frames")

    def build(self, cfg: GroundingConfig) -> nn.Module:
        return self.module(cfg)

    def inputs(self, cfg: GroundingConfig) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec(
                name="video", dtype="float32", shape=("batch", "frames", cfg.feature_dim), description="clip features, one row per clip"
            ),
            TensorSpec(name="video_mask", dtype="float32", shape=("batch", "frames"), description="1 for a real clip, 0 for padding"),
            TensorSpec(
                name="words",
                dtype="int64",
                shape=("batch", "words"),
                description="token ids into vocab.txt; 0 pads",
                values=(0, cfg.vocab_size - 1),
            ),
            TensorSpec(name="word_mask", dtype="float32", shape=("batch", "words"), description="1 for a real word, 0 for padding"),
        )

    def dims(self, cfg: GroundingConfig) -> dict[str, DimRange]:
        return {
            "batch": batch_dim(self.max_batch_size),
            "frames": DimRange(min=8, max=cfg.max_frames, default=64),
            "words": DimRange(min=2, max=cfg.max_words, default=8),
        }

    def alt_dims(self, cfg: GroundingConfig) -> dict[str, int]:
        return {"frames": 37, "words": 13}

    def random_input(self, cfg: GroundingConfig, spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> Array:
        if spec.name == "video":
            return rng.standard_normal(shape).astype(np.float32)
        if spec.name == "words":
            return rng.integers(2, cfg.vocab_size, shape, dtype=np.int64)
        lengths = np.concatenate([[shape[1]], rng.integers(max(shape[1] // 2, 1), shape[1] + 1, shape[0] - 1)])
        return mask_from_lengths(lengths, shape[1])

    def samples(self, cfg: GroundingConfig, seed: int) -> list[Sample]:
        """As the base, with padded word ids zeroed so samples look like the gateway's batches."""
        out = super().samples(cfg, seed)
        for sample in out:
            sample.inputs["words"] = sample.inputs["words"] * sample.inputs["word_mask"].astype(np.int64)
        return out

    def preprocessing(self, cfg: GroundingConfig) -> GroundingPreprocessing:
        return GroundingPreprocessing(
            feature_dim=cfg.feature_dim,
            feature_source="I3D clip features (Charades-STA)" if cfg.feature_dim == 1024 else f"{cfg.feature_dim}-d clip features",
            vocabulary_file=VOCAB_NAME,
            token_pattern=TOKEN_PATTERN,
            max_words=cfg.max_words,
            max_frames=cfg.max_frames,
        )

    def postprocessing(self, cfg: GroundingConfig) -> GroundingPostprocessing:
        widths = cfg.anchor_widths if self.head == "anchors" else ()
        return GroundingPostprocessing(head=self.head, anchor_widths=widths)

    def extra_files(self, cfg: GroundingConfig) -> dict[str, bytes]:
        return {VOCAB_NAME: VOCAB_FILE.read_bytes()}


def _prob(name: str, what: str) -> TensorSpec:
    return TensorSpec(name=name, dtype="float32", shape=("batch", "frames"), description=what)


class GroundingMGSL(_GroundingBase):
    name = "grounding-mgsl"
    variant = "mgsl"
    description = "MGSL-Net: memory-guided semantic learning; anchor scores and offsets per frame."
    head = "anchors"
    module = MGSLNet

    def outputs(self, cfg: GroundingConfig) -> tuple[TensorSpec, ...]:
        k = len(cfg.anchor_widths)
        return (
            TensorSpec(
                name="anchor_scores",
                dtype="float32",
                shape=("batch", "frames", k),
                description="confidence of the anchor centred on each frame",
            ),
            TensorSpec(
                name="anchor_offsets",
                dtype="float32",
                shape=("batch", "frames", k, 2),
                description="(start, end) offsets as fractions of the anchor width",
            ),
        )


class _StartEnd(_GroundingBase):
    head = "start_end"

    def outputs(self, cfg: GroundingConfig) -> tuple[TensorSpec, ...]:
        return (_prob("start_prob", "P(moment starts at frame)"), _prob("end_prob", "P(moment ends at frame)"))


class GroundingSSRN(_StartEnd):
    name = "grounding-ssrn"
    variant = "ssrn"
    description = "SSRN: siamese sampling and reasoning; soft start/end distributions over frames."
    module = SSRN


class GroundingECRL(_StartEnd):
    name = "grounding-ecrl"
    variant = "ecrl"
    description = "ECRL: joint encoder with one span head shared by start and end."
    module = ECRL


class GroundingDSCNet(_GroundingBase):
    name = "grounding-dscnet"
    variant = "dscnet"
    description = "DSCNet: frame clustering with query-relevant clusters; foreground attention per frame."
    head = "foreground"
    module = DSCNet

    def outputs(self, cfg: GroundingConfig) -> tuple[TensorSpec, ...]:
        return (_prob("foreground", "P(frame is inside the moment)"),)


class GroundingMHST(_GroundingBase):
    name = "grounding-mhst"
    variant = "mhst"
    description = "MHST: frame-query and adjacent-frame similarity for the gateway's segment tree."
    head = "tree"
    module = MHST

    def outputs(self, cfg: GroundingConfig) -> tuple[TensorSpec, ...]:
        return (
            _prob("query_similarity", "cosine similarity of each frame with the query"),
            _prob("adjacent_similarity", "cosine similarity of frame t with frame t+1 (0 at the last frame)"),
        )


def variants() -> list[ModelDef[GroundingConfig]]:
    return [GroundingMGSL(), GroundingSSRN(), GroundingECRL(), GroundingDSCNet(), GroundingMHST()]
