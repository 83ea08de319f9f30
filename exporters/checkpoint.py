"""Read a checkpoint (.safetensors, .pth, .pt) and load it into a zoo module, strictly by default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from migserve.contract import sha256_file

from .errors import CheckpointError

SUFFIXES = (".safetensors", ".pth", ".pt")
WRAPPERS = ("state_dict", "model", "model_state_dict", "module")
PREFIXES = ("module.", "model.")
SHOWN = 8


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    sha256: str
    missing: tuple[str, ...]  # left at the seeded init (non-strict only)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors by name, unwrapped from common training-script containers and prefixes."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix not in SUFFIXES:
        raise CheckpointError(f"checkpoint {path} has suffix {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise from deep inside each reader
        raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(exc)}") from None
    for key in WRAPPERS:
        if isinstance(raw, dict) and key in raw and isinstance(raw[key], dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"checkpoint {path} holds no state_dict of tensors")
    tensors: dict[str, torch.Tensor] = raw
    for prefix in PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def load_checkpoint(module: nn.Module, path: Path, strict: bool = True) -> LoadedCheckpoint:
    """Copy the checkpoint's tensors into `module`; unexpected keys and shape mismatches always fail."""
    tensors = read_state_dict(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k} {tuple(tensors[k].shape)} (model {tuple(expected[k].shape)})"
        for k in sorted(set(tensors) & set(expected))
        if tensors[k].shape != expected[k].shape
    ]
    problems = []
    if missing and (strict or len(missing) == len(expected)):
        problems.append(f"missing {len(missing)}: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_names(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {_names(wrong)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(problems))
    module.load_state_dict(tensors, strict=False)
    return LoadedCheckpoint(path=path, sha256=sha256_file(path), missing=tuple(missing))


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else "")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
