"""Building blocks shared by the five temporal sentence grounding variants.

All attention is masked: a 0 in `video_mask` or `word_mask` is padding and never
attended to. Everything is written so that T (frames) and L (words) stay symbolic
in the exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NEG = -1e4  # added to masked attention scores; finite so fp16 stays finite


@dataclass(frozen=True)
class GroundingConfig:
    feature_dim: int = 1024
    hidden: int = 256
    word_dim: int = 300
    heads: int = 8
    layers: int = 2
    vocab_size: int = 0  # set from the vocabulary file
    max_frames: int = 512
    max_words: int = 32
    memory_slots: int = 64
    anchor_widths: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)
    context_shifts: tuple[int, ...] = (1, 2, 4)
    clusters: int = 16


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where mask (broadcastable, 1 = keep) is 0 -> probability 0."""
    return (scores + (1.0 - mask) * NEG).softmax(dim=-1) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, N, H] with [B, N] mask -> [B, H]."""
    weights = mask.unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class MultiHeadAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, query: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        b, n, h = query.shape
        d = h // self.heads
        q = self.q(query).reshape(b, n, self.heads, d).transpose(1, 2)
        k, v = self.kv(context).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-2, -1) * d**-0.5
        attn = masked_softmax(scores, context_mask[:, None, None, :])
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, h))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer; cross-attends when given a context other than x."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = MultiHeadAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + self.attn(normed, normed, mask) if context is None or context_mask is None else x + self.attn(normed, context, context_mask)
        return (x + self.ffn(self.norm2(x))) * mask.unsqueeze(-1)


class QueryEncoder(nn.Module):
    """Word ids -> embedding table stored in the model -> self-attention layers."""

    def __init__(self, cfg: GroundingConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.word_dim, padding_idx=0)
        self.proj = nn.Linear(cfg.word_dim, cfg.hidden)
        self.layers = nn.ModuleList(EncoderLayer(cfg.hidden, cfg.heads) for _ in range(cfg.layers))

    def forward(self, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.embedding(words)) * word_mask.unsqueeze(-1)
        for layer in self.layers:
            x = layer(x, word_mask)
        return x


class VideoEncoder(nn.Module):
    """Clip features [B, T, D] -> projection, local temporal conv (order), self-attention layers."""

    def __init__(self, cfg: GroundingConfig) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(cfg.feature_dim), nn.Linear(cfg.feature_dim, cfg.hidden))
        self.local = nn.Conv1d(cfg.hidden, cfg.hidden, kernel_size=3, padding=1)
        self.layers = nn.ModuleList(EncoderLayer(cfg.hidden, cfg.heads) for _ in range(cfg.layers))

    def forward(self, video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(video) * video_mask.unsqueeze(-1)
        x = x + self.local(x.transpose(1, 2)).transpose(1, 2).relu()
        x = x * video_mask.unsqueeze(-1)
        for layer in self.layers:
            x = layer(x, video_mask)
        return x


def shift(x: torch.Tensor, offset: int) -> torch.Tensor:
    """Shift [B, T, H] along T by `offset` frames (positive = look ahead), zero-filled."""
    pad = torch.zeros_like(x[:, : abs(offset)])
    if offset > 0:
        return torch.cat([x[:, offset:], pad], dim=1)
    return torch.cat([pad, x[:, :offset]], dim=1)
