"""The model zoo: every exportable model by its model_repo name."""

from __future__ import annotations

from typing import Any

from migserve.contract import SIZES, Size

from ..names import known
from .base import ModelDef, Sample
from .crowd import CrowdCSRNet
from .face import FacePros
from .frontalize import FrontalizeDALGAN
from .grounding import variants as grounding_variants
from .lns import LNSOrgans, LNSStations

_MODELS: list[ModelDef[Any]] = [FacePros(), FrontalizeDALGAN(), *grounding_variants(), LNSOrgans(), LNSStations(), CrowdCSRNet()]
ZOO: dict[str, ModelDef[Any]] = {m.name: m for m in _MODELS}


def get(name: str) -> ModelDef[Any]:
    return ZOO[known(name)]


__all__ = ["SIZES", "ZOO", "ModelDef", "Sample", "Size", "get"]
