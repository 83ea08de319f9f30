"""The gateway over real HTTP with the real tritonclient: every model, JSON and binary tensors."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from exporters.zoo import ZOO
from migserve.contract import Contract, read_contract
from migserve.types import Array
from service.api.routes import UNSUPPORTED_ROUTES
from service.errors import UNSUPPORTED
from tests.helpers import ExportedRepo, Gateway

TRITON_DTYPES = {"float32": "FP32", "int64": "INT64"}


def make_inputs(contract: Contract, batch: int, seed: int, dims: dict[str, int] | None = None) -> dict[str, Array]:
    """Valid inputs at the contract's default dims (or `dims`), seeded."""
    rng = np.random.default_rng(seed)
    sizes = {name: r.default for name, r in contract.dims.items()} | (dims or {}) | {"batch": batch}
    arrays: dict[str, Array] = {}
    for spec in contract.inputs:
        shape = tuple(d if isinstance(d, int) else sizes[d] for d in spec.shape)
        if spec.dtype == "int64":
            arrays[spec.name] = rng.integers(2, 700, shape, dtype=np.int64)
        elif "mask" in spec.name:
            arrays[spec.name] = np.ones(shape, np.float32)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return arrays


def triton_inputs(arrays: dict[str, Array], binary: bool = True) -> list[httpclient.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = httpclient.InferInput(name, list(array.shape), TRITON_DTYPES[array.dtype.name])
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def grpc_inputs(arrays: dict[str, Array]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), TRITON_DTYPES[array.dtype.name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def direct(repo: Path, name: str, arrays: dict[str, Array]) -> list[Array]:
    session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return list(session.run(None, arrays))


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=gateway.url, network_timeout=60)


def test_health_and_server_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "migserve" and "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("name", list(ZOO))
def test_every_model_round_trips_through_tritonclient(client: httpclient.InferenceServerClient, tiny_repo: ExportedRepo, name: str) -> None:
    contract = read_contract(tiny_repo.root / name)
    assert client.is_model_ready(name)
    meta = client.get_model_metadata(name)
    assert [i["name"] for i in meta["inputs"]] == [s.name for s in contract.inputs]
    arrays = make_inputs(contract, batch=2, seed=11)
    outputs = [httpclient.InferRequestedOutput(s.name, binary_data=True) for s in contract.outputs]
    result = client.infer(name, triton_inputs(arrays), outputs=outputs)
    for spec, expected in zip(contract.outputs, direct(tiny_repo.root, name, arrays), strict=True):
        got = result.as_numpy(spec.name)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_json_tensors_and_a_subset_of_outputs(client: httpclient.InferenceServerClient, tiny_repo: ExportedRepo) -> None:
    contract = read_contract(tiny_repo.root / "face-pros")
    arrays = make_inputs(contract, batch=1, seed=3)
    wanted = [httpclient.InferRequestedOutput("attributes", binary_data=False)]
    result = client.infer("face-pros", triton_inputs(arrays, binary=False), outputs=wanted)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["attributes"]
    expected = direct(tiny_repo.root, "face-pros", arrays)[1]
    np.testing.assert_allclose(result.as_numpy("attributes"), expected, rtol=1e-5, atol=1e-6)
    assert ((expected >= 0) & (expected <= 1)).all()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_answers_read_as_plain_ones(
    client: httpclient.InferenceServerClient, gateway: Gateway, tiny_repo: ExportedRepo, algorithm: str
) -> None:
    """tritonclient's request_compression_algorithm and response_compression_algorithm, binary or JSON tensors."""
    arrays = make_inputs(read_contract(tiny_repo.root / "face-pros"), batch=2, seed=6)
    expected = direct(tiny_repo.root, "face-pros", arrays)[0]
    for binary in (True, False):
        outputs = [httpclient.InferRequestedOutput("embedding", binary_data=binary)]
        result = client.infer(
            "face-pros",
            triton_inputs(arrays, binary=binary),
            outputs=outputs,
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_allclose(result.as_numpy("embedding"), expected, rtol=1e-5, atol=1e-5)
    body = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": [0.5] * 150528}]})
    url = f"http://{gateway.url}/v2/models/face-pros/infer"
    answer = httpx.post(url, content=body, headers={"Accept-Encoding": f"br, {algorithm};q=0.5"}, timeout=30)
    assert answer.headers["content-encoding"] == algorithm
    assert int(answer.headers["content-length"]) < len(answer.content) and answer.json()["outputs"][0]["shape"] == [1, 48]
    refused = httpx.post(url, content=body, headers={"Accept-Encoding": f"{algorithm};q=0, identity"}, timeout=30)
    assert "content-encoding" not in refused.headers and refused.status_code == 200
    binary_out = json.dumps({**json.loads(body), "parameters": {"binary_data_output": True}})
    floats = httpx.post(url, content=binary_out, headers={"Accept-Encoding": algorithm}, timeout=30)
    assert "content-encoding" not in floats.headers, "binary tensor data goes as it is"
    assert int(floats.headers["inference-header-content-length"]) < len(floats.content)


def test_json_outputs_are_exact_and_a_nan_is_null(
    client: httpclient.InferenceServerClient, gateway: Gateway, tiny_repo: ExportedRepo
) -> None:
    arrays = make_inputs(read_contract(tiny_repo.root / "crowd-csrnet"), batch=1, seed=7, dims={"height": 16, "width": 16})
    binary = client.infer("crowd-csrnet", triton_inputs(arrays)).as_numpy("density")
    wanted = [httpclient.InferRequestedOutput("density", binary_data=False)]
    as_json = client.infer("crowd-csrnet", triton_inputs(arrays, binary=False), outputs=wanted).as_numpy("density")
    assert as_json.dtype == np.float32 and np.array_equal(as_json, binary)  # each float32 written in a form that reads back exact
    image = arrays["image"].copy()
    image[0, :, :8, :8] = np.nan  # Python's json.dumps writes NaN, which is not JSON: read all the same
    body = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(image.shape), "data": image.ravel().tolist()}]})
    assert "NaN" in body
    response = httpx.post(f"http://{gateway.url}/v2/models/crowd-csrnet/infer", content=body.encode())
    assert response.status_code == 200, response.text
    data = response.json()["outputs"][0]["data"]
    assert None in data and all(v is None or isinstance(v, float) for v in data)  # JSON has no NaN: null


def test_dynamic_sizes_pass_through(client: httpclient.InferenceServerClient, tiny_repo: ExportedRepo) -> None:
    contract = read_contract(tiny_repo.root / "crowd-csrnet")
    arrays = make_inputs(contract, batch=1, seed=5, dims={"height": 100, "width": 148})
    result = client.infer("crowd-csrnet", triton_inputs(arrays))
    assert result.as_numpy("density").shape == (1, 1, 12, 18)


def test_unknown_paths_and_triton_extensions_not_offered_answer_in_the_error_form(
    client: httpclient.InferenceServerClient, gateway: Gateway
) -> None:
    """No such path: 404; a wrong method: 405 with Allow; Triton's CUDA shared memory endpoints: 501 saying what to
    use instead; model load and unload outside explicit mode: 400 saying how to start the gateway. Each body
    is {"error": ...}, as every other error."""
    base = f"http://{gateway.url}"
    missing = httpx.get(f"{base}/v2/no-such-thing")
    assert missing.status_code == 404 and missing.json() == {"error": "no endpoint GET /v2/no-such-thing; the API is listed at /docs"}
    wrong = httpx.delete(f"{base}/v2/models/face-pros")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET" and "method not allowed" in wrong.json()["error"]
    for extension, routes in UNSUPPORTED_ROUTES.items():
        for method, path in routes:
            response = httpx.request(method, base + path.replace("{name}", "face-pros"))
            assert response.status_code == 501 and response.json() == {"error": UNSUPPORTED[extension]}, (method, path)
    with pytest.raises(InferenceServerException) as caught:
        client.get_cuda_shared_memory_status()
    assert caught.value.status() == "501" and "use system shared memory" in str(caught.value.message())
    for control in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as caught:
            control("face-pros")
        assert caught.value.status() == "400" and "start it with --model-control-mode explicit" in str(caught.value.message())
    assert client.is_model_ready("face-pros")


def test_version_1_is_served_and_other_versions_are_not_found(client: httpclient.InferenceServerClient, gateway: Gateway) -> None:
    """Every model has one version, 1; asking for another used to be answered by version 1."""
    base = f"http://{gateway.url}/v2/models/crowd-csrnet"
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        triton_inputs({"image": np.zeros((1, 3, 64, 64), np.float32)})
    )
    headers = {"Inference-Header-Content-Length": str(header_length)}
    for version, status in (("1", 200), ("2", 404)):
        for method, path in [("GET", ""), ("GET", "/ready"), ("GET", "/config"), ("GET", "/stats"), ("POST", "/infer")]:
            response = httpx.request(
                method, f"{base}/versions/{version}{path}", content=body if method == "POST" else None, headers=headers
            )
            assert response.status_code == status, (version, path, response.text)
            if status == 404:
                assert response.json() == {"error": "model crowd-csrnet has no version '2'; it serves version 1"}
    assert client.is_model_ready("crowd-csrnet", "1") and not client.is_model_ready("crowd-csrnet", "2")
