"""Checkpoint reading and strict loading, on real .safetensors and .pth files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from exporters import zoo
from exporters.checkpoint import load_checkpoint, read_state_dict
from exporters.errors import CheckpointError
from migserve.contract import sha256_file


def _csrnet(seed: int) -> nn.Module:
    mdef = zoo.get("crowd-csrnet")
    torch.manual_seed(seed)
    return mdef.build(mdef.config("tiny"))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    trained, fresh = _csrnet(1), _csrnet(2)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        save_file(trained.state_dict(), str(path))
    else:
        torch.save(trained.state_dict(), path)
    assert not _same_weights(trained, fresh)
    loaded = load_checkpoint(fresh, path)
    assert _same_weights(trained, fresh)
    assert loaded.sha256 == sha256_file(path)
    assert loaded.missing == ()


def test_training_script_wrappers_and_prefixes(tmp_path: Path) -> None:
    trained = _csrnet(1)
    path = tmp_path / "best.pth"
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"epoch": 12, "state_dict": state}, path)
    assert set(read_state_dict(path)) == set(trained.state_dict())


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    state = _csrnet(1).state_dict()
    state.pop("output_layer.weight")
    state["head.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_csrnet(2), path)
    message = str(info.value)
    assert "missing 1: output_layer.weight" in message and "unexpected 1: head.weight" in message
    assert "\n" not in message


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    state = _csrnet(1).state_dict()
    state["backend.0.weight"] = torch.zeros(1, 1, 3, 3)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"wrong shape 1: backend.0.weight \(1, 1, 3, 3\) \(model \(64, 64, 3, 3\)\)"):
        load_checkpoint(_csrnet(2), path)


def test_non_strict_keeps_the_init_and_reports_it(tmp_path: Path) -> None:
    trained = _csrnet(1)
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("output_layer")}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="missing 2"):
        load_checkpoint(_csrnet(2), path)
    loaded = load_checkpoint(_csrnet(2), path, strict=False)
    assert loaded.missing == ("output_layer.bias", "output_layer.weight")


def test_non_strict_still_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected 1: foo\.weight"):
        load_checkpoint(_csrnet(2), path, strict=False)


def test_missing_corrupt_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.pth")
    truncated = tmp_path / "trunc.safetensors"
    save_file(_csrnet(1).state_dict(), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(garbage)
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"use one of \.safetensors, \.pth, \.pt"):
        read_state_dict(onnx_file)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": _csrnet(1)}, path)  # a whole module: needs full unpickling
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("model", "fixture", "extra_heads"), [("crowd-csrnet", "crowd_csrnet.json", 0), ("face-pros", "face_vits16_attr40.json", 4)]
)
def test_paper_size_loads_a_checkpoint_with_the_public_names(
    tmp_path: Path, shared: Path, model: str, fixture: str, extra_heads: int
) -> None:
    """A checkpoint with exactly the fixture's names and shapes loads; only our extra heads are missing."""
    shapes = json.loads((shared / "fixtures" / "checkpoint_keys" / fixture).read_text())["state_dict"]
    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "public.safetensors"
    save_file({k: torch.randn(v, generator=generator) for k, v in shapes.items()}, str(path))
    mdef = zoo.get(model)
    module = mdef.build(mdef.config("paper"))
    if extra_heads:
        with pytest.raises(CheckpointError, match=f"missing {extra_heads}: expression.bias"):
            load_checkpoint(module, path)
    loaded = load_checkpoint(module, path, strict=False)
    assert len(loaded.missing) == extra_heads
    first = next(iter(shapes))
    assert torch.equal(module.state_dict()[first], torch.randn(shapes[first], generator=torch.Generator().manual_seed(0)))
