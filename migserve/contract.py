"""The model contract: `model_repo/<model>/contract.json`.

Written by the exporter, read by the gateway and the bench; the single source of
truth for what a model expects and returns. This module imports neither torch nor
onnxruntime so every side of the project can use it.

Shapes mix fixed sizes (int) and named symbolic dims (str); every name used in a
shape has a range in `Contract.dims`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION: Literal[1] = 1
CONTRACT_FILE = "contract.json"
MODEL_FILE = "1/model.onnx"
CONFIG_FILE = "config.pbtxt"

DType = Literal["float32", "float16", "int64"]
Size = Literal["tiny", "paper"]
SIZES: tuple[Size, ...] = ("tiny", "paper")
Family = Literal["face", "frontalize", "grounding", "lns", "crowd"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(_Frozen):
    """One input or output of the ONNX graph."""

    name: str
    dtype: DType
    shape: tuple[int | str, ...] = Field(description="ints are fixed; strs name a dim in Contract.dims")
    description: str = ""
    values: tuple[int, int] | None = Field(
        default=None, description="an integer input's valid values, inclusive (token ids: 0 to the vocabulary's size - 1)"
    )

    @model_validator(mode="after")
    def _values(self) -> TensorSpec:
        if self.values is not None and (self.dtype != "int64" or self.values[0] > self.values[1]):
            raise ValueError(f"{self.name}: 'values' is an int64 tensor's (min, max), got {self.values} for {self.dtype}")
        return self


class DimRange(_Frozen):
    """Inclusive range of a symbolic dim, and the value the exporter's samples default to."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)
    default: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> DimRange:
        if not self.min <= self.default <= self.max:
            raise ValueError(f"dim range needs min <= default <= max, got {self.min}, {self.default}, {self.max}")
        return self


# --- preprocessing, one model per family --------------------------------------------


class ImagePreprocessing(_Frozen):
    """RGB image -> float tensor: resize, scale to [0,1], then (x - mean) / std per channel."""

    kind: Literal["image"] = "image"
    height: int | None = Field(description="fixed input height; None when the model takes any height")
    width: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size_multiple: int = Field(1, description="H and W are cropped or padded to a multiple of this")
    face_crop_margin: float = Field(0.0, description="fraction of the detected box added on each side")


class ThermalPreprocessing(_Frozen):
    """Grayscale thermal image -> [-1, 1]: resize to height x width, x / 127.5 - 1."""

    kind: Literal["thermal"] = "thermal"
    height: int
    width: int
    value_range: tuple[float, float] = (-1.0, 1.0)


class GroundingPreprocessing(_Frozen):
    """Sentence -> word ids with the artifact's vocabulary; features [T, D] -> padded batch."""

    kind: Literal["grounding"] = "grounding"
    feature_dim: int
    feature_source: str = Field(description="what the features are, e.g. I3D on Charades-STA")
    vocabulary_file: str = Field(description="path relative to the model directory, one token per line")
    lowercase: bool = True
    token_pattern: str = Field(description="regex whose matches are the words")
    pad_id: int = 0
    unk_id: int = 1
    max_words: int
    max_frames: int


class VolumePreprocessing(_Frozen):
    """CT volume -> patches: resample to spacing, window HU, scale to [0,1], tile with overlap."""

    kind: Literal["volume"] = "volume"
    spacing_mm: tuple[float, float, float] = Field(description="target voxel spacing (z, y, x)")
    hu_window: tuple[float, float]
    patch_size: tuple[int, int, int] = Field(description="(D, H, W) of one patch")
    overlap: float = Field(ge=0.0, lt=1.0)
    gaussian_sigma_scale: float = Field(description="sigma of the blending weight, as a fraction of patch size")
    extra_channels: tuple[str, ...] = Field((), description="organ masks stacked after the CT channel")


Preprocessing = Annotated[
    ImagePreprocessing | ThermalPreprocessing | GroundingPreprocessing | VolumePreprocessing,
    Field(discriminator="kind"),
]


# --- postprocessing, one model per family -------------------------------------------


class FacePostprocessing(_Frozen):
    kind: Literal["face"] = "face"
    attribute_names: tuple[str, ...]
    expression_labels: tuple[str, ...]
    landmark_count: int
    landmarks_space: Literal["crop_unit"] = "crop_unit"


class ImageOutPostprocessing(_Frozen):
    """Tensor in value_range -> 8-bit image."""

    kind: Literal["image_out"] = "image_out"
    value_range: tuple[float, float] = (-1.0, 1.0)
    channels: Literal["rgb"] = "rgb"


class GroundingPostprocessing(_Frozen):
    """How the variant's heads become moments. `head` picks the gateway's decoder."""

    kind: Literal["grounding"] = "grounding"
    head: Literal["anchors", "start_end", "foreground", "tree"]
    anchor_widths: tuple[float, ...] = Field((), description="anchor lengths as fractions of the video")
    nms_iou: float = 0.5
    default_top_k: int = 5
    max_moment_fraction: float = Field(1.0, gt=0, le=1, description="start/end heads: longest moment, as a fraction of the video")
    foreground_levels: tuple[float, ...] = Field(
        (0.3, 0.5, 0.7), description="foreground head: thresholds between the min and max attention; each run above one is a moment"
    )
    tree_relevance_quantile: float = Field(
        0.5, ge=0, le=1, description="tree head: nodes whose mean query similarity is below this quantile of frames are pruned"
    )


class SegmentationPostprocessing(_Frozen):
    kind: Literal["segmentation"] = "segmentation"
    labels: tuple[str, ...] = Field(description="index 0 is background")
    key_organs: tuple[str, ...] = Field((), description="labels whose masks feed the next stage")


class DensityPostprocessing(_Frozen):
    kind: Literal["density"] = "density"
    output_stride: int
    count: Literal["sum"] = "sum"


Postprocessing = Annotated[
    FacePostprocessing | ImageOutPostprocessing | GroundingPostprocessing | SegmentationPostprocessing | DensityPostprocessing,
    Field(discriminator="kind"),
]


# --- provenance, parity, batching ---------------------------------------------------


class Provenance(_Frozen):
    weights: Literal["checkpoint", "random-init"]
    checkpoint_sha256: str | None = None
    checkpoint_name: str | None = None
    seed: int | None = None
    keys_not_in_checkpoint: tuple[str, ...] = Field((), description="left at the seeded init (non-strict load)")
    exporter: str
    versions: dict[str, str]
    opset: int
    fp16: bool = False


class OutputError(_Frozen):
    max_abs: float
    max_rel: float = Field(description="max_abs divided by the output's scale (max |reference|)")


class ParitySample(_Frozen):
    name: str
    shapes: dict[str, tuple[int, ...]]
    outputs: dict[str, OutputError]


class Parity(_Frozen):
    reference: str = "torch (CPU, fp32)"
    runtime: str
    tolerance: float
    samples: tuple[ParitySample, ...]

    @property
    def worst(self) -> float:
        return max(err.max_rel for s in self.samples for err in s.outputs.values())


class Batching(_Frozen):
    max_batch_size: int = Field(ge=1)
    max_queue_delay_us: int = Field(ge=0)
    preferred_batch_sizes: tuple[int, ...] = ()


class Memory(_Frozen):
    """What running the model takes beyond its weights, estimated at export from the graph (exporters/memory.py)."""

    activation_bytes: int = Field(ge=0, description="peak bytes of the tensors between the layers at `batch` rows, default sizes")
    batch: int = Field(ge=1, description="the rows it was estimated at: the largest batch")
    unsized_tensors: int = Field(0, ge=0, description="tensors whose size hangs on values (top-k, nonzero), counted as 0 bytes")


class Contract(_Frozen):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    family: Family
    variant: str
    version: int = 1
    size: Size
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimRange]
    batching: Batching
    preprocessing: Preprocessing
    postprocessing: Postprocessing
    provenance: Provenance
    parity: Parity
    parameters: int
    model_file: str = MODEL_FILE
    model_sha256: str
    memory: Memory | None = None  # exports before it was estimated have none

    @model_validator(mode="after")
    def _dims_named(self) -> Contract:
        for tensor in (*self.inputs, *self.outputs):
            for dim in tensor.shape:
                if isinstance(dim, str) and dim not in self.dims:
                    raise ValueError(f"{tensor.name}: dim {dim!r} has no range in dims")
            if not tensor.shape or tensor.shape[0] != "batch":
                raise ValueError(f"{tensor.name}: the first dim must be 'batch'")
        return self

    def class_labels(self) -> dict[str, tuple[str, ...]]:
        """Outputs that hold one value per class, after the batch dim, and their classes' labels by index: Triton's
        label files, and the labels in the gateway's answers to a classification request."""
        post = self.postprocessing
        if not isinstance(post, FacePostprocessing):
            return {}
        found = {"attributes": post.attribute_names, "expression": post.expression_labels}
        return {name: labels for name, labels in found.items() if self.output(name).shape[1:] == (len(labels),)}

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name)


def _by_name(tensors: tuple[TensorSpec, ...], name: str) -> TensorSpec:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise KeyError(f"no tensor {name!r}; have {[t.name for t in tensors]}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_contract(model_dir: Path) -> Contract:
    return Contract.model_validate_json((model_dir / CONTRACT_FILE).read_text())


def write_contract(model_dir: Path, contract: Contract) -> None:
    (model_dir / CONTRACT_FILE).write_text(contract.model_dump_json(indent=1) + "\n")
