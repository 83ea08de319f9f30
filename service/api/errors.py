"""The one mapping from a ServiceError to an HTTP answer, used by FastAPI's handler and the fast path, and the
answer to a gateway bug on the ASGI path."""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ServiceError

logger = logging.getLogger(__name__)


def error_body(exc: ServiceError) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (Retry-After on 503s that say when), and a JSON body {"error": message}."""
    headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))} if exc.retry_after_s else {}
    return exc.status, headers, json.dumps({"error": str(exc)}).encode()


def internal_error(exc: Exception) -> ServiceError:
    """A 500 for an exception no handler expected: the client is told it is the gateway's fault, not the request's."""
    return ServiceError(f"internal error: {type(exc).__name__}: {exc}"[:1000])


class AnswerBugs:
    """A route's unexpected exception answers 500 in the gateway's {"error": ...} form and the connection serves on.

    Starlette's handler for Exception (ServerErrorMiddleware) sends its answer and then raises again, and uvicorn
    closes the connection when an app raises: a client's next request on that kept-alive connection failed with a
    reset. Here the exception ends with the answer, as on the infer fast path. Once a response has started it
    cannot be answered any more, and the exception goes on to uvicorn, which closes the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:
                raise
            logger.exception("%s %s failed", scope["method"], scope["path"])
            body = error_body(internal_error(exc))[2]
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})
