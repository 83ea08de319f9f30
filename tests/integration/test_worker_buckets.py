"""GPU sessions pad batches to a few sizes (service/workers/buckets.py), checked with real exported models.

The padding and slicing are provider-independent, so they run here on onnxruntime's CPU provider: each padded
answer must equal the unpadded run's. That the CUDA provider needs it (cuDNN plans rebuilt at every shape change)
was measured on an H200 with bench/gpu_check.py.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from bench.gateway_bench import sample
from migserve.contract import read_contract
from service.workers.buckets import BucketedSession, buckets
from tests.helpers import ExportedRepo


def test_buckets_are_powers_of_two_up_to_the_largest_batch() -> None:
    assert buckets(32) == (1, 2, 4, 8, 16, 32)
    assert buckets(24) == (1, 2, 4, 8, 16, 24)
    assert buckets(4) == (1, 2, 4)
    assert buckets(1) == (1,)


@pytest.mark.parametrize("model", ["crowd-csrnet", "grounding-mgsl", "face-pros"])
def test_padded_batches_answer_as_unpadded_ones(tiny_repo: ExportedRepo, model: str) -> None:
    root = tiny_repo.root / model
    contract = read_contract(root).model_dump(mode="json")
    made: list[ort.InferenceSession] = []

    def make() -> ort.InferenceSession:
        made.append(ort.InferenceSession(str(root / "1" / "model.onnx"), providers=["CPUExecutionProvider"]))
        return made[-1]

    plain = ort.InferenceSession(str(root / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    bucketed = BucketedSession(make(), make, max_batch=8)
    for rows in (3, 1, 5, 8, 3, 2):
        feeds = {name: value[:rows] for name, value in sample(contract, {}, 8).items()}
        got, expected = bucketed.run(None, feeds), plain.run(None, feeds)
        assert [g.shape for g in got] == [e.shape for e in expected]
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    # 3 -> 4, 1, 5 -> 8, 8, 3 -> 4, 2: four shapes, the first on the session that was already loaded
    assert [dict(shapes)[contract["inputs"][0]["name"]][0] for shapes in bucketed.shapes] == [1, 8, 4, 2]
    assert len(made) == 4
    assert bucketed.get_outputs()[0].name == contract["outputs"][0]["name"]


def test_the_least_recently_used_session_goes_and_oversized_batches_run_as_they_come(tiny_repo: ExportedRepo) -> None:
    root = tiny_repo.root / "crowd-csrnet"
    contract = read_contract(root).model_dump(mode="json")

    def make() -> ort.InferenceSession:
        return ort.InferenceSession(str(root / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    bucketed = BucketedSession(make(), make, max_batch=4, keep=2)
    feeds = sample(contract, {"height": 32, "width": 32}, 6)
    for rows in (1, 2, 1, 4):
        bucketed.run(None, {k: v[:rows] for k, v in feeds.items()})
    assert [dict(s)["image"][0] for s in bucketed.shapes] == [1, 4]  # 2 was used least recently
    (density,) = bucketed.run(None, feeds)  # 6 rows, past the largest bucket
    assert density.shape[0] == 6
    assert [dict(s)["image"][0] for s in bucketed.shapes] == [4, 6]


def test_a_session_that_cannot_be_made_falls_back_to_a_running_one(tiny_repo: ExportedRepo) -> None:
    # On a full device onnxruntime raises when a session is made; the batch runs on the last used session instead.
    root = tiny_repo.root / "crowd-csrnet"
    contract = read_contract(root).model_dump(mode="json")
    plain = ort.InferenceSession(str(root / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    made = 0

    def make() -> ort.InferenceSession:
        nonlocal made
        made += 1
        if made > 2:
            raise RuntimeError("CUDA failure 2: out of memory")  # what onnxruntime's CUDA allocator raises, in kind
        return ort.InferenceSession(str(root / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    bucketed = BucketedSession(make(), make, max_batch=8)
    feeds = sample(contract, {"height": 32, "width": 32}, 8)
    for rows in (1, 2, 4, 8, 3):
        (got,) = bucketed.run(None, {k: v[:rows] for k, v in feeds.items()})
        (expected,) = plain.run(None, {k: v[:rows] for k, v in feeds.items()})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert [dict(s)["image"][0] for s in bucketed.shapes] == [1, 2]  # 4 and 8 ran on the session of 2
    assert bucketed.keep == 2 and made == 3  # it stopped trying after the first failure
