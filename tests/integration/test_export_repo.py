"""Every model exported at tiny size: files, contracts, ONNX graphs, parity, Triton configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from exporters.zoo import ZOO
from migserve.contract import Contract, TensorSpec, read_contract, sha256_file
from migserve.types import Array
from service.repository import load_repository
from tests.helpers import ROOT, ExportedRepo

MODELS = list(ZOO)
TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}
ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


@pytest.fixture(scope="module")
def repo(tiny_repo: ExportedRepo) -> Path:
    return tiny_repo.root


def _graph_shape(value: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    return tuple(d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim)


def test_every_model_directory_is_complete_and_nothing_else_is_left(repo: Path) -> None:
    assert sorted(p.name for p in repo.iterdir()) == sorted(MODELS)
    for name in MODELS:
        files = {str(p.relative_to(repo / name)) for p in (repo / name).rglob("*") if p.is_file()}
        expected = {"config.pbtxt", "contract.json", "1/model.onnx"} | ({"vocab.txt"} if name.startswith("grounding-") else set())
        expected |= {"attributes_labels.txt", "expression_labels.txt"} if name == "face-pros" else set()
        assert files == expected, name


def test_the_gateway_loader_accepts_every_model(repo: Path) -> None:
    loaded = load_repository(repo)
    assert loaded.refused == {}
    assert sorted(loaded.models) == sorted(MODELS)


def test_closing_table_has_a_row_per_model(tiny_repo: ExportedRepo) -> None:
    rows = tiny_repo.run.stdout.strip().splitlines()[2:]
    assert sorted(r.split()[0] for r in rows) == sorted(MODELS)
    for row in rows:
        assert float(row.split()[4]) <= 1e-4  # parity column


@pytest.mark.parametrize("name", MODELS)
def test_contract_records_parity_provenance_and_hash(repo: Path, name: str) -> None:
    contract = read_contract(repo / name)
    assert contract.model_sha256 == sha256_file(repo / name / "1" / "model.onnx")
    assert contract.size == "tiny" and contract.family == ZOO[name].family
    samples = {s.name: s for s in contract.parity.samples}
    assert len(samples) >= 3
    first = contract.inputs[0].name
    assert 1 in {s.shapes[first][0] for s in samples.values()}
    assert max(s.shapes[first][0] for s in samples.values()) > 1
    for sample in samples.values():
        assert set(sample.outputs) == {o.name for o in contract.outputs}
    assert 0 < contract.parity.worst <= contract.parity.tolerance == 1e-4
    prov = contract.provenance
    assert prov.weights == "random-init" and prov.seed == 0 and prov.checkpoint_sha256 is None
    assert prov.versions["torch"].startswith("2.13.0")
    assert prov.opset == 18
    assert contract.parameters > 0


@pytest.mark.parametrize("name", MODELS)
def test_onnx_graph_matches_the_contract(repo: Path, name: str) -> None:
    contract = read_contract(repo / name)
    model = onnx.load(str(repo / name / "1" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    for specs, values in ((contract.inputs, model.graph.input), (contract.outputs, model.graph.output)):
        assert [v.name for v in values] == [s.name for s in specs]
        for spec, value in zip(specs, values, strict=True):
            assert _graph_shape(value) == spec.shape
            assert value.type.tensor_type.elem_type == {"float32": 1, "int64": 7}[spec.dtype]


def _inputs_at(contract: Contract, dims: dict[str, int], rng: np.random.Generator) -> dict[str, Array]:
    def make(spec: TensorSpec) -> Array:
        shape = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
        if spec.dtype == "int64":
            return rng.integers(0, 40, shape, dtype=np.int64)
        if "mask" in spec.name:
            return np.ones(shape, np.float32)
        return rng.standard_normal(shape).astype(np.float32)

    return {spec.name: make(spec) for spec in contract.inputs}


@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_serves_sizes_never_seen_at_export(repo: Path, name: str) -> None:
    contract = read_contract(repo / name)
    session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == [ORT_TYPES[s.dtype] for s in contract.inputs]
    dims = {"batch": 5, "frames": 23, "words": 3, "height": 100, "width": 61}
    outputs = session.run(None, _inputs_at(contract, dims, np.random.default_rng(7)))
    for spec, value in zip(contract.outputs, outputs, strict=True):
        assert value.shape[0] == 5
        assert np.isfinite(value).all()
        for dim, size in zip(spec.shape, value.shape, strict=True):
            if isinstance(dim, int):
                assert size == dim
            elif dim in dims:
                assert size == dims[dim]
            else:
                assert contract.dims[dim].min <= size <= contract.dims[dim].max
    if name == "crowd-csrnet":
        assert outputs[0].shape == (5, 1, 100 // 8, 61 // 8)


@pytest.mark.parametrize("name", MODELS)
def test_triton_config_parses_and_matches_the_graph(repo: Path, name: str) -> None:
    contract = read_contract(repo / name)
    config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    graph = onnx.load(str(repo / name / "1" / "model.onnx")).graph
    assert config.name == name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == contract.batching.max_batch_size
    for tensors, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in tensors] == [v.name for v in values]
        for tensor, value in zip(tensors, values, strict=True):
            shape = _graph_shape(value)
            assert shape[0] == "batch"
            assert list(tensor.dims) == [d if isinstance(d, int) else -1 for d in shape[1:]]
            elem = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
            assert model_config_pb2.DataType.Name(tensor.data_type) == {"FLOAT": "TYPE_FP32", "INT64": "TYPE_INT64"}[elem]
    assert config.dynamic_batching.max_queue_delay_microseconds == contract.batching.max_queue_delay_us
    assert all(b <= config.max_batch_size for b in config.dynamic_batching.preferred_batch_size)
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    (warmup,) = config.model_warmup
    assert set(warmup.inputs) == {s.name for s in contract.inputs}
    for spec in contract.inputs:
        assert all(d > 0 for d in warmup.inputs[spec.name].dims)
    assert config.parameters["model_sha256"].string_value == contract.model_sha256
    labelled = {o.name: (repo / name / o.label_filename).read_text().splitlines() for o in config.output if o.label_filename}
    assert labelled == {output: list(labels) for output, labels in contract.class_labels().items()}
    if name == "face-pros":
        assert labelled["expression"][3] == "Happiness" and len(labelled["attributes"]) == 40


def test_grounding_models_carry_the_vocabulary_their_embedding_indexes(repo: Path) -> None:
    for name in (n for n in MODELS if n.startswith("grounding-")):
        contract = read_contract(repo / name)
        vocab = (repo / name / contract.preprocessing.vocabulary_file).read_text().splitlines()  # type: ignore[union-attr]
        graph = onnx.load(str(repo / name / "1" / "model.onnx")).graph
        tables = [t for t in graph.initializer if len(t.dims) == 2 and t.dims[0] == len(vocab)]
        assert tables, f"{name}: no embedding table with {len(vocab)} rows"
        assert contract.input("words").values == (0, len(vocab) - 1), "the gateway refuses token ids outside this range"


AFFINITIES = "sorted({tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir('/proc/self/task')})"


def test_the_parity_check_runs_onnxruntime_on_the_cores_the_process_may_use(tiny_repo: ExportedRepo) -> None:
    # onnxruntime left to its default thread count pins a thread to every core of the machine, whatever the
    # process's mask: an export in a container limited to some cores would log "pthread_setaffinity_np failed".
    script = (
        "import os, sys\n"
        "from service.workers.affinity import pin_threads\n"
        "pin_threads({0})\n"
        "from exporters.parity import cpu_session\n"
        "session = cpu_session(open(sys.argv[1], 'rb').read())\n"
        f"print({AFFINITIES})\n"
    )
    model = tiny_repo.root / "face-pros" / "1" / "model.onnx"
    done = subprocess.run([sys.executable, "-c", script, str(model)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[(0,)]", done.stdout
