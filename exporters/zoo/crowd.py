"""CSRNet (Li et al., CVPR 2018), the crowd counter attacked in the DMBA backdoor paper.

Layout and `state_dict` names follow the public CSRNet-pytorch code: `frontend`
(the first ten VGG-16 convolutions with three max-pools), `backend` (six 3x3
convolutions with dilation 2), `output_layer` (1x1 to one density channel). At
`paper` size that is 16,263,489 parameters; `tiny` keeps the structure with an
eighth of the channels. The density map is at 1/8 resolution; count = sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from migserve.contract import DensityPostprocessing, DimRange, ImagePreprocessing, Size, TensorSpec
from migserve.types import Array

from .base import IMAGENET_MEAN, IMAGENET_STD, ModelDef, OptionError, batch_dim

FRONTEND = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
BACKEND = (512, 512, 512, 256, 128, 64)
STRIDE = 8


@dataclass(frozen=True)
class CSRNetConfig:
    width_divisor: int = 1
    max_side: int = 2048


def _layers(plan: tuple[int | str, ...], in_channels: int, divisor: int, dilation: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out = int(item) // divisor
        layers += [nn.Conv2d(in_channels, out, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
        in_channels = out
    return nn.Sequential(*layers)


class CSRNet(nn.Module):
    def __init__(self, cfg: CSRNetConfig) -> None:
        super().__init__()
        self.frontend = _layers(FRONTEND, 3, cfg.width_divisor, dilation=1)
        self.backend = _layers(BACKEND, int(FRONTEND[-1]) // cfg.width_divisor, cfg.width_divisor, dilation=2)
        self.output_layer = nn.Conv2d(BACKEND[-1] // cfg.width_divisor, 1, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # seeded random init must give a non-vanishing output
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.backend(self.frontend(image)))


class CrowdCSRNet(ModelDef[CSRNetConfig]):
    name = "crowd-csrnet"
    family = "crowd"
    variant = "csrnet"
    description = "CSRNet crowd counting: RGB image of any size -> density map at 1/8 resolution; count = sum."
    max_batch_size = 8

    def config(self, size: Size) -> CSRNetConfig:
        return CSRNetConfig(width_divisor=1) if size == "paper" else CSRNetConfig(width_divisor=8, max_side=1024)

    def validate(self, cfg: CSRNetConfig) -> None:
        if 64 % cfg.width_divisor:
            raise OptionError("width_divisor must divide 64")

    def build(self, cfg: CSRNetConfig) -> nn.Module:
        return CSRNet(cfg)

    def inputs(self, cfg: CSRNetConfig) -> tuple[TensorSpec, ...]:
        return (TensorSpec(name="image", dtype="float32", shape=("batch", 3, "height", "width"), description="RGB, ImageNet-normalised"),)

    def outputs(self, cfg: CSRNetConfig) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec(
                name="density",
                dtype="float32",
                shape=("batch", 1, "density_height", "density_width"),
                description="people per density pixel; density_height = floor(height / 8)",
            ),
        )

    def dims(self, cfg: CSRNetConfig) -> dict[str, DimRange]:
        side = DimRange(min=STRIDE, max=cfg.max_side, default=256)
        out = DimRange(min=1, max=cfg.max_side // STRIDE, default=256 // STRIDE)
        return {
            "batch": batch_dim(self.max_batch_size),
            "height": side,
            "width": side,
            "density_height": out,
            "density_width": out,
        }

    def alt_dims(self, cfg: CSRNetConfig) -> dict[str, int]:
        # Not multiples of 8, and not square: exercises the floor in every pooling.
        return {"height": 180, "width": 244, "density_height": 180 // STRIDE, "density_width": 244 // STRIDE}

    def random_input(self, cfg: CSRNetConfig, spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> Array:
        pixels = rng.uniform(0.0, 1.0, shape)
        mean = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)
        std = np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
        return ((pixels - mean) / std).astype(np.float32)

    def preprocessing(self, cfg: CSRNetConfig) -> ImagePreprocessing:
        return ImagePreprocessing(height=None, width=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, size_multiple=STRIDE)

    def postprocessing(self, cfg: CSRNetConfig) -> DensityPostprocessing:
        return DensityPostprocessing(output_stride=STRIDE)
