"""The gateway's own HTTP/1.1 connection handling, over raw sockets.

Inference requests are read straight off the socket; any other request hands the
connection to uvicorn. These tests drive what a library client would not: several
requests on one connection, pipelining, a body dribbled in pieces, the framings that
must be handed over, malformed heads, Connection: close and the idle timeout.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import numpy as np
import pytest

from migserve.contract import read_contract
from migserve.types import Array
from service.fds import FEW
from tests.helpers import ExportedRepo, Gateway, read_response
from tests.integration.test_gateway_behaviour import _metric
from tests.integration.test_gateway_protocol import make_inputs

PATH = "/v2/models/crowd-csrnet/infer"


def _infer_body(repo: ExportedRepo, seed: int) -> tuple[bytes, int]:
    """A binary crowd-csrnet request (16x16 image, binary output) and its JSON header's length."""
    image = make_inputs(read_contract(repo.root / "crowd-csrnet"), batch=1, seed=seed, dims={"height": 16, "width": 16})["image"]
    header = json.dumps(
        {
            "inputs": [{"name": "image", "datatype": "FP32", "shape": list(image.shape), "parameters": {"binary_data_size": image.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + image.tobytes(), len(header)


def _request(body: bytes, header_length: int, *, target: str = PATH, version: str = "HTTP/1.1", extra: str = "") -> bytes:
    head = f"POST {target} {version}\r\nHost: x\r\nContent-Length: {len(body)}\r\nInference-Header-Content-Length: {header_length}\r\n"
    return (head + extra + "\r\n").encode() + body


def _density(headers: dict[str, str], body: bytes) -> Array:
    n = int(headers["inference-header-content-length"])
    (output,) = json.loads(body[:n])["outputs"]
    return np.frombuffer(body[n:], dtype=np.float32).reshape(output["shape"])


def _connect(gateway: Gateway) -> tuple[socket.socket, BinaryIO]:
    host, port = gateway.url.split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, sock.makefile("rb")


def _expected(gateway: Gateway, body: bytes, header_length: int) -> Array:
    """The answer over a fresh httpx connection, to compare raw-socket answers with."""
    response = httpx.post(f"http://{gateway.url}{PATH}", content=body, headers={"Inference-Header-Content-Length": str(header_length)})
    assert response.status_code == 200, response.text
    return _density({k.lower(): v for k, v in response.headers.items()}, response.content)


def test_one_connection_serves_inference_then_other_routes_then_inference(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    body, n = _infer_body(tiny_repo, seed=1)
    expected = _expected(gateway, body, n)
    sock, reader = _connect(gateway)
    with sock:
        sock.sendall(_request(body, n))
        status, headers, answer = read_response(reader)
        assert status == 200 and np.array_equal(_density(headers, answer), expected)
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")  # not inference: uvicorn takes over
        assert read_response(reader)[0] == 200
        sock.sendall(_request(body, n))
        status, headers, answer = read_response(reader)
        assert status == 200 and np.array_equal(_density(headers, answer), expected)


def test_pipelined_requests_are_answered_in_order(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    (first, n1), (second, n2) = _infer_body(tiny_repo, seed=2), _infer_body(tiny_repo, seed=3)
    expected = [_expected(gateway, first, n1), _expected(gateway, second, n2)]
    assert not np.array_equal(expected[0], expected[1])
    sock, reader = _connect(gateway)
    with sock:
        sock.sendall(_request(first, n1) + _request(second, n2) + _request(first, n1) + b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = [read_response(reader) for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    assert [np.array_equal(_density(h, b), e) for (_, h, b), e in zip(answers[:3], [*expected, expected[0]], strict=True)] == [True] * 3
    assert json.loads(answers[3][2])["name"] == "migserve"


def _dribbled(gateway: Gateway, seed: int, repo: ExportedRepo, piece: int, pause: float) -> None:
    """An inference request sent `piece` bytes at a time, `pause` seconds apart, is answered as a whole one is."""
    body, n = _infer_body(repo, seed=seed)
    expected = _expected(gateway, body, n)
    raw = _request(body, n)
    sock, reader = _connect(gateway)
    with sock:
        for start in range(0, len(raw), piece):
            sock.sendall(raw[start : start + piece])
            time.sleep(pause)
        status, headers, answer = read_response(reader)
    assert status == 200 and np.array_equal(_density(headers, answer), expected)


def test_a_request_sent_a_few_bytes_at_a_time(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    _dribbled(gateway, 4, tiny_repo, piece=97, pause=0.001)  # the head itself arrives in pieces


def _chunked(body: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000]) for i in range(0, len(body), 1000)) + b"0\r\n\r\n"


@pytest.mark.parametrize("variant", ["chunked", "expect-100", "query-string", "http/1.0", "escaped-path"])
def test_framings_the_fast_path_hands_to_uvicorn_are_served(gateway: Gateway, tiny_repo: ExportedRepo, variant: str) -> None:
    body, n = _infer_body(tiny_repo, seed=5)
    expected = _expected(gateway, body, n)
    if variant == "chunked":
        head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nInference-Header-Content-Length: {n}\r\n\r\n"
        raw = head.encode() + _chunked(body)
    elif variant == "expect-100":
        raw = _request(body, n, extra="Expect: 100-continue\r\n")
    elif variant == "query-string":
        raw = _request(body, n, target=PATH + "?trace=1")
    elif variant == "http/1.0":
        raw = _request(body, n, version="HTTP/1.0")
    else:
        raw = _request(body, n, target=PATH.replace("crowd-csrnet", "crowd%2Dcsrnet"))
    sock, reader = _connect(gateway)
    with sock:
        sock.sendall(raw)
        status, headers, answer = read_response(reader)
    assert status == 200, answer
    assert np.array_equal(_density(headers, answer), expected)


@pytest.mark.parametrize(
    "head",
    [
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nno colon here\r\n\r\n{{}}",
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: two\r\n\r\n{{}}",
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}",
        f"POST {PATH} HTTP/1.1\nHost: x\nContent-Length: 2\n\n{{}}",  # at once, not at the receive timeout (408)
        "GET /v2/health/ready HTTP/1.1\nHost: x\n\n",
        "GET /v2/health/ready HTTP/1.1\r\nHost: x\n\r\n",
    ],
    ids=["header-without-colon", "non-numeric-length", "two-lengths", "bare-lf", "bare-lf-get", "one-bare-lf"],
)
def test_malformed_heads_get_a_400_and_the_gateway_serves_on(gateway: Gateway, tiny_repo: ExportedRepo, head: str) -> None:
    sock, reader = _connect(gateway)
    with sock:
        sock.sendall(head.encode())
        status, _, answer = read_response(reader)
    assert status == 400, answer
    body, n = _infer_body(tiny_repo, seed=6)
    _expected(gateway, body, n)  # another client is still served


def test_connection_close_is_honoured(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    body, n = _infer_body(tiny_repo, seed=7)
    sock, reader = _connect(gateway)
    with sock:
        sock.sendall(_request(body, n, extra="Connection: close\r\n"))
        status, headers, _ = read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert reader.read() == b"", "the gateway closes the connection after the answer"


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    body, n = _infer_body(tiny_repo, seed=8)
    sock, reader = _connect(gateway)
    with sock:
        sock.sendall(_request(body, n))
        assert read_response(reader)[0] == 200
        started = time.monotonic()
        assert reader.read() == b""  # uvicorn's keep-alive timeout (5 s); the socket's own timeout is 30 s
        assert 3 < time.monotonic() - started < 15


def _resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


# "fresh": the gateway's own protocol reads the head; "handed-over": uvicorn's serves the connection after a GET
HEAD_PATHS = ["fresh", "handed-over"]


def _opened(gateway: Gateway, path: str) -> tuple[socket.socket, BinaryIO]:
    sock, reader = _connect(gateway)
    if path == "handed-over":
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(reader)[0] == 200
    return sock, reader


@pytest.mark.parametrize("path", HEAD_PATHS)
def test_a_head_over_64_kib_gets_431_and_the_connection_closes(gateway: Gateway, tiny_repo: ExportedRepo, path: str) -> None:
    sock, reader = _opened(gateway, path)
    with sock:
        sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nX-Padding: {'a' * (70 << 10)}\r\n\r\n".encode())
        status, headers, answer = read_response(reader)
        assert status == 431 and headers["connection"] == "close"
        assert "request line and headers are over 65536 bytes" in json.loads(answer)["error"]
        with contextlib.suppress(ConnectionResetError):  # closed with the rest of the head unread: the kernel resets it
            assert reader.read() == b""
    body, n = _infer_body(tiny_repo, seed=9)
    _expected(gateway, body, n)  # another client is still served


@pytest.mark.parametrize("path", HEAD_PATHS)
def test_an_endless_header_does_not_grow_the_gateway(gateway: Gateway, tiny_repo: ExportedRepo, path: str) -> None:
    """httptools keeps a header's bytes until it ends: uvicorn's protocol alone grew by what the client sent."""
    before = _resident_mb(gateway.process.pid)
    sock, _ = _opened(gateway, path)
    chunk, sent = b"a" * (1 << 20), 0
    with sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        with pytest.raises(OSError):  # reset or broken pipe: the gateway closed the connection
            while sent < 256:
                sock.sendall(chunk)
                sent += 1
    assert sent < 64, f"the gateway read {sent} MB of one header"
    assert _resident_mb(gateway.process.pid) - before < 32
    body, n = _infer_body(tiny_repo, seed=10)
    _expected(gateway, body, n)


RECEIVE_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def impatient(tiny_repo: ExportedRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway that waits 2 s for a stalled client, with room for one 50 MB body at a time."""
    log = tmp_path_factory.mktemp("impatient") / "serve.log"
    args = ("--cpu-slices", "1", "--models", "crowd-csrnet", "--max-body-mb", "50", "--max-pending-mb", "60")
    server = Gateway(tiny_repo.root, *args, "--receive-timeout-s", str(RECEIVE_TIMEOUT_S), log=log)
    yield server
    server.close()


def _body_bytes(gateway: Gateway) -> float:
    text = httpx.get(f"http://{gateway.url}/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("migserve_request_body_bytes ")))


def _ends_within(reader: BinaryIO, seconds: float) -> tuple[int | None, float]:
    """The status the gateway answers a stalled request with (None: closed without one), and when."""
    started = time.monotonic()
    try:
        status = read_response(reader)[0]
        assert reader.read() == b""
    except (ConnectionResetError, AssertionError):
        status = None
    waited = time.monotonic() - started
    assert waited < seconds, f"still open after {waited:.1f} s"
    return status, waited


@pytest.mark.parametrize("path", HEAD_PATHS)
def test_a_client_that_stops_in_the_head_gets_408_and_is_disconnected(impatient: Gateway, path: str) -> None:
    before = _disconnected(impatient)
    sock, reader = _opened(impatient, path)
    with sock:
        sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Le".encode())
        status, waited = _ends_within(reader, RECEIVE_TIMEOUT_S * 4)
    assert status == 408 and waited > RECEIVE_TIMEOUT_S * 0.9
    assert _disconnected(impatient) == before + 1  # in /metrics, by either protocol's code


def _disconnected(gateway: Gateway) -> float:
    text = httpx.get(f"http://{gateway.url}/metrics").text
    return _metric(text, "migserve_clients_disconnected_total", protocol="http", reason="receive_timeout")


@pytest.mark.parametrize("path", HEAD_PATHS)
def test_a_client_that_stops_in_the_body_is_disconnected_and_its_budget_given_back(
    impatient: Gateway, tiny_repo: ExportedRepo, path: str
) -> None:
    sock, reader = _opened(impatient, path)
    with sock:
        if path == "fresh":  # read into one buffer, counted in --max-pending-mb from its head on
            sock.sendall(_request(b"", 0).replace(b"Content-Length: 0", b"Content-Length: 50000000") + b"{" * 1000)
            deadline = time.monotonic() + 10  # polled: a busy host reads the head later
            while _body_bytes(impatient) != 50_000_000 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _body_bytes(impatient) == 50_000_000
            refused = httpx.post(f"http://{impatient.url}{PATH}", content=b"{" * 20_000_000)
            assert refused.status_code == 503, "the stalled body holds the budget while it lasts"
            expected_status = 408
        else:  # uvicorn's protocol: a chunked body, stopped after one chunk
            sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n{'{' * 1000}\r\n".encode())
            expected_status = 408  # no answer has begun: the app is told the client left, and the client why (was none)
        status, _ = _ends_within(reader, RECEIVE_TIMEOUT_S * 4)
    assert status == expected_status
    assert _body_bytes(impatient) == 0
    body, n = _infer_body(tiny_repo, seed=11)
    _expected(impatient, body, n)


def test_a_slow_client_that_keeps_sending_is_served(impatient: Gateway, tiny_repo: ExportedRepo) -> None:
    """The receive timeout bounds the quiet between reads, not the whole request: 8 pieces, 0.5 s apart."""
    size = len(_request(*_infer_body(tiny_repo, seed=12)))
    _dribbled(impatient, 12, tiny_repo, piece=size // 8 + 1, pause=RECEIVE_TIMEOUT_S / 4)


def test_uvicorn_alone_bounds_heads_and_stalls_too(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """--http-server uvicorn: every connection is uvicorn's protocol, with the same 431 and --receive-timeout-s."""
    args = ("--cpu-slices", "1", "--models", "crowd-csrnet", "--http-server", "uvicorn", "--receive-timeout-s", "1")
    server = Gateway(tiny_repo.root, *args, log=tmp_path / "serve.log")
    try:
        sock, reader = _connect(server)
        with sock:
            sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Le".encode())
            status, waited = _ends_within(reader, 4)
        assert status == 408 and waited > 0.9
        sock, reader = _connect(server)
        with sock:
            sock.sendall(f"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Padding: {'a' * (70 << 10)}\r\n\r\n".encode())
            assert _ends_within(reader, 4)[0] == 431
        body, n = _infer_body(tiny_repo, seed=13)
        _expected(server, body, n)
    finally:
        server.close()


def _open_files(pid: int) -> tuple[int, int]:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_the_open_file_limit_is_raised_to_the_hard_one_and_a_low_one_is_warned_of(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """Each connection is a descriptor; past the limit uvloop drops new connections unanswered and logs nothing. A
    soft limit of 1024 under a higher hard one (a common default) is raised; a low hard limit is warned of at start."""
    args = ("--models", "crowd-csrnet", "--cpu-slices", "1")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    roomy = min(hard, 8192)  # the hard limit this test may set: at most the one it runs under
    raised = Gateway(tiny_repo.root, *args, log=tmp_path / "raised.log", prefix=("prlimit", f"--nofile={roomy // 8}:{roomy}"))
    try:
        assert _open_files(raised.process.pid) == (roomy, roomy)
        assert ("client connections at once" in raised.log.read_text()) == (roomy < FEW)
    finally:
        raised.close()
    low = Gateway(tiny_repo.root, *args, log=tmp_path / "low.log", prefix=("prlimit", "--nofile=300:300"))
    try:
        assert _open_files(low.process.pid) == (300, 300)
        assert "may open 300 files (hard limit 300), so it can hold fewer than 300 client connections" in low.log.read_text()
        assert httpx.get(f"http://{low.url}/v2/health/ready").status_code == 200
    finally:
        low.close()


@pytest.mark.parametrize(
    "upgrade",
    [
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
    ],
    ids=["websocket", "h2c"],  # h2c: what `curl --http2` asks of a plain-HTTP server
)
def test_a_request_asking_to_upgrade_is_served_as_http_1_1_and_not_logged(gateway: Gateway, tiny_repo: ExportedRepo, upgrade: str) -> None:
    """The gateway serves no websockets and no h2c, so it answers such a request as HTTP/1.1, as a server may. With
    Upgrade and Connection: upgrade, httptools ended the request at its head and uvicorn dropped the body: `curl
    --http2` posting an inference request got 400 "not valid JSON". And uvicorn logged two WARNINGs for each, one
    telling the operator to install a websocket library."""
    body, n = _infer_body(tiny_repo, seed=8)
    expected = _expected(gateway, body, n)
    sock, reader = _connect(gateway)
    with sock:
        sock.sendall(_request(body, n, extra=f"Connection: Upgrade\r\n{upgrade}"))  # the first request: the fast path's
        status, headers, answer = read_response(reader)
        assert status == 200, answer
        assert np.array_equal(_density(headers, answer), expected)
        sock.sendall(f"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n{upgrade}\r\n".encode())
        status, _, answer = read_response(reader)  # handed over to uvicorn's protocol from here on
        assert status == 200, answer
        sock.sendall(_request(body, n, extra=f"Connection: Upgrade\r\n{upgrade}"))
        status, headers, answer = read_response(reader)
        assert status == 200, answer
        assert np.array_equal(_density(headers, answer), expected)
    log = gateway.log.read_text()
    assert "Unsupported upgrade request" not in log and "WebSocket library" not in log
