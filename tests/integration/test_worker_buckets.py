"""GPU sessions pad batches to a few sizes (service/workers/buckets.py), checked with real exported models.

The padding and slicing are provider-independent, so they run here on onnxruntime's CPU provider: each padded
answer must equal the unpadded run's. That the CUDA provider needs it (cuDNN plans rebuilt at every shape change)
was measured on an H200 with bench/gpu_check.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest

from bench.gateway_bench import sample
from migserve.contract import read_contract
from migserve.types import Array
from service.workers import shm
from service.workers.buckets import BucketedSession, buckets
from service.workers.process import merged, run_merged
from service.workers.protocol import BatchDone, RunBatch, TensorRef
from tests.fake_cudart import FakeCudart, HostBuffers
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


def _batch(batch_id: int, model: str, arrays: dict[str, Array]) -> tuple[shm.Attachments, shm.Arena, RunBatch]:
    """A batch as a front-end sends it: its inputs written to its own arena, and the worker's side of both arenas."""
    arena = shm.Arena()
    _keep.append(arena)
    refs = arena.write({name: [value] for name, value in arrays.items()})
    return shm.Attachments(), shm.Arena(), RunBatch(batch_id, model, refs)


_keep: list[shm.Arena] = []


def test_batches_from_several_front_ends_run_as_one_and_each_gets_its_rows(tiny_repo: ExportedRepo) -> None:
    """serve --frontends: a worker merges the batches that arrive together (same model and shapes, within the
    largest batch), and answers each front-end its own rows, as if its batch had run alone."""
    sessions = {
        name: ort.InferenceSession(str(tiny_repo.root / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        for name in ("crowd-csrnet", "grounding-mgsl")
    }
    crowd = read_contract(tiny_repo.root / "crowd-csrnet").model_dump(mode="json")
    small, large = sample(crowd, {"height": 16, "width": 16}, 3), sample(crowd, {"height": 32, "width": 32}, 2)
    mgsl = sample(read_contract(tiny_repo.root / "grounding-mgsl").model_dump(mode="json"), {}, 2)
    arrived = [
        ("a", _batch(1, "crowd-csrnet", small)),
        ("b", _batch(2, "grounding-mgsl", mgsl)),
        ("c", _batch(3, "crowd-csrnet", {k: v[:1] for k, v in small.items()})),
        ("d", _batch(4, "crowd-csrnet", large)),  # another size: not with a or c
        ("e", _batch(5, "crowd-csrnet", {k: v[1:] for k, v in small.items()})),  # 3 + 1 + 2 rows: over 4, a group of its own
    ]
    groups = merged([(name, item[2]) for name, item in arrived], {"crowd-csrnet": 4, "grounding-mgsl": 4})
    assert [[name for name, _ in group] for group in groups] == [["a", "c"], ["b"], ["d"], ["e"]]
    try:
        replies = run_merged(sessions, [arrived[0][1], arrived[2][1]])
        assert replies is not None and [r.batch_id for r in replies] == [1, 3]
        a, c = (r.compute_s for r in replies if isinstance(r, BatchDone))
        assert a == pytest.approx(3 * c), "the run's time is shared by rows (3 and 1), so the front-ends' counts add up to it"
        for (_, (_, _, message)), reply in zip((arrived[0], arrived[2]), replies, strict=True):
            assert isinstance(reply, BatchDone)
            alone = sessions["crowd-csrnet"].run(None, {k: shm_view(message.inputs[k]) for k in message.inputs})
            reader = shm.Attachments()
            got = reader.view(reply.outputs["density"])
            assert got.shape == alone[0].shape
            np.testing.assert_allclose(got, alone[0], rtol=1e-4, atol=1e-5)
            reader.close()
        # a merged run that onnxruntime refuses is left to the batches alone, each answered for itself
        broken = _batch(6, "crowd-csrnet", {k: v.astype(np.float64) for k, v in small.items()})
        assert run_merged(sessions, [arrived[0][1], broken]) is None
    finally:
        for _, (inputs, outputs, _) in arrived:
            inputs.close()
            outputs.close()
        for arena in _keep:
            arena.close()
        _keep.clear()


def shm_view(ref: TensorRef) -> Array:
    reader = shm.Attachments()
    value = reader.view(ref).copy()
    reader.close()
    return value


def test_batches_merged_into_a_padded_buffer_answer_as_one_concatenated_batch(tiny_repo: ExportedRepo) -> None:
    root = tiny_repo.root / "face-pros"
    contract = read_contract(root).model_dump(mode="json")

    def make() -> ort.InferenceSession:
        return ort.InferenceSession(str(root / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    plain, bucketed = make(), BucketedSession(make(), make, max_batch=8)
    feeds = sample(contract, {}, 5)
    parts = {name: [value[:2], value[2:3], value[3:]] for name, value in feeds.items()}  # 5 rows: padded to 8
    for got, expected in zip(bucketed.run_parts(None, parts), plain.run(None, feeds), strict=True):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["face-pros", "grounding-mgsl"])
def test_batches_copied_part_by_part_into_device_buffers_answer_as_one_batch(tiny_repo: ExportedRepo, model: str) -> None:
    """On a GPU, padded and merged batches are copied from the arenas their rows are in straight into input buffers
    on the device, and run there with an IOBinding. Here the "device" is host memory and the copies memmove (only
    the CUDA runtime is a stand-in); the session, the binding and the slicing are onnxruntime's own."""
    root = tiny_repo.root / model
    contract = read_contract(root).model_dump(mode="json")

    def make() -> ort.InferenceSession:
        return ort.InferenceSession(str(root / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    cudart = FakeCudart()
    plain, bucketed = make(), BucketedSession(make(), make, max_batch=8, device=HostBuffers(ort, cudart))
    feeds = sample(contract, {}, 8)
    for pieces in ([2, 1, 2], [8], [3], [1, 1, 1, 1, 1, 1, 1, 1], [3]):  # padded to 8, lone and full, padded to 4, ...
        cuts = np.cumsum([0, *pieces])
        parts = {name: [value[a:b] for a, b in itertools.pairwise(cuts)] for name, value in feeds.items()}
        rows = int(cuts[-1])
        cudart.calls.clear()
        got = bucketed.run_parts(None, parts)
        expected = plain.run(None, {name: value[:rows] for name, value in feeds.items()})
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
        if pieces == [8]:
            assert not cudart.calls, "a lone batch of a bucket's size runs where it is"
            continue
        bucket = next(b for b in (1, 2, 4, 8) if b >= rows)
        assert cudart.named().count("copy") == len(pieces) * len(feeds), "each part copied once, straight from where it is"
        zeroed = sum(args[2] for name, args in cudart.calls if name == "memset")
        assert zeroed == sum((bucket - rows) * value[0].nbytes for value in feeds.values()), "padding rows zeroed"
        assert cudart.named()[-1] == "synchronize", "the copies are done before the run"
