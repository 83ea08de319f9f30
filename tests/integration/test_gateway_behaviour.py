"""The gateway under load and abuse: batching, a killed worker, overload, deadlines, bad input."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from migserve.contract import Contract, read_contract
from migserve.types import Array
from tests.helpers import PARENT, ExportedRepo, Gateway, processes_where, read_response, running, small_dev_shm, thread_affinities
from tests.integration.test_gateway_protocol import grpc_inputs, make_inputs, triton_inputs


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _crowd_body(repo: Path, seed: int = 0) -> bytes:
    arrays = make_inputs(read_contract(repo / "crowd-csrnet"), batch=1, seed=seed, dims={"height": 64, "width": 64})
    image = arrays["image"]
    return json.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(image.shape), "data": image.ravel().tolist()}]}
    ).encode()


def test_batches_above_one_form_under_concurrency(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    # crowd-csrnet at 256x256 takes ~11 ms on one core: 32 clients keep both workers busy, so a queue builds.
    contract = read_contract(tiny_repo.root / "crowd-csrnet")
    client = httpclient.InferenceServerClient(url=gateway.url, concurrency=32, network_timeout=60)
    before = httpx.get(f"http://{gateway.url}/metrics").text
    requests = [client.async_infer("crowd-csrnet", triton_inputs(make_inputs(contract, 1, seed=i))) for i in range(96)]
    results = [r.get_result() for r in requests]
    assert all(r.as_numpy("density").shape == (1, 1, 32, 32) for r in results)
    after = httpx.get(f"http://{gateway.url}/metrics").text

    def delta(metric: str) -> float:
        return _metric(after, metric, model="crowd-csrnet") - _metric(before, metric, model="crowd-csrnet")

    assert delta("migserve_batch_size_sum") == 96
    assert delta("migserve_batch_size_count") < 96, "no batch above 1 formed"
    client.close()
    # each partition's compute time, as its worker measured it, within the batches' round trips and most of them
    for partition in ("cpu-0", "cpu-1"):
        computed = _metric(after, "migserve_partition_compute_seconds_total", partition=partition) - _metric(
            before, "migserve_partition_compute_seconds_total", partition=partition
        )
        trips = _metric(after, "migserve_batch_seconds_sum", partition=partition) - _metric(
            before, "migserve_batch_seconds_sum", partition=partition
        )
        assert 0.5 * trips < computed <= trips, (partition, computed, trips)


@pytest.mark.parametrize(("extra", "preferred"), [((), 4), (("--preferred-batch-sizes", "2,8"), 2)], ids=["contract", "override"])
def test_a_preferred_batch_size_goes_without_waiting_for_the_delay(
    extra: tuple[str, ...], preferred: int, tiny_repo: ExportedRepo, tmp_path: Path
) -> None:
    """Under load (one worker busy), requests for the free worker are held until they reach the smallest
    preferred batch size (crowd-csrnet's contract: 4 of at most 8), not until a full batch or the delay (60 s)."""
    args = ("--cpu-slices", "1,1", "--models", "crowd-csrnet", "--max-queue-delay-ms", "60000", *extra)
    server = Gateway(tiny_repo.root, *args, log=tmp_path / "serve.log")
    base = f"http://{server.url}"
    workers = httpx.get(f"{base}/v1/partitions").json()["partitions"]
    for worker in workers:
        os.kill(worker["pid"], signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(preferred + 1) as pool:
            first = pool.submit(_post_crowd, server, tiny_repo.root, 0)  # an idle service sends it at once
            deadline = time.monotonic() + 10
            while not (busy := [w for w in workers if _outstanding(base, w["id"])]) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(busy) == 1, "the first request never reached a worker"
            held_since = time.monotonic()  # its batch was sent before this
            (free,) = [w for w in workers if w is not busy[0]]
            os.kill(free["pid"], signal.SIGCONT)
            held = [pool.submit(_post_crowd, server, tiny_repo.root, seed) for seed in range(1, preferred)]
            deadline = time.monotonic() + 10  # until they are queued (a busy host takes longer), then a while more
            while _metric(httpx.get(f"{base}/metrics").text, "migserve_queue_depth", model="crowd-csrnet") < preferred - 1:
                assert time.monotonic() < deadline, "the requests never reached the queue"
                time.sleep(0.05)
            time.sleep(0.5)
            text = httpx.get(f"{base}/metrics").text
            assert _metric(text, "migserve_queue_depth", model="crowd-csrnet") == preferred - 1, "held below the preferred size"
            assert _outstanding(base, free["id"]) == 0
            last = pool.submit(_post_crowd, server, tiny_repo.root, preferred)
            assert [r.result(timeout=30).status_code for r in [*held, last]] == [200] * preferred
            after = httpx.get(f"{base}/metrics").text
            assert _metric(after, "migserve_batch_size_sum", model="crowd-csrnet", partition=free["id"]) == preferred
            assert _metric(after, "migserve_batch_size_count", model="crowd-csrnet", partition=free["id"]) == 1
            held_for = time.monotonic() - held_since
            os.kill(busy[0]["pid"], signal.SIGCONT)
            assert first.result(timeout=30).status_code == 200
        _check_config_and_statistics(base, preferred, held_for)
    finally:
        for worker in workers:
            os.kill(worker["pid"], signal.SIGCONT)
        server.close()


def _check_config_and_statistics(base: str, preferred: int, held_for: float) -> None:
    """Triton's model configuration shows the batching as served; its statistics count the two batches above:
    the first request alone (its worker stopped for more than `held_for` seconds from its batch's dispatch), then
    `preferred` requests together, the first `preferred - 1` of them held over 0.5 s each in the queue."""
    batching = httpx.get(f"{base}/v2/models/crowd-csrnet/config").json()["dynamic_batching"]
    assert batching["preferred_batch_size"] == ([4, 8] if preferred == 4 else [2, 8])
    assert batching["max_queue_delay_microseconds"] == 60_000_000
    (stats,) = httpx.get(f"{base}/v2/models/crowd-csrnet/stats").json()["model_stats"]
    assert (stats["inference_count"], stats["execution_count"]) == (preferred + 1, 2)
    infer = stats["inference_stats"]
    assert infer["success"]["count"] == infer["queue"]["count"] == infer["compute_infer"]["count"] == preferred + 1
    assert infer["fail"] == {"count": 0, "ns": 0}
    assert infer["queue"]["ns"] > (preferred - 1) * 0.5e9, "the held requests' time in the queue (about 1 s each)"
    assert infer["compute_infer"]["ns"] > held_for * 1e9, "the first request's batch ran on the stopped worker"
    assert infer["compute_infer"]["ns"] + infer["queue"]["ns"] < infer["success"]["ns"]
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [(1, 1), (preferred, 1)]


def _post_crowd(server: Gateway, repo: Path, seed: int) -> httpx.Response:
    return httpx.post(f"http://{server.url}/v2/models/crowd-csrnet/infer", content=_crowd_body(repo, seed), timeout=60)


def test_models_sharing_workers_never_strand_a_batch(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    """Three models' batchers compete for the same two workers under load: every request is answered.

    (A batcher that waited for more requests once dispatched to a worker another model had taken meanwhile.)
    """
    names = ("crowd-csrnet", "face-pros", "grounding-mgsl")
    contracts = {name: read_contract(tiny_repo.root / name) for name in names}
    client = httpclient.InferenceServerClient(url=gateway.url, concurrency=24, network_timeout=60)
    requests = [
        (name, client.async_infer(name, triton_inputs(make_inputs(contracts[name], 1, seed=i)), headers={"X-Timeout-Ms": "20000"}))
        for i in range(30)
        for name in names
    ]
    for name, request in requests:
        result = request.get_result()
        assert result.as_numpy(contracts[name].outputs[0].name) is not None
    client.close()


def test_a_killed_worker_is_restarted_and_requests_around_it_are_answered(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    url = f"http://{gateway.url}"
    victim = httpx.get(f"{url}/v1/partitions").json()["partitions"][0]
    body = _crowd_body(tiny_repo.root)

    def call(_: int) -> int:
        return httpx.post(f"{url}/v2/models/crowd-csrnet/infer", content=body, timeout=60).status_code

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, i) for i in range(120)]
        time.sleep(0.3)
        os.kill(victim["pid"], signal.SIGKILL)
        codes = [f.result(timeout=60) for f in futures]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 100  # the other replica took the retried batches
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = {p["id"]: p for p in httpx.get(f"{url}/v1/partitions").json()["partitions"]}[victim["id"]]
        if state["ready"]:
            break
        time.sleep(0.2)
    assert state["ready"] and state["restarts"] == 1 and state["pid"] != victim["pid"]
    assert state["last_death"] == "it exited with code -9" and state["oom_kills"] == 0, "killed by hand: not called an OOM kill"
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert call(0) == 200
    metrics = httpx.get(f"{url}/metrics").text
    assert _metric(metrics, "migserve_worker_restarts", partition=victim["id"]) == 1
    assert _metric(metrics, "migserve_worker_oom_kills", partition=victim["id"]) == 0


def test_requests_wait_for_the_only_worker_while_it_restarts(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    # One replica (as on a single GPU): while it restarts, new requests wait for it instead of getting 503.
    # Only the batch that was inside the killed worker is answered 503 (it may be what killed it: no retry there).
    server = Gateway(tiny_repo.root, "--cpu-slices", "1", "--models", "crowd-csrnet", log=tmp_path / "serve.log")
    url = f"http://{server.url}"
    body = _crowd_body(tiny_repo.root)
    answers: list[tuple[int, float, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = httpx.post(f"{url}/v2/models/crowd-csrnet/infer", content=body, timeout=60)
            answers.append((response.status_code, time.monotonic() - started, response.text))

    try:
        (victim,) = httpx.get(f"{url}/v1/partitions").json()["partitions"]
        with ThreadPoolExecutor(8) as pool:
            clients = [pool.submit(client) for _ in range(8)]
            time.sleep(0.5)
            os.kill(victim["pid"], signal.SIGKILL)
            killed, unready_seen = time.monotonic(), False
            while time.monotonic() - killed < 60:
                unready_seen |= httpx.get(f"{url}/v2/health/ready").status_code == 503
                (state,) = httpx.get(f"{url}/v1/partitions").json()["partitions"]
                if state["ready"] and state["restarts"] == 1:
                    break
                time.sleep(0.05)
            time.sleep(0.5)
            stop.set()
            for c in clients:
                c.result(timeout=60)
    finally:
        server.close()
    codes = [code for code, _, _ in answers]
    assert set(codes) <= {200, 503}, [a for a in answers if a[0] not in (200, 503)][:3]
    assert codes.count(503) <= 8, codes.count(503)  # the killed batch if there was one: at most one request per client
    assert all("no other replica could take the batch" in text for code, _, text in answers if code == 503)
    assert any(code == 200 and seconds > 0.4 for code, seconds, _ in answers), "no request waited through the restart"
    assert unready_seen  # readiness said so meanwhile


def test_a_hung_worker_is_killed_and_its_batches_answered_elsewhere(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    # SIGSTOP: the worker lives and answers nothing, as one stuck in a driver call or a deadlock. Each front-end
    # process's batch in it is retried on the other worker once --worker-hang-s has passed and it is killed.
    args = ("--cpu-slices", "1,1", "--models", "crowd-csrnet", "--worker-hang-s", "2", "--frontends", "2")
    server = Gateway(tiny_repo.root, *args, log=tmp_path / "serve.log")
    url = f"http://{server.url}"
    body = _crowd_body(tiny_repo.root)

    def call(_: int) -> tuple[int, float]:
        started = time.monotonic()
        code = httpx.post(f"{url}/v2/models/crowd-csrnet/infer", content=body, timeout=60).status_code  # a fresh connection
        return code, time.monotonic() - started

    victim = httpx.get(f"{url}/v1/partitions").json()["partitions"][0]
    try:
        os.kill(victim["pid"], signal.SIGSTOP)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(48)))
        assert [code for code, _ in answers] == [200] * 48
        assert max(seconds for _, seconds in answers) > 1.5, "no batch was caught in the hung worker"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = {p["id"]: p for p in httpx.get(f"{url}/v1/partitions").json()["partitions"]}[victim["id"]]
            if state["ready"] and state["restarts"] == 1:
                break
            time.sleep(0.2)
        assert state["ready"] and state["restarts"] == 1 and state["pid"] != victim["pid"]
        assert "has not answered a batch in" in server.log.read_text()
        assert "died (killed as hung: no answer to a batch in 2 s (--worker-hang-s)); restarting" in server.log.read_text()
        assert call(0)[0] == 200
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim["pid"], signal.SIGKILL)
        server.close()


def test_a_worker_back_without_the_model_answers_what_waited_503(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    # The restarted worker refuses crowd-csrnet (its file changed since start-up): the requests that waited get 503 at
    # once, and the model the worker did load is served on.
    repo = tmp_path / "repo"
    for model in ("crowd-csrnet", "face-pros"):
        shutil.copytree(tiny_repo.root / model, repo / model)
    server = Gateway(repo, "--cpu-slices", "1", log=tmp_path / "serve.log")
    url = f"http://{server.url}"
    try:
        (victim,) = httpx.get(f"{url}/v1/partitions").json()["partitions"]
        shutil.copyfile(repo / "face-pros" / "1" / "model.onnx", repo / "crowd-csrnet" / "1" / "model.onnx")
        os.kill(victim["pid"], signal.SIGKILL)
        time.sleep(0.1)  # the gateway has seen the death; the restart waits 0.5 s before it begins
        started = time.monotonic()
        response = httpx.post(f"{url}/v2/models/crowd-csrnet/infer", content=_crowd_body(tiny_repo.root), timeout=60)
        waited = time.monotonic() - started
        assert response.status_code == 503 and "no ready replica" in response.json()["error"]
        assert 0.3 < waited < 30, waited  # it waited for the restart, and no longer
        (state,) = httpx.get(f"{url}/v1/partitions").json()["partitions"]
        assert state["ready"] and "sha256" in state["refused"]["crowd-csrnet"]
        face = make_inputs(read_contract(repo / "face-pros"), batch=1, seed=0)
        client = httpclient.InferenceServerClient(url=server.url)
        assert client.infer("face-pros", triton_inputs(face)).as_numpy("embedding").shape == (1, 48)
    finally:
        server.close()


def test_a_gateway_killed_with_9_leaves_no_process_file_or_shared_memory(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    # A gateway gets no chance to clean up after kill -9: its workers must notice and exit, the tracker must unlink
    # the batch arenas, and the workers' shared timings (two CPU slices, sizes timed) must not be left in TMPDIR.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    server = Gateway(
        tiny_repo.root,
        "--cpu-slices",
        "1,1",
        "--models",
        "face-pros",
        log=tmp_path / "serve.log",
        env=os.environ | {"TMPDIR": str(scratch)},
    )
    gateway = server.process.pid
    try:
        face = make_inputs(read_contract(tiny_repo.root / "face-pros"), batch=1, seed=0)
        client = httpclient.InferenceServerClient(url=server.url, concurrency=4)
        for request in [client.async_infer("face-pros", triton_inputs(face)) for _ in range(16)]:
            assert request.get_result().as_numpy("embedding").shape == (1, 48)
        workers = {p["pid"] for p in httpx.get(f"http://{server.url}/v1/partitions").json()["partitions"]}
        processes = processes_where(PARENT, gateway)
        assert workers < processes  # the tracker too
        owners = {gateway, *processes}
        arenas = {p for p in Path("/dev/shm").glob("migserve-arena-*") if int(p.name.split("-")[2]) in owners}
        assert arenas  # the requests made some
        server.process.kill()
        server.process.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (any(Path(f"/proc/{pid}").exists() for pid in processes) or any(map(Path.exists, arenas))):
            time.sleep(0.1)
        assert not [pid for pid in processes if Path(f"/proc/{pid}").exists()]
        assert not [p for p in arenas if p.exists()]
        assert not list(scratch.iterdir())
    finally:
        server.close()


@pytest.fixture(scope="module")
def small_gateway(tiny_repo: ExportedRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One core, a queue of 4, bodies up to 1 MiB: easy to overload."""
    log = tmp_path_factory.mktemp("small") / "serve.log"
    server = Gateway(
        tiny_repo.root,
        "--cpu-slices",
        "1",
        "--queue-capacity",
        "4",
        "--max-body-mb",
        "1",
        "--models",
        "lns-organs",
        "crowd-csrnet",
        log=log,
    )
    yield server
    server.close()


def _slow_lns_call(gateway: Gateway, repo: Path) -> Callable[[int], httpx.Response]:
    """A binary request (and binary answer) of four lns-organs volumes: one full batch for the worker."""
    ct = make_inputs(read_contract(repo / "lns-organs"), batch=4, seed=0)["ct"]
    header = json.dumps(
        {
            "inputs": [{"name": "ct", "datatype": "FP32", "shape": list(ct.shape), "parameters": {"binary_data_size": ct.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    url = f"http://{gateway.url}/v2/models/lns-organs/infer"

    def call(_: int) -> httpx.Response:
        return httpx.post(url, content=header + ct.tobytes(), headers={"Inference-Header-Content-Length": str(len(header))}, timeout=120)

    return call


def test_overload_answers_503_with_retry_after(small_gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    call = _slow_lns_call(small_gateway, tiny_repo.root)
    with ThreadPoolExecutor(48) as pool:
        responses = list(pool.map(call, range(96)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["Retry-After"] == "1"
    assert "queue full (4 requests)" in rejected.json()["error"]


def test_a_compressed_body_not_as_it_says_gets_a_4xx_that_names_the_problem(small_gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    """Content-Encoding: an unknown one (415), a body that is not gzip, is cut short or has bytes after its end (400),
    and one that inflates past --max-body-mb (1 MiB here: 413, not a gateway full of zeros)."""
    body = _crowd_body(tiny_repo.root)
    cases = [
        ("br", body, 415, "Content-Encoding 'br' is not supported"),
        ("gzip", body, 400, "request body is not valid gzip data"),
        ("gzip", gzip.compress(body)[:-12], 400, "request body is truncated gzip data"),
        ("gzip", gzip.compress(body) + b"xx", 400, "2 bytes after the end of its gzip data"),
        ("gzip", gzip.compress(bytes(2 << 20)), 413, "inflates past the limit of 1048576 bytes"),
        ("deflate", zlib.compress(body)[2:-4], 200, ""),  # deflate without zlib's wrapping, as some clients send it
    ]
    for encoding, data, status, message in cases:
        response = httpx.post(
            f"http://{small_gateway.url}/v2/models/crowd-csrnet/infer", content=data, headers={"Content-Encoding": encoding}, timeout=30
        )
        assert response.status_code == status, (encoding, response.text)
        assert message in response.text
    assert httpx.get(f"http://{small_gateway.url}/metrics").text.count("migserve_request_body_bytes 0.0") == 1, "every body given back"


def test_expired_deadline_answers_504(small_gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    body = json.loads(_crowd_body(tiny_repo.root))
    body["parameters"] = {"timeout": 1}  # one microsecond, as Triton's timeout parameter
    response = httpx.post(f"http://{small_gateway.url}/v2/models/crowd-csrnet/infer", json=body, timeout=30)
    assert response.status_code == 504
    assert "deadline" in response.json()["error"] or "no answer within" in response.json()["error"]
    again = httpx.post(f"http://{small_gateway.url}/v2/models/crowd-csrnet/infer", content=_crowd_body(tiny_repo.root), timeout=30)
    assert again.status_code == 200


def test_oversized_body_answers_413(small_gateway: Gateway) -> None:
    response = httpx.post(f"http://{small_gateway.url}/v2/models/crowd-csrnet/infer", content=b"x" * (2 << 20), timeout=30)
    assert response.status_code == 413
    assert "over the limit of 1048576" in response.json()["error"]


def test_an_oversized_body_is_refused_before_it_is_sent_and_the_connection_serves_on(
    small_gateway: Gateway, tiny_repo: ExportedRepo
) -> None:
    """The 413 comes as soon as the head declares too much; the body is then read and dropped, and the same
    connection answers the next request."""
    host, port = small_gateway.url.split(":")
    path = "/v2/models/crowd-csrnet/infer"
    oversized = 2 << 20
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        reader = sock.makefile("rb")
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {oversized}\r\n\r\n".encode())
        status, _, answer = read_response(reader)
        assert status == 413
        assert f"over the limit of {1 << 20}" in answer.decode()
        sock.sendall(b"x" * oversized)
        body = _crowd_body(tiny_repo.root)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert read_response(reader)[0] == 200


def _post(gateway: Gateway, model: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"http://{gateway.url}/v2/models/{model}/infer", content=content, headers=headers or {}, timeout=30)


def _image_input(shape: list[int], datatype: str = "FP32", name: str = "image") -> bytes:
    count = int(np.prod(shape))
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": [0.0] * count}]}).encode()


def _grounding(words: list[list[float]]) -> bytes:
    """A grounding-mgsl request (8 frames) with these word ids as JSON data."""
    inputs = [
        {"name": "video", "datatype": "FP32", "shape": [1, 8, 1024], "data": [0.0] * 8 * 1024},
        {"name": "video_mask", "datatype": "FP32", "shape": [1, 8], "data": [1.0] * 8},
        {"name": "words", "datatype": "INT64", "shape": [1, len(words[0])], "data": words},
        {"name": "word_mask", "datatype": "FP32", "shape": [1, len(words[0])], "data": [1.0] * len(words[0])},
    ]
    return json.dumps({"inputs": inputs}).encode()


BAD_REQUESTS = [
    ("unknown model", "crowd", _image_input([1, 3, 16, 16]), None, 404, "unknown model 'crowd'"),
    ("malformed JSON", "crowd-csrnet", b'{"inputs": [', None, 400, "not valid JSON"),
    ("not an object", "crowd-csrnet", b"[1, 2]", None, 400, "must be a JSON object"),
    ("wrong input name", "crowd-csrnet", _image_input([1, 3, 16, 16], name="img"), None, 400, "missing ['image'], unknown ['img']"),
    ("wrong dtype", "crowd-csrnet", _image_input([1, 3, 16, 16], datatype="FP64"), None, 400, "datatype 'FP64', the model expects FP32"),
    ("wrong rank", "crowd-csrnet", _image_input([3, 16, 16]), None, 400, "has rank 3"),
    ("wrong channels", "crowd-csrnet", _image_input([1, 4, 16, 16]), None, 400, "the model expects [batch, 3, height, width]"),
    ("dim below range", "crowd-csrnet", _image_input([1, 3, 4, 16]), None, 400, "height=4 is outside [8,"),
    ("batch above max", "crowd-csrnet", _image_input([9, 3, 8, 8]), None, 400, "batch=9 is outside [1, 8]"),
    (
        "data count",
        "crowd-csrnet",
        json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [1.0]}]}).encode(),
        None,
        400,
        "1 values for shape",
    ),
    (
        "non-numeric",
        "crowd-csrnet",
        json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ["a"]}]}).encode(),
        None,
        400,
        "data holds strings; FP32 takes numbers",
    ),
    (
        "numbers as strings",
        "crowd-csrnet",
        json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": ["1.5"] * 192}]}).encode(),
        None,
        400,
        "data holds strings; FP32 takes numbers",
    ),
    (
        "booleans for FP32",
        "crowd-csrnet",
        json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [True] * 192}]}).encode(),
        None,
        400,
        "data holds booleans; FP32 takes numbers",
    ),
    (
        "a boolean among numbers",
        "crowd-csrnet",
        json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [1.5] * 191 + [True]}]}).encode(),
        None,
        400,
        "input image: data holds booleans among its numbers; FP32 takes numbers",
    ),
    (
        "a boolean among nested numbers, and booleans elsewhere",
        "crowd-csrnet",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "FP32",
                        "shape": [1, 3, 8, 8],
                        "data": [[[1.0] * 8] * 8] * 2 + [[[False] + [2.0] * 7] * 8],
                    }
                ],
                "outputs": [{"name": "density", "parameters": {"binary_data": True}}],
            }
        ).encode(),
        None,
        400,
        "input image: data holds booleans among its numbers",
    ),
    (
        "a boolean among token ids",
        "grounding-mgsl",
        _grounding(words=[[5, True]]),
        None,
        400,
        "input words: data holds booleans among its numbers; INT64 takes integers",
    ),
    (
        "numbers past FP32's range",
        "crowd-csrnet",
        json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [1.5] * 191 + [-1e39]}]}).encode(),
        None,
        400,
        "input image: data holds numbers past FP32's range (largest 3.4028235e+38)",
    ),
    (
        "nulls in the data",
        "crowd-csrnet",
        json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [1.0] * 191 + [None]}]}).encode(),
        None,
        400,
        "data holds values of mixed or unsupported types; FP32 takes numbers",
    ),
    (
        "fractions for INT64",
        "grounding-mgsl",
        _grounding(words=[[5, 2.5]]),
        None,
        400,
        "(fractions, or past INT64's range); INT64 takes integers",
    ),
    (
        "a token id past the vocabulary",
        "grounding-mgsl",
        _grounding(words=[[5, 746, 10**6]]),
        None,
        400,
        "input words: 2 values outside [0, 745] (token ids into vocab.txt; 0 pads), the first 746 at index [0, 1]",
    ),
    ("a negative token id", "grounding-mgsl", _grounding(words=[[-1, 5]]), None, 400, "the first -1 at index [0, 0]"),
    ("INT64 out of range", "grounding-mgsl", _grounding(words=[[2**63, 2**63]]), None, 400, "data holds integers past INT64's range"),
    (
        "INT64 far out of range",
        "grounding-mgsl",
        _grounding(words=[[5, 2**64]]),
        None,
        400,
        "data holds numbers that are not all 64-bit integers",
    ),
    (
        "name not a string",
        "crowd-csrnet",
        json.dumps({"inputs": [{"name": 5, "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode(),
        None,
        400,
        "every input needs a 'name' string",
    ),
    (
        "shape of booleans",
        "crowd-csrnet",
        json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [True, 3, 8, 8], "data": [1.0]}]}).encode(),
        None,
        400,
        "'shape' must be a list of non-negative integers",
    ),
    ("bad header length", "crowd-csrnet", b"{}", {"Inference-Header-Content-Length": "99"}, 400, "does not fit a body of 2 bytes"),
    ("timeout NaN", "crowd-csrnet", _image_input([1, 3, 8, 8]), {"X-Timeout-Ms": "nan"}, 400, "positive finite number"),
    ("timeout infinite", "crowd-csrnet", _image_input([1, 3, 8, 8]), {"X-Timeout-Ms": "inf"}, 400, "got 'inf'"),
    ("JSON over --max-json-mb", "crowd-csrnet", b'{"inputs": []' + b" " * (17 << 20) + b"}", None, 413, "over the limit of 16777216"),
    (
        "JSON header over --max-json-mb",
        "crowd-csrnet",
        b'{"inputs": []' + b" " * (17 << 20) + b"}" + bytes(16),
        {"Inference-Header-Content-Length": str((17 << 20) + 14)},
        413,
        "send tensors as binary data",
    ),
    (
        "an integer of over 4300 digits",
        "crowd-csrnet",
        b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [' + b"9" * 5000 + b"]}]}",
        None,
        400,
        "request body is not valid JSON: Exceeds the limit (4300 digits)",
    ),
    ("JSON nested too deeply", "crowd-csrnet", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, 400, "nested too deeply"),
    (
        "parameters not an object",
        "crowd-csrnet",
        json.dumps({**json.loads(_image_input([1, 3, 8, 8])), "parameters": [1]}).encode(),
        None,
        400,
        "the request: 'parameters' must be a JSON object, not [1]",
    ),
    (
        "input parameters not an object",
        "crowd-csrnet",
        json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0], "parameters": "x"}]}).encode(),
        None,
        400,
        "input image: 'parameters' must be a JSON object",
    ),
    (
        "output parameters not an object",
        "crowd-csrnet",
        json.dumps({**json.loads(_image_input([1, 3, 8, 8])), "outputs": [{"name": "density", "parameters": 3}]}).encode(),
        None,
        400,
        "output density: 'parameters' must be a JSON object, not 3",
    ),
    (
        "input given twice",
        "crowd-csrnet",
        json.dumps({"inputs": json.loads(_image_input([1, 3, 8, 8]))["inputs"] * 2}).encode(),
        None,
        400,
        "inputs ['image'] are given more than once",
    ),
    (
        "binary_data not a boolean",
        "crowd-csrnet",
        json.dumps(
            {**json.loads(_image_input([1, 3, 8, 8])), "outputs": [{"name": "density", "parameters": {"binary_data": "yes"}}]}
        ).encode(),
        None,
        400,
        "output density: 'binary_data' must be true or false, not 'yes'",
    ),
    (
        "binary_data_output not a boolean",
        "crowd-csrnet",
        json.dumps({**json.loads(_image_input([1, 3, 8, 8])), "parameters": {"binary_data_output": 1}}).encode(),
        None,
        400,
        "the request: 'binary_data_output' must be true or false, not 1",
    ),
    (
        "id not a string",
        "crowd-csrnet",
        json.dumps({**json.loads(_image_input([1, 3, 8, 8])), "id": {"a": 1}}).encode(),
        None,
        400,
        "the request's 'id' must be a string, not {'a': 1}",
    ),
    (
        "classification count not an integer",
        "crowd-csrnet",
        json.dumps(
            {**json.loads(_image_input([1, 3, 8, 8])), "outputs": [{"name": "density", "parameters": {"classification": "3"}}]}
        ).encode(),
        None,
        400,
        "output density: 'classification' must be a non-negative integer",
    ),
    (
        "classification count negative",
        "crowd-csrnet",
        json.dumps(
            {**json.loads(_image_input([1, 3, 8, 8])), "outputs": [{"name": "density", "parameters": {"classification": -2}}]}
        ).encode(),
        None,
        400,
        "not -2",
    ),
    (
        "output requested twice",
        "crowd-csrnet",
        json.dumps({**json.loads(_image_input([1, 3, 8, 8])), "outputs": [{"name": "density"}, {"name": "density"}]}).encode(),
        None,
        400,
        "outputs ['density'] are requested more than once",
    ),
]


@pytest.mark.parametrize(("case", "model", "body", "headers", "status", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_that_names_the_problem(
    gateway: Gateway, case: str, model: str, body: bytes, headers: dict[str, str] | None, status: int, message: str
) -> None:
    response = _post(gateway, model, body, headers)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_json_data_of_the_right_kinds_is_taken(gateway: Gateway) -> None:
    # the requests above refused for their values, with values of the kinds Triton takes: integers are numbers too
    assert _post(gateway, "grounding-mgsl", _grounding(words=[[5, 6]])).status_code == 200
    image = {"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8]}
    for data in ([1.5] * 192, [1] * 192, [[[1, 2.5] * 4] * 8] * 3):
        response = _post(gateway, "crowd-csrnet", json.dumps({"inputs": [image | {"data": data}]}).encode())
        assert response.status_code == 200, response.text
    # true and false elsewhere in the request, as a boolean parameter and inside a string, leave the numbers taken
    outputs = [{"name": "density", "parameters": {"binary_data": False}}]
    request = {"id": "true or false", "inputs": [image | {"data": [1.5] * 192}], "outputs": outputs}
    response = _post(gateway, "crowd-csrnet", json.dumps(request).encode())
    assert response.status_code == 200 and response.json()["id"] == "true or false", response.text


def test_truncated_and_overlong_binary_bodies(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    image = np.zeros((1, 3, 16, 16), np.float32)
    header = json.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 16, 16], "parameters": {"binary_data_size": image.nbytes}}]}
    ).encode()
    length = {"Inference-Header-Content-Length": str(len(header))}
    truncated = _post(gateway, "crowd-csrnet", header + image.tobytes()[:-100], length)
    assert truncated.status_code == 400 and "body truncated" in truncated.json()["error"]
    extra = _post(gateway, "crowd-csrnet", header + image.tobytes() + b"junk", length)
    assert extra.status_code == 400 and "4 bytes after the last binary input" in extra.json()["error"]
    ok = _post(gateway, "crowd-csrnet", header + image.tobytes(), length)
    assert ok.status_code == 200


def test_a_request_onnxruntime_refuses_fails_alone_not_the_batch_it_was_in(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """A request onnxruntime refuses makes it refuse the whole batch it is in. The requests batched with it must
    still be answered, and it alone gets the 400. The gateway refuses every such request it knows of before it is
    batched; a model exported before contracts gave token ids their range (`values`) leaves a token id past the
    vocabulary to onnxruntime, so that is the model here."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo.root / "grounding-mgsl", repo / "grounding-mgsl")
    written = json.loads((repo / "grounding-mgsl" / "contract.json").read_text())
    for spec in written["inputs"]:
        del spec["values"]
    (repo / "grounding-mgsl" / "contract.json").write_text(json.dumps(written))
    gateway = Gateway(repo, "--cpu-slices", "1,1", log=tmp_path / "serve.log")
    try:
        _refused_alone(gateway, read_contract(repo / "grounding-mgsl"))
    finally:
        gateway.close()


def _refused_alone(gateway: Gateway, contract: Contract) -> None:
    good = [make_inputs(contract, 1, seed=i, dims={"frames": 256}) for i in range(15)]
    bad = make_inputs(contract, 1, seed=99, dims={"frames": 256})
    bad["words"][0, 1] = 10**6  # the tiny vocabulary has 746 entries
    client = httpclient.InferenceServerClient(url=gateway.url, network_timeout=60)
    expected = [client.infer("grounding-mgsl", triton_inputs(arrays)).as_numpy("anchor_scores") for arrays in good]
    client.close()
    host, port = gateway.url.split(":")

    def request(arrays: dict[str, Array]) -> bytes:
        body: bytes
        body, json_size = httpclient.InferenceServerClient.generate_request_body(triton_inputs(arrays))
        head = f"POST /v2/models/grounding-mgsl/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        return f"{head}Inference-Header-Content-Length: {json_size}\r\n\r\n".encode() + body

    def run_alone() -> float:
        return _metric(httpx.get(f"http://{gateway.url}/metrics").text, "migserve_requests_run_alone_total", model="grounding-mgsl")

    sent = [request(arrays) for arrays in [*good[:5], bad, *good[5:]]]
    before = run_alone()
    for _ in range(8):  # until the bad request lands in a batch with others: sent at once, most rounds
        sockets = [socket.create_connection((host, int(port)), timeout=60) for _ in sent]
        for sock, data in zip(sockets, sent, strict=True):
            sock.sendall(data)
        answers = []
        for sock in sockets:
            with sock, sock.makefile("rb") as reader:
                status, headers, body = read_response(reader)
            answers.append((status, headers, body))
        status, _, body = answers.pop(5)
        assert status == 400 and "out of data bounds" in json.loads(body)["error"], body[:300]
        for (status, headers, body), want in zip(answers, expected, strict=True):
            assert status == 200, f"a good request batched with the bad one failed: {body[:300]!r}"
            n = int(headers["inference-header-content-length"])
            shapes = {o["name"]: o["shape"] for o in json.loads(body[:n])["outputs"]}
            got = np.frombuffer(body[n:], np.float32)[: int(np.prod(shapes["anchor_scores"]))]  # the first binary output
            np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)
        if run_alone() > before:
            break
    else:
        pytest.fail("the bad request never shared a batch in 8 rounds")


def test_grounding_inputs_must_agree_on_named_dims(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    arrays = make_inputs(read_contract(tiny_repo.root / "grounding-mgsl"), batch=1, seed=0)
    arrays["video_mask"] = np.ones((1, 10), np.float32)  # video has 64 frames
    inputs = [
        {"name": k, "datatype": "INT64" if v.dtype == np.int64 else "FP32", "shape": list(v.shape), "data": v.ravel().tolist()}
        for k, v in arrays.items()
    ]
    response = _post(gateway, "grounding-mgsl", json.dumps({"inputs": inputs}).encode())
    assert response.status_code == 400
    assert re.search(r"frames=10, but another input has frames=64", response.json()["error"])


def test_partitions_view(gateway: Gateway) -> None:
    partitions = httpx.get(f"http://{gateway.url}/v1/partitions").json()["partitions"]
    assert [p["id"] for p in partitions] == ["cpu-0", "cpu-1"]
    assert all(p["kind"] == "cpu" and len(p["cores"]) == 1 and len(p["models"]) == 10 for p in partitions)
    assert all(p["providers"] == ["CPUExecutionProvider"] and p["device_warning"] is None for p in partitions)
    assert all(p["scheduling"] == "normal" and os.sched_getscheduler(p["pid"]) == os.SCHED_OTHER for p in partitions)
    # Every thread, not just the first: onnxruntime left to its default thread count pins its own pool's threads to
    # cores by number, whatever the process's mask, so a slice's sessions must set their thread counts.
    for partition in partitions:
        assert thread_affinities(partition["pid"]) == {tuple(partition["cores"])}, partition["id"]


def test_a_gpu_partition_without_cuda_onnxruntime_serves_on_the_cpu_and_says_why(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    # A declared GPU whose onnxruntime has no CUDA provider (this machine's): onnxruntime alone would run it on the
    # CPU without a word. The gateway reports what the sessions really use, and warns at start-up.
    topology = tmp_path / "topology.yaml"
    device = "GPU-5d9f1e7a-0000-4000-8000-000000000000"
    topology.write_text(f"partitions:\n  - {{id: gpu-0, kind: gpu, device: {device}, profile: NVIDIA H200}}\n")
    # Served on core 0 alone (as a container's cpuset would): onnxruntime left to its default thread count pins a
    # pool thread to core 1 anyway; the worker sets the count, so every thread stays where the process may run.
    server = Gateway(
        tiny_repo.root, "--topology", str(topology), "--models", "crowd-csrnet", log=tmp_path / "serve.log", prefix=("taskset", "-c", "0")
    )
    try:
        (partition,) = httpx.get(f"http://{server.url}/v1/partitions").json()["partitions"]
        assert thread_affinities(partition["pid"]) == {(0,)}
        assert partition["kind"] == "gpu" and partition["device"] == device
        assert partition["providers"] == ["CPUExecutionProvider"]
        assert "runs its models on the CPU" in partition["device_warning"]
        assert "install onnxruntime-gpu" in partition["device_warning"]
        assert f"partition gpu-0 ({device}) runs its models on the CPU" in server.log.read_text()
        response = httpx.post(f"http://{server.url}/v2/models/crowd-csrnet/infer", content=_crowd_body(tiny_repo.root), timeout=60)
        assert response.status_code == 200, response.text
    finally:
        server.close()


def test_idle_priority_workers_yield_their_cores(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    server = Gateway(
        tiny_repo.root, "--cpu-slices", "1", "--models", "crowd-csrnet", "--cpu-worker-priority", "idle", log=tmp_path / "serve.log"
    )
    try:
        (partition,) = httpx.get(f"http://{server.url}/v1/partitions").json()["partitions"]
        assert partition["scheduling"] == "idle"
        assert os.sched_getscheduler(partition["pid"]) == os.SCHED_IDLE  # the kernel's word, not the gateway's
        response = httpx.post(f"http://{server.url}/v2/models/crowd-csrnet/infer", content=_crowd_body(tiny_repo.root), timeout=60)
        assert response.status_code == 200, response.text
    finally:
        server.close()


def test_ctrl_c_stops_the_gateway_and_its_workers_in_order(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """SIGINT to the gateway's process group, as Ctrl-C in a terminal: the gateway stops its workers itself,
    so no worker dies of the signal (a traceback, and "died; restarting" in the gateway's log); and once stopped it
    dies of the signal, as a terminal's job should (a shell's loop stops), without a traceback."""
    log = tmp_path / "serve.log"
    server = Gateway(tiny_repo.root, "--cpu-slices", "1,1", "--models", "crowd-csrnet", log=log, new_session=True)
    try:
        pids = [p["pid"] for p in httpx.get(f"http://{server.url}/v1/partitions").json()["partitions"]]
        os.killpg(server.process.pid, signal.SIGINT)
        assert server.process.wait(timeout=30) == -signal.SIGINT
    finally:
        server.close()
    text = log.read_text()
    assert "Traceback" not in text and "died" not in text, text[-3000:]
    assert "Finished server process" in text
    assert not [pid for pid in pids if running(pid)], "a worker outlived the gateway"


def test_openapi_documents_the_protocol(gateway: Gateway) -> None:
    spec = httpx.get(f"http://{gateway.url}/openapi.json").json()
    for path in ("/v2/models/{name}/infer", "/v2/health/ready", "/v1/partitions"):
        assert path in spec["paths"]
    assert httpx.get(f"http://{gateway.url}/docs").status_code == 200


def _hang_up_while_busy(
    gateway: Gateway, repo: Path, path: str, headers: dict[str, str], body: bytes, counted: tuple[str, dict[str, str]]
) -> None:
    """While the one worker holds a batch of lns-organs, send a whole request to `path` and hang up; then the
    metric `counted` (name, labels) rises by exactly one and crowd-csrnet never gets a batch.

    The worker is stopped (SIGSTOP) until the hang-up is counted, so it is busy for certain: a batch of tiny
    lns-organs takes only tens of ms, and a timed wait raced a loaded CI host where the worker was free again."""
    base = f"http://{gateway.url}"
    name, labels = counted
    before = httpx.get(f"{base}/metrics").text
    (worker,) = httpx.get(f"{base}/v1/partitions").json()["partitions"]
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(_slow_lns_call(gateway, repo), 0)
            deadline = time.monotonic() + 10
            while _outstanding(base, worker["id"]) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _outstanding(base, worker["id"]) == 1, "the lns-organs batch never reached the worker"
            host, port = gateway.url.split(":")
            lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
            with socket.create_connection((host, int(port))) as client:
                client.sendall("\r\n".join([*lines, "", ""]).encode() + body)
                time.sleep(0.2)
            gone = _wait_for_metric(base, name, _metric(before, name, **labels) + 1, **labels)
            os.kill(worker["pid"], signal.SIGCONT)
            assert running.result(timeout=60).status_code == 200
    finally:
        os.kill(worker["pid"], signal.SIGCONT)
    assert _metric(gone, name, **labels) - _metric(before, name, **labels) == 1
    after = httpx.get(f"{base}/metrics").text
    batches = _metric(after, "migserve_batch_size_count", model="crowd-csrnet")
    assert batches == _metric(before, "migserve_batch_size_count", model="crowd-csrnet"), "never sent to the worker"
    assert _metric(after, "migserve_queue_depth", model="crowd-csrnet") == 0, "the queue-depth gauge saw it leave"


def _outstanding(base: str, partition: str) -> int:
    partitions = {p["id"]: p for p in httpx.get(f"{base}/v1/partitions").json()["partitions"]}
    return int(partitions[partition]["outstanding_batches"])


def _wait_for_metric(base: str, name: str, at_least: float, **labels: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(f"{base}/metrics").text
        if _metric(text, name, **labels) >= at_least:
            return text
        time.sleep(0.1)
    return text


def test_a_client_that_disconnects_is_not_computed(small_gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    """A client sends an infer request and hangs up while the worker is busy: it leaves the queue (499 in
    the metrics) and its model never gets a batch; everything else is still answered."""
    counted = ("migserve_requests_total", {"model": "crowd-csrnet", "status": "499"})
    _hang_up_while_busy(small_gateway, tiny_repo.root, "/v2/models/crowd-csrnet/infer", {}, _crowd_body(tiny_repo.root), counted)
    again = httpx.post(f"http://{small_gateway.url}/v2/models/crowd-csrnet/infer", content=_crowd_body(tiny_repo.root), timeout=30)
    assert again.status_code == 200


def test_a_family_endpoint_client_that_disconnects_is_not_computed(small_gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    """The same through /v1/crowd/count: the decoded image's tiles leave the queue when the client hangs up."""
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    counted = ("migserve_v1_requests_total", {"endpoint": "/v1/crowd/count", "status": "499"})
    _hang_up_while_busy(small_gateway, tiny_repo.root, "/v1/crowd/count", {"Content-Type": "image/png"}, png.getvalue(), counted)
    again = httpx.post(
        f"http://{small_gateway.url}/v1/crowd/count", content=png.getvalue(), headers={"Content-Type": "image/png"}, timeout=30
    )
    assert again.status_code == 200, again.text


@pytest.mark.parametrize("http_server", ["migserve", "uvicorn"])
def test_bodies_past_the_pending_budget_get_503_before_they_are_read(http_server: str, tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """With --max-pending-mb 1.2, a crowd-csrnet request of 0.75 MB that a stopped worker holds leaves no room
    for another body of that size, to the infer or a family endpoint: each is answered 503 with Retry-After at
    once. Once the first is answered its bytes are given back and the next request is served."""
    args = ("--cpu-slices", "1", "--models", "crowd-csrnet", "--max-body-mb", "1", "--max-pending-mb", "1.2", "--http-server", http_server)
    server = Gateway(tiny_repo.root, *args, log=tmp_path / "serve.log", grpc=True)
    base = f"http://{server.url}"
    contract = read_contract(tiny_repo.root / "crowd-csrnet")
    arrays = make_inputs(contract, 1, seed=2)
    body, header_length = httpclient.InferenceServerClient.generate_request_body(triton_inputs(arrays))
    headers = {"Inference-Header-Content-Length": str(header_length)}

    def infer() -> httpx.Response:
        return httpx.post(f"{base}/v2/models/crowd-csrnet/infer", content=body, headers=headers, timeout=60)

    noise = np.random.default_rng(0).integers(0, 255, (420, 420, 3), dtype=np.uint8)  # a PNG that does not compress: ~0.5 MB
    png = io.BytesIO()
    Image.fromarray(noise).save(png, format="PNG")
    (worker,) = httpx.get(f"{base}/v1/partitions").json()["partitions"]
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(infer)
            deadline = time.monotonic() + 10
            while _outstanding(base, worker["id"]) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _metric(httpx.get(f"{base}/metrics").text, "migserve_request_body_bytes") == len(body)
            refused = [infer(), httpx.post(f"{base}/v1/crowd/count", files={"image": ("noise.png", png.getvalue())}, timeout=10)]
            for response in refused:
                assert response.status_code == 503 and response.headers["Retry-After"] == "1"
                assert "more would pass --max-pending-mb 1.2" in response.json()["error"]
            with grpcclient.InferenceServerClient(server.grpc_url) as client, pytest.raises(InferenceServerException) as caught:
                client.infer("crowd-csrnet", grpc_inputs(arrays), client_timeout=10)
            assert caught.value.status() == "StatusCode.UNAVAILABLE" and "--max-pending-mb 1.2" in str(caught.value.message())
            os.kill(worker["pid"], signal.SIGCONT)
            assert first.result(timeout=60).status_code == 200
    finally:
        os.kill(worker["pid"], signal.SIGCONT)
    try:
        assert infer().status_code == 200
        assert _metric(httpx.get(f"{base}/metrics").text, "migserve_request_body_bytes") == 0
    finally:
        server.close()


def _metric_reaches(base: str, name: str, done: Callable[[float], bool], timeout: float = 10) -> float:
    """The metric's value once `done` holds for it (polled), or its last value after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done(value := _metric(httpx.get(f"{base}/metrics").text, name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


LOGITS = 4 * 23 * 16 * 32 * 32  # an lns-organs batch of 4 tiles: 1.5 M logits, of 10 or more bytes each as JSON


def _logits_as_json(repo: ExportedRepo) -> tuple[bytes, int]:
    """A binary KServe request for a batch of 4 CT tiles whose answer is their logits as JSON (17 MB); its header length."""
    arrays = make_inputs(read_contract(repo.root / "lns-organs"), batch=4, seed=3)
    wanted = [httpclient.InferRequestedOutput("logits", binary_data=False)]
    body, header_length = httpclient.InferenceServerClient.generate_request_body(triton_inputs(arrays), outputs=wanted)
    return body, header_length


def _reader_of(port: int, body: bytes, header_length: int) -> socket.socket:
    """A connection that has sent the request and read nothing yet: its receive window stays tiny (4 KB)."""
    reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(("127.0.0.1", port))
    head = (
        f"POST /v2/models/lns-organs/infer HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n"
        f"inference-header-content-length: {header_length}\r\n\r\n"
    )
    reader.sendall(head.encode() + body)
    return reader


@pytest.mark.parametrize(
    "http_server", [("migserve",), ("uvicorn",), ("migserve", "--frontends", "2")], ids=["migserve", "uvicorn", "frontends"]
)
def test_answers_a_client_does_not_take_are_held_within_the_pending_budget(
    http_server: tuple[str, ...], tiny_repo: ExportedRepo, tmp_path: Path
) -> None:
    """An lns-organs answer is 23 times its request (logits of 23 labels for a CT tile), and more as JSON. A client
    that sent such requests and read none of the answers left them in the gateway's connection buffers, where
    --max-pending-mb saw nothing. Now what waits in a connection's buffer is counted: with --max-pending-mb 3, a
    reader that takes none of a 17 MB answer (4 MB of it may wait in the kernel) leaves no room for another request
    (503 naming the unsent answers); once it reads the answer whole the count goes back to 0 and the request is
    served. A client that takes none of its answer for --send-timeout-s is disconnected, and the count given back.
    With two front-end processes the count is the gateway's, whichever process holds the connection."""
    args = ("--cpu-slices", "1", "--models", "lns-organs", "--max-body-mb", "1", "--max-pending-mb", "3", "--send-timeout-s", "3")
    server = Gateway(tiny_repo.root, *args, "--http-server", *http_server, log=tmp_path / "serve.log")
    base = f"http://{server.url}"
    body, header_length = _logits_as_json(tiny_repo)
    headers = {"Inference-Header-Content-Length": str(header_length)}
    held = "migserve_request_body_bytes"

    def stalled_reader() -> socket.socket:
        return _reader_of(server.port, body, header_length)

    try:
        reader = stalled_reader()
        waiting = _metric_reaches(base, held, lambda value: value > 3 << 20)
        assert waiting > 3 << 20, waiting
        refused = httpx.post(f"{base}/v2/models/lns-organs/infer", content=body, headers=headers, timeout=30)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
        assert "MB for requests (their bodies, what they unpack to, large batches' copies, unsent answers)" in refused.json()["error"]
        assert "more would pass --max-pending-mb 3" in refused.json()["error"], refused.text
        with reader, reader.makefile("rb") as stream:
            status, _, answer = read_response(stream)
        assert status == 200 and len(json.loads(answer)["outputs"][0]["data"]) == LOGITS
        assert waiting <= len(answer)
        assert _metric_reaches(base, held, lambda value: value == 0) == 0
        served = httpx.post(f"{base}/v2/models/lns-organs/infer", content=body, headers=headers, timeout=30)
        assert served.status_code == 200, served.text

        stalled = stalled_reader()
        assert _metric_reaches(base, held, lambda value: value > 3 << 20) > 3 << 20
        deadline = time.monotonic() + 30
        while "took none of its answer for 3 s (--send-timeout-s)" not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric_reaches(base, held, lambda value: value == 0) == 0
        cut = _metric(httpx.get(f"{base}/metrics").text, "migserve_clients_disconnected_total", protocol="http", reason="send_timeout")
        assert cut == 1, cut  # the one stalled reader, whichever process held it
        with stalled, stalled.makefile("rb") as stream, contextlib.suppress(ConnectionResetError):
            stalled.settimeout(10)
            assert len(stream.read()) < len(answer)  # what the kernel took before the rest was dropped, then the end
    finally:
        server.close()


@pytest.mark.parametrize("http_server", ["migserve", "uvicorn"])
def test_a_client_that_reads_its_answer_slowly_is_not_taken_for_a_stalled_one(
    http_server: str, tiny_repo: ExportedRepo, tmp_path: Path
) -> None:
    """--send-timeout-s disconnects a client that takes none of its answer. A connection's buffer shrinks only once the
    kernel has room for a third of its send buffer (up to 4 MB here), so a client reading a 17 MB answer at 16 KB/s
    (a slow mobile link) looked stalled for longer than the timeout and was cut off with most of it unsent. What the
    kernel still holds for the client (its send queue) says it is reading: after 3 s at 16 KB/s, 1.5 times
    --send-timeout-s, the client is still connected; it then reads the rest at once and has the whole answer."""
    args = ("--cpu-slices", "1", "--models", "lns-organs", "--max-body-mb", "1", "--send-timeout-s", "2")
    server = Gateway(tiny_repo.root, *args, "--http-server", http_server, log=tmp_path / "serve.log")
    body, header_length = _logits_as_json(tiny_repo)
    try:
        with _reader_of(server.port, body, header_length) as reader:
            started, taken = time.monotonic(), bytearray()
            while time.monotonic() - started < 3:
                chunk = reader.recv(4096)
                assert chunk, f"the gateway closed the connection after {time.monotonic() - started:.1f} s, {len(taken)} bytes taken"
                taken += chunk
                time.sleep(len(chunk) / 16384)
            assert "took none of its answer" not in server.log.read_text()
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # the rest at once
            head, _, answer = bytes(taken).partition(b"\r\n\r\n")
            length = int(next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")).split(b":")[1])
            while len(answer) < length:
                chunk = reader.recv(1 << 20)
                assert chunk, f"the connection ended {length - len(answer)} bytes short"
                answer += chunk
        assert head.startswith(b"HTTP/1.1 200 ") and len(json.loads(answer)["outputs"][0]["data"]) == LOGITS
    finally:
        server.close()


def _arena_mappings(pid: int) -> dict[str, int]:
    """The batch arenas a process has mapped (its own or another's, unlinked or not): name -> bytes."""
    mapped: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and "/migserve-arena-" in fields[5]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5].rsplit("/", 1)[1]
            mapped[name] = mapped.get(name, 0) + end - start
    return mapped


def test_a_burst_of_large_batches_leaves_no_large_arena_behind(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """A batch larger than --arena-keep-mb grows the arenas it goes through: the gateway's for its inputs (counted in
    --max-pending-mb while it is there), the worker's for its outputs. Nothing used to release them at idle, so one
    burst of large requests left their size of shared memory allocated in both processes for good. Now, once no batch
    has come for 2 s, both are released and unmapped on both sides, the count given back; the next large batch
    makes them again and is answered the same."""
    args = ("--cpu-slices", "1", "--models", "crowd-csrnet", "lns-organs", "--arena-keep-mb", "1")
    server = Gateway(tiny_repo.root, *args, log=tmp_path / "serve.log")
    base = f"http://{server.url}"
    client = httpclient.InferenceServerClient(server.url, network_timeout=60)
    crowd = make_inputs(read_contract(tiny_repo.root / "crowd-csrnet"), batch=1, seed=4, dims={"height": 512, "width": 512})
    lns = make_inputs(read_contract(tiny_repo.root / "lns-organs"), batch=4, seed=4)  # outputs of 6 MB

    def infer() -> tuple[Array, Array]:
        density = client.infer("crowd-csrnet", triton_inputs(crowd)).as_numpy("density")
        logits = client.infer("lns-organs", triton_inputs(lns)).as_numpy("logits")
        return density, logits

    try:
        (worker,) = httpx.get(f"{base}/v1/partitions").json()["partitions"]
        pids = (server.process.pid, worker["pid"])
        first = infer()
        mapped = {pid: _arena_mappings(pid) for pid in pids}
        assert all(max(m.values(), default=0) > 1 << 20 for m in mapped.values()), mapped  # inputs here, outputs there
        assert _metric(httpx.get(f"{base}/metrics").text, "migserve_request_body_bytes") > 0  # 3 MB of inputs, 1 kept
        assert _metric_reaches(base, "migserve_request_body_bytes", lambda value: value == 0) == 0
        deadline = time.monotonic() + 10
        while any(max(_arena_mappings(pid).values(), default=0) > 1 << 20 for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {pid: _arena_mappings(pid) for pid in pids} == {pid: {} for pid in pids}
        # these processes' arenas only: another process's may be unlinked between the listing and the stat
        ours = [f for pid in pids for f in Path("/dev/shm").glob(f"migserve-arena-{pid}-*")]
        assert not [f for f in ours if f.stat().st_size > 1 << 20], ours
        again = infer()
        assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    finally:
        client.close()
        server.close()


def test_a_dev_shm_too_small_for_a_batch_answers_500_and_everything_serves_on(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """A container's /dev/shm is 64 MB unless it is given more. A batch whose inputs (in the gateway) or outputs
    (in the worker) do not fit used to kill that process with SIGBUS; now the batch gets a 500 that says how to
    give it more room, and the gateway and its worker serve on (no restart)."""
    prefix = small_dev_shm("6m")
    if prefix is None:
        pytest.skip("needs root, unshare and mount to give the gateway a small /dev/shm")
    args = ("--cpu-slices", "1", "--models", "crowd-csrnet", "lns-organs")
    server = Gateway(tiny_repo.root, *args, log=tmp_path / "serve.log", prefix=prefix)
    client = httpclient.InferenceServerClient(server.url, network_timeout=60)
    crowd, lns = (read_contract(tiny_repo.root / name) for name in ("crowd-csrnet", "lns-organs"))
    try:
        small = triton_inputs(make_inputs(crowd, 1, seed=1, dims={"height": 64, "width": 64}))
        assert client.infer("crowd-csrnet", small).as_numpy("density").shape == (1, 1, 8, 8)
        too_big = [  # 12 MB of inputs, for the gateway's arena; then 6 MB of outputs, for the worker's
            ("crowd-csrnet", make_inputs(crowd, 1, seed=2, dims={"height": 1024, "width": 1024})),
            ("lns-organs", make_inputs(lns, 4, seed=3)),
        ]
        for name, arrays in too_big:
            with pytest.raises(InferenceServerException) as caught:
                client.infer(name, triton_inputs(arrays))
            assert caught.value.status() == "500", name
            assert "no room for a" in str(caught.value.message()) and "--shm-size" in str(caught.value.message()), name
        assert client.infer("lns-organs", triton_inputs(make_inputs(lns, 1, seed=4))).as_numpy("logits").shape == (1, 23, 16, 32, 32)
        assert client.infer("crowd-csrnet", small).as_numpy("density").shape == (1, 1, 8, 8)
        (partition,) = httpx.get(f"http://{server.url}/v1/partitions").json()["partitions"]
        assert partition["ready"] and partition["restarts"] == 0
    finally:
        client.close()
        server.close()
    assert "Bus error" not in (tmp_path / "serve.log").read_text()


def test_log_settings_change_what_the_gateway_logs_while_it_runs(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """Triton's logging extension: with only errors on, a killed worker's restart logs its death (ERROR) but
    not its new start (INFO); with info on again, it does. gRPC reads and changes the same settings."""
    log = tmp_path / "serve.log"
    server = Gateway(tiny_repo.root, "--cpu-slices", "1", "--models", "crowd-csrnet", log=log, grpc=True)
    base = f"http://{server.url}"
    assert server.grpc_url is not None
    grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        defaults = httpx.get(f"{base}/v2/logging").json()
        assert defaults == {
            "log_file": "",
            "log_info": True,
            "log_warning": True,
            "log_error": True,
            "log_verbose_level": 0,
            "log_format": "default",
        }
        quiet = httpx.post(f"{base}/v2/logging", json={"log_info": False, "log_warning": False}).json()
        assert (quiet["log_info"], quiet["log_warning"], quiet["log_error"]) == (False, False, True)
        over_grpc = grpc_client.get_log_settings(as_json=True)["settings"]
        assert over_grpc["log_info"] == {"bool_param": False} and over_grpc["log_error"] == {"bool_param": True}
        for restarts, info in ((1, False), (2, True)):
            if info:
                grpc_client.update_log_settings({"log_info": True})
            before = log.read_text()
            _kill_and_wait(base, restarts)
            added = log.read_text()[len(before) :]
            assert "died" in added and ("worker cpu-0 ready" in added) == info, added
        for bad, says in [
            ({"log_verbose_level": "x"}, "log_verbose_level must be an integer from 0 to 4294967295"),
            ({"log_verbose_level": 2**32}, "not 4294967296"),  # Triton's is a uint32: taken, it broke gRPC's LogSettings
            ({"nope": 1}, "unknown log setting 'nope'"),
            ({"log_file": "/tmp/x.log"}, "log_file cannot be set"),
            ({"log_format": "ISO8601"}, "one format, 'default'"),
        ]:
            response = httpx.post(f"{base}/v2/logging", json=bad)
            assert response.status_code == 400 and says in response.json()["error"], bad
        assert httpx.get(f"{base}/v2/logging").json()["log_info"] is True, "a refused change changes nothing"
        assert grpc_client.get_log_settings(as_json=True)["settings"]["log_verbose_level"] == {"uint32_param": 0}
    finally:
        grpc_client.close()
        server.close()


def _kill_and_wait(base: str, restarts: int) -> None:
    (worker,) = httpx.get(f"{base}/v1/partitions").json()["partitions"]
    os.kill(worker["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        (state,) = httpx.get(f"{base}/v1/partitions").json()["partitions"]
        if state["ready"] and state["restarts"] == restarts:
            return
        time.sleep(0.2)
    raise AssertionError(f"the worker did not come back: {state}")


def test_an_output_too_large_for_json_is_refused_and_the_same_as_binary_is_answered(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """JSON outputs are written in the event loop: one certainly over --max-json-mb as JSON gets 400 naming the
    output and the way out (binary data), before it is written; small ones, and the same one as binary, are served."""
    args = ("--cpu-slices", "1", "--models", "crowd-csrnet", "--max-json-mb", "0.001")
    server = Gateway(tiny_repo.root, *args, log=tmp_path / "serve.log")
    contract = read_contract(tiny_repo.root / "crowd-csrnet")

    def post(side: int, binary_output: bool) -> httpx.Response:
        image = make_inputs(contract, batch=1, seed=side, dims={"height": side, "width": side})["image"]
        output: dict[str, object] = {"name": "density", **({"parameters": {"binary_data": True}} if binary_output else {})}
        header = json.dumps(
            {
                "inputs": [
                    {"name": "image", "datatype": "FP32", "shape": list(image.shape), "parameters": {"binary_data_size": image.nbytes}}
                ],
                "outputs": [output],
            }
        ).encode()
        headers = {"Inference-Header-Content-Length": str(len(header))}
        return httpx.post(
            f"http://{server.url}/v2/models/crowd-csrnet/infer", content=header + image.tobytes(), headers=headers, timeout=60
        )

    try:
        refused = post(256, binary_output=False)  # a 32x32 density: 1,024 floats, at least 4,096 bytes as JSON
        assert refused.status_code == 400
        assert refused.json()["error"] == (
            "output density has 1024 values, over 4096 bytes as JSON, past the limit of 1048 (--max-json-mb): "
            "ask for it as binary data (its 'parameters': {'binary_data': true})"
        )
        binary = post(256, binary_output=True)
        assert binary.status_code == 200
        assert (
            int(binary.headers["inference-header-content-length"])
            < len(binary.content)
            == int(binary.headers["inference-header-content-length"]) + 4096
        )
        small = post(32, binary_output=False)  # a 4x4 density as JSON
        assert small.status_code == 200 and len(small.json()["outputs"][0]["data"]) == 16
    finally:
        server.close()


def test_batch_arenas_grown_by_one_large_request_shrink_back(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    # Allocated up front, an arena counts against a container's memory limit for as long as it exists.
    server = Gateway(tiny_repo.root, "--cpu-slices", "1", "--models", "crowd-csrnet", log=tmp_path / "serve.log")
    client = httpclient.InferenceServerClient(server.url, network_timeout=60)

    def arenas() -> dict[str, int]:
        prefix = f"migserve-arena-{server.process.pid}-"
        return {p.name: p.stat().st_size for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)}

    contract = read_contract(tiny_repo.root / "crowd-csrnet")

    def infer(batch: int, side: int) -> None:
        client.infer("crowd-csrnet", triton_inputs(make_inputs(contract, batch, seed=0, dims={"height": side, "width": side})))

    try:
        infer(8, 1024)  # 96 MiB of inputs: over the 64 MB below which arenas are kept
        assert max(arenas().values()) >= 96 << 20
        for _ in range(130):  # two watches of SHRINK_AFTER (64) writes: the one that saw the large batch, then one without
            infer(1, 64)  # 48 KiB
        assert max(arenas().values()) <= 1 << 20, arenas()
    finally:
        client.close()
        server.close()
