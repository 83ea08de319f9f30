"""The KServe v2 gRPC endpoint (Triton's `inference.GRPCInferenceService`), beside HTTP.

`migserve serve --grpc-port 8001` serves it in the gateway's own event loop, so a
gRPC request goes through the same checks, batcher, deadlines and metrics as an
HTTP one (the tensor checks of `tensors.py`, `Gateway.infer_decoded`). The message
types and service stubs are the ones tritonclient ships (generated from Triton's
`grpc_service.proto`), so `tritonclient.grpc` and any client generated from that
proto talk to it: health, server and model metadata, model configuration and
statistics (`service/stats.py`), the repository index, system shared memory
(`service/regions.py`), model load and unload (explicit model control), ModelInfer and
ModelStreamInfer, trace settings (`service/trace.py`). CUDA shared memory answers UNIMPLEMENTED
with what to use instead. LogSettings reads and changes the gateway's log level
(`service/logsettings.py`).

With `serve --frontends N` every front-end process serves gRPC on the same port
(SO_REUSEPORT: the kernel spreads connections, as for HTTP). A front-end runs inference
with its own batchers; a request that names a shared memory region, and every other
RPC (metadata, readiness, statistics, regions, model control, log settings), it passes
to the first process over that process's Unix socket and returns its answer as it is,
so that state lives in one place as on the HTTP side (`service/api/frontends.py`).

Tensors arrive as `raw_input_contents` (what tritonclient sends; read in place) or
as typed contents (`fp32_contents`, ...); outputs always go back as
`raw_output_contents`. The request's deadline is the earliest of the gRPC
deadline, `parameters.timeout` (microseconds, as in Triton) and the server
default. Errors keep the HTTP side's messages, with the matching status code:
400 INVALID_ARGUMENT, 404 NOT_FOUND, 413 RESOURCE_EXHAUSTED, 503 UNAVAILABLE,
504 DEADLINE_EXCEEDED, anything else INTERNAL. A message over `--max-body-mb` is
refused by gRPC itself (RESOURCE_EXHAUSTED) before it is decoded.
The messages' decoding and encoding are in service/api/grpc_codec.py.

gRPC holds an answer until the client's HTTP/2 window lets it out, and a stream's answers wait here
while one is written; each is counted in `--max-pending-mb` meanwhile (from when it is made until the
RPC is done, or its turn is written), so clients that read no answers fill the budget (new messages
UNAVAILABLE) and not the gateway's memory. A client that answers no ping for about `--send-timeout-s`
is disconnected, which drops its answers; so is one that answers pings but takes none of its answers
for `--send-timeout-s` (gRPC tells the servicer nothing of a write's progress; its socket does:
service/api/grpc_stalls.py). A stream has at most STREAM_WINDOW requests running and answers waiting:
past that its next request is not read, and gRPC's flow control holds a client that sends and takes
nothing (what gRPC itself buffers of the requests it received is not counted: bench/grpc_flood.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

import migserve

from ..errors import UNSUPPORTED, NotSupported, ServiceError
from ..regions import PARAMETERS
from ..trace import Trace
from . import control, views
from .budget import Hold
from .grpc_codec import decode_infer_request, encode_infer_response, plain, repository_parameters
from .grpc_stalls import StalledCalls
from .kserve import EXTENSIONS
from .sockets import bracketed

if TYPE_CHECKING:
    from ..repository import ModelEntry
    from .gateway import Gateway

logger = logging.getLogger(__name__)

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# What an answer takes of the gateway's memory while gRPC sends it, per byte of the message: the response, its
# serialized bytes and gRPC's own copy (bench/grpc_unsent.py: 3.01-3.10 for unary answers a client leaves unread).
# A stream's answers waiting their turn take one.
ANSWER_COPIES = 3
# A stream's requests running and answers waiting for their turn, at most: past it the stream's next request is not read
# (gRPC's flow control then holds the client), so a client that sends and takes nothing cannot queue answers (refusals
# too, once the budget is full) without end.
STREAM_WINDOW = 256
REGION = PARAMETERS[0]  # the parameter that puts a tensor in shared memory
# The RPCs of the extensions the gateway does not offer (errors.UNSUPPORTED says what to use instead).
UNSUPPORTED_RPCS = {
    "CudaSharedMemoryStatus": "cuda_shared_memory",
    "CudaSharedMemoryRegister": "cuda_shared_memory",
    "CudaSharedMemoryUnregister": "cuda_shared_memory",
}


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # answers not out yet, for clients that take none
        self.stalls = StalledCalls(gateway.config.send_timeout_s, gateway.metrics.disconnection("grpc", "send_timeout"))

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.gateway.server_ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            self.gateway.check_version(request.name, request.version)
        except ServiceError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=self.gateway.model_ready(request.name))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return service_pb2.ServerMetadataResponse(name="migserve", version=migserve.__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            self.gateway.check_version(request.name, request.version)
            meta = views.model_metadata(self.gateway, request.name)
        except ServiceError as exc:
            await _abort(context, exc)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            self.gateway.check_version(request.name, request.version)
            return service_pb2.ModelConfigResponse(config=views.model_config(self.gateway, request.name))
        except ServiceError as exc:
            await _abort(context, exc)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if request.name:
                self.gateway.check_version(request.name, request.version)
            await self.gateway.refresh_frontends()
            return views.model_statistics(self.gateway, request.name)
        except ServiceError as exc:
            await _abort(context, exc)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        index = service_pb2.RepositoryIndexResponse.ModelIndex
        return service_pb2.RepositoryIndexResponse(models=[index(**model) for model in views.repository_index(self.gateway, request.ready)])

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            await control.load_model(self.gateway, request.model_name, repository_parameters(request))
        except ServiceError as exc:
            await _abort(context, exc)
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            await control.unload_model(self.gateway, request.model_name, repository_parameters(request))
        except ServiceError as exc:
            await _abort(context, exc)
        return service_pb2.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            regions = self.gateway.regions.status(request.name)
        except ServiceError as exc:
            await _abort(context, exc)
        status = service_pb2.SystemSharedMemoryStatusResponse.RegionStatus
        return service_pb2.SystemSharedMemoryStatusResponse(regions={r["name"]: status(**r) for r in regions})

    async def SystemSharedMemoryRegister(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            self.gateway.regions.register(request.name, request.key, request.offset, request.byte_size)
        except ServiceError as exc:
            await _abort(context, exc)
        return service_pb2.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.gateway.regions.unregister(request.name)
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    async def TraceSetting(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """Triton's trace extension (service/trace.py): each value a list of strings; an empty one clears it."""
        changes = {key: list(value.value) or None for key, value in request.settings.items()}
        try:
            settings = await self.gateway.trace_settings(request.model_name or None, changes)
        except ServiceError as exc:
            await _abort(context, exc)
        value = service_pb2.TraceSettingResponse.SettingValue
        listed = {key: v if isinstance(v, list) else [v] for key, v in settings.items()}
        return service_pb2.TraceSettingResponse(settings={key: value(value=v) for key, v in listed.items()})

    async def LogSettings(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        changes = {key: plain(value) for key, value in request.settings.items()}
        try:
            settings = await self.gateway.update_logs(changes) if changes else self.gateway.logs.values
        except ServiceError as exc:
            await _abort(context, exc)
        value = service_pb2.LogSettingsResponse.SettingValue
        kinds = {bool: "bool_param", int: "uint32_param", str: "string_param"}
        return service_pb2.LogSettingsResponse(settings={k: value(**{kinds[type(v)]: v}) for k, v in settings.items()})

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            response = await self._infer(request, context)
        except ServiceError as exc:
            await _abort(context, exc)
        held = self._hold_answer(response)
        self.stalls.watch(context, held)

        def over(_: Any) -> None:  # the RPC is over: sent, or its client gone
            self.gateway.bodies.give(held)
            self.stalls.done(context)

        context.add_done_callback(over)
        return response

    def _hold_answer(self, response: Any, copies: int = ANSWER_COPIES) -> int:
        """Count `copies` of an answer in --max-pending-mb until gRPC has sent it, which a client that does not read
        delays; what was counted, to give back."""
        held: int = copies * response.ByteSize()
        self.gateway.bodies.count(held)
        return held

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        """Each request of the stream runs as soon as it arrives (so a stream's requests batch together);
        answers come back as they finish, matched by their `id`; a failed one answers `error_message`."""
        answers: asyncio.Queue[tuple[Any, int] | None] = asyncio.Queue()  # an answer, and what of the budget it holds
        running: set[asyncio.Task[None]] = set()
        taken = asyncio.Event()  # an answer left the queue: room for another request

        async def answer(request: Any) -> None:
            try:
                response = service_pb2.ModelStreamInferResponse(infer_response=await self._infer(request, context))
            except ServiceError as exc:
                response = service_pb2.ModelStreamInferResponse(error_message=str(exc), infer_response={"id": request.id})
            answers.put_nowait((response, self._hold_answer(response, copies=1)))  # waits its turn: the message alone

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    while len(running) + answers.qsize() >= STREAM_WINDOW:  # gRPC stops reading the stream meanwhile
                        taken.clear()
                        await taken.wait()
                await asyncio.gather(*running)
            finally:
                answers.put_nowait(None)  # every request is answered, or the stream broke

        reader = asyncio.create_task(read())
        try:
            while (answered := await answers.get()) is not None:
                taken.set()
                response, held = answered
                held += self._hold_answer(response, copies=ANSWER_COPIES - 1)  # and its bytes and gRPC's copy
                self.stalls.watch(context, held)
                try:
                    yield response  # returns once gRPC has sent it (the client's window let it)
                finally:
                    self.gateway.bodies.give(held)
                    self.stalls.done(context)
            await reader  # a broken request stream raises here
        finally:
            for task in [reader, *running]:
                task.cancel()
            while not answers.empty():
                if (left := answers.get_nowait()) is not None:
                    self.gateway.bodies.give(left[1])

    async def _infer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        name = request.model_name

        async def work(entry: ModelEntry, trace: Trace | None) -> Any:
            started = time.monotonic()
            self.gateway.check_version(name, request.model_version)
            with Hold(self.gateway.bodies) as hold:
                hold.add(request.ByteSize())  # received already; counted so that queued messages stay bounded
                decoded = decode_infer_request(request, entry, self.gateway.regions)
                timeouts = [t for t in (decoded.timeout_s, context.time_remaining()) if t is not None]
                timeout = min(timeouts, default=self.gateway.config.default_timeout_s)
                outputs = await self.gateway.infer_decoded(name, decoded, started, timeout, trace)
            return encode_infer_response(name, decoded, outputs)

        return await self.gateway.counted(name, work)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: ServiceError) -> NoReturn:
    code = exc.code if isinstance(exc, Answered) else CODES.get(exc.status, grpc.StatusCode.INTERNAL)
    if code is grpc.StatusCode.INTERNAL:
        logger.error("grpc: %s", exc)
    await context.abort(code, str(exc))
    raise AssertionError("context.abort returns only by raising")


def _unsupported(extension: str) -> Any:
    async def rpc(self: InferenceService, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _abort(context, NotSupported(UNSUPPORTED[extension]))

    return rpc


for _rpc, _extension in UNSUPPORTED_RPCS.items():
    setattr(InferenceService, _rpc, _unsupported(_extension))


class Answered(ServiceError):
    """The first process's error answer to a call a front-end passed on: returned to the client as it is."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details() or error.code().name)
        self.code = error.code()
        self.status = STATUS_OF.get(self.code, 500)


STATUS_OF = {code: status for status, code in CODES.items()}
# What a front-end passes to the first process: the state these read or change lives there.
FORWARDED_RPCS = (
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "LogSettings",
)
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class FrontendInferenceService(InferenceService):
    """A front-end process's gRPC service: inference with its own batchers; the rest answered by the first process."""

    def __init__(self, gateway: Gateway, first: str) -> None:
        super().__init__(gateway)
        self.channel = grpc.aio.insecure_channel(f"unix:{first}", options=UNLIMITED)  # sizes were checked on receipt here
        self.first = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def forward(self, rpc: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """The first process's answer to `request`, within the client's deadline (it waits while the first process
        starts); an error answer raises Answered."""
        try:
            return await getattr(self.first, rpc)(request, timeout=context.time_remaining(), wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise Answered(exc) from None

    async def _infer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if any(REGION in t.parameters for t in (*request.inputs, *request.outputs)):  # regions are the first process's
            return await self.forward("ModelInfer", request, context)
        return await super()._infer(request, context)

    async def close(self) -> None:
        await self.channel.close()


def _forwarded(rpc: str) -> Any:
    async def call(self: FrontendInferenceService, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await self.forward(rpc, request, context)
        except ServiceError as exc:
            await _abort(context, exc)

    return call


for _rpc in FORWARDED_RPCS:
    setattr(FrontendInferenceService, _rpc, _forwarded(_rpc))


def grpc_server(
    gateway: Gateway,
    host: str,
    port: int,
    *,
    service: InferenceService | None = None,
    shared: bool = False,
    internal: str | None = None,
) -> tuple[grpc.aio.Server, int]:
    """The gRPC server, not yet started, and the port it bound; messages up to the HTTP side's body limit.

    service: what answers (default: the gateway's own; a front-end passes its FrontendInferenceService).
    shared: other front-end processes bind the same port (SO_REUSEPORT; else a second server there is refused).
    internal: the first process of several front-ends also listens on this Unix socket, for what they pass on."""
    limit = gateway.config.max_body_bytes
    # A client whose connection answers no ping for about --send-timeout-s is disconnected, dropping the answers gRPC
    # holds for it: a ping after half of it without a frame from the client (on a connection with calls), the other
    # half to answer it (0.1 s at least). gRPC 1.85 closes on an unanswered ping after ping_timeout_ms, not
    # keepalive_timeout_ms alone (tests/integration/test_gateway_grpc.py sees it close).
    keepalive = max(100, round(gateway.config.send_timeout_s * 500))
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", int(shared)),
        ("grpc.keepalive_time_ms", keepalive),
        ("grpc.keepalive_timeout_ms", keepalive),
        ("grpc.http2.ping_timeout_ms", keepalive),
        # one past --max-connections is closed at once (service/fds.py), and a connection that has not sent its HTTP/2
        # preface within --head-timeout-s is closed, as an HTTP one whose head has not come whole
        ("grpc.max_allowed_incoming_connections", gateway.connection_limit),
        ("grpc.server_handshake_timeout_ms", max(1, round(gateway.config.head_timeout_s * 1000))),
    ]
    server = grpc.aio.server(options=options)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service or InferenceService(gateway), server)
    bound = server.add_insecure_port(f"{bracketed(host)}:{port}")  # "[::]": IPv6 and IPv4 clients both
    if internal is not None:
        server.add_insecure_port(f"unix:{internal}")
    return server, bound
