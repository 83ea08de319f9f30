"""Architectures: paper-size state_dict names match the public checkpoints; options; samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporters import zoo
from exporters.errors import UnknownModel
from exporters.names import MODEL_NAMES
from exporters.zoo.base import OptionError
from tests.helpers import migserve_imports


def _fixture(shared: Path, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((shared / "fixtures" / "checkpoint_keys" / name).read_text())
    return data


def test_csrnet_paper_matches_public_checkpoint(shared: Path) -> None:
    fixture = _fixture(shared, "crowd_csrnet.json")
    mdef = zoo.get("crowd-csrnet")
    module = mdef.build(mdef.config("paper"))
    names = {k: list(v.shape) for k, v in module.state_dict().items()}
    assert names == fixture["state_dict"]
    assert sum(p.numel() for p in module.parameters()) == fixture["num_parameters"] == 16_263_489


def test_face_paper_matches_timm_vit_s16_harness(shared: Path) -> None:
    fixture = _fixture(shared, "face_vits16_attr40.json")
    expected = fixture["state_dict"]
    assert isinstance(expected, dict)
    mdef = zoo.get("face-pros")
    module = mdef.build(mdef.config("paper"))
    names = {k: list(v.shape) for k, v in module.state_dict().items()}
    assert {k: names[k] for k in expected} == expected
    extra = set(names) - set(expected)
    assert extra == {"expression.weight", "expression.bias", "landmarks.weight", "landmarks.bias"}
    assert sum(module.state_dict()[k].numel() for k in expected) == fixture["num_parameters"]


def test_expression_heads_configurable() -> None:
    mdef = zoo.get("face-pros")
    cfg = mdef.configure("tiny", {"expression_classes": "8"})
    assert mdef.outputs(cfg)[2].shape == ("batch", 8)
    assert mdef.postprocessing(cfg).expression_labels[-1] == "Contempt"  # type: ignore[union-attr]
    with pytest.raises(OptionError, match="7 \\(RAF-DB\\) or 8"):
        mdef.configure("tiny", {"expression_classes": "5"})


def test_grounding_feature_dim_configurable() -> None:
    mdef = zoo.get("grounding-ssrn")
    for dim in (500, 1024, 4096):
        cfg = mdef.configure("tiny", {"feature_dim": str(dim)})
        assert mdef.inputs(cfg)[0].shape == ("batch", "frames", dim)


def test_unknown_option_lists_the_real_ones() -> None:
    with pytest.raises(OptionError, match=r"no option 'width'.*width_divisor"):
        zoo.get("crowd-csrnet").configure("tiny", {"width": "3"})
    with pytest.raises(OptionError, match=r"invalid literal"):
        zoo.get("crowd-csrnet").configure("tiny", {"width_divisor": "many"})


def test_options_that_break_the_dims_are_refused() -> None:
    with pytest.raises(OptionError, match="invalid dims"):
        zoo.get("crowd-csrnet").configure("tiny", {"max_side": "4"})


def test_unknown_model() -> None:
    with pytest.raises(UnknownModel, match="unknown model 'crowd'; known: face-pros"):
        zoo.get("crowd")


@pytest.mark.parametrize(
    "args",
    [
        ["export", "--model", "crowd", "--out", "unused"],
        ["export", "--model", "crowd-csrnet", "--checkpoint", "crowd=w.pth", "--out", "unused"],
        ["bench", "train", "--models", "crowd", "--out", "unused"],
    ],
)
def test_an_unknown_name_is_refused_before_torch_is_imported(args: list[str]) -> None:
    """The commands check names against MODEL_NAMES, the zoo's names in its order, before they import torch (seconds)."""
    assert MODEL_NAMES == tuple(zoo.ZOO) == tuple(m.name for m in zoo.ZOO.values())
    run, torch_imported = migserve_imports("torch", *args)
    assert (run.returncode, torch_imported, "unknown model" in run.stderr) == (2, False, True), run.stderr


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_samples_cover_batch_one_many_and_a_non_default_size(name: str) -> None:
    mdef = zoo.get(name)
    cfg = mdef.config("tiny")
    samples = mdef.samples(cfg, seed=0)
    batches = [next(iter(s.inputs.values())).shape[0] for s in samples]
    assert 1 in batches and max(batches) > 1
    dims = mdef.dims(cfg)
    default = {t.name: tuple(d if isinstance(d, int) else dims[d].default for d in t.shape[1:]) for t in mdef.inputs(cfg)}
    off_default = [s.name for s in samples if any(v.shape[1:] != default[k] for k, v in s.inputs.items())]
    has_dynamic = any(isinstance(d, str) for t in mdef.inputs(cfg) for d in t.shape[1:])
    assert bool(off_default) == has_dynamic
    again = mdef.samples(cfg, seed=0)
    for a, b in zip(samples, again, strict=True):
        for key in a.inputs:
            np.testing.assert_array_equal(a.inputs[key], b.inputs[key])


def test_grounding_samples_pad_like_the_gateway() -> None:
    mdef = zoo.get("grounding-mgsl")
    cfg = mdef.config("tiny")
    for sample in mdef.samples(cfg, seed=3):
        words, mask = sample.inputs["words"], sample.inputs["word_mask"]
        assert words.dtype == np.int64
        assert (words[mask == 0] == 0).all() and (words[mask == 1] >= 2).all()
        assert (words < cfg.vocab_size).all()
        assert set(np.unique(sample.inputs["video_mask"])) <= {0.0, 1.0}
