"""What an export is asked for and what it gives, without torch: `migserve export --skip-existing` decides what is up
to date from these alone, so a repository already exported is checked in a second, not after torch's import."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from migserve.contract import Size

from .triton import TritonBackend

DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportRequest:
    name: str
    size: Size = "tiny"
    out: Path = Path("model_repo")
    checkpoint: Path | None = None
    strict: bool = True
    seed: int = 0
    fp16: bool = False
    opset: int = DEFAULT_OPSET
    options: Mapping[str, str] = field(default_factory=dict)
    triton_backend: TritonBackend = "onnxruntime"


@dataclass(frozen=True)
class ExportResult:
    name: str
    path: Path
    parameters: int
    onnx_bytes: int
    seconds: float
    parity_error: float
    weights: str
