"""DAL-GAN generator: thermal face (1x128x128, [-1, 1]) -> frontal visible face (3x128x128, tanh).

Encoder (7x7 stem, two stride-2 convolutions), a residual bottleneck with the
paper's dual attention (channel attention then spatial attention) after the
residual blocks, and a decoder of two transposed convolutions and a 7x7 tanh head;
instance normalisation and reflection padding as in pix2pix/CycleGAN-style
generators that DAL-GAN builds on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from migserve.contract import DimRange, ImageOutPostprocessing, Size, TensorSpec, ThermalPreprocessing
from migserve.types import Array

from .base import ModelDef, batch_dim


@dataclass(frozen=True)
class GeneratorConfig:
    base_channels: int = 64
    residual_blocks: int = 9
    image_size: int = 128


def _conv_block(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    pad: list[nn.Module] = [nn.ReflectionPad2d(kernel // 2)] if stride == 1 else []
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=0 if stride == 1 else kernel // 2)
    return [*pad, conv, nn.InstanceNorm2d(cout, affine=True), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_block(channels, channels, 3)[:-1], nn.ReLU(inplace=True), *_conv_block(channels, channels, 3)[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DualAttention(nn.Module):
    """Channel attention (squeeze-excite over pooled features) then spatial attention (7x7 over channel stats)."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.channel = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel_size=7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.channel(x.mean(dim=(2, 3), keepdim=True)) + self.channel(x.amax(dim=(2, 3), keepdim=True))
        x = x * pooled.sigmoid()
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.spatial(stats).sigmoid()


class DALGenerator(nn.Module):
    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        c = cfg.base_channels
        self.encoder = nn.Sequential(*_conv_block(1, c, 7), *_conv_block(c, 2 * c, 3, stride=2), *_conv_block(2 * c, 4 * c, 3, stride=2))
        self.bottleneck = nn.Sequential(*(ResidualBlock(4 * c) for _ in range(cfg.residual_blocks)))
        self.attention = DualAttention(4 * c)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(4 * c, 2 * c, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(2 * c, affine=True),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(c, affine=True),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(3),
            nn.Conv2d(c, 3, 7),
            nn.Tanh(),
        )

    def forward(self, thermal: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.attention(self.bottleneck(self.encoder(thermal))))


class FrontalizeDALGAN(ModelDef[GeneratorConfig]):
    name = "frontalize-dalgan"
    family = "frontalize"
    variant = "dalgan"
    description = "DAL-GAN generator: thermal face 1x128x128 in [-1, 1] -> frontal visible face 3x128x128 in [-1, 1]."
    max_batch_size = 16

    def config(self, size: Size) -> GeneratorConfig:
        return GeneratorConfig() if size == "paper" else GeneratorConfig(base_channels=8, residual_blocks=2)

    def build(self, cfg: GeneratorConfig) -> nn.Module:
        return DALGenerator(cfg)

    def inputs(self, cfg: GeneratorConfig) -> tuple[TensorSpec, ...]:
        s = cfg.image_size
        return (TensorSpec(name="thermal", dtype="float32", shape=("batch", 1, s, s), description="grayscale thermal in [-1, 1]"),)

    def outputs(self, cfg: GeneratorConfig) -> tuple[TensorSpec, ...]:
        s = cfg.image_size
        return (TensorSpec(name="visible", dtype="float32", shape=("batch", 3, s, s), description="RGB in [-1, 1]"),)

    def dims(self, cfg: GeneratorConfig) -> dict[str, DimRange]:
        return {"batch": batch_dim(self.max_batch_size)}

    def random_input(self, cfg: GeneratorConfig, spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> Array:
        return rng.uniform(-1.0, 1.0, shape).astype(np.float32)

    def preprocessing(self, cfg: GeneratorConfig) -> ThermalPreprocessing:
        return ThermalPreprocessing(height=cfg.image_size, width=cfg.image_size)

    def postprocessing(self, cfg: GeneratorConfig) -> ImageOutPostprocessing:
        return ImageOutPostprocessing()
