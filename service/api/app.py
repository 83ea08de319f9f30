"""The gateway application: the infer fast path in front of FastAPI, its lifespan, the error handlers and the routes."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import migserve

from ..config import ServeConfig
from ..errors import ServiceError
from .build import build_gateway
from .errors import AnswerBugs, error_body
from .fastpath import HEAD, InferFastPath
from .gateway import Gateway
from .sockets import bracketed

logger = logging.getLogger(__name__)


class GatewayServer(uvicorn.Server):
    """uvicorn's server, telling the gateway as its stop begins: before the connections drain (the requests in flight
    answered, up to --timeout-s), the long polls of jobs are answered and the jobs kept in --jobs-dir paused
    (JobStore.stopping); the rest of the stop is the app's lifespan's, after the drain."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.jobs.stopping()
        await super().shutdown(sockets)


def create_app(config: ServeConfig) -> InferFastPath:
    """The gateway's ASGI app: the infer fast path in front of the FastAPI app that serves everything else.

    The fast path sits outside FastAPI's own middleware (error, telemetry, body-limit wrappers) so
    that an inference request passes through none of them."""
    gateway = build_gateway(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await gateway.start()
        except ServiceError as exc:  # said in one line, not under a traceback (InferFastPath)
            gateway.start_error = str(exc)
            raise
        grpc = None
        try:
            if config.grpc_port is not None:
                from .grpc_service import grpc_server

                frontends = gateway.frontends
                internal = frontends.grpc_path if frontends is not None else None
                grpc, port = grpc_server(gateway, config.host, config.grpc_port, shared=frontends is not None, internal=internal)
                await grpc.start()
                logger.info("KServe v2 gRPC on %s:%s", bracketed(config.host), port)
            yield
        finally:
            if grpc is not None:
                await grpc.stop(grace=5)
            await gateway.stop()

    app = FastAPI(title="migserve", version=migserve.__version__, lifespan=lifespan)
    app.state.gateway = gateway

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        status, headers, body = error_body(exc)
        if status == 500:
            logger.error("%s %s: %s", request.method, request.url.path, exc)
        return Response(body, status_code=status, headers=headers, media_type="application/json")

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own answers (no such path, method not allowed) in the gateway's {"error": ...} form."""
        where = f"{'HEAD' if request.scope.get(HEAD) else request.method} {request.url.path}"
        message = {404: f"no endpoint {where}; the API is listed at /docs", 405: f"{where}: method not allowed"}.get(exc.status_code)
        body = json.dumps({"error": message or f"{where}: {exc.detail}"})
        return Response(body, status_code=exc.status_code, headers=exc.headers, media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return Response(json.dumps({"error": f"{where}: {first['msg']}"}), status_code=422, media_type="application/json")

    from .limits import FamilyLimits
    from .routes import register
    from .v1 import register_v1

    register(app, gateway)
    register_v1(app, gateway)
    app.add_middleware(FamilyLimits, gateway=gateway)
    app.add_middleware(AnswerBugs)  # outermost of the two: FamilyLimits counts the 500 of a bug in a /v1 route
    return InferFastPath(app, gateway)
