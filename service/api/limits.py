"""Plain ASGI middleware for the family endpoints (POST /v1/...): the body size limits, hang-ups, per-endpoint metrics.

The body is read here, once, with the configured limit (a declared or streamed
body over it is a 413 before any parsing), then replayed to the route. While the
route works, the connection is watched: a client that hangs up cancels the route,
so its tiles leave the batch queues instead of being computed (status 499 in the
metrics).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ServiceError
from .budget import Hold
from .fastpath import CONTENT_LENGTH, error_reply, read_body, respond, unless_disconnected, wanted_headers

if TYPE_CHECKING:
    from .gateway import Gateway


class FamilyLimits:
    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        endpoint = scope["path"]
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            with Hold(self.gateway.bodies) as hold:
                if await self._serve(scope, receive, sending, hold):
                    status = 499  # the client hung up first (nginx's code for it); the route was cancelled
        finally:
            known = endpoint if any(route == endpoint for route in FAMILY_ROUTES) else "other"
            self.gateway.metrics.v1_requests.labels(known, str(status)).inc()
            self.gateway.metrics.v1_latency.labels(known).observe(time.monotonic() - started)

    async def _serve(self, scope: Scope, receive: Receive, sending: Send, hold: Hold) -> bool:
        """Read the body, then run the route with it replayed; True if the client hung up first."""
        try:
            declared = wanted_headers(scope["headers"]).get(CONTENT_LENGTH)
            body = await read_body(receive, declared, self.gateway.config.max_body_bytes, hold)
        except ServiceError as exc:
            await respond(sending, error_reply(exc))
            return False
        scope[HOLD] = hold  # a route counts what it unpacks from the body too (v1.py)
        replayed = False
        gone = asyncio.Event()

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                await gone.wait()  # after the body, only the disconnect is left to report
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await unless_disconnected(self.app(scope, replay, sending), receive, gone.set)
        return gone.is_set()


HOLD = "migserve.hold"  # the scope key of the request's Hold
FAMILY_ROUTES = ("/v1/face/analyze", "/v1/frontalize", "/v1/grounding", "/v1/lns/segment", "/v1/crowd/count")
