"""DeepStationing lymph node station parsing: two 3D U-Nets on fixed CT patches.

Stage 1 (`lns-organs`) segments 22 thoracic organs from CT. Stage 2
(`lns-stations`) takes CT plus the masks of the six key referencing organs the
paper uses (esophagus, aortic arch, ascending aorta, heart, spine, sternum) and
segments the 12 IASLC station groups. Both are encoder-decoder 3D U-Nets (two
3x3x3 conv + instance norm + leaky ReLU per level, max-pool down, transposed
conv up, skip concatenation); only the batch dim is dynamic.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from migserve.contract import DimRange, SegmentationPostprocessing, Size, TensorSpec, VolumePreprocessing
from migserve.types import Array

from .base import ModelDef, OptionError, batch_dim

ORGANS = (
    "esophagus", "aortic_arch", "ascending_aorta", "descending_aorta", "heart", "spine", "sternum", "trachea",
    "left_main_bronchus", "right_main_bronchus", "left_lung", "right_lung", "pulmonary_trunk",
    "left_pulmonary_artery", "right_pulmonary_artery", "superior_vena_cava", "brachiocephalic_trunk",
    "left_common_carotid_artery", "left_subclavian_artery", "brachiocephalic_vein", "azygos_vein", "thyroid",
)  # fmt: skip
KEY_ORGANS = ("esophagus", "aortic_arch", "ascending_aorta", "heart", "spine", "sternum")
STATIONS = ("1", "2R", "2L", "3A", "3P", "4R", "4L", "5", "6", "7", "8", "10")


@dataclass(frozen=True)
class UNetConfig:
    base_channels: int = 32
    levels: int = 4
    patch: tuple[int, int, int] = (64, 128, 128)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class UNet3D(nn.Module):
    def __init__(self, cfg: UNetConfig, in_channels: int, classes: int) -> None:
        super().__init__()
        widths = [cfg.base_channels * 2**i for i in range(cfg.levels)]
        self.down = nn.ModuleList([_double_conv(in_channels, widths[0])])
        self.down.extend(_double_conv(a, b) for a, b in itertools.pairwise(widths))
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList(nn.ConvTranspose3d(b, a, 2, stride=2) for a, b in itertools.pairwise(widths))
        self.merge = nn.ModuleList(_double_conv(2 * a, a) for a in widths[:-1])
        self.head = nn.Conv3d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, merge in zip(reversed(self.up), reversed(self.merge), strict=True):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class _Organs(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.unet = UNet3D(cfg, 1, len(ORGANS) + 1)

    def forward(self, ct: torch.Tensor) -> torch.Tensor:
        return self.unet(ct)


class _Stations(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.unet = UNet3D(cfg, 1 + len(KEY_ORGANS), len(STATIONS) + 1)

    def forward(self, ct_organs: torch.Tensor) -> torch.Tensor:
        return self.unet(ct_organs)


class _LNSBase(ModelDef[UNetConfig]):
    family = "lns"
    max_batch_size = 4
    max_queue_delay_us = 5000
    input_name: str
    in_channels: int
    labels: tuple[str, ...]

    def config(self, size: Size) -> UNetConfig:
        return UNetConfig() if size == "paper" else UNetConfig(base_channels=4, levels=3, patch=(16, 32, 32))

    def validate(self, cfg: UNetConfig) -> None:
        step = 2 ** (cfg.levels - 1)
        if len(cfg.patch) != 3 or any(p % step for p in cfg.patch):
            raise OptionError(f"every patch side must be a multiple of {step} for {cfg.levels} levels")

    def inputs(self, cfg: UNetConfig) -> tuple[TensorSpec, ...]:
        return (TensorSpec(name=self.input_name, dtype="float32", shape=("batch", self.in_channels, *cfg.patch)),)

    def outputs(self, cfg: UNetConfig) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec(
                name="logits",
                dtype="float32",
                shape=("batch", len(self.labels) + 1, *cfg.patch),
                description="class logits per voxel; 0 is background",
            ),
        )

    def dims(self, cfg: UNetConfig) -> dict[str, DimRange]:
        return {"batch": batch_dim(self.max_batch_size)}

    def preprocessing(self, cfg: UNetConfig) -> VolumePreprocessing:
        return VolumePreprocessing(
            spacing_mm=(2.0, 1.0, 1.0) if cfg.patch[0] >= 64 else (4.0, 4.0, 4.0),
            hu_window=(-1000.0, 1000.0),
            patch_size=cfg.patch,
            overlap=0.5,
            gaussian_sigma_scale=0.125,
            extra_channels=KEY_ORGANS if self.in_channels > 1 else (),
        )

    def postprocessing(self, cfg: UNetConfig) -> SegmentationPostprocessing:
        return SegmentationPostprocessing(labels=("background", *self.labels), key_organs=KEY_ORGANS if self.labels == ORGANS else ())

    def random_input(self, cfg: UNetConfig, spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> Array:
        volume = rng.uniform(0.0, 1.0, shape).astype(np.float32)  # windowed CT in [0, 1]
        if shape[1] > 1:  # organ masks are binary
            volume[:, 1:] = (volume[:, 1:] > 0.7).astype(np.float32)
        return volume


class LNSOrgans(_LNSBase):
    name = "lns-organs"
    variant = "deepstationing-organs"
    description = "DeepStationing stage 1: CT patch -> logits for 22 organs + background."
    input_name = "ct"
    in_channels = 1
    labels = ORGANS

    def build(self, cfg: UNetConfig) -> nn.Module:
        return _Organs(cfg)


class LNSStations(_LNSBase):
    name = "lns-stations"
    variant = "deepstationing-stations"
    description = "DeepStationing stage 2: CT + 6 key organ masks -> logits for 12 lymph node stations + background."
    input_name = "ct_organs"
    in_channels = 1 + len(KEY_ORGANS)
    labels = STATIONS

    def build(self, cfg: UNetConfig) -> nn.Module:
        return _Stations(cfg)
