"""The gateway's own HTTP/1.1 connection handling, over raw sockets.

Inference requests are read straight off the socket; any other request hands the
connection to uvicorn. These tests drive what a library client would not: several
requests on one connection, pipelining, a body dribbled in pieces, the framings that
must be handed over, malformed heads, Connection: close and the idle timeout.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import select
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import numpy as np
import pytest

from migserve.contract import read_contract
from migserve.types import Array
from service.fds import FEW, RESERVE
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
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent Length: 2\r\nContent-Length: 2\r\n\r\n{{}}",
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nX-Trace(1): on\r\nContent-Length: 2\r\n\r\n{{}}",
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nX-Note: a\x01b\r\nContent-Length: 2\r\n\r\n{{}}",
    ],
    ids=[
        "header-without-colon",
        "non-numeric-length",
        "two-lengths",
        "bare-lf",
        "bare-lf-get",
        "one-bare-lf",
        "space-in-a-name",
        "name-not-a-token",
        "control-in-a-value",
    ],
)
def test_malformed_heads_get_a_400_and_the_gateway_serves_on(gateway: Gateway, tiny_repo: ExportedRepo, head: str) -> None:
    sock, reader = _connect(gateway)
    with sock:
        sock.sendall(head.encode())
        status, _, answer = read_response(reader)
    assert status == 400, answer
    if "X-" in head or "t L" in head:  # what httptools found, named (RFC 9110: a name is a token, a value has no CTL)
        assert "Invalid header" in json.loads(answer)["error"], answer
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


@pytest.mark.parametrize("before", ["answered", "silent"])
def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(gateway: Gateway, tiny_repo: ExportedRepo, before: str) -> None:
    """Idle after an answer, or since it was opened (silent: before, a client that never sent a byte held its
    connection and an open file for as long as it liked, past --head-timeout-s, which starts at a head's first
    byte)."""
    body, n = _infer_body(tiny_repo, seed=8)
    sock, reader = _connect(gateway)
    with sock:
        if before == "answered":
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
        assert reader.read() == b"", "the gateway's side ends after the answer (the rest of the head is dropped)"
    body, n = _infer_body(tiny_repo, seed=9)
    _expected(gateway, body, n)  # another client is still served


@pytest.mark.parametrize("path", HEAD_PATHS)
def test_an_endless_header_does_not_grow_the_gateway(gateway: Gateway, tiny_repo: ExportedRepo, path: str) -> None:
    """httptools keeps a header's bytes until it ends: uvicorn's protocol alone grew by what the client sent. Past
    64 KiB the gateway answers 431 and drops the rest while it lingers."""
    before = _resident_mb(gateway.process.pid)
    sock, reader = _opened(gateway, path)
    chunk = b"a" * (1 << 20)
    with sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        for _ in range(128):
            sock.sendall(chunk)
        assert read_response(reader)[0] == 431
    assert _resident_mb(gateway.process.pid) - before < 32, "the header's 128 MB were not kept"
    body, n = _infer_body(tiny_repo, seed=10)
    _expected(gateway, body, n)


RECEIVE_TIMEOUT_S = 2.0
HEAD_TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def impatient(tiny_repo: ExportedRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway that waits 2 s for a stalled client and 4 s for a whole head, with room for one 50 MB body at a time."""
    log = tmp_path_factory.mktemp("impatient") / "serve.log"
    args = ("--cpu-slices", "1", "--models", "crowd-csrnet", "--max-body-mb", "50", "--max-pending-mb", "60")
    timeouts = ("--receive-timeout-s", str(RECEIVE_TIMEOUT_S), "--head-timeout-s", str(HEAD_TIMEOUT_S))
    server = Gateway(tiny_repo.root, *args, *timeouts, log=log)
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


def _disconnected(gateway: Gateway, reason: str = "receive_timeout") -> float:
    text = httpx.get(f"http://{gateway.url}/metrics").text
    return _metric(text, "migserve_clients_disconnected_total", protocol="http", reason=reason)


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


@pytest.mark.parametrize("path", HEAD_PATHS)
def test_a_client_that_sends_again_after_its_408_reads_it(impatient: Gateway, tiny_repo: ExportedRepo, path: str) -> None:
    """A client that paused mid-request for --receive-timeout-s, then sends the rest: the gateway lingers after its 408
    (drops what comes), so the client reads the 408; before, the gateway closed at once, and the client's second
    write after it met a reset (the fuzzer's timing kind found it)."""
    request = _request(*_infer_body(tiny_repo, seed=16))
    sock, reader = _opened(impatient, path)
    with sock:
        sock.sendall(request[:100])
        time.sleep(RECEIVE_TIMEOUT_S * 1.5)
        sock.sendall(request[100:200])
        time.sleep(0.3)  # a reset, were the gateway's side closed, is back by now
        sock.sendall(request[200:])
        status, _, answer = read_response(reader)
        assert status == 408 and "--receive-timeout-s" in json.loads(answer)["error"]
        assert reader.read() == b"", "the gateway's side ended after the answer"
    assert _body_bytes(impatient) == 0


@pytest.mark.parametrize("path", HEAD_PATHS)
def test_a_head_that_trickles_in_gets_408_at_the_head_timeout(impatient: Gateway, tiny_repo: ExportedRepo, path: str) -> None:
    """A head sent a few bytes every 0.5 s (never quiet for the receive timeout) is cut off once --head-timeout-s has
    passed since it began (before, such a client held its connection for as long as it kept trickling), counted as
    head_timeout, and the gateway serves on."""
    before = _disconnected(impatient, "head_timeout")
    head = _request(*_infer_body(tiny_repo, seed=18))[:100]  # not all of the head
    sock, reader = _opened(impatient, path)
    with sock:
        started, sent = time.monotonic(), 0
        while not select.select([sock], [], [], RECEIVE_TIMEOUT_S / 4)[0] and sent < len(head):  # until the answer comes
            sock.sendall(head[sent : sent + 4])
            sent += 4
        waited = time.monotonic() - started
        status, _, answer = read_response(reader)
    assert status == 408 and "--head-timeout-s" in json.loads(answer)["error"], answer
    assert HEAD_TIMEOUT_S * 0.9 < waited < HEAD_TIMEOUT_S * 2.5
    assert _disconnected(impatient, "head_timeout") == before + 1
    _expected(impatient, *_infer_body(tiny_repo, seed=19))


def test_a_slow_client_that_keeps_sending_is_served(impatient: Gateway, tiny_repo: ExportedRepo) -> None:
    """The receive timeout bounds the quiet between reads, not the whole request: 8 pieces, 0.5 s apart."""
    size = len(_request(*_infer_body(tiny_repo, seed=12)))
    _dribbled(impatient, 12, tiny_repo, piece=size // 8 + 1, pause=RECEIVE_TIMEOUT_S / 4)


def _tcp_inode(gateway: Gateway, client: socket.socket) -> int:
    """The inode of the gateway's end of `client`'s connection, from /proc/net/tcp (0 once it is closed, when the
    kernel keeps the end without an owner for a while, or when the entry is gone)."""
    local, remote = f"{int(gateway.url.split(':')[1]):04X}", f"{client.getsockname()[1]:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{local}") and fields[2].endswith(f":{remote}"):
            return int(fields[9])
    return 0


def _held(gateway: Gateway, client: socket.socket) -> bool:
    """Whether the gateway process has its end of `client`'s connection open."""
    inode = _tcp_inode(gateway, client)
    return inode != 0 and f"socket:[{inode}]" in _fd_targets(gateway.process.pid)


def _fd_targets(pid: int) -> set[str]:
    """What a process's descriptors point at; one it closes while they are read is left out (it was listed, then gone)."""
    targets = set()
    for link in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            targets.add(str(link.readlink()))
    return targets


def _released_after(gateway: Gateway, client: socket.socket, bound: float) -> float:
    started = time.monotonic()
    while _held(gateway, client):
        assert time.monotonic() - started < bound, f"the gateway held the connection over {bound} s"
        time.sleep(0.05)
    return time.monotonic() - started


MB = 1 << 20
BIG = 64 * MB  # over the impatient gateway's --max-body-mb 50, and over what the sockets' buffers take up


def _sent_whole(gateway: Gateway, method_path: tuple[str, str], headers: dict[str, str], size: int) -> tuple[int, bytes]:
    """http.client sends the head and all `size` bytes of body, then reads the answer, as Python's clients do."""
    host, port = gateway.url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest(*method_path, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        chunk = bytes(MB)
        for _ in range(size // MB):
            connection.send(chunk)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("method_path", "headers", "status", "says"),
    [
        (("POST", PATH), {"Content-Length": str(BIG), "Connection": "close"}, 413, "over the limit of 52428800"),
        (
            ("POST", "/v1/crowd/count"),
            {"Content-Length": str(BIG), "Connection": "close", "Content-Type": "image/jpeg"},
            413,
            "over the limit",
        ),
        (("POST", PATH), {"Content-Length": f"{BIG}x"}, 400, "could not be parsed: Invalid character in Content-Length"),
        (("POST", "/v1/crowd/count"), {"Bad Header": "1", "Content-Length": str(BIG)}, 400, "could not be parsed: Invalid header token"),
        (("POST", PATH), {"X-Padding": "a" * (70 << 10), "Content-Length": str(BIG)}, 431, "over 65536 bytes"),
    ],
    ids=["over-the-limit-closing", "over-the-limit-closing-v1", "unparsable-length", "unparsable-header", "head-over-64-kib"],
)
def test_a_client_still_sending_its_body_reads_the_answer(
    impatient: Gateway, tiny_repo: ExportedRepo, method_path: tuple[str, str], headers: dict[str, str], status: int, says: str
) -> None:
    """Answered before the body is read, on a connection that then closes: closed at once, the unread body made the
    kernel reset the connection, and a client still sending it (http.client, urllib) got "connection reset"."""
    got, answer = _sent_whole(impatient, method_path, headers, BIG)
    assert got == status, answer
    assert says in json.loads(answer)["error"]
    body, n = _infer_body(tiny_repo, seed=14)
    _expected(impatient, body, n)


def test_urllib_gets_413_for_a_body_over_the_limit(impatient: Gateway) -> None:
    """urllib asks to close the connection after each request."""
    request = urllib.request.Request(f"http://{impatient.url}{PATH}", data=bytes(BIG), method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert "over the limit of 52428800" in json.loads(refused.value.read())["error"]


@pytest.mark.parametrize("path", ["/v1/crowd/count", PATH])
def test_a_lingering_connection_ends_when_its_client_closes_or_goes_quiet(impatient: Gateway, path: str) -> None:
    """After an answer to a request whose body it did not read, the gateway ends its side and drops what comes,
    until the client closes (then at once) or sends nothing for --receive-timeout-s (here 2 s; 5 s at most)."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000x\r\n\r\n".encode()
    sock, reader = _connect(impatient)
    with sock:
        sock.sendall(head)
        assert read_response(reader)[0] == 400
        assert reader.read() == b"", "the gateway's side ended after the answer"
        assert _held(impatient, sock), "lingering"
        sock.sendall(b"x" * MB)  # dropped, no reset
        sock.shutdown(socket.SHUT_WR)
        assert _released_after(impatient, sock, 1.5) < 1.5
    sock, reader = _connect(impatient)
    with sock:
        sock.sendall(head)
        assert read_response(reader)[0] == 400
        quiet = _released_after(impatient, sock, RECEIVE_TIMEOUT_S * 4)
    assert quiet > RECEIVE_TIMEOUT_S * 0.8


def test_a_request_running_when_its_connection_ends_writes_nothing_after_the_end(impatient: Gateway, tiny_repo: ExportedRepo) -> None:
    """A chunked body whose chunk size cannot be parsed, on a request asking for "100 Continue": the request has
    begun in the gateway, which then asks for the body (writing its 100) after the connection's 400 and end."""
    before = impatient.log.read_text().count("Exception in ASGI application")
    head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n"
    sock, reader = _connect(impatient)
    with sock:
        sock.sendall(head.encode() + b"zz\r\n")
        status, _, answer = read_response(reader)
        assert status == 400 and "Invalid character in chunk size" in json.loads(answer)["error"]
        assert reader.read() == b"", "nothing after the answer and the end"
    _expected(impatient, *_infer_body(tiny_repo, seed=15))  # and the request's task has run meanwhile
    assert impatient.log.read_text().count("Exception in ASGI application") == before


def test_uvicorn_alone_bounds_heads_and_stalls_too(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """--http-server uvicorn: every connection is uvicorn's protocol, with the same 431 and --receive-timeout-s, and
    its refusals before a body is read are read by a client still sending it; a silent connection closes at the
    keep-alive timeout, and one past --max-connections is answered 503."""
    args = ["--cpu-slices", "1", "--models", "crowd-csrnet", "--http-server", "uvicorn", "--receive-timeout-s", "1", "--max-body-mb", "8"]
    args += ["--max-connections", "4"]
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
        refusals = [({"Connection": "close"}, 413), ({"Content-Length": f"{BIG}x"}, 400), ({"X-Padding": "a" * (70 << 10)}, 431)]
        for headers, status in refusals:
            assert _sent_whole(server, ("POST", PATH), {"Content-Length": str(BIG), **headers}, BIG)[0] == status
        body, n = _infer_body(tiny_repo, seed=13)
        _expected(server, body, n)
        sock, reader = _connect(server)
        with sock:  # silent: closed at the keep-alive timeout, as an idle one
            started = time.monotonic()
            assert reader.read() == b""
            assert 3 < time.monotonic() - started < 15
        held = [_connect(server) for _ in range(4)]  # --max-connections 4
        time.sleep(0.2)
        response = httpx.get(f"http://{server.url}/v2/health/ready")
        assert response.status_code == 503 and "--max-connections 4" in response.json()["error"], response.text
        for sock, reader in held:
            reader.close()
            sock.close()
        time.sleep(0.2)
        assert httpx.get(f"http://{server.url}/v2/health/ready").status_code == 200
    finally:
        server.close()


def _open_files(pid: int) -> tuple[int, int]:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_the_open_file_limit_is_raised_to_the_hard_one_and_a_low_one_is_warned_of(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """Each connection is a descriptor. A soft limit of 1024 under a higher hard one (a common default) is raised; a
    low hard limit is warned of at start, with the connections it leaves room for."""
    args = ("--models", "crowd-csrnet", "--cpu-slices", "1")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    roomy = min(hard, 8192)  # the hard limit this test may set: at most the one it runs under
    raised = Gateway(tiny_repo.root, *args, log=tmp_path / "raised.log", prefix=("prlimit", f"--nofile={roomy // 8}:{roomy}"))
    try:
        assert _open_files(raised.process.pid) == (roomy, roomy)
        assert ("client connections at once" in raised.log.read_text()) == (roomy < FEW)
    finally:
        raised.close()


def test_at_the_limit_a_new_connection_takes_the_place_of_an_idle_one(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """--max-connections 3: connections that sent nothing (a silent flood's) do not keep a client out: the new one is
    served and the oldest silent one closed, though one kept alive after an answer is older; with no silent one left,
    the oldest kept alive is closed (its client sees what it would at the keep-alive timeout). Connections with a
    request begun are not closed for it: with three of those the new one gets 503."""
    server = Gateway(tiny_repo.root, "--cpu-slices", "1", "--models", "crowd-csrnet", "--max-connections", "3", log=tmp_path / "serve.log")
    body, n = _infer_body(tiny_repo, seed=22)
    opened: list[tuple[socket.socket, BinaryIO]] = []

    def served() -> socket.socket:
        sock, reader = _connect(server)
        opened.append((sock, reader))
        sock.sendall(_request(body, n))
        status, headers, answer = read_response(reader)
        assert status == 200 and np.array_equal(_density(headers, answer), expected), answer
        return sock

    try:
        expected = _expected(server, body, n)
        kept = served()  # 1: kept alive after its answer, the oldest
        silent = [_connect(server) for _ in range(2)]  # 2 and 3
        opened += silent
        time.sleep(0.2)
        fourth = served()
        assert [_closed_by_gateway(sock) for sock in (kept, silent[0][0], silent[1][0])] == [False, True, False]
        for sock in (silent[1][0], fourth):
            sock.sendall(b"GET /v2 HTTP/1.1\r\nHo")  # a request begun: not idle
        time.sleep(0.2)
        fifth = served()  # the kept-alive one, the only idle one, makes room
        assert [_closed_by_gateway(sock) for sock in (kept, silent[1][0], fourth)] == [True, False, False]
        fifth.sendall(b"GET /v2 HTTP/1.1\r\nHo")
        time.sleep(0.2)
        refused = httpx.get(f"http://{server.url}/v2/health/ready")
        assert refused.status_code == 503 and "--max-connections 3" in refused.json()["error"], refused.text
        for sock, reader in opened[-1:]:  # the fifth's: room for the metrics' request
            reader.close()
            sock.close()
        time.sleep(0.2)
        assert _disconnected(server, "made_room") == 2 and _disconnected(server, "max_connections") == 1
    finally:
        for sock, reader in opened:
            reader.close()
            sock.close()
        server.close()


def _closed_by_gateway(sock: socket.socket) -> bool:
    """Whether the gateway has ended the connection (nothing else was sent on it)."""
    readable, _, _ = select.select([sock], [], [], 0.5)
    return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""


def test_connections_past_the_limit_get_503_and_leave_the_gateway_the_files_its_work_needs(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """Under a hard limit of 300 open files the gateway takes 300 less RESERVE client connections at once. Before,
    it took connections until its table of files was full: new clients were dropped without an answer, and a worker
    killed meanwhile was not started again (EMFILE at its pipes) until clients went away; a client sending a head a
    byte at a time holds its connection for --head-timeout-s. Now one past the limit gets 503 naming
    --max-connections, a flood of them is closed as fast as it comes, a killed worker comes back while the flood
    holds its sockets, and a client connected before keeps being served."""
    args = ("--models", "crowd-csrnet", "--cpu-slices", "1")
    server = Gateway(tiny_repo.root, *args, log=tmp_path / "low.log", prefix=("prlimit", "--nofile=300:300"))
    limit = 300 - max(RESERVE, 30)
    held: list[socket.socket] = []
    try:
        assert _open_files(server.process.pid) == (300, 300)
        assert f"may open 300 files, so it takes at most {limit} client connections at once" in server.log.read_text()
        body, n = _infer_body(tiny_repo, seed=21)
        expected = _expected(server, body, n)
        (worker,) = [p["pid"] for p in httpx.get(f"http://{server.url}/v1/partitions").json()["partitions"]]
        request = _request(body, n)
        keep, reader = _connect(server)  # connected before, its request begun: served once it is whole
        keep.sendall(request[:20])
        held.append(keep)
        for _ in range(limit - 1):  # heads begun: each held until --head-timeout-s (60 s)
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /v2 HTTP/1.1\r\nHo")
            held.append(sock)
        time.sleep(0.5)
        refused = httpx.get(f"http://{server.url}/v2/health/ready")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert f"--max-connections {limit}" in refused.json()["error"]
        for _ in range(400):  # more than the table of files holds, each also a head begun
            sock = socket.create_connection(("127.0.0.1", server.port))
            with contextlib.suppress(OSError):  # reset: closed at once
                sock.sendall(b"GET /v2 HTTP/1.1\r\nHo")
            held.append(sock)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while server.log.read_text().count("worker cpu-0 ready") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        log = server.log.read_text()
        assert log.count("worker cpu-0 ready") == 2 and "Too many open files" not in log, log[-3000:]
        keep.sendall(request[20:])
        status, headers, answer = read_response(reader)
        assert status == 200 and np.array_equal(_density(headers, answer), expected), answer
        reader.close()
        for sock in held:
            sock.close()
        held.clear()
        time.sleep(0.5)
        assert httpx.get(f"http://{server.url}/v2/health/ready").status_code == 200
        assert _disconnected(server, "max_connections") >= 1
        assert log.count("answering new connections 503") == 1  # once a minute
    finally:
        for sock in held:
            sock.close()
        server.close()


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


@pytest.mark.parametrize("path", ["/v2/health/ready", "/v2", "/v2/models/crowd-csrnet", "/v1/partitions", "/metrics"])
def test_head_is_answered_as_get_without_the_body(gateway: Gateway, path: str) -> None:
    """Every server must take HEAD where it takes GET (`curl -I`, load balancers' health checks): 405 before."""
    got, head = httpx.get(f"http://{gateway.url}{path}"), httpx.head(f"http://{gateway.url}{path}")
    assert head.status_code == got.status_code == 200
    assert head.content == b"" and head.headers.get("content-type") == got.headers.get("content-type")
    if path in ("/v2/health/ready", "/v2", "/v2/models/crowd-csrnet"):  # the others' figures move between the two
        assert int(head.headers["content-length"]) == len(got.content)


def test_head_where_only_post_is_taken_is_405_naming_head(gateway: Gateway) -> None:
    refused = httpx.head(f"http://{gateway.url}{PATH}")
    assert refused.status_code == 405 and refused.headers["allow"] == "POST"
    sock, reader = _connect(gateway)  # the error's text, which an HTTP client drops from a HEAD answer
    with sock:
        sock.sendall(f"HEAD {PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, _ = read_response(reader)
    assert status == 405 and int(headers["content-length"]) == len(json.dumps({"error": f"HEAD {PATH}: method not allowed"}))
