"""serve --frontends: several processes take inference requests on one port and share the workers.

Connections are spread by the kernel (SO_REUSEPORT), so each test opens many: with two processes the
chance that 16 connections all land on one of them is 2 in 65,536. The module's gateway runs two batches at once
in each worker (--worker-threads 2, a GPU's default is 4) and keeps two in flight from each process
(--batches-in-flight 2), so that every test here also covers both."""

from __future__ import annotations

import gzip
import json
import os
import queue
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from migserve.contract import read_contract
from migserve.types import Array
from tests.helpers import ExportedRepo, Gateway, migserve, read_response, shm_key, with_http_client
from tests.integration.test_gateway_protocol import direct, grpc_inputs, make_inputs, triton_inputs

CONNECTIONS = 16
MODEL = "crowd-csrnet"


@pytest.fixture(scope="module")
def frontends(tiny_repo: ExportedRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    log = tmp_path_factory.mktemp("frontends") / "serve.log"
    server = Gateway(
        tiny_repo.root,
        "--cpu-slices",
        "1,1",
        "--frontends",
        "2",
        "--worker-threads",
        "2",
        "--batches-in-flight",
        "2",
        "--models",
        MODEL,
        "face-pros",
        log=log,
        grpc=True,
    )
    yield server
    server.close()


def _get(gateway: Gateway, path: str) -> Any:
    with urllib.request.urlopen(f"http://{gateway.url}{path}", timeout=10) as response:
        return json.load(response)


def _metric(gateway: Gateway, line_start: str) -> float:
    with urllib.request.urlopen(f"http://{gateway.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def _binary_request(arrays: dict[str, Array], model: str = MODEL, output: str = "density") -> bytes:
    header = json.dumps(
        {
            "inputs": [
                {"name": k, "datatype": "FP32", "shape": list(v.shape), "parameters": {"binary_data_size": v.nbytes}}
                for k, v in arrays.items()
            ],
            "outputs": [{"name": output, "parameters": {"binary_data": True}}],
        }
    ).encode()
    body = header + b"".join(v.tobytes() for v in arrays.values())
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\n\r\n"
    )
    return head.encode() + body


def _density(payload: bytes, headers: dict[str, str], shape: tuple[int, ...]) -> Array:
    start = int(headers["inference-header-content-length"])
    return np.frombuffer(payload[start:], dtype=np.float32).reshape(shape)


def _front_end_counts(gateway: Gateway) -> list[dict[str, Any]]:
    return list(_get(gateway, "/v1/partitions")["frontends"])


def test_inference_spreads_over_the_front_ends_and_the_counts_add_up(frontends: Gateway, tiny_repo: ExportedRepo) -> None:
    contract = read_contract(tiny_repo.root / MODEL)
    before = _metric(frontends, f'migserve_requests_total{{model="{MODEL}",status="200"}}')
    before_front = sum(f["requests"] for f in _front_end_counts(frontends))
    for i in range(CONNECTIONS):
        arrays = make_inputs(contract, 1, seed=i, dims={"height": 16, "width": 16})
        expected = direct(tiny_repo.root, MODEL, arrays)[0]
        with socket.create_connection(("127.0.0.1", frontends.port), timeout=30) as sock, sock.makefile("rb") as reader:
            for _ in range(3):
                sock.sendall(_binary_request(arrays))
                status, headers, payload = read_response(reader)
                assert status == 200, payload
                np.testing.assert_allclose(_density(payload, headers, expected.shape), expected, rtol=1e-4, atol=1e-5)
    answered = _metric(frontends, f'migserve_requests_total{{model="{MODEL}",status="200"}}') - before
    assert answered == 3 * CONNECTIONS, "/metrics counts every process's requests"
    [other] = _front_end_counts(frontends)
    by_other = other["requests"] - before_front
    assert 0 < by_other < 3 * CONNECTIONS, f"both processes took connections: the second answered {by_other} of {3 * CONNECTIONS}"
    stats = _get(frontends, f"/v2/models/{MODEL}/stats")["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] >= 3 * CONNECTIONS, "the statistics extension adds the front-ends' counts"
    assert _metric(frontends, "migserve_partition_ready{") == 2, "partition gauges are the first process's alone, not summed"


def test_a_connection_that_asks_anything_else_is_handed_to_the_first_process(frontends: Gateway, tiny_repo: ExportedRepo) -> None:
    """Health and metadata requests, pipelined behind an inference request in one write, on every connection."""
    contract = read_contract(tiny_repo.root / MODEL)
    arrays = make_inputs(contract, 1, seed=7, dims={"height": 16, "width": 16})
    expected = direct(tiny_repo.root, MODEL, arrays)[0]
    handed_before = sum(f["handed_over"] for f in _front_end_counts(frontends))
    for _ in range(CONNECTIONS):
        with socket.create_connection(("127.0.0.1", frontends.port), timeout=30) as sock, sock.makefile("rb") as reader:
            sock.sendall(_binary_request(arrays) + f"GET /v2/models/{MODEL} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + _binary_request(arrays))
            status, headers, payload = read_response(reader)
            assert status == 200
            np.testing.assert_allclose(_density(payload, headers, expected.shape), expected, rtol=1e-4, atol=1e-5)
            status, _, payload = read_response(reader)
            assert status == 200 and json.loads(payload)["name"] == MODEL
            status, headers, payload = read_response(reader)
            assert status == 200
            np.testing.assert_allclose(_density(payload, headers, expected.shape), expected, rtol=1e-4, atol=1e-5)
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(reader)[0] == 200
    handed = sum(f["handed_over"] for f in _front_end_counts(frontends)) - handed_before
    assert handed > 0, "some connections reached the second process and were handed over"


def test_a_compressed_body_is_answered_whichever_process_takes_it(frontends: Gateway, tiny_repo: ExportedRepo) -> None:
    """A gzip body may name a shared memory region only the first process knows: front-ends hand it over unread."""
    arrays = make_inputs(read_contract(tiny_repo.root / MODEL), 1, seed=8, dims={"height": 16, "width": 16})
    expected = direct(tiny_repo.root, MODEL, arrays)[0]
    plain = _binary_request(arrays)
    head, _, body = plain.partition(b"\r\n\r\n")
    packed = gzip.compress(body)
    head = head.replace(f"Content-Length: {len(body)}".encode(), f"Content-Length: {len(packed)}\r\nContent-Encoding: gzip".encode())
    handed_before = sum(f["handed_over"] for f in _front_end_counts(frontends))
    for _ in range(CONNECTIONS):
        with socket.create_connection(("127.0.0.1", frontends.port), timeout=30) as sock, sock.makefile("rb") as reader:
            sock.sendall(head + b"\r\n\r\n" + packed)
            status, headers, payload = read_response(reader)
            assert status == 200, payload
            np.testing.assert_allclose(_density(payload, headers, expected.shape), expected, rtol=1e-4, atol=1e-5)
    assert sum(f["handed_over"] for f in _front_end_counts(frontends)) > handed_before, "the second process handed some over"


def test_shared_memory_regions_serve_whichever_process_takes_the_connection(frontends: Gateway, tiny_repo: ExportedRepo) -> None:
    """A region is registered with the first process; an inference request naming it on a connection the second
    process took is handed over, request and all."""
    image = make_inputs(read_contract(tiny_repo.root / "face-pros"), 1, seed=3)["image"]
    expected = direct(tiny_repo.root, "face-pros", {"image": image})
    handle = shm.create_shared_memory_region("fe-in", shm_key("frontends"), image.nbytes)
    try:
        shm.set_shared_memory_region(handle, [image])
        with_http_client(frontends.url, lambda c: c.register_system_shared_memory("fe-in", shm_key("frontends"), image.nbytes))
        for _ in range(CONNECTIONS):
            client = httpclient.InferenceServerClient(frontends.url)  # a connection of its own
            tensor = httpclient.InferInput("image", list(image.shape), "FP32")
            tensor.set_shared_memory("fe-in", image.nbytes)
            result = client.infer("face-pros", [tensor], outputs=[httpclient.InferRequestedOutput("embedding")])
            np.testing.assert_allclose(result.as_numpy("embedding"), expected[0], rtol=1e-4, atol=1e-5)
            client.close()
    finally:
        with_http_client(frontends.url, lambda c: c.unregister_system_shared_memory())
        shm.destroy_shared_memory_region(handle)


def test_grpc_spreads_over_the_front_ends_and_the_rest_is_answered_by_the_first(frontends: Gateway, tiny_repo: ExportedRepo) -> None:
    """gRPC on the shared port: each process runs inference itself; metadata, errors, statistics and a region
    registered once answer the same whichever process took the connection (a front-end passes them on)."""
    assert frontends.grpc_url is not None
    contract = read_contract(tiny_repo.root / MODEL)
    image = make_inputs(read_contract(tiny_repo.root / "face-pros"), 1, seed=4)["image"]
    in_region = direct(tiny_repo.root, "face-pros", {"image": image})[0]
    handle = shm.create_shared_memory_region("fe-grpc", shm_key("frontends_grpc"), image.nbytes)
    before_front = sum(f["requests"] for f in _front_end_counts(frontends))
    before = _metric(frontends, f'migserve_requests_total{{model="{MODEL}",status="200"}}')
    try:
        shm.set_shared_memory_region(handle, [image])
        registrar = grpcclient.InferenceServerClient(frontends.grpc_url)
        registrar.register_system_shared_memory("fe-grpc", shm_key("frontends_grpc"), image.nbytes)
        registrar.close()
        for i in range(CONNECTIONS):
            client = grpcclient.InferenceServerClient(frontends.grpc_url)  # a connection of its own
            arrays = make_inputs(contract, 1, seed=200 + i, dims={"height": 16, "width": 16})
            result = client.infer(MODEL, grpc_inputs(arrays))
            np.testing.assert_allclose(result.as_numpy("density"), direct(tiny_repo.root, MODEL, arrays)[0], rtol=1e-4, atol=1e-5)
            assert client.is_server_ready() and client.get_model_metadata(MODEL).name == MODEL
            assert "fe-grpc" in client.get_system_shared_memory_status().regions
            with pytest.raises(InferenceServerException) as caught:
                client.get_model_metadata("no-such-model")
            assert caught.value.status() == "StatusCode.NOT_FOUND" and "no-such-model" in str(caught.value.message())
            tensor = grpcclient.InferInput("image", list(image.shape), "FP32")
            tensor.set_shared_memory("fe-grpc", image.nbytes)
            answer = client.infer("face-pros", [tensor], outputs=[grpcclient.InferRequestedOutput("embedding")])
            np.testing.assert_allclose(answer.as_numpy("embedding"), in_region, rtol=1e-4, atol=1e-5)
            client.close()
        statistics = grpcclient.InferenceServerClient(frontends.grpc_url).get_inference_statistics(MODEL, as_json=True)
    finally:
        grpcclient.InferenceServerClient(frontends.grpc_url).unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)
    answered = _metric(frontends, f'migserve_requests_total{{model="{MODEL}",status="200"}}') - before
    assert answered == CONNECTIONS, "/metrics counts the gRPC requests of every process"
    by_other = sum(f["requests"] for f in _front_end_counts(frontends)) - before_front
    assert 0 < by_other < CONNECTIONS, f"both processes ran gRPC inference: the second answered {by_other} of {CONNECTIONS}"
    assert int(statistics["model_stats"][0]["inference_stats"]["success"]["count"]) >= CONNECTIONS, "statistics over gRPC add them up"


def test_a_grpc_stream_on_a_front_end_runs_its_requests_and_passes_on_those_naming_a_region(
    frontends: Gateway, tiny_repo: ExportedRepo
) -> None:
    """One stream per connection, on 16 connections: plain requests, one naming a region, one broken."""
    assert frontends.grpc_url is not None
    contract = read_contract(tiny_repo.root / "face-pros")
    image = make_inputs(contract, 1, seed=9)["image"]
    handle = shm.create_shared_memory_region("fe-stream", shm_key("frontends_stream"), image.nbytes)
    try:
        shm.set_shared_memory_region(handle, [image])
        grpcclient.InferenceServerClient(frontends.grpc_url).register_system_shared_memory(
            "fe-stream", shm_key("frontends_stream"), image.nbytes
        )
        for _ in range(CONNECTIONS):
            answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
            client = grpcclient.InferenceServerClient(frontends.grpc_url)
            client.start_stream(callback=lambda result, error, answers=answers: answers.put((result, error)))
            try:
                sent = {f"r{i}": make_inputs(contract, 1, seed=300 + i) for i in range(3)}
                for request_id, arrays in sent.items():
                    client.async_stream_infer("face-pros", grpc_inputs(arrays), request_id=request_id)
                tensor = grpcclient.InferInput("image", list(image.shape), "FP32")
                tensor.set_shared_memory("fe-stream", image.nbytes)
                client.async_stream_infer("face-pros", [tensor], request_id="region")
                wrong = grpcclient.InferInput("image", [1, 3, 7, 7], "FP32")
                wrong.set_data_from_numpy(np.zeros((1, 3, 7, 7), np.float32))
                client.async_stream_infer("face-pros", [wrong], request_id="bad")
                got = [answers.get(timeout=60) for _ in range(len(sent) + 2)]
            finally:
                client.stop_stream()
                client.close()
            errors = [error for _, error in got if error is not None]
            assert len(errors) == 1 and "image" in errors[0].message(), errors
            results = {result.get_response().id: result.as_numpy("embedding") for result, error in got if error is None}
            for request_id, arrays in [*sent.items(), ("region", {"image": image})]:
                np.testing.assert_allclose(results[request_id], direct(tiny_repo.root, "face-pros", arrays)[0], rtol=1e-4, atol=1e-5)
    finally:
        grpcclient.InferenceServerClient(frontends.grpc_url).unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)


def test_log_settings_reach_every_front_end(frontends: Gateway) -> None:
    """Triton's logging extension: a change to the log level applies in every process, not only the first."""
    client = httpclient.InferenceServerClient(frontends.url)
    try:
        assert [f["log_level"] for f in _front_end_counts(frontends)] == ["INFO"]
        assert client.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
        assert [f["log_level"] for f in _front_end_counts(frontends)] == ["DEBUG"]
        client.update_log_settings({"log_verbose_level": 0, "log_info": False})
        assert [f["log_level"] for f in _front_end_counts(frontends)] == ["WARNING"]
    finally:
        client.update_log_settings({"log_verbose_level": 0, "log_info": True})
    assert [f["log_level"] for f in _front_end_counts(frontends)] == ["INFO"]


def _wait(condition: Any, what: str, timeout: float = 60) -> None:
    """Until `condition()`; a connection reset counts as not yet: connections the kernel had queued for a
    front-end that was just killed are reset (SO_REUSEPORT), and clients retry them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def _all_answer(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    contract = read_contract(tiny_repo.root / MODEL)
    for i in range(CONNECTIONS):
        arrays = make_inputs(contract, 1, seed=100 + i, dims={"height": 16, "width": 16})
        client = httpclient.InferenceServerClient(gateway.url, network_timeout=60)
        result = client.infer(MODEL, triton_inputs(arrays))
        np.testing.assert_allclose(result.as_numpy("density"), direct(tiny_repo.root, MODEL, arrays)[0], rtol=1e-4, atol=1e-5)
        client.close()


def test_killed_workers_come_back_for_every_front_end(frontends: Gateway, tiny_repo: ExportedRepo) -> None:
    """Both workers killed: the first process restarts them, and the second connects to them again (with no
    worker it could not answer at all)."""
    partitions = _get(frontends, "/v1/partitions")["partitions"]
    for partition in partitions:
        os.kill(partition["pid"], signal.SIGKILL)
    restarts = {p["id"]: p["restarts"] for p in partitions}
    _wait(
        lambda: all(p["ready"] and p["restarts"] > restarts[p["id"]] for p in _get(frontends, "/v1/partitions")["partitions"]),
        "both workers restarted",
    )
    _all_answer(frontends, tiny_repo)
    assert "attached to worker cpu-0" in frontends.log.read_text().split("died")[-1], "the second process connected again"


def test_grpc_calls_in_flight_when_the_workers_die_are_all_answered(frontends: Gateway, tiny_repo: ExportedRepo) -> None:
    """8 gRPC clients call in a loop, each on its own connection (so on either process), while both workers are
    killed: every call ends, answered right or UNAVAILABLE, none hangs, and once the workers are back all answer."""
    assert frontends.grpc_url is not None
    url = frontends.grpc_url
    contract = read_contract(tiny_repo.root / MODEL)
    arrays = make_inputs(contract, 1, seed=11, dims={"height": 16, "width": 16})
    expected = direct(tiny_repo.root, MODEL, arrays)[0]
    stop = time.monotonic() + 6
    partitions = _get(frontends, "/v1/partitions")["partitions"]

    def calls() -> list[str]:
        client, outcomes = grpcclient.InferenceServerClient(url), []
        try:
            while time.monotonic() < stop:
                started = time.monotonic()
                try:
                    result = client.infer(MODEL, grpc_inputs(arrays), client_timeout=30)
                    np.testing.assert_allclose(result.as_numpy("density"), expected, rtol=1e-4, atol=1e-5)
                    outcomes.append("ok")
                except InferenceServerException as exc:
                    outcomes.append(str(exc.status()))
                assert time.monotonic() - started < 30
        finally:
            client.close()
        return outcomes

    with ThreadPoolExecutor(8) as pool:
        running = [pool.submit(calls) for _ in range(8)]
        time.sleep(1.5)
        for partition in partitions:
            os.kill(partition["pid"], signal.SIGKILL)
        outcomes = [outcome for future in running for outcome in future.result()]
    assert set(outcomes) <= {"ok", "StatusCode.UNAVAILABLE"}, sorted(set(outcomes))
    assert outcomes.count("ok") > 8
    _wait(lambda: all(p["ready"] for p in _get(frontends, "/v1/partitions")["partitions"]), "both workers restarted")
    client = grpcclient.InferenceServerClient(url)
    for _ in range(4):
        np.testing.assert_allclose(client.infer(MODEL, grpc_inputs(arrays)).as_numpy("density"), expected, rtol=1e-4, atol=1e-5)
    client.close()


def test_a_killed_front_end_is_started_again_and_a_stop_ends_every_process(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    gateway = Gateway(tiny_repo.root, "--cpu-slices", "1,1", "--frontends", "3", "--models", MODEL, log=tmp_path / "serve.log")
    try:
        before = _front_end_counts(gateway)
        assert [f["index"] for f in before] == [1, 2]
        victim = before[0]
        os.kill(victim["pid"], signal.SIGKILL)
        _wait(lambda: any(f["index"] == 1 and f["pid"] != victim["pid"] for f in _front_end_counts(gateway)), "front-end 1 restarted")
        assert not list(Path("/dev/shm").glob(f"migserve-arena-{victim['pid']}-*")), "the dead front-end's batch arena was removed"
        after = {f["index"]: f for f in _front_end_counts(gateway)}
        assert after[1]["restarts"] == 1 and after[2]["pid"] == before[1]["pid"]
        _all_answer(gateway, tiny_repo)
        pids = [f["pid"] for f in after.values()] + [p["pid"] for p in _get(gateway, "/v1/partitions")["partitions"]]
    finally:
        gateway.close()
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log.split("Shutting down")[-1], log[-3000:]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _announce(gateway: Gateway, length: int, count: int) -> tuple[list[socket.socket], int]:
    """`count` new connections each send a request head announcing a body of `length` bytes, and 10 bytes of it:
    the connections whose bodies the gateway holds (no answer yet), and how many it refused (503) at once."""
    opened = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        head = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
        sock.sendall(head.encode() + b"{" * 10)
        opened.append(sock)
        time.sleep(0.05)  # one head at a time: two processes taking at the same instant may both pass (budget.py)
    time.sleep(0.5)  # a refusal is sent as the head is read
    held, refused = [], 0
    for sock in opened:
        sock.setblocking(False)
        try:
            answer = sock.recv(65536)
        except BlockingIOError:
            sock.setblocking(True)
            held.append(sock)
            continue
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        refused += 1
        sock.close()
    return held, refused


def test_max_pending_mb_bounds_the_bodies_of_every_process_together(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """1 MiB of bodies in all: three unfinished bodies of 300,000 bytes, whichever process took each; a front-end that
    dies holding some gives them back."""
    flags = ("--cpu-slices", "1,1", "--frontends", "2", "--models", MODEL, "--max-body-mb", "1", "--max-pending-mb", "1")
    gateway = Gateway(tiny_repo.root, *flags, log=tmp_path / "serve.log")
    held: list[socket.socket] = []
    try:
        for _ in range(10):  # until the second process holds some (the kernel spreads connections at random)
            held, refused = _announce(gateway, 300_000, CONNECTIONS)
            assert (len(held), refused) == (3, CONNECTIONS - 3), "the processes share one budget"
            [victim] = _front_end_counts(gateway)
            if victim["bodies_held"]:
                break
            for sock in held:
                sock.close()
        assert victim["bodies_held"] >= 300_000
        assert _metric(gateway, "migserve_request_body_bytes ") == 900_000, "the gauge adds every process's bodies"
        os.kill(victim["pid"], signal.SIGKILL)
        _wait(lambda: any(f["pid"] != victim["pid"] for f in _front_end_counts(gateway)), "front-end 1 restarted")
        for sock in held:
            sock.close()
        _wait(lambda: _metric(gateway, "migserve_request_body_bytes ") == 0, "the first process gave back its bodies")
        for _ in range(4):  # the whole budget is free: the dead process's bodies no longer count
            almost_all, refused = _announce(gateway, 1_000_000, 1)
            assert (len(almost_all), refused) == (1, 0)
            almost_all[0].close()  # its body is held until the process that took it sees the hang-up
            _wait(lambda: _metric(gateway, "migserve_request_body_bytes ") == 0, "the hung-up body given back")
    finally:
        for sock in held:
            sock.close()
        gateway.close()


def test_queue_capacity_bounds_the_requests_of_every_process_together(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """--queue-capacity 4 over two front-ends, the one worker stopped: each process has one batch of one request in
    flight and the two queue 4 requests together, so at most 6 of 16 connections wait and the others get 503 at once
    (with a queue of 4 per process, up to 10 would wait). Once the worker runs again every waiting request is answered."""
    flags = ("--cpu-slices", "1", "--frontends", "2", "--models", MODEL, "--queue-capacity", "4", "--max-batch-size", "1")
    gateway = Gateway(tiny_repo.root, *flags, log=tmp_path / "serve.log")
    contract = read_contract(tiny_repo.root / MODEL)
    arrays = make_inputs(contract, 1, seed=5, dims={"height": 16, "width": 16})
    expected = direct(tiny_repo.root, MODEL, arrays)[0]
    [worker] = _get(gateway, "/v1/partitions")["partitions"]
    opened: list[tuple[socket.socket, Any]] = []
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        for _ in range(CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
            sock.sendall(_binary_request(arrays))
            opened.append((sock, sock.makefile("rb")))
            time.sleep(0.05)  # one at a time: two processes admitting at the same instant may both pass (service/shared.py)
        time.sleep(0.5)  # a refusal is sent as the request is read
        waiting, refused = [], []
        for sock, reader in opened:
            sock.setblocking(False)
            try:
                sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                waiting.append((sock, reader))
                continue
            sock.setblocking(True)
            refused.append(read_response(reader))
        assert 5 <= len(waiting) <= 6, f"{len(waiting)} requests wait: the queues of both processes hold 4 in all"
        for status, headers, payload in refused:
            assert status == 503 and headers["retry-after"] == "1", payload
            assert "queue full (4 requests across the front-end processes)" in json.loads(payload)["error"]
        assert _metric(gateway, f'migserve_queue_depth{{model="{MODEL}"}}') == 4
        os.kill(worker["pid"], signal.SIGCONT)
        for sock, reader in waiting:
            sock.setblocking(True)
            status, headers, payload = read_response(reader)
            assert status == 200, payload
            np.testing.assert_allclose(_density(payload, headers, expected.shape), expected, rtol=1e-4, atol=1e-5)
        _wait(lambda: _metric(gateway, f'migserve_queue_depth{{model="{MODEL}"}}') == 0, "the queues emptied")
    finally:
        os.kill(worker["pid"], signal.SIGCONT)
        for sock, reader in opened:
            reader.close()
            sock.close()
        gateway.close()


def test_front_ends_need_the_gateway_s_own_http_server(tiny_repo: ExportedRepo) -> None:
    run = migserve("serve", "--model-repo", tiny_repo.root, "--port", "0", "--frontends", "2", "--http-server", "uvicorn", timeout=60)
    assert run.returncode == 2
    assert "needs --http-server migserve" in run.stderr


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_front_ends_refuse_a_port_another_server_shares_out(tiny_repo: ExportedRepo, flag: str) -> None:
    """Another server listening with SO_REUSEPORT (Triton's gRPC does) would let the front-ends bind beside it and
    take half its connections: the port counts as taken."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        ports = {"--port": str(taken), "--grpc-port": str(taken)} if flag == "--port" else {"--port": "0", "--grpc-port": str(taken)}
        args = [item for pair in ports.items() for item in pair]
        run = migserve("serve", "--model-repo", tiny_repo.root, *args, "--frontends", "2", timeout=60)
    assert run.returncode == 2
    assert f"{flag} {taken}: cannot listen on 127.0.0.1:{taken}" in run.stderr, run.stderr


def _face_answers(gateway: Gateway, image: Array) -> list[tuple[int, bytes]]:
    """face-pros over 16 new connections: each one's status and embedding bytes."""
    found = []
    for _ in range(CONNECTIONS):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock, sock.makefile("rb") as reader:
            sock.sendall(_binary_request({"image": image}, "face-pros", "embedding"))
            status, headers, payload = read_response(reader)
            start = int(headers.get("inference-header-content-length", len(payload)))
            found.append((status, payload[start:]))
    return found


def test_explicit_model_control_reaches_every_front_end(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """A model loaded, unloaded and loaded again answers the same on every connection, whichever process took it."""
    flags = ("--cpu-slices", "1,1", "--frontends", "2", "--model-control-mode", "explicit", "--models", MODEL)
    gateway = Gateway(tiny_repo.root, *flags, log=tmp_path / "serve.log")
    try:
        client = httpclient.InferenceServerClient(gateway.url)
        image = make_inputs(read_contract(tiny_repo.root / "face-pros"), 1, seed=5)["image"]
        expected = direct(tiny_repo.root, "face-pros", {"image": image})[0]
        assert {status for status, _ in _face_answers(gateway, image)} == {404}
        client.load_model("face-pros")
        answers = _face_answers(gateway, image)
        assert {status for status, _ in answers} == {200}
        for _, payload in answers:
            np.testing.assert_allclose(np.frombuffer(payload, np.float32).reshape(expected.shape), expected, rtol=1e-4, atol=1e-5)
        assert _front_end_counts(gateway)[0]["requests"] > 0, "the second process served the loaded model"
        client.unload_model("face-pros")
        assert {status for status, _ in _face_answers(gateway, image)} == {404}
        assert _front_end_counts(gateway)[0]["requests"] == 0, "its statistics went with the model"
        client.load_model("face-pros")
        assert {status for status, _ in _face_answers(gateway, image)} == {200}
        assert _front_end_counts(gateway)[0]["requests"] > 0, "and came back with it"
        assert client.is_model_ready(MODEL), "the model served from the start was left alone"
    finally:
        gateway.close()


def test_requests_whose_http_cannot_be_parsed_are_counted_and_logged_once_a_minute(frontends: Gateway) -> None:
    """uvicorn logs a WARNING for each (its own handling of a head the gateway cannot read): a scanner would fill
    the operator's log. Counted in /metrics over every process; each process logs the first of each minute."""
    before = _metric(frontends, "migserve_http_invalid_requests_total")
    logged = frontends.log.read_text().count("Invalid HTTP request received.")
    host, port = frontends.url.split(":")
    for _ in range(12):  # new connections: the kernel spreads them over both processes
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
            status, _, answer = read_response(sock.makefile("rb"))
            assert status == 400, answer
    _wait(lambda: _metric(frontends, "migserve_http_invalid_requests_total") - before == 12, "all twelve counted")
    assert frontends.log.read_text().count("Invalid HTTP request received.") - logged <= 2, "at most one line per process"
