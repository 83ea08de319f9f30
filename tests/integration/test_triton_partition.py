"""Triton partitions: a real tritonserver serving python-backend twins, behind the gateway like a local worker."""

from __future__ import annotations

import base64
import gzip
import os
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from migserve.contract import read_contract
from migserve.types import Array
from tests.helpers import GROUP, ExportedRepo, Gateway, migserve, processes_where, shm_key, thread_affinities, with_http_client
from tests.integration.test_family_endpoints import nifti_gz
from tests.integration.test_gateway_protocol import make_inputs, triton_inputs
from tests.triton_server import TritonServer

MODELS = (  # every model: each one's twin must answer as the local worker does
    "crowd-csrnet",
    "face-pros",
    "frontalize-dalgan",
    "grounding-dscnet",
    "grounding-ecrl",
    "grounding-mgsl",
    "grounding-mhst",
    "grounding-ssrn",
    "lns-organs",
    "lns-stations",
)


@pytest.fixture(scope="module")
def twins(tiny_repo: ExportedRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Python twins of every model: the tiny repo's exports, switched to Triton's python backend by
    `export --skip-existing --triton-backend python` without exporting again (test_offline exports a twin afresh)."""
    root = tmp_path_factory.mktemp("triton_repo") / "repo"
    shutil.copytree(tiny_repo.root, root)
    run = migserve("export", "--model", *MODELS, "--triton-backend", "python", "--skip-existing", "--out", root)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("up to date, skipped (its config.pbtxt switched to Triton's python backend)") == len(MODELS), run.stderr
    return root


@pytest.fixture(scope="module")
def triton(twins: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("triton")
    server = TritonServer(twins, work, log=work / "triton.log")
    server.start()
    yield server
    server.stop()


def _topology(path: Path, *partitions: Mapping[str, object]) -> Path:
    path.write_text(yaml.safe_dump({"partitions": [dict(p) for p in partitions]}))
    return path


def _gateway(repo: ExportedRepo, tmp: Path, name: str, *partitions: Mapping[str, object], flags: tuple[str, ...] = ()) -> Gateway:
    topology = _topology(tmp / f"{name}.yaml", *partitions)
    return Gateway(repo.root, "--topology", str(topology), "--models", *MODELS, "--timeout-s", "20", *flags, log=tmp / f"{name}.log")


@pytest.fixture(scope="module")
def gateways(tiny_repo: ExportedRepo, triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Gateway]]:
    tmp = tmp_path_factory.mktemp("gateways")
    local = {"id": "cpu-0", "kind": "cpu", "cores": [0]}
    remote = {"id": "triton-0", "kind": "triton", "url": triton.url}
    grpc = {"id": "triton-grpc", "kind": "triton", "url": f"127.0.0.1:{triton.grpc_port}", "protocol": "grpc", "batching": "gateway"}
    servers = {
        "local": _gateway(tiny_repo, tmp, "local", local),
        "triton": _gateway(tiny_repo, tmp, "triton", remote),
        "grpc": _gateway(tiny_repo, tmp, "grpc", grpc),
        "both": _gateway(tiny_repo, tmp, "both", local, remote),
        # two front-end processes, each with its own client of the Triton partition (service/api/frontends.py)
        "frontends": _gateway(tiny_repo, tmp, "frontends", remote, flags=("--frontends", "2")),
        "impatient": _gateway(tiny_repo, tmp, "impatient", local, remote, flags=("--worker-hang-s", "2")),
    }
    yield servers
    for server in servers.values():
        server.close()


def test_export_writes_python_twins(twins: Path) -> None:
    for name in MODELS:
        config = model_config_pb2.ModelConfig()
        text_format.Parse((twins / name / "config.pbtxt").read_text(), config)
        assert config.backend == "python" and config.platform == ""
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert (twins / name / "1" / "model.py").is_file() and (twins / name / "1" / "model.onnx").is_file()
        assert config.parameters["model_sha256"].string_value == read_contract(twins / name).model_sha256


def test_the_same_request_gets_the_same_answer_locally_and_through_triton(gateways: dict[str, Gateway], tiny_repo: ExportedRepo) -> None:
    for name in MODELS:
        contract = read_contract(tiny_repo.root / name)
        inputs = make_inputs(contract, 3, seed=7)
        answers = {}
        for kind in ("local", "triton", "grpc", "frontends"):
            client = httpclient.InferenceServerClient(gateways[kind].url)
            result = client.infer(name, triton_inputs(inputs))
            answers[kind] = {o.name: result.as_numpy(o.name) for o in contract.outputs}
            client.close()
        for output in contract.outputs:
            for kind in ("triton", "grpc", "frontends"):
                np.testing.assert_allclose(answers[kind][output.name], answers["local"][output.name], rtol=1e-4, atol=1e-5)
    crowd = make_inputs(read_contract(tiny_repo.root / "crowd-csrnet"), 1, seed=8)
    for _ in range(16):  # new connections: the kernel spreads them over both front-ends
        client = httpclient.InferenceServerClient(gateways["frontends"].url)
        client.infer("crowd-csrnet", triton_inputs(crowd))
        client.close()
    others = httpx.get(f"http://{gateways['frontends'].url}/v1/partitions").json()["frontends"]
    assert others[0]["requests"] > 0, "the second front-end answered through its own client of the Triton partition"


CLASSES = {"expression": 3, "attributes": 5, "embedding": 2, "landmarks": 500}  # landmarks: all 136 values of a row


def test_a_ct_volume_gets_the_same_stations_locally_and_through_triton(gateways: dict[str, Gateway]) -> None:
    """/v1/lns/segment blends each tile's softmax in its logits' memory; a Triton partition's logits are read-only
    (tritonclient reads them from the response's bytes), so there the blend works on a copy: same labels."""
    ct = nifti_gz(np.random.default_rng(5).normal(-300, 400, (40, 40, 24)).astype(np.int16), np.diag([4.0, 4.0, 4.0, 1.0]))
    maps = {}
    for kind in ("local", "triton", "grpc"):
        with httpx.Client(base_url=f"http://{gateways[kind].url}", timeout=60) as client:
            answer = client.post("/v1/lns/segment", files={"volume": ("ct.nii.gz", ct)}, data={"mode": "sync", "inline": "true"})
            assert answer.status_code == 200, (kind, answer.text)
            maps[kind] = gzip.decompress(base64.b64decode(answer.json()["label_map_base64"]))
    assert maps["triton"] == maps["local"] and maps["grpc"] == maps["local"]


def _classes(answer: Array) -> list[list[tuple[float, int, str]]]:
    """A classification answer's rows, each element as (value, index, label)."""
    rows = []
    for row in answer:
        parsed = []
        for element in row:
            text = element.decode() if isinstance(element, bytes) else element  # tritonclient: str from JSON, bytes from binary
            value, index, *label = text.split(":")
            parsed.append((float(value), int(index), ":".join(label)))
        rows.append(parsed)
    return rows


def test_classification_answers_as_a_real_triton_s(gateways: dict[str, Gateway], triton: TritonServer, tiny_repo: ExportedRepo) -> None:
    """Triton's classification extension: the gateway's top classes of face-pros's outputs, labelled from the contract,
    read as tritonserver's own, labelled from the export's label files; over HTTP as JSON and as binary data."""
    inputs = make_inputs(read_contract(tiny_repo.root / "face-pros"), 2, seed=9)

    def answers(url: str, binary: bool) -> dict[str, Array]:
        client = httpclient.InferenceServerClient(url)
        outputs = [httpclient.InferRequestedOutput(name, binary_data=binary, class_count=n) for name, n in CLASSES.items()]
        result = client.infer("face-pros", triton_inputs(inputs), outputs=outputs)
        client.close()
        return {name: result.as_numpy(name) for name in CLASSES}

    reference = answers(triton.url, False)
    assert {name: a.shape for name, a in reference.items()} == {
        "expression": (2, 3),
        "attributes": (2, 5),
        "embedding": (2, 2),
        "landmarks": (2, 136),
    }
    expected = {name: _classes(a) for name, a in reference.items()}
    assert all(label for row in expected["expression"] + expected["attributes"] for _, _, label in row), "Triton read the label files"
    assert not any(label for row in expected["embedding"] for _, _, label in row)
    for kind in ("local", "triton", "frontends"):
        for binary in (False, True):
            got = answers(gateways[kind].url, binary)
            for name, answer in got.items():
                assert answer.shape == reference[name].shape and answer.dtype == np.object_, (kind, name)
                for ours, theirs in zip(_classes(answer), expected[name], strict=True):
                    assert [(i, label) for _, i, label in ours] == [(i, label) for _, i, label in theirs], (kind, binary, name)
                    np.testing.assert_allclose([v for v, _, _ in ours], [v for v, _, _ in theirs], atol=2e-6)
    client = httpclient.InferenceServerClient(gateways["local"].url)
    plain = client.infer("face-pros", triton_inputs(inputs), outputs=[httpclient.InferRequestedOutput("expression", class_count=0)])
    assert plain.as_numpy("expression").shape == (2, 7), "a count of 0 asks for the values, as in Triton"
    client.close()


def test_trace_settings_read_as_a_real_triton_s(gateways: dict[str, Gateway], triton: TritonServer) -> None:
    """Triton's trace extension, neither server given a trace file: the same settings, the same strings."""
    for path in ("/v2/trace/setting", "/v2/models/face-pros/trace/setting"):
        theirs = httpx.get(f"http://{triton.url}{path}", timeout=10).json()
        assert httpx.get(f"http://{gateways['local'].url}{path}", timeout=10).json() == theirs, path
    refused = {"trace_file": "/tmp/elsewhere.json"}
    theirs_refused = httpx.post(f"http://{triton.url}/v2/trace/setting", json=refused, timeout=10)
    ours_refused = httpx.post(f"http://{gateways['local'].url}/v2/trace/setting", json=refused, timeout=10)
    assert ours_refused.status_code == theirs_refused.status_code == 501
    assert theirs_refused.json()["error"] in ours_refused.json()["error"]


def test_triton_partitions_report_triton_s_own_state(gateways: dict[str, Gateway]) -> None:
    view = {p["id"]: p for p in httpx.get(f"http://{gateways['both'].url}/v1/partitions").json()["partitions"]}
    remote = view["triton-0"]
    assert remote["kind"] == "triton" and remote["ready"] and remote["providers"] == ["triton-http"]
    assert sorted(remote["models"]) == sorted(MODELS) and remote["refused"] == {}
    crowd = httpx.post(f"http://{gateways['triton'].url}/v1/crowd/count", files={"image": ("x.png", _png())})
    assert crowd.status_code == 200 and crowd.json()["count"] >= 0, "family endpoints run on Triton partitions too"


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _paths(value: object, at: str = "") -> set[str]:
    """Every key path in a JSON value (list items merged under "[]")."""
    if isinstance(value, dict):
        return {at} | {p for key, item in value.items() for p in _paths(item, f"{at}.{key}")}
    if isinstance(value, list):
        return {at} | {p for item in value for p in _paths(item, f"{at}[]")}
    return {at}


def test_configuration_statistics_and_index_read_as_a_real_triton_s(
    gateways: dict[str, Gateway], triton: TritonServer, tiny_repo: ExportedRepo
) -> None:
    """Triton's model configuration, statistics and repository index extensions, beside a real tritonserver
    serving the same contract: the statistics have Triton's keys at every level, the configuration its
    tensors and batching."""
    ours, theirs = httpclient.InferenceServerClient(gateways["local"].url), httpclient.InferenceServerClient(triton.url)
    name = "face-pros"
    contract = read_contract(tiny_repo.root / name)
    for client in (ours, theirs):
        client.infer(name, triton_inputs(make_inputs(contract, 2, seed=5)))
    got, want = ours.get_model_config(name), theirs.get_model_config(name)
    for key in ("name", "max_batch_size", "input", "output", "dynamic_batching", "version_policy", "model_warmup", "parameters"):
        assert got[key] == want[key], key
    assert set(got) <= set(want)
    assert [(g["name"], g["kind"], g["count"]) for g in got["instance_group"]] == [("cpu-0", "KIND_CPU", 1)]
    (got_stats,), (want_stats,) = ours.get_inference_statistics(name)["model_stats"], theirs.get_inference_statistics(name)["model_stats"]
    assert _paths(got_stats) == _paths(want_stats)
    assert all(isinstance(got_stats[key], int) for key in ("last_inference", "inference_count", "execution_count"))
    assert 2 in [b["batch_size"] for b in got_stats["batch_stats"]]
    assert ours.get_model_repository_index()[:1] == [{"name": "crowd-csrnet", "version": "1", "state": "READY"}]
    assert _paths(ours.get_model_repository_index()) == _paths(theirs.get_model_repository_index())
    ours.close()
    theirs.close()


def test_shared_memory_regions_behave_as_in_a_real_triton(
    gateways: dict[str, Gateway], triton: TritonServer, tiny_repo: ExportedRepo
) -> None:
    """The same client regions registered with the gateway and with tritonserver: the same status, the same
    answer (an output in a region comes back without data), the same output bytes in the region."""
    contract = read_contract(tiny_repo.root / "face-pros")
    image = make_inputs(contract, 1, seed=8)["image"]
    source = shm.create_shared_memory_region("in", shm_key("twin_in"), image.nbytes)
    targets = {kind: shm.create_shared_memory_region("out", shm_key(f"twin_out_{kind}"), 1024) for kind in ("ours", "theirs")}
    shm.set_shared_memory_region(source, [image])
    urls = {"ours": gateways["local"].url, "theirs": triton.url}
    answers, statuses = {}, {}
    try:
        for kind, url in urls.items():
            client = httpclient.InferenceServerClient(url)
            client.register_system_shared_memory("in", shm_key("twin_in"), image.nbytes)
            client.register_system_shared_memory("out", shm_key(f"twin_out_{kind}"), 1024)
            statuses[kind] = [{**r, "key": r["key"].replace("_theirs", "_ours")} for r in client.get_system_shared_memory_status()]
            tensor = httpclient.InferInput("image", list(image.shape), "FP32")
            tensor.set_shared_memory("in", image.nbytes)
            embedding = httpclient.InferRequestedOutput("embedding", binary_data=True)
            embedding.set_shared_memory("out", 48 * 4)
            body, length = httpclient.InferenceServerClient.generate_request_body([tensor], outputs=[embedding])
            response = httpx.post(f"http://{url}/v2/models/face-pros/infer", content=body, timeout=60)
            assert response.status_code == 200 and length is None, response.text
            answers[kind] = response.json()
            client.unregister_system_shared_memory()
            client.close()
        assert sorted(statuses["ours"], key=lambda r: r["name"]) == sorted(statuses["theirs"], key=lambda r: r["name"])
        assert (
            answers["ours"]
            == answers["theirs"]
            == {
                "model_name": "face-pros",
                "model_version": "1",
                "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [1, 48]}],
            }
        )
        got = {kind: shm.get_contents_as_numpy(handle, np.float32, [1, 48]) for kind, handle in targets.items()}
        np.testing.assert_allclose(got["ours"], got["theirs"], rtol=1e-4, atol=1e-5)
    finally:
        for handle in [source, *targets.values()]:
            shm.destroy_shared_memory_region(handle)


def test_killing_triton_mid_load_fails_over_and_it_comes_back(
    gateways: dict[str, Gateway], triton: TritonServer, tiny_repo: ExportedRepo
) -> None:
    url = f"http://{gateways['both'].url}"
    contract = read_contract(tiny_repo.root / "crowd-csrnet")
    body = httpclient.InferenceServerClient.generate_request_body(
        triton_inputs(make_inputs(contract, 1, seed=1, dims={"height": 64, "width": 64}))
    )

    def call(_: int) -> int:
        payload, header_length = body
        headers = {"Inference-Header-Content-Length": str(header_length)} if header_length else {}
        return httpx.post(f"{url}/v2/models/crowd-csrnet/infer", content=payload, headers=headers, timeout=60).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, i) for i in range(160)]
        time.sleep(0.5)
        triton.kill()
        codes = [f.result(timeout=60) for f in futures]
    assert time.monotonic() - started < 60, "nothing hangs"
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 140, "the local partition took the failed-over batches"
    state = {p["id"]: p for p in httpx.get(f"{url}/v1/partitions").json()["partitions"]}
    assert not state["triton-0"]["ready"] and state["cpu-0"]["ready"]
    assert call(0) == 200
    triton.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not state["triton-0"]["ready"]:
        time.sleep(0.3)
        state = {p["id"]: p for p in httpx.get(f"{url}/v1/partitions").json()["partitions"]}
    assert state["triton-0"]["ready"] and state["triton-0"]["restarts"] == 1
    only_triton = f"http://{gateways['triton'].url}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and httpx.get(f"{only_triton}/v2/health/ready").status_code != 200:
        time.sleep(0.3)
    assert httpx.get(f"{only_triton}/v2/health/ready").status_code == 200


def test_a_triton_that_answers_nothing_fails_over_and_comes_back(
    gateways: dict[str, Gateway], triton: TritonServer, tiny_repo: ExportedRepo
) -> None:
    # SIGSTOP: Triton keeps its sockets and answers nothing, as a hung server. After --worker-hang-s (2 s) its
    # batches go to the local partition, and readiness checks (5 s at most) mark it unready until it answers again.
    url = f"http://{gateways['impatient'].url}"
    contract = read_contract(tiny_repo.root / "crowd-csrnet")
    payload, header_length = httpclient.InferenceServerClient.generate_request_body(
        triton_inputs(make_inputs(contract, 1, seed=2, dims={"height": 64, "width": 64}))
    )

    def call(_: int) -> int:
        headers = {"Inference-Header-Content-Length": str(header_length)} if header_length else {}
        return httpx.post(f"{url}/v2/models/crowd-csrnet/infer", content=payload, headers=headers, timeout=60).status_code

    def triton_state() -> dict[str, object]:
        return {p["id"]: p for p in httpx.get(f"{url}/v1/partitions").json()["partitions"]}["triton-0"]  # type: ignore[no-any-return]

    def ready_within(seconds: float) -> dict[str, object]:
        deadline = time.monotonic() + seconds
        while not (state := triton_state())["ready"] and time.monotonic() < deadline:
            time.sleep(0.3)
        return state

    assert triton.process is not None
    before = ready_within(30)  # the test before restarted Triton
    assert before["ready"]
    os.killpg(triton.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(call, range(40)))
        assert codes == [200] * 40, codes
        assert time.monotonic() - started < 45
        assert not triton_state()["ready"]
    finally:
        os.killpg(triton.process.pid, signal.SIGCONT)
    after = ready_within(30)
    assert after["ready"] and after["restarts"] == before["restarts"] + 1  # type: ignore[operator]


def test_a_twin_runs_onnxruntime_on_the_cores_triton_may_use(twins: Path, tmp_path: Path) -> None:
    # Served on core 0 alone (as a container's cpuset would): onnxruntime left to its default thread count pins a
    # pool thread to core 1 anyway, and in a real cpuset logs "pthread_setaffinity_np failed"; the twin sets it.
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "crowd-csrnet").symlink_to(twins / "crowd-csrnet")
    server = TritonServer(repo, tmp_path, log=tmp_path / "triton.log")
    server.start(prefix=("taskset", "-c", "0"))
    try:
        inputs = make_inputs(read_contract(repo / "crowd-csrnet"), batch=1, seed=0)
        assert with_http_client(server.url, lambda c: c.infer("crowd-csrnet", triton_inputs(inputs))).as_numpy("density") is not None
        assert server.process is not None
        threads = {pid: thread_affinities(pid) for pid in processes_where(GROUP, server.process.pid)}
        assert len(threads) >= 2, threads  # tritonserver and the model's python stub
        assert set().union(*threads.values()) == {(0,)}, threads
    finally:
        server.stop()
