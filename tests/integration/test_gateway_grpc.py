"""The gateway's KServe v2 gRPC endpoint with the real tritonclient.grpc: every model, typed contents, errors."""

from __future__ import annotations

import queue
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench.held_grpc import HeldGrpcCall
from exporters.zoo import ZOO
from migserve.contract import read_contract
from migserve.types import Array
from service.api.grpc_service import UNSUPPORTED_RPCS
from service.errors import UNSUPPORTED
from tests.helpers import ExportedRepo, Gateway, ipv6_loopback
from tests.integration.test_gateway_behaviour import _metric, _metric_reaches
from tests.integration.test_gateway_protocol import TRITON_DTYPES, direct, grpc_inputs, make_inputs, triton_inputs


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[grpcclient.InferenceServerClient]:
    assert gateway.grpc_url is not None
    client = grpcclient.InferenceServerClient(url=gateway.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(gateway: Gateway) -> Iterator[Any]:
    """The generated stub itself, for requests tritonclient would not send (typed contents, broken raw sizes)."""
    assert gateway.grpc_url is not None
    with grpc.insecure_channel(gateway.grpc_url, options=[("grpc.max_send_message_length", -1)]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_health_and_metadata_match_http(client: grpcclient.InferenceServerClient, gateway: Gateway) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert not client.is_model_ready("no-such-model")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "migserve" and "binary_tensor_data" in meta["extensions"]
    for name in ("face-pros", "grounding-mgsl"):
        over_http = httpx.get(f"http://{gateway.url}/v2/models/{name}").json()
        over_grpc = client.get_model_metadata(name, as_json=True)
        for tensors in ("inputs", "outputs"):
            assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in over_grpc[tensors]] == [
                (t["name"], t["datatype"], t["shape"]) for t in over_http[tensors]
            ]
    with pytest.raises(InferenceServerException, match="unknown model 'no-such-model'") as caught:
        client.get_model_metadata("no-such-model")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("name", list(ZOO))
def test_every_model_round_trips_through_tritonclient_grpc(
    client: grpcclient.InferenceServerClient, tiny_repo: ExportedRepo, name: str
) -> None:
    contract = read_contract(tiny_repo.root / name)
    assert client.is_model_ready(name)
    arrays = make_inputs(contract, batch=2, seed=13)
    result = client.infer(name, grpc_inputs(arrays), request_id="r-1")
    assert result.get_response().id == "r-1"
    for spec, expected in zip(contract.outputs, direct(tiny_repo.root, name, arrays), strict=True):
        got = result.as_numpy(spec.name)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_a_subset_of_outputs(client: grpcclient.InferenceServerClient, tiny_repo: ExportedRepo) -> None:
    arrays = make_inputs(read_contract(tiny_repo.root / "face-pros"), batch=1, seed=3)
    result = client.infer("face-pros", grpc_inputs(arrays), outputs=[grpcclient.InferRequestedOutput("attributes")])
    assert [o.name for o in result.get_response().outputs] == ["attributes"]
    np.testing.assert_allclose(result.as_numpy("attributes"), direct(tiny_repo.root, "face-pros", arrays)[1], rtol=1e-5, atol=1e-6)


def test_classification_over_grpc_answers_as_over_http(
    client: grpcclient.InferenceServerClient, gateway: Gateway, tiny_repo: ExportedRepo
) -> None:
    """Triton's classification extension over gRPC: BYTES in raw_output_contents, the same as HTTP's answer (whose
    strings test_triton_partition.py checks against a real tritonserver's)."""
    arrays = make_inputs(read_contract(tiny_repo.root / "face-pros"), batch=2, seed=4)
    wanted = [grpcclient.InferRequestedOutput("expression", class_count=2), grpcclient.InferRequestedOutput("landmarks")]
    result = client.infer("face-pros", grpc_inputs(arrays), outputs=wanted)
    classes = result.as_numpy("expression")
    assert classes.shape == (2, 2) and result.get_output("expression").datatype == "BYTES"
    http = httpclient.InferenceServerClient(gateway.url)
    over_http = http.infer("face-pros", triton_inputs(arrays), outputs=[httpclient.InferRequestedOutput("expression", class_count=2)])
    http.close()
    assert classes.tolist() == over_http.as_numpy("expression").tolist()
    value, index, label = classes[0, 0].decode().split(":")
    assert 0 < float(value) < 1 and label == read_contract(tiny_repo.root / "face-pros").postprocessing.expression_labels[int(index)]  # type: ignore[union-attr]
    assert result.as_numpy("landmarks").shape == (2, 68, 2), "outputs not asked for as classes come back as values"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_messages_answer_as_plain_ones(
    client: grpcclient.InferenceServerClient, tiny_repo: ExportedRepo, algorithm: str
) -> None:
    """tritonclient's compression_algorithm: gRPC inflates the message itself, before the servicer sees it."""
    arrays = make_inputs(read_contract(tiny_repo.root / "crowd-csrnet"), batch=2, seed=12, dims={"height": 16, "width": 16})
    result = client.infer("crowd-csrnet", grpc_inputs(arrays), compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("density"), direct(tiny_repo.root, "crowd-csrnet", arrays)[0], rtol=1e-4, atol=1e-5)


def _request(model: str, arrays: dict[str, Array], raw: bool = True, id: str = "", change: Callable[[Any], object] | None = None) -> Any:
    """A ModelInferRequest built by hand: raw contents, or typed contents (fp32_contents, int64_contents);
    `change` then breaks it."""
    request = service_pb2.ModelInferRequest(model_name=model, id=id)
    for name, array in arrays.items():
        tensor = request.inputs.add(name=name, datatype=TRITON_DTYPES.get(array.dtype.name, "FP64"), shape=array.shape)
        if raw:
            request.raw_input_contents.append(array.tobytes())
        elif array.dtype == np.int64:
            tensor.contents.int64_contents.extend(array.ravel().tolist())
        else:
            tensor.contents.fp32_contents.extend(array.ravel().tolist())
    if change is not None:
        change(request)
    return request


def test_typed_contents_give_the_raw_answer(stub: Any, tiny_repo: ExportedRepo) -> None:
    arrays = make_inputs(read_contract(tiny_repo.root / "grounding-ssrn"), batch=1, seed=4)  # FP32 and INT64 inputs
    typed = stub.ModelInfer(_request("grounding-ssrn", arrays, raw=False, id="typed"), timeout=60)
    raw = stub.ModelInfer(_request("grounding-ssrn", arrays), timeout=60)
    assert typed.id == "typed" and typed.raw_output_contents == raw.raw_output_contents
    expected = direct(tiny_repo.root, "grounding-ssrn", arrays)
    for output, blob, want in zip(typed.outputs, typed.raw_output_contents, expected, strict=True):
        got = np.frombuffer(blob, dtype=np.float32).reshape(list(output.shape))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def _crowd(batch: int = 1, dtype: type = np.float32) -> dict[str, Array]:
    return {"image": np.zeros((batch, 3, 16, 16), dtype)}


GROUNDING: dict[str, Array] = {
    "video": np.zeros((1, 8, 1024), np.float32),
    "video_mask": np.ones((1, 8), np.float32),
    "words": np.full((1, 2), 5, np.int64),
    "word_mask": np.ones((1, 2), np.float32),
}


def _shape(request: Any) -> None:
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([1, 3, 16, 17])


BAD = [
    ("unknown model", _request("no-such-model", _crowd()), "NOT_FOUND", "unknown model 'no-such-model'"),
    ("wrong input name", _request("crowd-csrnet", {"img": _crowd()["image"]}), "INVALID_ARGUMENT", "missing ['image'], unknown ['img']"),
    ("wrong datatype", _request("crowd-csrnet", _crowd(dtype=np.float64)), "INVALID_ARGUMENT", "datatype 'FP64', the model expects FP32"),
    ("wrong rank", _request("crowd-csrnet", {"image": np.zeros((3, 16, 16), np.float32)}), "INVALID_ARGUMENT", "has rank 3"),
    ("batch above max", _request("crowd-csrnet", _crowd(batch=9)), "INVALID_ARGUMENT", "batch=9 is outside [1, 8]"),
    (
        "raw bytes short of the shape",
        _request("crowd-csrnet", _crowd(), change=_shape),
        "INVALID_ARGUMENT",
        "raw_input_contents[0] has 3072 bytes, but shape [1, 3, 16, 17] of FP32 needs 3264",
    ),
    (
        "typed values short of the shape",
        _request("crowd-csrnet", _crowd(), raw=False, change=_shape),
        "INVALID_ARGUMENT",
        "768 values for shape [1, 3, 16, 17] (816 expected)",
    ),
    (
        "typed values in another type's field",
        _request(
            "crowd-csrnet",
            {},
            change=lambda r: r.inputs.add(name="image", datatype="FP32", shape=[1, 3, 8, 8]).contents.int64_contents.extend([1] * 192),
        ),
        "INVALID_ARGUMENT",
        "input image: FP32 values go in contents.fp32_contents; the request filled contents.int64_contents",
    ),
    (
        "raw and typed contents both",
        _request("crowd-csrnet", _crowd(), change=lambda r: r.inputs[0].contents.fp32_contents.extend([1.0] * 768)),
        "INVALID_ARGUMENT",
        "input image: its values are given both in raw_input_contents and in contents: give them once",
    ),
    (
        "no data at all",
        _request("crowd-csrnet", {}, change=lambda r: r.inputs.add(name="image", datatype="FP32", shape=[1, 3, 8, 8])),
        "INVALID_ARGUMENT",
        "input image: no data: give raw_input_contents or contents.fp32_contents (192 values for shape [1, 3, 8, 8])",
    ),
    (
        "a raw part missing",
        _request("grounding-ssrn", GROUNDING, change=lambda r: r.raw_input_contents.pop()),
        "INVALID_ARGUMENT",
        "raw_input_contents has 3 entries for 4 inputs",
    ),
    (
        "token ids past the vocabulary",
        _request("grounding-ssrn", GROUNDING | {"words": np.array([[3, -1]], np.int64)}),
        "INVALID_ARGUMENT",
        "input words: 1 values outside [0, 745] (token ids into vocab.txt; 0 pads), the first -1 at index [0, 1]",
    ),
    (
        "unknown output",
        _request("crowd-csrnet", _crowd(), change=lambda r: r.outputs.add(name="heat")),
        "INVALID_ARGUMENT",
        "unknown outputs ['heat']",
    ),
    (
        "classification of a negative count",
        _request(
            "crowd-csrnet",
            _crowd(),
            change=lambda r: setattr(r.outputs.add(name="density").parameters["classification"], "int64_param", -1),
        ),
        "INVALID_ARGUMENT",
        "output density: 'classification' must be a non-negative integer",
    ),
    (
        "classification given as a string",
        _request(
            "crowd-csrnet",
            _crowd(),
            change=lambda r: setattr(r.outputs.add(name="density").parameters["classification"], "string_param", "3"),
        ),
        "INVALID_ARGUMENT",
        "not '3'",
    ),
    (
        "bad timeout",
        _request("crowd-csrnet", _crowd(), change=lambda r: setattr(r.parameters["timeout"], "int64_param", -5)),
        "INVALID_ARGUMENT",
        "parameters.timeout must be a positive",
    ),
]


@pytest.mark.parametrize(("case", "request_", "code", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_status_that_names_the_problem(
    stub: Any, tiny_repo: ExportedRepo, case: str, request_: Any, code: str, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_, timeout=60)
    assert caught.value.code().name == code
    assert message in caught.value.details()
    arrays = make_inputs(read_contract(tiny_repo.root / "crowd-csrnet"), batch=1, seed=1, dims={"height": 16, "width": 16})
    assert stub.ModelInfer(_request("crowd-csrnet", arrays), timeout=60).outputs[0].name == "density"  # still serving


def test_requests_are_counted_and_a_passed_deadline_answers_deadline_exceeded(stub: Any, gateway: Gateway) -> None:
    base = f"http://{gateway.url}/metrics"
    before = httpx.get(base).text
    stats_before = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="crowd-csrnet")).model_stats[0].inference_stats
    assert stub.ModelInfer(_request("crowd-csrnet", _crowd()), timeout=60).model_name == "crowd-csrnet"
    big = {"image": np.zeros((1, 3, 256, 256), np.float32)}  # about 10 ms of one core: the 1 µs deadline passes first
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_request("crowd-csrnet", big, change=lambda r: setattr(r.parameters["timeout"], "int64_param", 1)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "crowd-csrnet" in caught.value.details()
    after = httpx.get(base).text
    for status in ("200", "504"):
        counted = [_metric(text, "migserve_requests_total", model="crowd-csrnet", status=status) for text in (before, after)]
        assert counted[1] - counted[0] == 1, status
    stats_after = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="crowd-csrnet")).model_stats[0].inference_stats
    assert stats_after.success.count - stats_before.success.count == 1
    assert stats_after.fail.count - stats_before.fail.count == 1


def test_configuration_statistics_and_index_match_http(client: grpcclient.InferenceServerClient, stub: Any, gateway: Gateway) -> None:
    base = f"http://{gateway.url}"
    for name in ("face-pros", "grounding-mgsl"):
        over_http = json_format.ParseDict(httpx.get(f"{base}/v2/models/{name}/config").json(), model_config_pb2.ModelConfig())
        assert client.get_model_config(name).config == over_http
        assert [i.name for i in over_http.input] == [i["name"] for i in client.get_model_metadata(name, as_json=True)["inputs"]]
    over_http = json_format.ParseDict(httpx.get(f"{base}/v2/models/stats").json(), service_pb2.ModelStatisticsResponse())
    assert client.get_inference_statistics() == over_http
    assert sorted(s.name for s in over_http.model_stats) == sorted(ZOO)
    index = [json_format.MessageToDict(m) for m in stub.RepositoryIndex(service_pb2.RepositoryIndexRequest()).models]
    assert index == httpx.post(f"{base}/v2/repository/index").json()
    assert {m["state"] for m in index} == {"READY"}
    for call in (client.get_model_config, client.get_inference_statistics):
        with pytest.raises(InferenceServerException) as caught:
            call("no-such-model")
        assert caught.value.status() == "StatusCode.NOT_FOUND" and "unknown model 'no-such-model'" in str(caught.value.message())


def test_a_message_over_the_body_limit_is_refused(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    args = ("--cpu-slices", "1", "--models", "crowd-csrnet", "--max-body-mb", "1")
    server = Gateway(tiny_repo.root, *args, log=tmp_path / "serve.log", grpc=True)
    try:
        assert server.grpc_url is not None
        client = grpcclient.InferenceServerClient(url=server.grpc_url)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("crowd-csrnet", grpc_inputs({"image": np.zeros((1, 3, 300, 300), np.float32)}))  # 1.08 MB
        assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "larger than max" in str(caught.value.message())
        assert client.infer("crowd-csrnet", grpc_inputs(_crowd())).as_numpy("density").shape == (1, 1, 2, 2)
        client.close()
    finally:
        server.close()


def test_a_stream_answers_every_request_and_reports_a_bad_one(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    """tritonclient.grpc's bidirectional stream: twelve requests in flight at once, one of them broken."""
    assert gateway.grpc_url is not None
    contract = read_contract(tiny_repo.root / "face-pros")
    sent = {f"r{i}": make_inputs(contract, batch=1, seed=i) for i in range(12)}
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url=gateway.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for request_id, arrays in sent.items():
            client.async_stream_infer("face-pros", grpc_inputs(arrays), request_id=request_id)
        wrong = grpcclient.InferInput("image", [1, 3, 224, 224], "FP64")
        wrong.set_data_from_numpy(np.zeros((1, 3, 224, 224)))
        client.async_stream_infer("face-pros", [wrong], request_id="bad")
        got = [answers.get(timeout=60) for _ in range(len(sent) + 1)]
    finally:
        client.stop_stream()
        client.close()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "datatype 'FP64', the model expects FP32" in errors[0].message()
    results = {result.get_response().id: result for result, error in got if error is None}
    assert sorted(results) == sorted(sent)
    for request_id, arrays in sent.items():
        expected = direct(tiny_repo.root, "face-pros", arrays)[0]
        np.testing.assert_allclose(
            results[request_id].as_numpy("embedding"), expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max())
        )


@pytest.mark.parametrize("frontends", [(), ("--frontends", "2")], ids=["one-process", "frontends"])
def test_answers_a_client_does_not_take_are_held_within_the_pending_budget(
    frontends: tuple[str, ...], tiny_repo: ExportedRepo, tmp_path: Path
) -> None:
    """gRPC holds a unary answer (the message, its serialized bytes, its own copy) until the client's HTTP/2 window
    lets it out, and a stream's answers wait in the servicer while one is written; --max-pending-mb saw none of it,
    so clients that read no answers grew the gateway by three times each answer (17.5 MB for an lns-organs batch's
    5.75 MB of logits, bench/grpc_unsent.py). Now an answer is counted
    until gRPC is done with it: with --max-pending-mb 3, a client that is alive but takes none of its answer leaves no
    room for another request (UNAVAILABLE naming the unsent answers); once it takes the answer whole (the same logits
    as onnxruntime's), the count goes back to 0 and the request is served; the same for a stream of two. A client
    that stops answering pings (a frozen process) is disconnected within about --send-timeout-s, and the count given back;
    so is what calls cut short by their deadlines held."""
    args = ("--cpu-slices", "1", "--models", "lns-organs", "--max-body-mb", "1", "--max-pending-mb", "3", "--send-timeout-s", "4")
    server = Gateway(tiny_repo.root, *args, *frontends, log=tmp_path / "serve.log", grpc=True)
    assert server.grpc_url is not None
    base, held = f"http://{server.url}", "migserve_request_body_bytes"
    arrays = make_inputs(read_contract(tiny_repo.root / "lns-organs"), batch=4, seed=3)  # 5.75 MB of logits
    expected = direct(tiny_repo.root, "lns-organs", arrays)[0]
    infer, stream = "/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ModelStreamInfer"
    client = grpcclient.InferenceServerClient(url=server.grpc_url)
    calls: list[HeldGrpcCall] = []
    try:
        calls.append(call := HeldGrpcCall(server.grpc_url, infer, [_request("lns-organs", arrays).SerializeToString()]))
        assert _metric_reaches(base, held, lambda value: value > 3 << 20) > 3 << 20
        with pytest.raises(InferenceServerException) as refused:
            client.infer("lns-organs", grpc_inputs(arrays))
        assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value
        assert "large batches' copies, unsent answers); " in str(refused.value) and "--max-pending-mb 3" in str(refused.value)
        [message] = call.take(timeout=60)
        assert call.headers[b"grpc-status"] == b"0", call.headers
        answer = service_pb2.ModelInferResponse.FromString(message)
        np.testing.assert_allclose(
            np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(expected.shape), expected, rtol=1e-5, atol=1e-5
        )
        assert _metric_reaches(base, held, lambda value: value == 0) == 0
        assert client.infer("lns-organs", grpc_inputs(arrays)).as_numpy("logits").shape == expected.shape

        requests = [_request("lns-organs", arrays, id=f"r{i}").SerializeToString() for i in range(2)]
        calls.append(call := HeldGrpcCall(server.grpc_url, stream, requests))
        assert _metric_reaches(base, held, lambda value: value > 3 << 20) > 3 << 20
        answers = [service_pb2.ModelStreamInferResponse.FromString(m) for m in call.take(timeout=60)]
        assert sorted(a.infer_response.id for a in answers) == ["r0", "r1"] and not any(a.error_message for a in answers)
        assert _metric_reaches(base, held, lambda value: value == 0) == 0

        calls.append(frozen := HeldGrpcCall(server.grpc_url, infer, [_request("lns-organs", arrays).SerializeToString()]))
        assert _metric_reaches(base, held, lambda value: value > 3 << 20) > 3 << 20
        time.sleep(1)  # the server's pings and settings since the request are answered: nothing left pending
        frozen.freeze()
        assert _metric_reaches(base, held, lambda value: value == 0, timeout=30) == 0
        assert frozen.read_to_end(timeout=10) < expected.nbytes  # what was sent before the connection closed
        assert client.infer("lns-organs", grpc_inputs(arrays)).as_numpy("logits").shape == expected.shape

        def status(deadline: float) -> str:
            try:
                client.infer("lns-organs", grpc_inputs(arrays), client_timeout=deadline)
            except InferenceServerException as exc:
                return str(exc.status())
            return "OK"

        # calls whose deadlines pass at every stage (queued, running, half sent) give back all they held
        with ThreadPoolExecutor(8) as pool:
            outcomes = set(pool.map(status, [0.002, 0.01, 0.05, 0.2, 5.0] * 6))
        assert "StatusCode.DEADLINE_EXCEEDED" in outcomes and outcomes <= {"OK", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.UNAVAILABLE"}
        assert _metric_reaches(base, held, lambda value: value == 0) == 0
    finally:
        for held_call in calls:
            held_call.close()
        client.close()
        server.close()


@pytest.mark.parametrize("frontends", [(), ("--frontends", "2")], ids=["one-process", "frontends"])
def test_a_client_that_answers_pings_but_takes_none_of_its_answer_is_disconnected_and_a_slow_reader_is_not(
    frontends: tuple[str, ...], tiny_repo: ExportedRepo, tmp_path: Path
) -> None:
    """gRPC tells the servicer nothing of a write's progress, so a client that kept answering pings but never opened
    its HTTP/2 window kept its answers (and their share of --max-pending-mb) for as long as it stayed connected. Now a
    connection whose client takes none of its answers for --send-timeout-s is closed (its socket's acknowledged bytes
    say what it took, service/api/grpc_stalls.py): with --send-timeout-s 1, of two clients that send an lns-organs
    batch at once, one that answers pings and keeps its window shut is disconnected with less than the answer, while
    one that takes it at 64 KB/s keeps its connection for 3.5 s (3.5 times the timeout) and then gets the whole
    answer, the same logits as onnxruntime's; the count goes back to 0."""
    args = ("--cpu-slices", "1", "--models", "lns-organs", "--max-body-mb", "1", "--max-pending-mb", "256", "--send-timeout-s", "1")
    log = tmp_path / "serve.log"
    server = Gateway(tiny_repo.root, *args, *frontends, log=log, grpc=True)
    assert server.grpc_url is not None
    base, held = f"http://{server.url}", "migserve_request_body_bytes"
    arrays = make_inputs(read_contract(tiny_repo.root / "lns-organs"), batch=4, seed=5)  # 5.75 MB of logits
    expected = direct(tiny_repo.root, "lns-organs", arrays)[0]
    message = [_request("lns-organs", arrays).SerializeToString()]
    calls: list[HeldGrpcCall] = []
    try:
        for _ in range(2):
            calls.append(HeldGrpcCall(server.grpc_url, "/inference.GRPCInferenceService/ModelInfer", message))
        stalled, slow = calls
        assert _metric_reaches(base, held, lambda value: value > 2 * expected.nbytes * 2) > 2 * expected.nbytes * 2  # both made
        slow.trickle(64 << 10, seconds=3.5)
        assert stalled.ended.is_set() and b"grpc-status" not in stalled.headers, stalled.headers
        assert len(stalled.received) < expected.nbytes
        assert not slow.ended.is_set() and 2 << 16 < len(slow.received) < expected.nbytes, len(slow.received)
        [answer] = slow.take(timeout=60)
        assert slow.headers[b"grpc-status"] == b"0", slow.headers
        logits = np.frombuffer(service_pb2.ModelInferResponse.FromString(answer).raw_output_contents[0], np.float32)
        np.testing.assert_allclose(logits.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)
        assert _metric_reaches(base, held, lambda value: value == 0) == 0
        metrics = httpx.get(f"{base}/metrics").text
        assert _metric(metrics, "migserve_clients_disconnected_total", protocol="grpc", reason="send_timeout") == 1
        assert _metric(metrics, "migserve_clients_disconnected_total", protocol="http") == 0
        text = log.read_text()
        assert "closing a gRPC connection whose client took none of its answers for 1 s (--send-timeout-s)" in text
        assert "ExecuteBatchError" not in text  # gRPC's error for the call it was writing is not logged as the servicer's
    finally:
        for call in calls:
            call.close()
        server.close()


def test_a_stream_whose_client_takes_no_answers_stops_being_read(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """A stream's requests were all read and run, whether or not its client took the answers, and the answers queued
    in the gateway without end (bench/grpc_flood.py: 11,367 of 100,000 requests answered in 7 s, the gateway 45 MB
    larger and growing). Now a stream has at most STREAM_WINDOW requests running and answers waiting: past that its
    requests are not read and gRPC's flow control holds the client. A client that sends 5,000 requests and takes
    nothing has fewer than that answered, and no more a second later; once it takes them, every request is answered.
    (Answers within gRPC's and the sockets' buffers count as taken: about a thousand tiny ones, which a busy host can
    take more than 2 s to reach, so the count is read each second until it holds.)"""
    server = Gateway(tiny_repo.root, "--cpu-slices", "1", "--models", "crowd-csrnet", log=tmp_path / "serve.log", grpc=True)
    assert server.grpc_url is not None
    base, answered = f"http://{server.url}", "migserve_requests_total"
    request = _request("crowd-csrnet", {"image": np.ones((1, 3, 16, 16), np.float32)}).SerializeToString()
    call = HeldGrpcCall(server.grpc_url, "/inference.GRPCInferenceService/ModelStreamInfer", [request] * 5000)
    try:
        counts, deadline = [-1.0], time.monotonic() + 30
        while time.monotonic() < deadline and (counts[-1] <= 0 or counts[-1] != counts[-2]):
            time.sleep(1)
            counts.append(_metric(httpx.get(f"{base}/metrics").text, answered, model="crowd-csrnet"))
        assert 0 < counts[-1] == counts[-2] < 5000, counts
        answers = [service_pb2.ModelStreamInferResponse.FromString(m) for m in call.take(timeout=60)]
        assert len(answers) == 5000 and not any(a.error_message for a in answers)
    finally:
        call.close()
        server.close()


def _live(target: str) -> grpc.StatusCode:
    """ServerLive over a channel of its own (a connection of its own: not the process's shared subchannel), left open."""
    channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    _channels.append(channel)
    try:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(service_pb2.ServerLiveRequest(), timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


_channels: list[grpc.Channel] = []


def test_grpc_connections_past_the_limit_are_closed_and_a_silent_one_at_the_head_timeout(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """gRPC connections hold open files as HTTP ones do: each process takes --max-connections of them (besides as
    many over HTTP); one more is closed at once and its call fails UNAVAILABLE (a gRPC client connects again later).
    A connection that sends nothing is closed at --head-timeout-s (gRPC's handshake timeout, 120 s before)."""
    args = ("--cpu-slices", "1", "--models", "crowd-csrnet", "--max-connections", "2", "--head-timeout-s", "2")
    server = Gateway(tiny_repo.root, *args, log=tmp_path / "serve.log", grpc=True)
    assert server.grpc_url is not None
    try:
        assert [_live(server.grpc_url) for _ in range(3)] == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE]
        assert httpx.get(f"http://{server.url}/v2/health/ready").status_code == 200  # HTTP's own connections
        _channels.pop(0).close()
        time.sleep(0.5)
        assert _live(server.grpc_url) == grpc.StatusCode.OK
        while _channels:
            _channels.pop().close()
        time.sleep(0.5)
        host, port = server.grpc_url.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as silent:
            started = time.monotonic()
            while silent.recv(4096):  # the server's SETTINGS, then the end
                pass
            assert 1.5 < time.monotonic() - started < 8
    finally:
        while _channels:
            _channels.pop().close()
        server.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="the host has no IPv6 loopback address")
@pytest.mark.parametrize("frontends", [(), ("--frontends", "2")], ids=["one-process", "frontends"])
def test_a_gateway_on_every_address_answers_ipv4_and_ipv6_clients_over_http_and_grpc(
    frontends: tuple[str, ...], tiny_repo: ExportedRepo, tmp_path: Path
) -> None:
    """`--host ::` (every address, as a dual-stack cluster's pod needs) failed to start with a gRPC port (gRPC takes an
    IPv6 address in brackets), and HTTP took IPv6 clients alone (asyncio's listener on "::" is IPv6-only). Now both
    protocols answer clients of either family; the helper itself waits for readiness over 127.0.0.1."""
    log = tmp_path / "serve.log"
    server = Gateway(tiny_repo.root, "--cpu-slices", "1", "--models", "crowd-csrnet", "--host", "::", *frontends, log=log, grpc=True)
    assert server.grpc_url is not None
    arrays = {"image": np.ones((1, 3, 64, 64), np.float32)}
    expected = direct(tiny_repo.root, "crowd-csrnet", arrays)[0]
    try:
        for host in ("127.0.0.1", "[::1]"):
            with httpclient.InferenceServerClient(f"{host}:{server.port}") as http:
                np.testing.assert_allclose(http.infer("crowd-csrnet", triton_inputs(arrays)).as_numpy("density"), expected, rtol=1e-5)
            with grpcclient.InferenceServerClient(f"{host}:{server.grpc_url.rsplit(':', 1)[1]}") as client:
                np.testing.assert_allclose(client.infer("crowd-csrnet", grpc_inputs(arrays)).as_numpy("density"), expected, rtol=1e-5)
        text = log.read_text()
        assert f"KServe v2 HTTP on http://[::]:{server.port}" in text and "KServe v2 gRPC on [::]:" in text
    finally:
        server.close()


def test_rpcs_of_extensions_not_offered_say_what_to_use_instead(stub: Any) -> None:
    for rpc, extension in UNSUPPORTED_RPCS.items():
        request = getattr(service_pb2, rpc + "Request")()
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, rpc)(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED and caught.value.details() == UNSUPPORTED[extension], rpc


def test_log_settings_read_over_grpc_and_a_setting_without_a_value_is_refused(stub: Any) -> None:
    settings = stub.LogSettings(service_pb2.LogSettingsRequest(), timeout=10).settings
    assert settings["log_format"].string_param == "default" and settings["log_error"].bool_param
    empty = service_pb2.LogSettingsRequest(settings={"log_info": service_pb2.LogSettingsRequest.SettingValue()})
    with pytest.raises(grpc.RpcError) as caught:
        stub.LogSettings(empty, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "log_info must be true or false, not None" in caught.value.details()


def test_version_1_is_served_and_other_versions_are_not_found_over_grpc(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_model_ready("crowd-csrnet", "1") and not client.is_model_ready("crowd-csrnet", "2")
    arrays = {"image": np.zeros((1, 3, 64, 64), np.float32)}
    assert client.infer("crowd-csrnet", grpc_inputs(arrays), model_version="1").as_numpy("density").shape == (1, 1, 8, 8)
    calls: list[Callable[[], object]] = [
        lambda: client.infer("crowd-csrnet", grpc_inputs(arrays), model_version="2"),
        lambda: client.get_model_metadata("crowd-csrnet", "2"),
        lambda: client.get_model_config("crowd-csrnet", "2"),
        lambda: client.get_inference_statistics("crowd-csrnet", "2"),
    ]
    for call in calls:
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "StatusCode.NOT_FOUND" and "has no version '2'" in str(caught.value.message())
