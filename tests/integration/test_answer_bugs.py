"""A bug in an ASGI route (not the infer fast path) answers 500 in the gateway's form, and the client's kept-alive
connection serves its next request: real uvicorn, as `migserve serve` runs it, over a real socket.

The gateway's routes have no known bug to trigger, so the app here is FastAPI with the gateway's middleware and
a route that raises. Before AnswerBugs, Starlette's handler answered and raised again, uvicorn closed the
connection, and a client's next request on it failed with a reset (found by fuzzing the /v1 uploads)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from bench.ports import free_port
from service.api.errors import AnswerBugs
from tests.helpers import read_response


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a route's mistake")

    @app.get("/fine")
    async def fine() -> dict[str, str]:
        return {"state": "fine"}

    @app.get("/half")
    async def half() -> StreamingResponse:
        async def parts() -> AsyncIterator[bytes]:
            yield b"the first part, "
            raise RuntimeError("a mistake after the answer started")

        return StreamingResponse(parts())

    app.add_middleware(AnswerBugs)
    return app


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    chosen = free_port()
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=chosen, log_level="critical", http="httptools"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield chosen
    server.should_exit = True
    thread.join(10)


def test_a_bug_answers_500_and_the_connection_serves_the_next_request(port: int, caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as reader:
        for _ in range(2):  # twice on one connection, then a request that works
            sock.sendall(b"GET /bug HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_response(reader)
            assert status == 500
            assert headers["content-type"] == "application/json"
            assert json.loads(body) == {"error": "internal error: RuntimeError: a route's mistake"}
            assert headers.get("connection") != "close"
        sock.sendall(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(reader)
        assert (status, json.loads(body)) == (200, {"state": "fine"})
    assert any("GET /bug failed" in r.getMessage() and r.exc_info for r in caplog.records), "the traceback is logged"


def test_a_bug_after_the_answer_started_closes_the_connection(port: int) -> None:
    """Nothing can be answered any more: the client sees the connection end before the body does."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /half HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")
    assert b"the first part, " in received
    assert not received.endswith(b"0\r\n\r\n"), "the chunked body never got its last chunk"
