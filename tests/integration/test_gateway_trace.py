"""Triton's trace extension (service/trace.py): settings over HTTP and gRPC with tritonclient, and the trace files."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from migserve.contract import read_contract
from tests.helpers import ExportedRepo, Gateway, read_response, with_http_client
from tests.integration.test_frontends import _binary_request
from tests.integration.test_gateway_protocol import make_inputs, triton_inputs

MODEL = "crowd-csrnet"
ORDER = ["REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END", "REQUEST_END"]
SENT = ["HTTP_SEND_START", "HTTP_SEND_END"]
DEFAULTS = {"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1", "log_frequency": "0", "trace_mode": "triton"}


def _infer(client: httpclient.InferenceServerClient, arrays: dict[str, Any], times: int) -> None:
    for _ in range(times):
        client.infer(MODEL, triton_inputs(arrays))


def _traces(path: Path) -> list[dict[str, Any]]:
    traces = json.loads(path.read_text())
    assert isinstance(traces, list)
    return traces


def test_sampled_requests_are_traced_to_files_as_the_settings_say(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """Every request traced globally, every 2nd of one model by its own settings, 5 traces at most, 2 per file, over
    HTTP and gRPC; what is held when the gateway stops goes to the next file."""
    trace_file = tmp_path / "traces" / "trace.json"
    trace_file.parent.mkdir()
    gateway = Gateway(
        tiny_repo.root, "--models", MODEL, "face-pros", "--trace-file", str(trace_file), log=tmp_path / "serve.log", grpc=True
    )
    arrays = make_inputs(read_contract(tiny_repo.root / MODEL), 1, seed=2, dims={"height": 16, "width": 16})
    try:
        client = httpclient.InferenceServerClient(gateway.url)
        assert "trace" in client.get_server_metadata()["extensions"]
        assert client.get_trace_settings() == {**DEFAULTS, "trace_file": str(trace_file)}
        _infer(client, arrays, 3)
        assert not list(trace_file.parent.iterdir()), "tracing is off until asked for"
        settings = {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "5", "log_frequency": "2"}
        assert client.update_trace_settings(settings=settings) == {**DEFAULTS, **settings, "trace_file": str(trace_file)}
        own = client.update_trace_settings(model_name=MODEL, settings={"trace_rate": "2"})
        assert own["trace_rate"] == "2" and own["trace_count"] == "5", "the rest comes from the global settings"
        _infer(client, arrays, 6)  # the 2nd, 4th and 6th are traced
        assert client.get_trace_settings(model_name=MODEL)["trace_count"] == "2", "the model counts down its own traces"
        assert client.get_trace_settings()["trace_count"] == "5"
        assert client.get_trace_settings(model_name="face-pros")["trace_rate"] == "1"
        first = _traces(trace_file.with_name("trace.json.0"))
        assert [t["id"] for t in first] == [1, 2] and {t["model_name"] for t in first} == {MODEL}
        for trace in first:
            assert [s["name"] for s in trace["timestamps"]] == ["HTTP_RECV_START", "HTTP_RECV_END", *ORDER, *SENT]
            times = [s["ns"] for s in trace["timestamps"]]
            assert times == sorted(times) and 0 < times[-1] - times[0] < 30e9, times

        grpc = grpcclient.InferenceServerClient(gateway.grpc_url or "")
        cleared = grpc.update_trace_settings(model_name=MODEL, settings={"trace_rate": None}, as_json=True)["settings"]
        assert cleared["trace_rate"]["value"] == ["1"] and cleared["trace_count"]["value"] == ["2"]
        grpc_inputs = grpcclient.InferInput("image", list(arrays["image"].shape), "FP32")
        grpc_inputs.set_data_from_numpy(arrays["image"])
        grpc.infer(MODEL, [grpc_inputs])  # traced over gRPC too: the 4th, which fills the second file
        grpc.close()
        third, fourth = _traces(trace_file.with_name("trace.json.1"))
        assert (third["id"], fourth["id"]) == (3, 4)
        assert [s["name"] for s in fourth["timestamps"]] == ORDER, "over gRPC: no HTTP stamps"
        _infer(client, arrays, 3)  # the 5th trace is the model's last (trace_count 0 after it)
        assert client.get_trace_settings(model_name=MODEL)["trace_count"] == "0"
        assert not trace_file.with_name("trace.json.2").exists(), "one trace held, a file takes two"
    finally:
        gateway.close()
    assert [t["id"] for t in _traces(trace_file.with_name("trace.json.2"))] == [5], "what was held is written as the gateway stops"
    assert sorted(p.name for p in trace_file.parent.iterdir()) == ["trace.json.0", "trace.json.1", "trace.json.2"]


@pytest.mark.parametrize(
    ("settings", "status", "message"),
    [
        ({"trace_rate": "x"}, 400, "trace_rate must be an integer (as a string) of at least 1, not 'x'"),
        ({"trace_rate": "0"}, 400, "of at least 1, not 0"),
        ({"trace_count": "-2"}, 400, "trace_count must be an integer (as a string) of at least -1"),
        ({"trace_level": "TIMESTAMPS"}, 400, "trace_level must be a list of levels"),
        ({"trace_level": ["TENSORS"]}, 400, "the gateway traces OFF or TIMESTAMPS (no TENSORS)"),
        ({"trace_mode": "opentelemetry"}, 400, "trace_mode 'opentelemetry' is not supported"),
        ({"trace_rat": "1"}, 400, "unknown trace setting 'trace_rat'"),
        ({"trace_rat": None}, 400, "unknown trace setting 'trace_rat'"),  # cleared: was a 500
        ({"trace_file": "/tmp/elsewhere.json"}, 501, "trace file location can not be updated through network protocol"),
        ({"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}, 400, "tracing needs a file: start the gateway with --trace-file PATH"),
    ],
)
def test_bad_trace_settings_are_refused_and_change_nothing(gateway: Gateway, settings: dict[str, Any], status: int, message: str) -> None:
    """The module gateway has no --trace-file: asking it to trace is refused too."""
    response = httpx.post(f"http://{gateway.url}/v2/trace/setting", json=settings, timeout=10)
    assert response.status_code == status and message in response.json()["error"], response.text
    assert httpx.get(f"http://{gateway.url}/v2/trace/setting", timeout=10).json() == {**DEFAULTS, "trace_file": ""}
    unknown = httpx.get(f"http://{gateway.url}/v2/models/no-such-model/trace/setting", timeout=10)
    assert unknown.status_code == 404 and "unknown model 'no-such-model'" in unknown.json()["error"]


def test_requests_through_uvicorn_are_traced_with_their_http_stamps_too(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """--http-server uvicorn: inference goes through the ASGI fast path (service/api/fastpath.py), which stamps too."""
    trace_file = tmp_path / "trace.json"
    flags = ("--http-server", "uvicorn", "--models", MODEL, "--trace-file", str(trace_file))
    gateway = Gateway(tiny_repo.root, *flags, log=tmp_path / "serve.log")
    try:
        client = httpclient.InferenceServerClient(gateway.url)
        client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
        _infer(client, make_inputs(read_contract(tiny_repo.root / MODEL), 1, seed=3, dims={"height": 16, "width": 16}), 2)
    finally:
        gateway.close()
    traces = _traces(trace_file)  # log_frequency 0: the file itself, written as the gateway stops
    assert [t["id"] for t in traces] == [1, 2]
    for trace in traces:
        assert [s["name"] for s in trace["timestamps"]] == ["HTTP_RECV_START", "HTTP_RECV_END", *ORDER, *SENT]
        times = [s["ns"] for s in trace["timestamps"]]
        assert times == sorted(times)


def test_every_front_end_process_traces_and_the_first_writes_it_all(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """--frontends 2: requests on fresh connections land in both processes (SO_REUSEPORT); each process traces its
    own, the first numbers and writes them all, and trace_count holds across the two."""
    trace_file = tmp_path / "trace.json"
    gateway = Gateway(tiny_repo.root, "--frontends", "2", "--models", MODEL, "--trace-file", str(trace_file), log=tmp_path / "serve.log")
    arrays = make_inputs(read_contract(tiny_repo.root / MODEL), 1, seed=4, dims={"height": 16, "width": 16})
    try:
        settings = {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "log_frequency": "10"}
        with_http_client(gateway.url, lambda c: c.update_trace_settings(settings=settings))
        for _ in range(30):
            client = httpclient.InferenceServerClient(gateway.url)  # a new connection each time
            _infer(client, arrays, 1)
            client.close()
        served = httpx.get(f"http://{gateway.url}/v1/partitions", timeout=10).json()["frontends"][0]["requests"]
        assert 0 < served < 30, f"the second front-end served {served} of 30: the test needs both to serve some"
        deadline = time.monotonic() + 10
        while not trace_file.with_name("trace.json.2").exists() and time.monotonic() < deadline:
            time.sleep(0.2)  # the first process takes the front-end's traces every second
        traces = [t for k in range(3) for t in _traces(trace_file.with_name(f"trace.json.{k}"))]
        assert sorted(t["id"] for t in traces) == list(range(1, 31))
        for trace in traces:
            assert trace["model_name"] == MODEL
            assert [s["name"] for s in trace["timestamps"]] == ["HTTP_RECV_START", "HTTP_RECV_END", *ORDER, *SENT]
        counted = with_http_client(gateway.url, lambda c: c.update_trace_settings(settings={"trace_count": "4"}))
        assert counted["trace_count"] == "4"
        for _ in range(20):
            client = httpclient.InferenceServerClient(gateway.url)
            _infer(client, arrays, 1)
            client.close()
    finally:
        gateway.close()
    last = _traces(trace_file.with_name("trace.json.3"))  # held (fewer than 10) until the gateway stopped
    assert sorted(t["id"] for t in last) == [31, 32, 33, 34], "four traces in all, from both processes"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("trace")) == [f"trace.json.{k}" for k in range(4)]


def test_a_request_a_front_end_answers_as_the_gateway_stops_is_traced(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """A front-end holding half a request when the gateway is told to stop answers it once the rest comes, after the
    first process's last sync of traces: its trace comes with the front-end's last words and is written too."""
    trace_file = tmp_path / "trace.json"
    gateway = Gateway(tiny_repo.root, "--frontends", "2", "--models", MODEL, "--trace-file", str(trace_file), log=tmp_path / "serve.log")
    request = _binary_request(make_inputs(read_contract(tiny_repo.root / MODEL), 1, seed=5, dims={"height": 16, "width": 16}))
    sent = 0
    try:
        with httpclient.InferenceServerClient(gateway.url) as client:
            client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
        for _ in range(40):  # a connection the second front-end took: it answers the request sent on it
            before = httpx.get(f"http://{gateway.url}/v1/partitions", timeout=10).json()["frontends"][0]["requests"]
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
            reader = sock.makefile("rb")
            sock.sendall(request)
            sent += 1
            assert read_response(reader)[0] == 200
            if httpx.get(f"http://{gateway.url}/v1/partitions", timeout=10).json()["frontends"][0]["requests"] > before:
                break
            reader.close()
            sock.close()
        else:
            pytest.fail("40 connections in a row went to the first process")
        with sock, reader:
            sock.sendall(request[:-100])
            time.sleep(0.5)  # the front-end has the head and most of the body
            gateway.process.send_signal(signal.SIGTERM)
            time.sleep(3)  # the first process has taken the front-ends' traces one last time, and waits for them
            assert gateway.process.poll() is None, "the gateway waits for the front-end's request"
            sock.sendall(request[-100:])
            sent += 1
            assert read_response(reader)[0] == 200
        assert gateway.process.wait(timeout=20) in (0, -signal.SIGTERM), "a stop, not a kill"
    finally:
        gateway.close()
    traces = _traces(trace_file)
    assert len(traces) == sent, f"{sent} requests answered, {len(traces)} traced"
    assert sorted(t["id"] for t in traces) == list(range(1, sent + 1))
