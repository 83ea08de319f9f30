"""A plain ASGI middleware for the hot path: `POST /v2/models/{name}[/versions/{v}]/infer`.

It reads the body with its size limit, calls `Gateway.infer` and writes the answer,
skipping FastAPI's routing, dependency resolution and Request/Response objects
(about 0.5 ms per request on these machines). Every other request, and the
OpenAPI description of this one, stays with FastAPI.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ServiceError, TooLarge
from .budget import Hold
from .encoding import WORTH_COMPRESSING, answer_coding, compressed, inflated, is_identity
from .errors import error_body
from .kserve import HEADER_LENGTH, Body, response_headers

if TYPE_CHECKING:
    from ..trace import Trace, Tracer
    from .gateway import Gateway

T = TypeVar("T")
CONTENT_LENGTH, BINARY_HEADER_LENGTH, TIMEOUT = b"content-length", HEADER_LENGTH.encode(), b"x-timeout-ms"
CONTENT_ENCODING, ACCEPT_ENCODING = b"content-encoding", b"accept-encoding"
WANTED = frozenset({CONTENT_LENGTH, BINARY_HEADER_LENGTH, TIMEOUT, CONTENT_ENCODING, ACCEPT_ENCODING})
INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/1)?/infer$")  # other versions: FastAPI's route refuses them
HEAD = "migserve.head"  # in a scope: the request was a HEAD, served as a GET


class InferFastPath:
    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._plain_startup_failure(send))
            return
        if scope["type"] == "http" and scope["method"] == "HEAD":
            # a GET without its body (every server must take HEAD where it takes GET: `curl -I`, load balancers'
            # checks); uvicorn leaves the body out, going by the method in its own scope, which stays HEAD
            await self.app({**scope, "method": "GET", HEAD: True}, receive, send)
            return
        match = INFER_PATH.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        headers = wanted_headers(scope["headers"])
        received = Received(time.monotonic_ns(), 0)
        with Hold(self.gateway.bodies) as hold:
            try:
                body = await read_body(receive, headers.get(CONTENT_LENGTH), self.gateway.config.max_body_bytes, hold)
            except ServiceError as exc:
                reply = error_reply(exc)
            else:
                received.end_ns = time.monotonic_ns()
                infer = answer_infer(
                    self.gateway,
                    match["name"],
                    body,
                    headers.get(BINARY_HEADER_LENGTH),
                    headers.get(TIMEOUT),
                    encoding=headers.get(CONTENT_ENCODING),
                    accept=headers.get(ACCEPT_ENCODING),
                    received=received,
                )
                answered = await unless_disconnected(infer, receive)
                if answered is None:
                    received.dropped(self.gateway.tracer)
                    return  # the client went away: its request left the queue (or its batch's answer is dropped)
                reply = answered
        sending = time.monotonic_ns()
        try:
            await respond(send, reply)
        finally:
            received.sent(self.gateway.tracer, sending)  # a send cut short still ends the trace

    def _plain_startup_failure(self, send: Send) -> Send:
        """`send`, with a start that failed for a reason the gateway can say (workers that died loading their models,
        say) told in that one line: uvicorn logs the message Starlette sends, a traceback of the gateway's own code."""

        async def sending(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.gateway.start_error is not None:
                message = {**message, "message": f"cannot start: {self.gateway.start_error}"}
            await send(message)

        return sending


@dataclass(slots=True)
class Received:
    """When an HTTP request's head and its whole body had arrived (time.monotonic_ns()); and its trace, if the trace
    settings picked it, for the HTTP path to finish once the answer is written (service/trace.py)."""

    start_ns: int
    end_ns: int
    trace: Trace | None = None

    def sent(self, tracer: Tracer, started_ns: int) -> None:
        """The answer went out (begun at `started_ns`): the trace, if any, is complete."""
        if self.trace is not None:
            self.trace.stamp("HTTP_SEND_START", started_ns)
            self.trace.stamp("HTTP_SEND_END")
            tracer.done(self.trace)
            self.trace = None

    def dropped(self, tracer: Tracer) -> None:
        """The client went away before its answer: the trace, if any, ends without sending."""
        if self.trace is not None:
            tracer.done(self.trace)
            self.trace = None


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    media: str
    payload: bytes
    extra: dict[str, str]

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Its headers, lower-case names: what both HTTP paths (ASGI and the raw connection) send."""
        found = [(b"content-type", self.media.encode()), (b"content-length", str(len(self.payload)).encode())]
        return found + [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.extra.items()]


async def answer_infer(
    gateway: Gateway,
    name: str,
    body: Body,
    header_length: str | None,
    timeout: str | None,
    *,
    encoding: str | None = None,
    accept: str | None = None,
    received: Received | None = None,
) -> Reply:
    """One inference request's answer, an error included; both HTTP paths (ASGI and the raw connection) use it.
    A body with a Content-Encoding (gzip, deflate) is inflated first, and the answer compressed as Accept-Encoding
    asks (service/api/encoding.py)."""
    try:
        with Hold(gateway.bodies) as hold:  # the inflated bytes, beside the body the caller holds
            if not is_identity(encoding):
                assert encoding is not None
                body = await inflated(body, encoding, gateway.config.max_body_bytes, hold)
            payload, json_length = await gateway.infer(name, body, header_length, timeout, received=received)
    except ServiceError as exc:
        return error_reply(exc)
    media, extra = response_headers(json_length)
    coding = answer_coding(accept) if json_length is None else None  # binary tensors go as they are (encoding.py)
    if coding is not None and len(payload) > WORTH_COMPRESSING:
        payload = await compressed(payload, coding)
        extra["Content-Encoding"] = coding
    return Reply(200, media, payload, extra)


def error_reply(exc: ServiceError) -> Reply:
    status, extra, payload = error_body(exc)
    return Reply(status, "application/json", payload, extra)


def wanted_headers(raw: list[tuple[bytes, bytes]]) -> dict[bytes, str]:
    """The few request headers the fast path reads, by lower-case name."""
    found: dict[bytes, str] = {}
    for key, value in raw:
        name = key.lower()
        if name in WANTED:
            found[name] = value.decode("latin-1")
    return found


async def unless_disconnected(work: Awaitable[T], receive: Receive, on_disconnect: Callable[[], object] | None = None) -> T | None:
    """`work`'s result, or None once the client disconnects first: then this task is cancelled while it
    awaits `work`, which cancels the request's future, so the batcher drops it before dispatch.
    `receive` must have delivered the whole body; `on_disconnect` is told when the client goes."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    def on_message(watch: asyncio.Future[Message]) -> None:
        nonlocal gone
        if not watch.cancelled() and watch.exception() is None and watch.result().get("type") == "http.disconnect":
            gone = True
            if on_disconnect is not None:
                on_disconnect()
            task.cancel()

    watch = asyncio.ensure_future(receive())  # after the whole body, the next message is http.disconnect
    watch.add_done_callback(on_message)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # shutdown, not the client
        task.uncancel()
        return None
    finally:
        watch.remove_done_callback(on_message)
        watch.cancel()


async def respond(send: Send, reply: Reply) -> None:
    """A whole response in two ASGI messages."""
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers()})
    await send({"type": "http.response.body", "body": reply.payload})


async def read_body(receive: Receive, declared: str | None, limit: int, hold: Hold | None = None) -> bytes:
    """The whole body, within `limit` (413) and, with a `hold`, counted in the gateway's budget of bodies
    held at once (503): a declared length before any of it is read, a chunked body as it arrives."""
    length = int(declared) if declared is not None and declared.isdigit() else None
    if length is not None and length > limit:
        raise TooLarge(f"request body of {length} bytes is over the limit of {limit}")
    if length is not None and hold is not None:
        hold.add(length)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ServiceError("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body is over the limit of {limit} bytes")
        if length is None and hold is not None:
            hold.add(len(chunk))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
