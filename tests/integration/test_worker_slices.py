"""CPU workers run batches in slices (service/workers/slices.py), checked with real exported models and a real gateway.

Each sliced answer must equal the whole batch's run; the gateway reports the slices it runs at /v1/partitions and
answers a request larger than a slice as direct onnxruntime does. Which size `auto` picks depends on this machine's
timings, so the gateway here is given a fixed size; the throughput gain is measured in bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from migserve.contract import read_contract
from migserve.types import Array
from service.backends.worker import WorkerReplica
from service.partitions import Partition, PartitionKind
from service.placement import model_spec
from service.repository import load_model
from service.workers import shm
from service.workers.process import load_sessions, run_merged, timed_choices
from service.workers.protocol import BatchDone, WorkerOptions, WorkerSpec
from service.workers.slices import SlicedSession, time_per_row, timing_key
from tests.helpers import ExportedRepo, Gateway, assert_equal_but_rounding
from tests.integration.test_gateway_protocol import direct, make_inputs, triton_inputs
from tests.integration.test_worker_buckets import _batch, _keep


class _Recorded:
    """A real session whose runs' row counts are recorded."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.runs: list[int] = []

    def run(self, names: list[str] | None, feeds: dict[str, Array]) -> list[Array]:
        self.runs.append(next(iter(feeds.values())).shape[0])
        return list(self.session.run(names, feeds))

    def get_outputs(self) -> list[ort.NodeArg]:
        return list(self.session.get_outputs())


@pytest.mark.parametrize("model", ["crowd-csrnet", "grounding-mgsl", "face-pros"])
def test_sliced_batches_answer_as_whole_ones(tiny_repo: ExportedRepo, model: str) -> None:
    root = tiny_repo.root / model
    contract = read_contract(root)
    plain = ort.InferenceSession(str(root / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    recorded = _Recorded(plain)
    sliced = SlicedSession.made(recorded, model_spec(load_model(root)), 2)
    assert isinstance(sliced, SlicedSession)
    for rows in (1, 2, 5, 8):
        feeds = make_inputs(contract, rows, seed=rows)
        recorded.runs.clear()
        got, expected = sliced.run(None, feeds), plain.run(None, feeds)
        assert recorded.runs == [2] * (rows // 2) + [1] * (rows % 2)
        assert [g.shape for g in got] == [e.shape for e in expected]
        for g, e in zip(got, expected, strict=True):
            assert_equal_but_rounding(g, e)


def test_merged_batches_run_in_slices_taken_from_their_pieces(tiny_repo: ExportedRepo) -> None:
    """serve --frontends: batches merged in a worker run slice by slice from where their rows lie; only a slice
    across two front-ends' pieces is copied."""
    root = tiny_repo.root / "face-pros"
    contract = read_contract(root)
    plain = ort.InferenceSession(str(root / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    pieces = [make_inputs(contract, rows, seed=rows) for rows in (3, 1, 2)]
    fed: list[bool] = []

    class Viewed(_Recorded):
        def run(self, names: list[str] | None, feeds: dict[str, Array]) -> list[Array]:
            fed.append(any(np.shares_memory(feeds["image"], piece["image"]) for piece in pieces))
            return super().run(names, feeds)

    recorded = Viewed(plain)
    sliced = SlicedSession.made(recorded, model_spec(load_model(root)), 2)
    got = sliced.run_parts(None, {name: [piece[name] for piece in pieces] for name in pieces[0]})
    expected = plain.run(None, {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]})
    assert recorded.runs == [2, 2, 2]
    assert fed == [True, False, True], "rows 0-1 and 4-5 are views of their pieces; rows 2-3 cross two and are copied"
    for g, e in zip(got, expected, strict=True):
        assert_equal_but_rounding(g, e)


def test_smaller_inputs_run_in_slices_of_more_rows(tiny_repo: ExportedRepo) -> None:
    root = tiny_repo.root / "crowd-csrnet"
    contract = read_contract(root)
    default = {name: r.default for name, r in contract.dims.items() if name in ("height", "width")}
    recorded = _Recorded(ort.InferenceSession(str(root / "1" / "model.onnx"), providers=["CPUExecutionProvider"]))
    sliced = SlicedSession.made(recorded, model_spec(load_model(root)), 1)
    half = {name: size // 2 for name, size in default.items()}  # a quarter of the bytes per row: 4 rows a run
    sliced.run(None, make_inputs(contract, 6, seed=0, dims=half))
    double = {name: size * 2 for name, size in default.items()}  # four times the bytes: still one row a run
    sliced.run(None, make_inputs(contract, 2, seed=0, dims=double))
    assert recorded.runs == [4, 2, 1, 1]


def test_every_model_that_batches_leads_its_outputs_with_the_batch_axis(tiny_repo: ExportedRepo) -> None:
    # what slicing rests on (and merging batches already did); a model whose outputs did not would be left whole
    checked = []
    for root in sorted(p for p in tiny_repo.root.iterdir() if (p / "contract.json").exists()):
        spec = model_spec(load_model(root))
        if (spec.max_batch or 1) < 2:
            continue
        session = ort.InferenceSession(spec.path, providers=["CPUExecutionProvider"])
        per_row, batch_first = time_per_row(session, spec.warmup, min(spec.max_batch or 1, 4))
        assert batch_first, spec.name
        assert per_row and all(t > 0 for t in per_row.values())
        checked.append(spec.name)
    assert {"crowd-csrnet", "face-pros", "grounding-mgsl"} <= set(checked)


def test_a_worker_slices_cpu_sessions_unless_told_not_to(tiny_repo: ExportedRepo) -> None:
    specs = tuple(model_spec(load_model(tiny_repo.root / m)) for m in ("crowd-csrnet", "face-pros"))

    def loaded(run_slices: str | int) -> dict[str, object]:
        spec = WorkerSpec(partition="cpu-0", device=None, cores=(0,), models=specs, options=WorkerOptions(run_slices=run_slices))  # type: ignore[arg-type]
        sessions, refused = load_sessions(ort, spec)
        assert not refused
        return sessions

    assert {name: s.rows for name, s in loaded(2).items() if isinstance(s, SlicedSession)} == {"crowd-csrnet": 2, "face-pros": 2}
    assert not any(isinstance(s, SlicedSession) for s in loaded("off").values())


def test_a_worker_takes_the_choices_an_earlier_worker_timed(tiny_repo: ExportedRepo) -> None:
    """`timed` (what the worker before it chose) stands in for the timing: 3 rows, which the timing never picks (it
    times 1, 2, 4, ...), and 0, run whole; a fixed --cpu-run-slices still wins."""
    specs = tuple(model_spec(load_model(tiny_repo.root / m)) for m in ("crowd-csrnet", "face-pros"))
    timed = {"crowd-csrnet": 3, "face-pros": 0}
    spec = WorkerSpec(partition="cpu-0", device=None, cores=(0,), models=specs, timed=timed)
    sessions, refused = load_sessions(ort, spec)
    assert not refused
    assert {name: s.rows for name, s in sessions.items() if isinstance(s, SlicedSession)} == {"crowd-csrnet": 3}
    assert timed_choices(spec, sessions) == timed, "reported again, for the next restart"
    fixed = WorkerSpec(partition="cpu-0", device=None, cores=(0,), models=specs, options=WorkerOptions(run_slices=2), timed=timed)
    sessions, _ = load_sessions(ort, fixed)
    assert {name: s.rows for name, s in sessions.items() if isinstance(s, SlicedSession)} == {"crowd-csrnet": 2, "face-pros": 2}
    assert timed_choices(fixed, sessions) == {}, "nothing timed: nothing to remember"


def test_a_worker_takes_what_another_worker_of_the_gateway_timed(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """The gateway's timings file: a model file already timed on as many cores is not timed again (3 rows, which
    the timing never picks, stands for another worker's choice); one timed here is recorded for the others."""
    specs = tuple(model_spec(load_model(tiny_repo.root / m)) for m in ("crowd-csrnet", "face-pros"))
    timings = tmp_path / "timings.json"
    keys = [timing_key(spec.sha256, 1, ort.__version__) for spec in specs]
    timings.write_text(json.dumps({keys[0]: 3}))
    options = WorkerOptions(timings=str(timings))
    sessions, _ = load_sessions(ort, WorkerSpec(partition="cpu-1", device=None, cores=(1,), models=specs, options=options))
    assert isinstance(sessions["crowd-csrnet"], SlicedSession) and sessions["crowd-csrnet"].rows == 3
    recorded = json.loads(timings.read_text())
    assert set(recorded) == set(keys), "face-pros timed here and recorded"
    assert recorded[keys[1]] == timed_choices(WorkerSpec("cpu-1", None, (1,), specs, options), sessions)["face-pros"]


def test_a_gateway_started_again_takes_the_slices_timed_at_an_earlier_start(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """--cpu-run-slices-cache: the first start times each model and keeps the choice; the next takes it instead of
    timing again (here choices set by hand: 3 rows, which the timing never picks, and 0, whole). A file that cannot
    be written: tests/unit/test_slices.py."""
    cache = tmp_path / "cache" / "slices.json"
    models = ("face-pros", "crowd-csrnet")
    keys = {m: timing_key(model_spec(load_model(tiny_repo.root / m)).sha256, 1, ort.__version__) for m in models}

    def started(*flags: str) -> tuple[list[dict[str, int]], str]:
        log = tmp_path / f"serve-{len(list(tmp_path.glob('serve-*')))}.log"
        gateway = Gateway(tiny_repo.root, "--cpu-slices", "1,1", "--models", *models, *flags, log=log)
        try:
            return _slices(gateway), log.read_text()
        finally:
            gateway.close()

    first, log = started("--cpu-run-slices-cache", str(cache))
    assert f"take the run slices timed at earlier starts from {cache}" in log
    assert set(json.loads(cache.read_text())) == set(keys.values()), "each model timed once, kept under its key"
    cache.write_text(json.dumps({keys["face-pros"]: 3, keys["crowd-csrnet"]: 0}))
    again, _ = started("--cpu-run-slices-cache", str(cache))
    assert again == [{"face-pros": 3}] * 2, f"the kept choices, not a new timing (first start: {first})"


def test_every_worker_of_a_gateway_runs_a_model_in_the_same_slices(gateway: Gateway) -> None:
    """The session's gateway: two one-core slices, --cpu-run-slices auto (the default). Each worker timed its
    models alone before; they could pick different sizes (1 and 2 rows for face-pros in one start)."""
    first, second = _slices(gateway)
    assert first == second


def test_a_restarted_worker_runs_its_batches_as_the_one_before_it_chose(tiny_repo: ExportedRepo) -> None:
    """The replica keeps what its worker timed and hands it to the worker that replaces a killed one, which then
    skips the timing (its start is shorter by it) and slices as before: here a choice set by hand to 3 rows."""

    async def main() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        specs = {m: model_spec(load_model(tiny_repo.root / m)) for m in ("crowd-csrnet", "face-pros")}
        replica = WorkerReplica(Partition("cpu-t", PartitionKind.CPU, cores=(0,)), specs, lambda: None)
        await replica.start()
        try:
            first = dict(replica.timed)
            replica.timed["crowd-csrnet"] = 3
            pid = replica.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while not (replica.ready and replica.pid != pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert replica.ready and replica.pid != pid, "the worker came back"
            return first, dict(replica.timed), dict(replica.slices)
        finally:
            await replica.stop()

    first, timed, slices = asyncio.run(main())
    # what the timing chose, whatever it is on a busy host: whole batches (0), or a power of two of rows
    assert set(first) == {"crowd-csrnet", "face-pros"} and all(rows == 0 or rows & (rows - 1) == 0 for rows in first.values()), first
    assert timed["crowd-csrnet"] == 3 and slices["crowd-csrnet"] == 3
    assert timed["face-pros"] == first["face-pros"], "the other model as first timed"


@pytest.fixture(scope="module")
def sliced_gateway(tiny_repo: ExportedRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    log = tmp_path_factory.mktemp("slices") / "serve.log"
    args = ("--cpu-slices", "1,1", "--cpu-run-slices", "2", "--model-control-mode", "explicit", "--models", "face-pros")
    gateway = Gateway(tiny_repo.root, *args, log=log)
    yield gateway
    gateway.close()


def _slices(gateway: Gateway) -> list[dict[str, int]]:
    return [p["run_slices"] for p in httpx.get(f"http://{gateway.url}/v1/partitions").json()["partitions"]]


def test_the_gateway_reports_its_slices_and_answers_larger_batches_whole(tiny_repo: ExportedRepo, sliced_gateway: Gateway) -> None:
    assert _slices(sliced_gateway) == [{"face-pros": 2}, {"face-pros": 2}]
    assert "face-pros in runs of 2 rows" in Path(sliced_gateway.log).read_text()
    client = httpclient.InferenceServerClient(url=sliced_gateway.url, network_timeout=60)
    arrays = make_inputs(read_contract(tiny_repo.root / "face-pros"), 5, seed=3)
    result = client.infer("face-pros", triton_inputs(arrays))
    outputs = [o.name for o in ort.InferenceSession(str(tiny_repo.root / "face-pros" / "1" / "model.onnx")).get_outputs()]
    for name, expected in zip(outputs, direct(tiny_repo.root, "face-pros", arrays), strict=True):
        assert_equal_but_rounding(result.as_numpy(name), expected)
    # a model loaded later is sliced too, and forgotten with its unloading
    assert httpx.post(f"http://{sliced_gateway.url}/v2/repository/models/crowd-csrnet/load", timeout=60).status_code == 200
    assert _slices(sliced_gateway) == [{"crowd-csrnet": 2, "face-pros": 2}] * 2
    assert httpx.post(f"http://{sliced_gateway.url}/v2/repository/models/crowd-csrnet/unload", timeout=60).status_code == 200
    assert _slices(sliced_gateway) == [{"face-pros": 2}] * 2


def test_the_default_gateway_slices_only_below_each_models_largest_batch(tiny_repo: ExportedRepo, gateway: Gateway) -> None:
    # auto: sizes chosen by this machine's timings, so only what any choice must satisfy
    for partition in httpx.get(f"http://{gateway.url}/v1/partitions").json()["partitions"]:
        for model, rows in partition["run_slices"].items():
            largest = read_contract(tiny_repo.root / model).dims["batch"].max
            assert rows & (rows - 1) == 0 and 1 <= rows < largest, (model, rows)


def test_a_worker_merging_batches_into_a_sliced_session_answers_each_its_rows(tiny_repo: ExportedRepo) -> None:
    root = tiny_repo.root / "face-pros"
    contract = read_contract(root)
    plain = ort.InferenceSession(str(root / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    recorded = _Recorded(plain)
    sessions = {"face-pros": SlicedSession.made(recorded, model_spec(load_model(root)), 2)}
    first, second = make_inputs(contract, 3, seed=5), make_inputs(contract, 2, seed=6)
    batches = [_batch(1, "face-pros", first), _batch(2, "face-pros", second)]
    try:
        replies = run_merged(sessions, batches)
        assert replies is not None and [r.batch_id for r in replies] == [1, 2]
        assert recorded.runs == [2, 2, 1]
        reader = shm.Attachments()
        for arrays, reply in zip((first, second), replies, strict=True):
            assert isinstance(reply, BatchDone)
            for output, expected in zip(plain.get_outputs(), plain.run(None, arrays), strict=True):
                assert_equal_but_rounding(reader.view(reply.outputs[output.name]), expected)
        reader.close()
    finally:
        for inputs, outputs, _ in batches:
            inputs.close()
            outputs.close()
        for arena in _keep:
            arena.close()
        _keep.clear()
