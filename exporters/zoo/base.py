"""What every model in the zoo tells the export pipeline.

A `ModelDef` builds the torch module for a size, names its inputs and outputs in
the contract's terms, and makes the seeded sample inputs used for the example
trace and the parity check. Families subclass it; the pipeline sees only this.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
from torch import nn

from migserve.contract import (
    Batching,
    DimRange,
    Family,
    Postprocessing,
    Preprocessing,
    Size,
    TensorSpec,
)
from migserve.types import Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

C = TypeVar("C")


@dataclass(frozen=True)
class Sample:
    """Named, seeded inputs for one parity check."""

    name: str
    inputs: dict[str, Array]


class OptionError(ValueError):
    """A `--set` option names a field the model's config lacks, or a bad value."""


class ModelDef(ABC, Generic[C]):
    """One exportable model: `name` is the directory in model_repo/ and the URL name."""

    name: ClassVar[str]
    family: ClassVar[Family]
    variant: ClassVar[str]
    description: ClassVar[str]
    tolerance: ClassVar[float] = 1e-4
    max_batch_size: ClassVar[int] = 32
    max_queue_delay_us: ClassVar[int] = 2000

    # --- configuration ---------------------------------------------------------
    @abstractmethod
    def config(self, size: Size) -> C:
        """The architecture hyper-parameters at this size."""

    def configure(self, size: Size, options: Mapping[str, str]) -> C:
        """`config(size)` with `--set key=value` overrides, coerced to each field's type."""
        cfg = self.config(size)
        if not options:
            return cfg
        assert dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)
        fields = {f.name: f for f in dataclasses.fields(cfg)}
        changes: dict[str, Any] = {}
        for key, raw in options.items():
            if key not in fields:
                raise OptionError(f"{self.name} has no option {key!r}; options: {', '.join(sorted(fields))}")
            current = getattr(cfg, key)
            try:
                changes[key] = _coerce(raw, current)
            except ValueError as exc:
                raise OptionError(f"{self.name}: {key}={raw!r}: {exc}") from None
        new = dataclasses.replace(cfg, **changes)
        self.validate(new)
        try:
            self.dims(new)  # ranges derived from options must still be valid
        except ValueError as exc:
            raise OptionError(f"{self.name}: options {dict(options)} give invalid dims: {exc}") from None
        return new

    def validate(self, cfg: C) -> None:
        """Reject configs the architecture cannot take; raise OptionError."""

    # --- the graph ---------------------------------------------------------------
    @abstractmethod
    def build(self, cfg: C) -> nn.Module:
        """A module whose forward takes the inputs by name, in order, and returns outputs in order."""

    @abstractmethod
    def inputs(self, cfg: C) -> tuple[TensorSpec, ...]: ...

    @abstractmethod
    def outputs(self, cfg: C) -> tuple[TensorSpec, ...]: ...

    @abstractmethod
    def dims(self, cfg: C) -> dict[str, DimRange]:
        """Every symbolic dim used by inputs and outputs; 'batch' always."""

    def alt_dims(self, cfg: C) -> dict[str, int]:
        """Non-default values of the dynamic (non-batch) dims, for the third parity sample."""
        return {}

    # --- contract pieces ---------------------------------------------------------
    @abstractmethod
    def preprocessing(self, cfg: C) -> Preprocessing: ...

    @abstractmethod
    def postprocessing(self, cfg: C) -> Postprocessing: ...

    def batching(self, cfg: C) -> Batching:
        return Batching(
            max_batch_size=self.max_batch_size,
            max_queue_delay_us=self.max_queue_delay_us,
            preferred_batch_sizes=tuple(b for b in (4, 8, 16, 32) if b <= self.max_batch_size),
        )

    def extra_files(self, cfg: C) -> dict[str, bytes]:
        """Files written beside contract.json (e.g. a vocabulary)."""
        return {}

    # --- inputs --------------------------------------------------------------------
    def random_input(self, cfg: C, spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> Array:
        """One seeded input tensor; families override for ids, masks and ranges."""
        return rng.standard_normal(shape).astype(np.float32)

    def samples(self, cfg: C, seed: int) -> list[Sample]:
        """Batch 1 and batch 3 at the default dims, and batch 2 at the non-default dims."""
        dims = self.dims(cfg)
        default = {name: r.default for name, r in dims.items()}
        alt = {**default, **self.alt_dims(cfg)}
        cases = [("batch1", 1, default), ("batch3", 3, default), ("dynamic", 2, alt)]
        rng = np.random.default_rng(seed)
        return [
            Sample(name, {spec.name: self.random_input(cfg, spec, _shape(spec, {**d, "batch": b}), rng) for spec in self.inputs(cfg)})
            for name, b, d in cases
        ]

    def example(self, cfg: C, seed: int) -> dict[str, Array]:
        """The trace example: batch 2 (never 1, which torch.export would specialise) at default dims."""
        dims = {name: r.default for name, r in self.dims(cfg).items()} | {"batch": 2}
        rng = np.random.default_rng(seed + 1)
        return {spec.name: self.random_input(cfg, spec, _shape(spec, dims), rng) for spec in self.inputs(cfg)}


def _shape(spec: TensorSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)


def _coerce(raw: str, current: object) -> object:
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise ValueError("expected true or false")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, tuple):
        return tuple(type(current[0])(x) for x in raw.split(",")) if current else tuple(raw.split(","))
    return raw


def batch_dim(max_batch: int) -> DimRange:
    return DimRange(min=1, max=max_batch, default=1)


def mask_from_lengths(lengths: Array, size: int) -> Array:
    """[B] lengths -> [B, size] float32 mask of ones then zeros."""
    return (np.arange(size)[None, :] < lengths[:, None]).astype(np.float32)
