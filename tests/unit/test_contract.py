from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from migserve.contract import Contract, DimRange, TensorSpec, read_contract, sha256_file, write_contract


def _contract(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "crowd-csrnet",
        "family": "crowd",
        "variant": "csrnet",
        "size": "tiny",
        "description": "d",
        "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, "height", "width"]}],
        "outputs": [{"name": "density", "dtype": "float32", "shape": ["batch", 1, "dh", "dw"]}],
        "dims": {k: {"min": 1, "max": 64, "default": 8} for k in ("batch", "height", "width", "dh", "dw")},
        "batching": {"max_batch_size": 8, "max_queue_delay_us": 100},
        "preprocessing": {"kind": "image", "height": None, "width": None, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "postprocessing": {"kind": "density", "output_stride": 8},
        "provenance": {"weights": "random-init", "seed": 0, "exporter": "t", "versions": {}, "opset": 18},
        "parity": {
            "runtime": "ort",
            "tolerance": 1e-4,
            "samples": [{"name": "s", "shapes": {"image": [1, 3, 8, 8]}, "outputs": {"density": {"max_abs": 1e-7, "max_rel": 2e-6}}}],
        },
        "parameters": 10,
        "model_sha256": "0" * 64,
    }
    base.update(changes)
    return base


def test_round_trip(tmp_path: Path) -> None:
    contract = Contract.model_validate(_contract())
    write_contract(tmp_path, contract)
    again = read_contract(tmp_path)
    assert again == contract
    assert again.parity.worst == pytest.approx(2e-6)
    assert again.input("image").shape == ("batch", 3, "height", "width")


def test_unnamed_dim_is_rejected() -> None:
    dims = _contract()["dims"]
    del dims["height"]
    with pytest.raises(ValidationError, match="dim 'height' has no range"):
        Contract.model_validate(_contract(dims=dims))


def test_batch_must_come_first() -> None:
    outputs = [{"name": "density", "dtype": "float32", "shape": [1, "batch"]}]
    with pytest.raises(ValidationError, match="first dim must be 'batch'"):
        Contract.model_validate(_contract(outputs=outputs))


def test_unknown_family_and_extra_fields_are_rejected() -> None:
    with pytest.raises(ValidationError):
        Contract.model_validate(_contract(family="speech"))
    with pytest.raises(ValidationError):
        Contract.model_validate(_contract(colour="blue"))


def test_dim_range_order() -> None:
    with pytest.raises(ValidationError, match="min <= default <= max"):
        DimRange(min=4, max=8, default=9)


def test_value_ranges_are_for_integer_tensors_and_ordered() -> None:
    words = TensorSpec(name="words", dtype="int64", shape=("batch", "words"), values=(0, 745))
    assert words.values == (0, 745)
    with pytest.raises(ValidationError, match="'values' is an int64 tensor's"):
        TensorSpec(name="image", dtype="float32", shape=("batch",), values=(0, 1))
    with pytest.raises(ValidationError, match=r"got \(5, 4\)"):
        TensorSpec(name="words", dtype="int64", shape=("batch",), values=(5, 4))
    # a contract written before ranges existed reads as before: no range
    assert Contract.model_validate(_contract()).input("image").values is None


def test_unknown_tensor_name() -> None:
    with pytest.raises(KeyError, match="no tensor 'img'"):
        Contract.model_validate(_contract()).input("img")


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path, chunk=2) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
