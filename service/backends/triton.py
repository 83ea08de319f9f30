"""A remote Triton Inference Server as a partition, behind the same Replica interface as a local worker.

It talks to Triton with tritonclient's asyncio clients (HTTP with binary tensors,
or gRPC). Readiness and the models it can run come from Triton itself: its
`/v2/health/ready` and its repository index, polled every POLL_S. A request that
cannot reach Triton fails its batch with WorkerDied (the dispatcher retries it
once on another replica) and marks the partition unready until Triton answers
again; an error Triton answers with is a 400 (bad input) or a 500. A Triton that
accepts connections and answers nothing (stopped, or hung) counts as unreachable:
an inference unanswered for `hang_s` (serve --worker-hang-s), or a readiness check
unanswered for CHECK_TIMEOUT_S.

Batching: with `batching: gateway` the gateway's batcher sends one batch at a
time, as to a local worker; with `batching: triton` it sends every request as it
comes (up to TRITON_DEPTH in flight) and Triton's dynamic batcher
(`config.pbtxt`) forms the batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from migserve.types import Array

from ..errors import BadRequest, InferenceFailed, WorkerDied
from ..partitions import Partition

logger = logging.getLogger(__name__)
POLL_S = 1.0
CHECK_TIMEOUT_S = 5.0  # a readiness probe that takes longer than this is a "not ready"
TRITON_DEPTH = 64  # requests in flight to one Triton when it does the batching
_V2 = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "float64": "FP64", "uint8": "UINT8", "bool": "BOOL"}


class TritonReplica:
    read_only_outputs = True  # outputs are views of the answer's bytes (a CT stage's blends copy them)

    def __init__(self, partition: Partition, models: Sequence[str], on_change: Callable[[], None], *, hang_s: float = 300.0) -> None:
        if partition.url is None:
            raise ValueError(f"triton partition {partition.id} has no url")
        self.partition = partition
        self._hang_s = hang_s
        self.assigned = tuple(models)
        self._on_change = on_change
        self._client: Any = None
        self._ready = False
        self._outstanding = 0
        self._poller: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.loaded: tuple[str, ...] = ()
        self.refused: dict[str, str] = {}
        self.providers = (f"triton-{partition.protocol}",)
        self.device_warning: str | None = None  # the Triton server chooses its own devices
        self.slices: dict[str, int] = {}  # the Triton server runs each batch as it comes
        self.recovering = False  # an unreachable server may be gone for long: requests get 503 meanwhile
        self.restarts = 0  # times Triton came back after being unreachable
        self.oom_kills = 0  # a remote server's processes are not this host's to watch
        self.last_death: str | None = None
        self.pid: int | None = None
        self.depth = TRITON_DEPTH if partition.batching == "triton" else 1
        self.max_rows: int | None = 1 if partition.batching == "triton" else None

    @property
    def id(self) -> str:
        return self.partition.id

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def _modules(self) -> tuple[Any, Any]:
        if self.partition.protocol == "grpc":
            import tritonclient.grpc as sync
            from tritonclient.grpc import aio
        else:
            import tritonclient.http as sync
            from tritonclient.http import aio
        return sync, aio

    async def start(self) -> None:
        _, aio = self._modules()
        self._client = aio.InferenceServerClient(url=self.partition.url)
        await self._check()
        if not self._ready:
            logger.warning("triton partition %s (%s) is not ready yet; polling", self.id, self.partition.url)
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name=f"triton-{self.id}")

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            self._wake.clear()
            await self._check()

    async def _check(self) -> None:
        """Ready when Triton says so and serves at least one assigned model; `loaded` is those it serves."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                ready = bool(await self._client.is_server_ready())
                index = await self._repository_index() if ready else []
        except Exception as exc:  # refused, reset, timed out: all mean "not reachable now"
            ready, index = False, []
            logger.debug("triton partition %s: %s", self.id, exc)
        states = {entry.get("name"): entry.get("state", "") for entry in index}
        loaded = tuple(m for m in self.assigned if states.get(m) == "READY")
        self.refused = {m: f"Triton state {states.get(m) or 'not in its repository'}" for m in self.assigned if m not in loaded}
        now_ready = ready and bool(loaded)
        if now_ready != self._ready or loaded != self.loaded:
            if now_ready and not self._ready and self._client is not None and self.loaded:
                self.restarts += 1
            logger.log(logging.INFO if now_ready else logging.WARNING, "triton partition %s ready=%s models=%s", self.id, now_ready, loaded)
            self._ready, self.loaded = now_ready, loaded if now_ready else self.loaded
            self._on_change()

    async def _repository_index(self) -> list[dict[str, Any]]:
        if self.partition.protocol == "grpc":
            raw = await self._client.get_model_repository_index(as_json=True)
            return list(raw.get("models", []))
        return list(await self._client.get_model_repository_index())

    def submit(self, model: str, parts: Mapping[str, list[Array]]) -> asyncio.Future[dict[str, Array]]:
        if not self._ready or self._client is None:
            raise WorkerDied(f"triton partition {self.id} is not reachable")
        inputs = {name: chunks[0] if len(chunks) == 1 else np.concatenate(chunks) for name, chunks in parts.items()}
        self._outstanding += 1
        task = asyncio.get_running_loop().create_task(self._infer(model, inputs))
        task.add_done_callback(self._done)
        return task

    def _done(self, _: asyncio.Future[dict[str, Array]]) -> None:
        self._outstanding -= 1
        self._on_change()

    async def _infer(self, model: str, inputs: dict[str, Array]) -> dict[str, Array]:
        sync, _ = self._modules()
        from tritonclient.utils import InferenceServerException

        tensors = []
        for name, array in inputs.items():
            tensor = sync.InferInput(name, list(array.shape), _V2[array.dtype.name])
            if self.partition.protocol == "grpc":
                tensor.set_data_from_numpy(array)
            else:
                tensor.set_data_from_numpy(array, binary_data=True)
            tensors.append(tensor)
        try:
            result = await asyncio.wait_for(self._client.infer(model, tensors), self._hang_s)
        except InferenceServerException as exc:
            raise self._classify(exc) from None
        except TimeoutError:
            self._lost(f"no answer to an inference in {self._hang_s:g} s (--worker-hang-s)")
            raise WorkerDied(f"triton partition {self.id} did not answer in {self._hang_s:g} s") from None
        except Exception as exc:  # the connection failed: the batch may be retried elsewhere
            self._lost(f"{type(exc).__name__}: {exc}")
            raise WorkerDied(f"triton partition {self.id} unreachable: {type(exc).__name__}") from None
        response = result.get_response(as_json=True) if self.partition.protocol == "grpc" else result.get_response()
        return {out["name"]: result.as_numpy(out["name"]) for out in response["outputs"]}

    def _classify(self, exc: Any) -> Exception:
        status = str(exc.status() or "")
        message = exc.message() or str(exc)
        if status in ("400", "StatusCode.INVALID_ARGUMENT"):
            return BadRequest(f"triton partition {self.id}: {message}")
        if status in ("", "503", "502", "StatusCode.UNAVAILABLE", "StatusCode.CANCELLED") or "connect" in message.lower():
            self._lost(message)
            return WorkerDied(f"triton partition {self.id} unreachable: {message}")
        return InferenceFailed(f"triton partition {self.id}: {message}")

    def _lost(self, why: str) -> None:
        if self._ready:
            logger.error("triton partition %s lost: %s", self.id, why)
            self._ready = False
            self._on_change()
        self._wake.set()

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
