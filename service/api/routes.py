"""Routes: KServe v2 (/v2/...), the gateway's own views (/v1/...), and /metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import migserve

from ..errors import UNSUPPORTED, BadRequest, NotSupported, Unavailable
from ..stats import as_json
from . import control, views
from .fastpath import read_body
from .kserve import EXTENSIONS, HEADER_LENGTH, json_object, response_headers

if TYPE_CHECKING:
    from .gateway import Gateway


# Triton's HTTP paths for the extensions the gateway does not offer: 501 with what to use instead.
UNSUPPORTED_ROUTES = {
    "cuda_shared_memory": [
        ("GET", "/v2/cudasharedmemory/status"),
        ("GET", "/v2/cudasharedmemory/region/{name}/status"),
        ("POST", "/v2/cudasharedmemory/region/{name}/register"),
        ("POST", "/v2/cudasharedmemory/region/{name}/unregister"),
        ("POST", "/v2/cudasharedmemory/unregister"),
    ],
}
SMALL_BODY_LIMIT = 64 * 1024  # a repository index or region registration request is a small JSON object


def register(app: FastAPI, gateway: Gateway) -> None:
    _register_trace(app, gateway)

    @app.get("/v2", summary="Server metadata (KServe v2)")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "migserve", "version": migserve.__version__, "extensions": EXTENSIONS}

    @app.get("/v2/health/live", summary="Liveness")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready", summary="Readiness: every served model has a ready replica")
    async def ready() -> Response:
        return Response(status_code=200 if gateway.server_ready() else 503)

    @app.get("/v2/models/stats", summary="Every model's statistics (Triton's statistics extension)")
    @app.get("/v2/models/{name}/stats", summary="A model's statistics (Triton's statistics extension)")
    @app.get("/v2/models/{name}/versions/{version}/stats", include_in_schema=False)
    async def model_statistics(name: str = "", version: str = "1") -> dict[str, Any]:
        if name:
            gateway.check_version(name, version)
        await gateway.refresh_frontends()
        return as_json(views.model_statistics(gateway, name))

    @app.get("/v2/models/{name}/config", summary="The model's configuration as served (Triton's model configuration extension)")
    @app.get("/v2/models/{name}/versions/{version}/config", include_in_schema=False)
    async def model_config(name: str, version: str = "1") -> dict[str, Any]:
        gateway.check_version(name, version)
        return as_json(views.model_config(gateway, name))

    @app.post("/v2/repository/index", summary="Every model in the repository and its state (Triton's repository index)")
    async def repository_index(request: Request) -> JSONResponse:
        body = await read_body(request.receive, request.headers.get("content-length"), SMALL_BODY_LIMIT)
        options = json_object(body, 'a JSON object such as {"ready": true}') if body.strip() else {}
        ready = options.get("ready", False)
        if not isinstance(ready, bool):
            raise BadRequest(f"'ready' must be true or false, not {ready!r}")
        return JSONResponse(views.repository_index(gateway, ready_only=ready))

    @app.post("/v2/repository/models/{name}/load", summary="Load a model, or load it again from its files (explicit mode)")
    async def model_load(name: str, request: Request) -> Response:
        await control.load_model(gateway, name, await _parameters(request))
        return Response(status_code=200)

    @app.post("/v2/repository/models/{name}/unload", summary="Stop serving a model once what it accepted is answered (explicit mode)")
    async def model_unload(name: str, request: Request) -> Response:
        await control.unload_model(gateway, name, await _parameters(request))
        return Response(status_code=200)

    @app.get("/v2/systemsharedmemory/status", summary="Registered shared memory regions (Triton's system shared memory)")
    @app.get("/v2/systemsharedmemory/region/{name}/status", summary="One registered shared memory region")
    async def shared_memory_status(name: str = "") -> JSONResponse:
        return JSONResponse(gateway.regions.status(name))

    @app.post("/v2/systemsharedmemory/region/{name}/register", summary="Register a /dev/shm object as a region for inputs and outputs")
    async def shared_memory_register(name: str, request: Request) -> Response:
        body = await read_body(request.receive, request.headers.get("content-length"), SMALL_BODY_LIMIT)
        options = json_object(body, 'a JSON object such as {"key": "/my_input", "offset": 0, "byte_size": 602112}')
        gateway.regions.register(name, options.get("key"), options.get("offset", 0), options.get("byte_size"))
        return Response(status_code=200)

    @app.post("/v2/systemsharedmemory/region/{name}/unregister", summary="Unregister a region (the client keeps its object)")
    @app.post("/v2/systemsharedmemory/unregister", summary="Unregister every region")
    async def shared_memory_unregister(name: str = "") -> Response:
        gateway.regions.unregister(name)
        return Response(status_code=200)

    @app.get("/v2/logging", summary="The gateway's log settings (Triton's logging extension)")
    async def log_settings() -> dict[str, Any]:
        return dict(gateway.logs.values)

    @app.post("/v2/logging", summary="Change the gateway's log level while it runs (Triton's logging extension)")
    async def update_log_settings(request: Request) -> dict[str, Any]:
        body = await read_body(request.receive, request.headers.get("content-length"), SMALL_BODY_LIMIT)
        return await gateway.update_logs(json_object(body, 'a JSON object such as {"log_verbose_level": 1}'))

    @app.get("/v2/models/{name}", summary="Model metadata (KServe v2)")
    @app.get("/v2/models/{name}/versions/{version}", include_in_schema=False)
    async def model_metadata(name: str, version: str = "1") -> dict[str, Any]:
        gateway.check_version(name, version)
        return views.model_metadata(gateway, name)

    @app.get("/v2/models/{name}/ready", summary="Model readiness")
    @app.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def model_ready(name: str, version: str = "1") -> Response:
        gateway.check_version(name, version)
        if not gateway.model_ready(name):
            raise Unavailable(f"model {name}: no ready replica", retry_after_s=1.0)
        return Response(status_code=200)

    @app.post("/v2/models/{name}/infer", summary="Inference (KServe v2, JSON or binary tensors)")
    @app.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
    async def infer(name: str, request: Request, version: str = "1") -> Response:
        """Served by the fast paths (api/connection.py, api/fastpath.py) for version 1 or none; here otherwise."""
        gateway.check_version(name, version)
        body = await read_body(request.receive, request.headers.get("content-length"), gateway.config.max_body_bytes)
        payload, length = await gateway.infer(name, body, request.headers.get(HEADER_LENGTH), request.headers.get("x-timeout-ms"))
        media, headers = response_headers(length)
        return Response(payload, media_type=media, headers=headers)

    for extension, routes in UNSUPPORTED_ROUTES.items():
        for method, path in routes:
            app.add_api_route(path, _unsupported(extension), methods=[method], include_in_schema=False)

    @app.get("/v1/partitions", summary="Partitions, their workers and the models placed on them")
    async def partitions() -> JSONResponse:
        return JSONResponse(await views.partitions_document(gateway))

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        gateway.count_held()
        await gateway.refresh_memory_used()
        await gateway.refresh_frontends()
        return Response(views.metrics_text(gateway), media_type=CONTENT_TYPE_LATEST)


def _unsupported(extension: str) -> Callable[[], Awaitable[Response]]:
    async def endpoint() -> Response:
        raise NotSupported(UNSUPPORTED[extension])

    return endpoint


async def _parameters(request: Request) -> dict[str, Any]:
    """The `parameters` object of a model load or unload request ({} for an empty body)."""
    body = await read_body(request.receive, request.headers.get("content-length"), SMALL_BODY_LIMIT)
    options = json_object(body, 'a JSON object such as {"parameters": {}}') if body.strip() else {}
    parameters = options.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(f"'parameters' must be a JSON object, not {parameters!r}")
    return parameters


def _register_trace(app: FastAPI, gateway: Gateway) -> None:
    """Triton's trace extension (service/trace.py)."""

    @app.get("/v2/trace/setting", summary="The trace settings for every model (Triton's trace extension)")
    @app.get("/v2/models/{name}/trace/setting", summary="The trace settings in force for one model")
    async def trace_settings(name: str | None = None) -> dict[str, Any]:
        return await gateway.trace_settings(name)

    @app.post("/v2/trace/setting", summary="Change the trace settings for every model (Triton's trace extension)")
    @app.post("/v2/models/{name}/trace/setting", summary="Change one model's trace settings (null clears one)")
    async def update_trace_settings(request: Request, name: str | None = None) -> dict[str, Any]:
        body = await read_body(request.receive, request.headers.get("content-length"), SMALL_BODY_LIMIT)
        return await gateway.trace_settings(
            name, json_object(body, 'a JSON object such as {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}')
        )
