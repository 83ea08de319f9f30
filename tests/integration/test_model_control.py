"""Triton's model repository extension in explicit mode: load and unload models while the gateway serves.

Driven with the real tritonclient (HTTP and gRPC) against `migserve serve --model-control-mode explicit`, on a copy
of the tiny exports so a test can change a model's files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import numpy_helper
from tritonclient.utils import InferenceServerException

from migserve.contract import read_contract, sha256_file, write_contract
from migserve.types import Array
from service.placement import footprint
from service.repository import load_model
from tests.helpers import ExportedRepo, Gateway, with_http_client
from tests.integration.test_family_endpoints import ND_IMAGE, readers_imported_within
from tests.integration.test_gateway_protocol import direct, grpc_inputs, make_inputs, triton_inputs

MODELS = ("crowd-csrnet", "face-pros", "lns-organs")


@pytest.fixture(scope="module")
def repo(tiny_repo: ExportedRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("control") / "repo"
    for model in MODELS:
        shutil.copytree(tiny_repo.root / model, root / model)
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    log = tmp_path_factory.mktemp("control-log") / "serve.log"
    gateway = Gateway(repo, "--cpu-slices", "1,1", "--model-control-mode", "explicit", "--models", "crowd-csrnet", log=log, grpc=True)
    yield gateway
    gateway.close()


def _crowd(repo: Path, seed: int = 0) -> list[httpclient.InferInput]:
    return triton_inputs(make_inputs(read_contract(repo / "crowd-csrnet"), 1, seed=seed, dims={"height": 64, "width": 64}))


def _states(url: str) -> dict[str, dict[str, str]]:
    return {m["name"]: m for m in httpx.post(f"http://{url}/v2/repository/index").json()}


def _placed(url: str) -> list[list[str]]:
    return [p["models"] for p in httpx.get(f"http://{url}/v1/partitions").json()["partitions"]]


def test_load_unload_and_load_again_over_http(server: Gateway, repo: Path) -> None:
    client = httpclient.InferenceServerClient(url=server.url)
    assert _states(server.url)["face-pros"]["state"] == "UNAVAILABLE" and not client.is_model_ready("face-pros")
    face = make_inputs(read_contract(repo / "face-pros"), 1, seed=0)

    client.load_model("face-pros")
    assert client.is_model_ready("face-pros") and _states(server.url)["face-pros"]["state"] == "READY"
    assert all("face-pros" in models for models in _placed(server.url))
    assert client.infer("face-pros", triton_inputs(face)).as_numpy("embedding").shape == (1, 48)
    assert client.get_model_config("face-pros")["name"] == "face-pros"

    before = client.infer("crowd-csrnet", _crowd(repo)).as_numpy("density")
    client.unload_model("crowd-csrnet")
    assert not client.is_model_ready("crowd-csrnet")
    assert _states(server.url)["crowd-csrnet"] == {
        "name": "crowd-csrnet",
        "version": "1",
        "state": "UNAVAILABLE",
        "reason": "unloaded; POST /v2/repository/models/crowd-csrnet/load serves it again",
    }
    assert all("crowd-csrnet" not in models for models in _placed(server.url))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("crowd-csrnet", _crowd(repo))
    assert caught.value.status() == "404" and "unknown model 'crowd-csrnet'" in str(caught.value.message())
    assert httpx.get(f"http://{server.url}/v2/health/ready").status_code == 200  # every served model is ready

    client.load_model("crowd-csrnet")
    np.testing.assert_array_equal(client.infer("crowd-csrnet", _crowd(repo)).as_numpy("density"), before)
    client.unload_model("lns-organs")  # not served: nothing to do, as in Triton


def test_loading_a_ct_model_imports_the_volume_readers(repo: Path, tmp_path: Path) -> None:
    """As a gateway that starts with one does (test_family_endpoints.py), so the first volume does not wait for it."""
    gateway = Gateway(repo, "--cpu-slices", "1", "--model-control-mode", "explicit", "--models", "crowd-csrnet", log=tmp_path / "serve.log")
    try:
        maps = Path(f"/proc/{gateway.process.pid}/maps")
        assert ND_IMAGE not in maps.read_text(), "no CT model served yet"
        httpclient.InferenceServerClient(url=gateway.url).load_model("lns-organs")
        assert readers_imported_within(gateway.process.pid, 30), "scipy.ndimage imported once lns-organs was loaded"
    finally:
        gateway.close()


def test_bad_loads_and_unloads_say_what_was_wrong_and_change_nothing(server: Gateway, repo: Path) -> None:
    client = httpclient.InferenceServerClient(url=server.url)
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: client.load_model("no-such-model"), "failed to load 'no-such-model': no such model in"),
        (lambda: client.load_model("crowd-csrnet", config='{"max_batch_size": 2}'), "parameters ['config'] are not supported"),
        (lambda: client.unload_model("no-such-model"), "failed to unload 'no-such-model': no such model in"),
        (lambda: client.load_model("x" * 300), "no such model in"),  # a name too long for a file name: was a 500
        (lambda: client.unload_model("x" * 300), "no such model in"),
    ]
    for call, says in calls:
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "400" and says in str(caught.value.message())
    odd = httpx.post(f"http://{server.url}/v2/repository/models/crowd-csrnet/unload", content=b'{"parameters": []}')
    assert odd.status_code == 400 and "'parameters' must be a JSON object" in odd.json()["error"]
    assert client.is_model_ready("crowd-csrnet")
    assert client.infer("crowd-csrnet", _crowd(repo)).as_numpy("density").shape == (1, 1, 8, 8)


def test_a_changed_file_is_refused_at_load_with_the_reason(server: Gateway, repo: Path) -> None:
    client = httpclient.InferenceServerClient(url=server.url)
    original = (repo / "lns-organs" / "1" / "model.onnx").read_bytes()
    try:
        shutil.copyfile(repo / "face-pros" / "1" / "model.onnx", repo / "lns-organs" / "1" / "model.onnx")
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("lns-organs")
        assert caught.value.status() == "400" and "sha256" in str(caught.value.message())
        assert "sha256" in _states(server.url)["lns-organs"]["reason"] and not client.is_model_ready("lns-organs")
    finally:
        (repo / "lns-organs" / "1" / "model.onnx").write_bytes(original)
    client.load_model("lns-organs")  # fixed: it loads
    assert client.is_model_ready("lns-organs")
    client.unload_model("lns-organs")


def test_unload_answers_what_it_accepted_first(server: Gateway, repo: Path) -> None:
    client = httpclient.InferenceServerClient(url=server.url)
    if not client.is_model_ready("crowd-csrnet"):
        client.load_model("crowd-csrnet")
    image = make_inputs(read_contract(repo / "crowd-csrnet"), 1, seed=1)["image"]  # 256x256: some ms each on one core
    body = json.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(image.shape), "data": image.ravel().tolist()}]}
    ).encode()  # once: eight threads encoding 200,000 floats each under the GIL answered nothing in a second on CI

    unloaded, answering = threading.Event(), threading.Event()

    def steady() -> list[tuple[int, bool]]:
        """(status, whether the request was sent after the unload returned), until shortly after it did."""
        answers: list[tuple[int, bool]] = []
        while not unloaded.is_set() or len(answers) < 3:
            after = unloaded.is_set()
            response = httpx.post(f"http://{server.url}/v2/models/crowd-csrnet/infer", content=body, timeout=60)
            answers.append((response.status_code, after))
            if response.status_code == 200:
                answering.set()
        return answers

    with ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(steady) for _ in range(8)]
        assert answering.wait(60), "no request was answered before the unload"
        time.sleep(0.3)  # requests in flight and queued when the unload comes
        client.unload_model("crowd-csrnet")  # returns once the requests it accepted are answered
        unloaded.set()
        answers = [a for c in clients for a in c.result()]
    assert {code for code, _ in answers} == {200, 404}, answers  # answered before, unknown after: nothing else
    assert all(code == 404 for code, after in answers if after)
    assert not client.is_model_ready("crowd-csrnet")
    client.load_model("crowd-csrnet")


def test_loading_a_served_model_again_swaps_it_without_a_failed_request(server: Gateway, repo: Path) -> None:
    # A reload re-reads the files and swaps each worker's session between two batches: no request sees a gap.
    client = httpclient.InferenceServerClient(url=server.url)
    if not client.is_model_ready("crowd-csrnet"):
        client.load_model("crowd-csrnet")
    image = make_inputs(read_contract(repo / "crowd-csrnet"), 1, seed=3, dims={"height": 64, "width": 64})["image"]
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(image.shape), "data": image.ravel().tolist()}]}
    stop = threading.Event()
    codes: list[int] = []  # every client's answers as they come (list.append is atomic)

    def steady() -> None:
        while not stop.is_set():
            codes.append(httpx.post(f"http://{server.url}/v2/models/crowd-csrnet/infer", json=body, timeout=60).status_code)

    def five_more_than(count: int) -> bool:
        """Whether 5 more requests than `count` are answered within 30 s (waited for, not a fixed sleep: a busy host
        answers fewer in a given time)."""
        deadline = time.monotonic() + 30
        while len(codes) < count + 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(codes) >= count + 5

    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(steady) for _ in range(4)]
        try:
            flowing = [five_more_than(0)]
            for _ in range(3):
                before = len(codes)
                client.load_model("crowd-csrnet")
                flowing.append(five_more_than(before))  # answered while and after it reloads
        finally:
            stop.set()
        for done in clients:
            done.result()
    assert flowing == [True] * 4 and set(codes) == {200}, (flowing, sorted(set(codes)))
    assert _states(server.url)["crowd-csrnet"]["state"] == "READY"


def test_a_loaded_model_stays_loaded_across_a_worker_restart(server: Gateway, repo: Path) -> None:
    client = httpclient.InferenceServerClient(url=server.url)
    client.load_model("face-pros")
    victim = httpx.get(f"http://{server.url}/v1/partitions").json()["partitions"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = httpx.get(f"http://{server.url}/v1/partitions").json()["partitions"][0]
        if state["ready"] and state["pid"] != victim["pid"]:
            break
        time.sleep(0.1)
    assert "face-pros" in state["models"] and state["restarts"] >= 1
    face = make_inputs(read_contract(repo / "face-pros"), 1, seed=2)

    def call(_: int) -> tuple[int, ...]:
        own = httpclient.InferenceServerClient(url=server.url)  # the HTTP client is not shared between threads
        return tuple(own.infer("face-pros", triton_inputs(face)).as_numpy("embedding").shape)

    with ThreadPoolExecutor(4) as pool:  # enough at once that both partitions answer
        assert set(pool.map(call, range(8))) == {(1, 48)}


def test_load_and_unload_over_grpc(server: Gateway, repo: Path) -> None:
    assert server.grpc_url is not None
    client = grpcclient.InferenceServerClient(url=server.grpc_url)
    client.load_model("lns-organs")
    assert client.is_model_ready("lns-organs")
    ct = make_inputs(read_contract(repo / "lns-organs"), 1, seed=0)
    assert client.infer("lns-organs", grpc_inputs(ct)).as_numpy("logits").shape[:2] == (1, 23)
    client.unload_model("lns-organs", unload_dependents=True)
    assert not client.is_model_ready("lns-organs")
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("no-such-model")
    assert caught.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT) and "no such model" in str(caught.value.message())


def _retrained(source: Path, target: Path, extra_weights: int) -> Path:
    """A new version of an exported model, as a re-export after training would be, without the minutes of an export:
    other values in its patch embedding (other answers) and `extra_weights` bytes of weights more (a larger model
    file), with its contract's sha256."""
    shutil.copytree(source, target)
    model = onnx.load(str(target / "1" / "model.onnx"))
    (patches,) = (t for t in model.graph.initializer if t.name == "patch_embed.proj.weight")
    patches.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(patches) * np.float32(1.5), patches.name))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(extra_weights // 4, np.float32), "unused_weights"))
    onnx.save(model, str(target / "1" / "model.onnx"))
    contract = read_contract(target)
    write_contract(target, contract.model_copy(update={"model_sha256": sha256_file(target / "1" / "model.onnx")}))
    return target


def test_a_reload_that_no_longer_fits_a_partition_drops_the_old_version_there(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """cpu-b has memory for face-pros as exported, not for a deeper version: after the reload only cpu-a runs the
    model, and every answer, whichever front-end process or partition would have taken it, is the new version's."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo.root / "face-pros", repo / "face-pros")
    small = (repo / "face-pros" / "1" / "model.onnx").stat().st_size
    room = footprint(load_model(repo / "face-pros")) + 4096
    topology = tmp_path / "topology.yaml"
    topology.write_text(
        f"partitions:\n  - {{id: cpu-a, kind: cpu, cores: [0]}}\n  - {{id: cpu-b, kind: cpu, cores: [1], memory_bytes: {room}}}\n"
    )
    deeper = _retrained(tiny_repo.root / "face-pros", tmp_path / "deeper" / "face-pros", extra_weights=small // 4)
    assert footprint(load_model(deeper)) > room
    flags = ("--topology", str(topology), "--frontends", "2", "--model-control-mode", "explicit", "--models", "face-pros")
    server = Gateway(repo, *flags, log=tmp_path / "serve.log")
    try:
        assert _placed(server.url) == [["face-pros"], ["face-pros"]]
        shutil.rmtree(repo / "face-pros")
        shutil.copytree(deeper, repo / "face-pros")
        with_http_client(server.url, lambda c: c.load_model("face-pros"))
        assert _placed(server.url) == [["face-pros"], []], "cpu-b no longer runs the model"
        sent = [make_inputs(read_contract(repo / "face-pros"), 1, seed=i) for i in range(32)]

        def call(arrays: dict[str, Array]) -> Array:
            own = httpclient.InferenceServerClient(url=server.url)  # a connection of its own: either front-end
            try:
                return np.asarray(own.infer("face-pros", triton_inputs(arrays)).as_numpy("embedding"))
            finally:
                own.close()

        with ThreadPoolExecutor(8) as pool:  # enough at once that both partitions would take batches
            answers = list(pool.map(call, sent))
        for arrays, answer in zip(sent, answers, strict=True):
            np.testing.assert_allclose(answer, direct(repo, "face-pros", arrays)[0], rtol=1e-4, atol=1e-5)
    finally:
        server.close()
    assert "partitions cpu-b ran the previous version" in (tmp_path / "serve.log").read_text()
