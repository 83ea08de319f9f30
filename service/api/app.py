"""The gateway application: lifecycle, the error handler, and the routes."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from tritonclient.grpc import service_pb2

import migserve
from migserve.types import Array

from ..backends.local import LocalBackend
from ..cgroups import memory_usage
from ..config import MB, ServeConfig
from ..dispatch.batcher import BatchPolicy, ModelBatcher, Pending
from ..errors import BadRequest, DeadlineExpired, NotFound, ServiceError, UnknownModel
from ..families.volume import import_readers_soon
from ..fds import connection_limit
from ..jobs import Job, JobStore
from ..logsettings import LogSettings, watch_invalid_requests
from ..metrics import Metrics
from ..partitions import Partition, PartitionKind, discover, memory_used
from ..placement import SharedMemory, arena_slots, arenas_per_worker, cpu_placed_bytes, footprint, place, place_one, why_nowhere
from ..regions import Regions
from ..repository import ModelEntry, RepositoryError, load_model, load_repository
from ..shared import Published, SharedCounts
from ..stats import ModelStatistics, model_config
from ..trace import TRACE_SYNC_S, Trace, Tracer
from ..workers.oom import ADVICE
from ..workers.protocol import ModelSpec, WorkerOptions
from .budget import BodyBudget
from .classification import classified
from .errors import AnswerBugs, error_body
from .fastpath import HEAD, InferFastPath, Received
from .frontends import (
    GRPC_SOCKET,
    Frontends,
    FrontendSpec,
    ServeModel,
    SetLogs,
    UnserveModel,
    bracketed,
    merge_metrics,
    merge_statistics,
    run_dir,
)
from .kserve import NUMPY_TO_V2, Body, DecodedRequest, decode_request, encode_response

logger = logging.getLogger(__name__)
T = TypeVar("T")


def worker_options(config: ServeConfig) -> WorkerOptions:
    """How the workers run their models, and how each process sends them batches (in front-end processes too)."""
    return WorkerOptions(
        idle_priority=config.cpu_worker_priority == "idle",
        run_slices=config.cpu_run_slices,
        timings_cache=None if config.cpu_run_slices_cache is None else str(config.cpu_run_slices_cache),
        conv_algo_search=config.cudnn_conv_algo_search.upper(),
        shape_sessions=config.gpu_shape_sessions,
        threads=config.worker_threads,
        in_flight=config.batches_in_flight,
        arena_keep=config.arena_keep_bytes,
    )


@dataclass
class Gateway:
    config: ServeConfig
    models: dict[str, ModelEntry]
    partitions: list[Partition]
    placement: dict[str, dict[str, ModelSpec]]
    backend: LocalBackend
    metrics: Metrics = field(default_factory=Metrics)
    batchers: dict[str, ModelBatcher] = field(default_factory=dict)
    stats: dict[str, ModelStatistics] = field(default_factory=dict)
    configs: dict[str, Any] = field(default_factory=dict)  # model -> its Triton ModelConfig message, as served
    not_served: dict[str, str] = field(default_factory=dict)  # repository models not served -> why
    jobs: JobStore = field(init=False)
    bodies: BodyBudget = field(init=False)  # request bodies held at once
    regions: Regions = field(default_factory=Regions)  # clients' shared memory regions (system shared memory extension)
    logs: LogSettings = field(default_factory=LogSettings.current)  # the logging extension's view of the log level
    control: asyncio.Lock = field(default_factory=asyncio.Lock)  # one model load or unload at a time
    loaded: asyncio.Condition = field(default_factory=asyncio.Condition)  # notified as a model is loaded (explicit control)
    frontends: Frontends | None = None  # the other front-end processes (serve --frontends), run by this one
    shared: SharedCounts | None = None  # with front-ends: every process's bodies and queues, for the gateway's bounds
    index: int = 0  # this process's front-end index (0: the first process)
    start_error: str | None = None  # why start() failed, for uvicorn to log in one line (fastpath.InferFastPath)
    started: bool = False  # start() has finished: every front-end is up (readiness waits for it)
    connection_limit: int = 1 << 20  # client connections of each protocol this process takes at once (fds.py), by start()
    tracer: Tracer = field(init=False)  # Triton's trace extension; the first process writes every process's traces
    cpu_memory: SharedMemory | None = None  # what the models on CPU slices share (service/placement.py)
    _syncing: asyncio.Task[None] | None = None  # with front-ends and a trace file: their settings and traces, each second
    _unwatch: Callable[[], None] = lambda: None  # ends the count of requests uvicorn cannot parse (logsettings.py)

    def __post_init__(self) -> None:
        config = self.config
        self.jobs = JobStore(config.max_jobs, config.job_ttl_s, config.max_job_results_bytes, config.max_job_bytes, on_end=self._count_job)
        self.bodies = BodyBudget(config.max_pending_bytes, self.shared, self.index)
        self.backend.hold_arenas(self.bodies.count)  # the batches' copies in shared memory over --arena-keep-mb
        self.tracer = Tracer(config.trace_file, collected=self.index != 0)

    def _count_job(self, job: Job[Any], outcome: str) -> None:
        self.metrics.jobs_ended.labels(job.kind, outcome).inc()
        if outcome == "done" and job.finished is not None:
            self.metrics.job_seconds.labels(job.kind).observe(job.finished - job.created)

    @classmethod
    def build(cls, config: ServeConfig) -> Gateway:
        partitions = discover(config.topology, config.cpu_slices)  # cheap checks of the arguments first
        if any(p.kind is not PartitionKind.TRITON for p in partitions):
            _check_onnxruntime()
        repo = load_repository(config.model_repo)
        models = {n: e for n, e in repo.models.items() if config.models is None or n in config.models}
        if config.models is not None and (missing := sorted(set(config.models) - set(models))):
            raise UnknownModel(f"models not in {config.model_repo}: {missing}")
        if not models:
            raise UnknownModel(f"no servable models in {config.model_repo}; run: migserve export --all --out {config.model_repo}")
        workers = sum(p.kind is not PartitionKind.TRITON for p in partitions)
        cpu = any(p.kind is PartitionKind.CPU for p in partitions)
        slots = arena_slots(partitions, config.batches_in_flight, config.worker_threads)
        arenas = arenas_per_worker(models.values(), config.arena_keep_bytes) * slots
        job_bytes = _job_memory(config, models)
        cpu_memory = (
            SharedMemory.of_host(config.max_pending_bytes, workers, job_bytes=job_bytes, frontends=config.frontends, arena_bytes=arenas)
            if cpu
            else None
        )
        placed = place(partitions, models, cpu_memory)
        if len(placed.left_off) == len(models):
            raise ServiceError(f"no model fits in memory: {'; '.join(f'{n}: {why}' for n, why in placed.left_off.items())}")
        placement, models = placed.by_partition, {n: e for n, e in models.items() if n not in placed.left_off}
        _log_placement_bounds(partitions, placement, placed.left_off, cpu_memory)
        directory = run_dir() if config.frontends > 1 else None
        sockets = {
            p.id: str(directory / f"worker-{i}.sock") for i, p in enumerate(partitions) if directory and p.kind is not PartitionKind.TRITON
        }
        backend = LocalBackend(partitions, placement, worker_options(config), sockets=sockets, hang_s=config.worker_hang_s)
        left_out = {name: "not served: the gateway was started with --models naming others" for name in repo.models if name not in models}
        not_served = repo.refused | left_out | placed.left_off
        frontends = shared = None
        if directory is not None:
            shared = SharedCounts(config.frontends, repo.models.keys() | repo.refused.keys())
            grpc_socket = str(directory / GRPC_SOCKET) if config.grpc_port is not None else None
            frontends = Frontends(
                config.frontends - 1,
                directory,
                lambda index, handoff: FrontendSpec(
                    index=index,
                    config=config,
                    models=models,
                    not_served=not_served,
                    partitions=partitions,
                    placement=placement,
                    sockets=sockets,
                    handoff=handoff,
                    grpc=grpc_socket,
                    shared=shared,
                    log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
                ),
                shared,
                grpc_socket,
            )
        gateway = cls(
            config, models, partitions, placement, backend, not_served=not_served, frontends=frontends, shared=shared, cpu_memory=cpu_memory
        )
        if config.jobs_dir is not None:
            gateway.jobs.keep_in(config.jobs_dir)
        return gateway

    async def start(self) -> None:
        self._unwatch = watch_invalid_requests(self.metrics.invalid_http.inc)
        if any(entry.contract.family == "lns" for entry in self.models.values()):
            import_readers_soon()  # while the workers start; a CT model loaded later starts it in _serve
        await self.backend.start()
        self._check_memory_headroom()
        protocols = 1 if self.config.grpc_port is None else 2
        self.connection_limit, warning = connection_limit(self.config.max_connections, protocols)
        if warning is not None:
            logger.warning("%s", warning)
        for name, entry in self.models.items():
            self._serve(name, entry)
        if self.frontends is not None:
            await self.frontends.start()
            if self.tracer.file is not None:
                self._syncing = asyncio.get_running_loop().create_task(self._sync_traces_forever())
        self.backend.add_listener(self._update_partition_metrics)
        self._update_partition_metrics()
        self.metrics.count_compute(self.backend.compute_seconds)
        for partition in self.partitions:
            if partition.memory_bytes is not None:
                self.metrics.memory.labels(partition.id).set(partition.memory_bytes)
            logger.info(
                "partition %s (%s %s): %s",
                partition.id,
                partition.kind.value,
                partition.profile or partition.cores,
                ", ".join(sorted(self.placement[partition.id])) or "no models",
            )
        self.started = True
        self.jobs.resume_pending()  # the jobs the last gateway on --jobs-dir left running, now that the models are served

    def server_ready(self) -> bool:
        """KServe's server readiness: started, and every served model has a ready replica. A front-end process that
        is up hands health checks to this one while it starts the others: it said ready before they all were."""
        return self.started and all(self.model_ready(name) for name in self.models)

    def _policy(self, entry: ModelEntry) -> BatchPolicy:
        """The model's batching: its contract's, with what `serve` overrides."""
        batching, config = entry.contract.batching, self.config
        delay = config.max_queue_delay_s if config.max_queue_delay_s is not None else batching.max_queue_delay_us / 1e6
        return BatchPolicy(
            max_batch_size=min(batching.max_batch_size, config.max_batch_size or batching.max_batch_size),
            max_queue_delay_s=delay,
            queue_capacity=config.queue_capacity,
            preferred_batch_sizes=batching.preferred_batch_sizes if config.preferred_batch_sizes is None else config.preferred_batch_sizes,
        )

    def _serve(self, name: str, entry: ModelEntry) -> None:
        """The model's batcher, statistics and configuration: from here on it takes requests."""
        policy = self._policy(entry)
        self.stats[name] = stats = ModelStatistics(name)
        replicas = functools.partial(self.backend.replicas, name)
        batcher = ModelBatcher(name, policy, replicas, self.metrics, stats, shared=self._queue_count(name))
        self.backend.add_listener(batcher.notify)
        self.batchers[name] = batcher
        self._configure(name, entry, policy)
        if entry.contract.family == "lns":
            import_readers_soon()

    def _queue_count(self, name: str) -> Published | None:
        """With front-ends, where the model's batcher publishes its queue's length for the gateway's --queue-capacity."""
        if self.shared is None:
            return None
        column = self.shared.assign(name) if self.index == 0 else self.shared.columns.get(name)
        if column is None:
            logger.warning("model %s: no shared queue count left; each front-end process queues up to --queue-capacity of it", name)
        return self.shared.published(self.index, column)

    def _configure(self, name: str, entry: ModelEntry, policy: BatchPolicy) -> None:
        """The model's entry and Triton configuration, with the batching and the partitions it has now."""
        placed = [p for p in self.partitions if name in self.placement.get(p.id, {})]
        self.configs[name] = model_config(entry.config, policy, placed)
        self.models[name] = entry

    async def _unserve(self, name: str) -> None:
        """Stop taking requests for a model (404 from now on), answer what it accepted, then free its sessions."""
        await self._stop_serving(name)
        await self.backend.unload_model(name)

    async def _stop_serving(self, name: str) -> None:
        """404 for a model from now on, once what it accepted is answered (its sessions stay)."""
        del self.models[name]
        batcher = self.batchers.pop(name)
        await batcher.drain(self.config.default_timeout_s)
        await batcher.stop()
        self.backend.remove_listener(batcher.notify)
        self.stats.pop(name, None)
        self.configs.pop(name, None)
        for placed in self.placement.values():
            placed.pop(name, None)

    def _placed(self, name: str, entry: ModelEntry, specs: dict[str, ModelSpec]) -> None:
        """A model now runs on these partitions (partition id -> its spec): serve it, or a reloaded one with the
        batching its new files declare (the same queue)."""
        for partition in self.partitions:
            if partition.id in specs:
                self.placement.setdefault(partition.id, {})[name] = specs[partition.id]
            elif partition.kind is not PartitionKind.TRITON:  # a reload left it out: it stops running the model
                self.placement.get(partition.id, {}).pop(name, None)
        self.not_served.pop(name, None)
        if name in self.models:
            self.batchers[name].policy = policy = self._policy(entry)
            self._configure(name, entry, policy)
        else:
            self._serve(name, entry)

    def _local_partitions(self, name: str) -> set[str]:
        """The local partitions a model is placed on now."""
        return {p.id for p in self.partitions if p.kind is not PartitionKind.TRITON and name in self.placement.get(p.id, {})}

    async def serve_attached(self, name: str, entry: ModelEntry, specs: dict[str, ModelSpec], column: int | None) -> None:
        """A front-end process: the first process loaded (or reloaded) a model on these partitions, its queue count in
        this column of the shared counts; serve it too."""
        if self.shared is not None:
            self.shared.learn(name, column)
        await self.backend.attach_model(name, specs)
        self._placed(name, entry, specs)

    async def unserve_attached(self, name: str, reason: str) -> None:
        """A front-end process: the first process unloads a model; answer what this process accepted of it first."""
        if name in self.models:
            await self._stop_serving(name)
            self.backend.detach_model(name)
        self.not_served[name] = reason

    def _model_dir(self, name: str) -> Path | None:
        """The model's directory in the repository, if `name` names one (hidden ones are exports in progress)."""
        if not name or name.startswith(".") or "/" in name:
            return None
        directory = self.config.model_repo / name
        try:
            return directory if directory.is_dir() else None
        except (OSError, ValueError):  # a name too long for the file system, or holding NUL
            return None

    def _check_control(self, what: str) -> None:
        if self.config.model_control_mode != "explicit":
            raise BadRequest(
                f"cannot {what}: the gateway runs with --model-control-mode none and serves the models it started with; "
                "start it with --model-control-mode explicit to load and unload models"
            )

    async def load_model(self, name: str, parameters: dict[str, Any]) -> None:
        """Triton's model repository extension, explicit mode: read the model's directory again and serve it on every
        local partition with room. A served model is swapped in place (its files may have changed); if every partition
        refuses the new version, the running one serves on."""
        self._check_control(f"load '{name}'")
        if parameters:
            raise BadRequest(
                f"failed to load '{name}': parameters {sorted(parameters)} are not supported; "
                f"the gateway loads the files in {self.config.model_repo / name} as they are"
            )
        async with self.control:
            directory = self._model_dir(name)
            if directory is None:
                raise BadRequest(f"failed to load '{name}': no such model in {self.config.model_repo}")
            try:
                entry = load_model(directory)
            except RepositoryError as exc:
                if name not in self.models:  # a served model serves on from its old files
                    self.not_served[name] = str(exc)
                raise BadRequest(f"failed to load '{name}': {exc}") from None
            specs = place_one(self.partitions, self.placement, entry, self.cpu_memory)
            if not specs:
                self.not_served[name] = why_nowhere(self.partitions, self.placement, footprint(entry), self.cpu_memory, name)
                raise BadRequest(f"failed to load '{name}': {self.not_served[name]}")
            outcome = await self.backend.load_model(specs)  # a served model is swapped in place, between batches
            loaded = {pid: specs[pid] for pid, why in outcome.items() if why is None}
            refusals = "; ".join(f"partition {pid} refused it: {why}" for pid, why in outcome.items() if why is not None)
            if not loaded:
                if name not in self.models:
                    self.not_served[name] = refusals
                raise BadRequest(
                    f"failed to load '{name}': {refusals}" + (" (the running version serves on)" if name in self.models else "")
                )
            left_out = self._local_partitions(name) - loaded.keys()  # a reload they did not take: they drop the old version
            self._placed(name, entry, loaded)
            if self.frontends is not None:  # each stops sending batches to the partitions left out before they drop it
                column = None if self.shared is None else self.shared.columns.get(name)  # given as _placed served it
                await self.frontends.tell(ServeModel(name, entry, loaded, column), self.config.default_timeout_s)
            logger.info("loaded model %s on %s%s", name, ", ".join(loaded), f" ({refusals})" if refusals else "")
            async with self.loaded:
                self.loaded.notify_all()
            if left_out:
                await self.backend.unload_model(name, sorted(left_out))
                logger.warning(
                    "model %s: partitions %s ran the previous version and do not run the new one (%s): dropped it there, "
                    "so every answer comes from the new version",
                    name,
                    ", ".join(sorted(left_out)),
                    refusals or "no memory left for it",
                )

    async def unload_model(self, name: str, parameters: dict[str, Any]) -> None:
        """Stop serving a model: new requests get 404, accepted ones are answered first. Unloading a model of the
        repository that is not served does nothing, as in Triton."""
        self._check_control(f"unload '{name}'")
        dependents = parameters.get("unload_dependents", False)
        if not isinstance(dependents, bool) or set(parameters) - {"unload_dependents"}:
            raise BadRequest(f"failed to unload '{name}': the only parameter is unload_dependents (true or false), not {parameters}")
        async with self.control:
            if name not in self.models:
                if self._model_dir(name) is None:
                    raise BadRequest(f"failed to unload '{name}': no such model in {self.config.model_repo}")
                return
            reason = f"unloaded; POST /v2/repository/models/{name}/load serves it again"
            if self.frontends is not None:  # they stop sending its batches before the workers drop it
                await self.frontends.tell(UnserveModel(name, reason), self.config.default_timeout_s + 5)
            await self._unserve(name)
            self.not_served[name] = reason
            logger.info("unloaded model %s", name)

    async def stop(self) -> None:
        if self._syncing is not None:
            self._syncing.cancel()
            await self.sync_traces()  # what the front-ends traced before they stop (after a sync under way)
        if self.frontends is not None:
            for records in await self.frontends.stop():  # and what they traced as they stopped
                if self.tracer.file is not None:
                    self.tracer.accept(records)
        await self.jobs.stop()
        for batcher in self.batchers.values():
            await batcher.stop()
        await self.backend.stop()
        self.regions.unregister()
        self.tracer.close()
        self._unwatch()

    def _update_partition_metrics(self) -> None:
        for worker in self.backend.workers.values():
            self.metrics.ready.labels(worker.id).set(1 if worker.ready else 0)
            self.metrics.restarts.labels(worker.id).set(worker.restarts)
            self.metrics.oom_kills.labels(worker.id).set(worker.oom_kills)

    def entry(self, name: str) -> ModelEntry:
        if name not in self.models:
            if (why := self.not_served.get(name)) is not None:
                raise UnknownModel(f"unknown model {name!r}: it is in the repository but not served: {why}")
            raise UnknownModel(f"unknown model {name!r}; served: {', '.join(sorted(self.models))}")
        return self.models[name]

    def batcher(self, name: str) -> ModelBatcher:
        """A served model's batcher (one unloaded meanwhile is unknown from then on)."""
        batcher = self.batchers.get(name)
        if batcher is None:
            self.entry(name)  # raises UnknownModel
            raise UnknownModel(f"unknown model {name!r}")
        return batcher

    def check_version(self, name: str, version: str) -> None:
        """A served model, and a version it has: every model has one version, 1 ("" asks for the latest)."""
        self.entry(name)
        if version not in ("", "1"):
            raise NotFound(f"model {name} has no version {version!r}; it serves version 1")

    def model_ready(self, name: str) -> bool:
        return any(r.ready for r in self.backend.replicas(name))

    async def infer(
        self, name: str, body: Body, header_length: str | None, timeout_header: str | None, *, received: Received | None = None
    ) -> tuple[bytes, int | None]:
        """One KServe v2 inference over HTTP: the response body, and its JSON header's length when binary follows.
        With `received`, a trace gets the body's arrival times, and is left to the caller to finish once it has sent
        the answer (HTTP_SEND_START, HTTP_SEND_END)."""

        async def work(entry: ModelEntry, trace: Trace | None) -> tuple[bytes, int | None]:
            started = time.monotonic()
            decoded = decode_request(body, header_length, entry.contract, self.regions, self.config.max_json_bytes)
            timeout = decoded.timeout_s or self.timeout(timeout_header)
            outputs = await self.infer_decoded(name, decoded, started, timeout, trace)
            return encode_response(name, decoded, outputs, self.config.max_json_bytes)

        return await self.counted(name, work, received)

    async def counted(self, name: str, work: Callable[[ModelEntry, Trace | None], Awaitable[T]], received: Received | None = None) -> T:
        """`work` on the model's entry, counted in the request metrics by its outcome, and traced if the trace
        settings pick it (service/trace.py); both protocols use it."""
        started = time.monotonic()
        status = "500"
        trace = None
        try:
            entry = self.entry(name)
            trace = self.tracer.sample(name)
            if trace is not None:
                if received is not None:
                    trace.stamp("HTTP_RECV_START", received.start_ns)
                    trace.stamp("HTTP_RECV_END", received.end_ns)
                trace.stamp("REQUEST_START")
            result = await work(entry, trace)
            status = "200"
            return result
        except ServiceError as exc:
            status = str(exc.status)
            raise
        except asyncio.CancelledError:
            status = "499"  # the client closed the connection first (nginx's code for it)
            raise
        finally:
            if name in self.models:
                elapsed = time.monotonic() - started
                self.metrics.request_done(name, status, elapsed)
                self.stats[name].request_done(status == "200", elapsed)
            if trace is not None:
                trace.stamp("REQUEST_END")
                if received is not None:
                    received.trace = trace  # finished by the HTTP path once the answer is written
                else:
                    self.tracer.done(trace)

    async def infer_decoded(
        self, name: str, decoded: DecodedRequest, started: float, timeout: float, trace: Trace | None = None
    ) -> dict[str, Array]:
        """A checked request through the model's batcher: its outputs (those asked for as classes classified), or 504
        `timeout` seconds after `started` (time.monotonic() when it arrived: decoding counts against its deadline)."""
        pending = Pending(inputs=decoded.inputs, size=decoded.batch, deadline=started + timeout, trace=trace)
        if trace is not None:
            trace.stamp("QUEUE_START")
        self.batcher(name).submit(pending)
        return classified(await _await_until(pending, name, timeout), decoded.classes)

    def count_held(self) -> None:
        """The running jobs, their memory and the request bodies held, for a /metrics scrape."""
        self.metrics.jobs_running.set(self.jobs.running())
        self.metrics.job_bytes.set(self.jobs.reserved())
        self.metrics.body_bytes.set(self.bodies.held)

    async def refresh_memory_used(self) -> None:
        """Memory in use per GPU and MIG partition, from NVML, and in the gateway's cgroup where it has a memory limit,
        for a /metrics scrape."""
        if (usage := memory_usage()) is not None:
            self.metrics.memory_limit.set(usage[0])
            self.metrics.memory_in_use.set(usage[1])
        devices = {p.device: p.id for p in self.partitions if p.kind in (PartitionKind.GPU, PartitionKind.MIG) and p.device}
        if not devices:
            return
        for uuid, used in (await asyncio.to_thread(memory_used, list(devices))).items():
            self.metrics.memory_used.labels(devices[uuid]).set(used)

    def _check_memory_headroom(self) -> None:
        """A warning where the workers, their models loaded, leave less of the cgroup's memory limit than the request
        bodies the gateway may hold: under load a worker would be killed for memory (service/workers/oom.py)."""
        usage, jobs = memory_usage(), _job_memory(self.config, self.models)
        if usage is None or usage[1] + self.config.max_pending_bytes + jobs <= usage[0]:
            return
        limit, in_use = usage
        logger.warning(
            "with their models loaded the gateway and its workers hold %.0f MB of their cgroup's memory limit of %.0f MB "
            "(docker --memory, a Kubernetes memory limit), and may hold %.0f MB of request bodies more (--max-pending-mb)%s, "
            "besides larger batches' activations: under load the kernel can kill a worker for memory; %s",
            in_use / MB,
            limit / MB,
            self.config.max_pending_bytes / MB,
            f" and {jobs / MB:.0f} MB for CT jobs (--max-job-mb)" if jobs else "",
            ADVICE,
        )

    def timeout(self, header: str | None) -> float:
        """Seconds from an X-Timeout-Ms header, else the configured default."""
        return _timeout_ms(header) or self.config.default_timeout_s

    async def run(self, name: str, inputs: dict[str, Array], deadline: float) -> dict[str, Array]:
        """Rows through the model's batcher, in chunks of its max batch size: the /v1 endpoints' way to infer."""
        batcher = self.batcher(name)
        rows = next(iter(inputs.values())).shape[0]
        step = batcher.policy.max_batch_size
        pending: list[Pending] = []
        try:
            for start in range(0, rows, step):
                item = Pending(
                    inputs={k: v[start : start + step] for k, v in inputs.items()}, size=min(step, rows - start), deadline=deadline
                )
                batcher.submit(item)
                pending.append(item)
        except ServiceError as exc:
            for item in pending:  # the batcher skips answered requests
                if not item.future.done():
                    item.future.set_exception(exc)
                    item.future.exception()  # retrieved: nobody else awaits it
            raise
        started = time.monotonic()
        timeout = max(deadline - started, 0.0)
        try:
            answers = await asyncio.gather(*(_await_until(item, name, timeout) for item in pending), return_exceptions=True)
        finally:  # each chunk is a request to the model in its statistics, as an HTTP or gRPC request is
            elapsed, stats = time.monotonic() - started, self.stats[name]
            for item in pending:
                future = item.future
                stats.request_done(future.done() and not future.cancelled() and future.exception() is None, elapsed)
        if failed := [a for a in answers if isinstance(a, BaseException)]:
            raise failed[0]
        parts = [a for a in answers if not isinstance(a, BaseException)]
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def model_metadata(self, name: str) -> dict[str, Any]:
        contract = self.entry(name).contract

        def tensor(spec: Any) -> dict[str, Any]:
            return {"name": spec.name, "datatype": NUMPY_TO_V2[spec.dtype], "shape": [d if isinstance(d, int) else -1 for d in spec.shape]}

        return {
            "name": name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [tensor(s) for s in contract.inputs],
            "outputs": [tensor(s) for s in contract.outputs],
        }

    def model_config(self, name: str) -> Any:
        """Triton's ModelConfig message for a served model (the model configuration extension)."""
        self.entry(name)
        return self.configs[name]

    def model_statistics(self, name: str | None) -> Any:
        """Triton's ModelStatisticsResponse: one model's statistics, or every served model's (name None or "")."""
        if name:
            self.entry(name)
        names = [name] if name else sorted(self.models)
        others = self.frontends.latest if self.frontends is not None else []
        merged = {n: merge_statistics(self.stats[n], [c.stats[n] for c in others if n in c.stats]) for n in names}
        return service_pb2.ModelStatisticsResponse(model_stats=[merged[n].message() for n in names])

    async def trace_settings(self, model: str | None, changes: dict[str, Any] | None = None) -> dict[str, Any]:
        """Triton's trace extension, both protocols: the settings for every model or a served one, after `changes`
        (which reach the other front-end processes before the answer)."""
        if model is not None:
            self.entry(model)  # raises UnknownModel
        if not changes:
            return self.tracer.settings(model)
        settings = self.tracer.update(model, changes)
        await self.sync_traces()
        return settings

    async def sync_traces(self) -> None:
        """The first process's trace settings to every other front-end, and their finished traces into its file."""
        if self.frontends is not None and self.tracer.file is not None:
            for records in await self.frontends.sync_traces(self.tracer.state()):
                self.tracer.accept(records)

    async def _sync_traces_forever(self) -> None:
        while True:
            await asyncio.sleep(TRACE_SYNC_S)
            # shielded: stopping the gateway cancels this task, and a question cancelled halfway would leave a
            # front-end's answer (its traces) to be taken as the answer to the next question
            await asyncio.shield(self._sync_traces_logged())

    async def _sync_traces_logged(self) -> None:
        try:
            await self.sync_traces()
        except Exception:  # the next turn asks again
            logger.exception("could not take the front-ends' traces")

    async def update_logs(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Triton's logging extension: change the log level here and in every other front-end process."""
        settings = self.logs.update(changes)
        if self.frontends is not None:
            await self.frontends.tell(SetLogs(changes))
        return settings

    async def refresh_frontends(self) -> None:
        """Ask the other front-end processes for their counts, for the metrics and statistics served next."""
        if self.frontends is not None:
            await self.frontends.refresh()

    def metrics_text(self) -> bytes:
        """/metrics: this process's metrics, with the other front-ends' (as of the last refresh) added."""
        own = generate_latest(self.metrics.registry)
        if self.frontends is None:
            return own
        return merge_metrics(own, [c.metrics for c in self.frontends.latest])

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: served models READY while a replica is ready; the rest UNAVAILABLE, and why."""
        states = {name: "" if self.model_ready(name) else "no ready replica" for name in self.models} | self.not_served
        return [
            {"name": name, "version": "1", "state": "UNAVAILABLE", "reason": reason}
            if reason
            else {"name": name, "version": "1", "state": "READY"}
            for name, reason in sorted(states.items())
            if not (ready_only and reason)
        ]

    async def partitions_document(self) -> dict[str, Any]:
        """GET /v1/partitions: the partitions, and the other front-end processes with their latest counts."""
        await self.refresh_frontends()
        return {
            "partitions": self.partitions_view(),
            "frontends": self.frontends.view() if self.frontends is not None else [],
            "cpu_models_memory": self._cpu_models_memory(),
        }

    def _cpu_models_memory(self) -> dict[str, Any] | None:
        """What the models on CPU slices share (service/placement.py), and how much of it those placed take."""
        if self.cpu_memory is None:
            return None
        placed = cpu_placed_bytes(self.partitions, self.placement)
        return {"bytes": self.cpu_memory.bytes, "placed_bytes": placed, "source": self.cpu_memory.source}

    def partitions_view(self) -> list[dict[str, Any]]:
        view = []
        for partition in self.partitions:
            worker = self.backend.workers.get(partition.id)
            view.append(
                partition.describe()
                | {
                    "models": sorted(self.placement.get(partition.id, {})),
                    "ready": bool(worker and worker.ready),
                    "pid": worker.pid if worker else None,
                    "scheduling": _scheduling(worker.pid) if worker and worker.ready else None,
                    "providers": list(worker.providers) if worker else [],
                    "device_warning": worker.device_warning if worker else None,
                    "restarts": worker.restarts if worker else 0,
                    "oom_kills": worker.oom_kills if worker else 0,
                    "last_death": worker.last_death if worker else None,
                    "outstanding_batches": worker.outstanding if worker else 0,
                    "refused": worker.refused if worker else {},
                    "run_slices": dict(worker.slices) if worker else {},
                }
            )
        return view


async def _await_until(pending: Pending, name: str, timeout: float) -> dict[str, Array]:
    """The batch's answer, or 504 at the request's deadline (the batcher skips it from then on)."""
    loop = asyncio.get_running_loop()

    def expire() -> None:
        if not pending.future.done():
            pending.future.set_exception(DeadlineExpired(f"model {name}: no answer within {timeout:.3f}s"))

    timer = loop.call_at(loop.time() + max(pending.deadline - time.monotonic(), 0), expire)
    try:
        return await pending.future
    finally:
        timer.cancel()


SCHEDULING = {os.SCHED_OTHER: "normal", os.SCHED_BATCH: "batch", os.SCHED_IDLE: "idle"}


def _job_memory(config: ServeConfig, models: dict[str, ModelEntry]) -> int:
    """What CT jobs may hold in the gateway (--max-job-mb) where it serves a CT model, else nothing."""
    return config.max_job_bytes if any(e.contract.family == "lns" for e in models.values()) else 0


def _log_placement_bounds(
    partitions: list[Partition], placement: dict[str, dict[str, ModelSpec]], left_off: dict[str, str], cpu_memory: SharedMemory | None
) -> None:
    """Warnings where memory kept models off partitions: those served nowhere, and those on fewer CPU slices than all."""
    for name, why in left_off.items():
        logger.warning("model %s is not served: %s", name, why)
    if cpu_memory is None:
        return
    share, source = cpu_memory.bytes / MB, cpu_memory.source
    logger.info(
        "the models on the CPU slices take %.0f of the %.0f MB they share (%s)", cpu_placed_bytes(partitions, placement) / MB, share, source
    )
    slices = [p.id for p in partitions if p.kind is PartitionKind.CPU]
    runs_on = {name: sum(name in placement[pid] for pid in slices) for name in sorted({m for pid in slices for m in placement[pid]})}
    if fewer := {name: k for name, k in runs_on.items() if k < len(slices)}:
        logger.warning(
            "the models on the %d CPU slices share %.0f MB of memory (%s): %s",
            len(slices),
            share,
            source,
            ", ".join(f"{name} runs on {k}" for name, k in fewer.items()),
        )


def _scheduling(pid: int | None) -> str | None:
    """A worker's CPU scheduling policy as the kernel reports it (None for a remote partition or a process gone)."""
    if pid is None:
        return None
    try:
        return SCHEDULING.get(os.sched_getscheduler(pid), "realtime")
    except OSError:
        return None


def _timeout_ms(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"X-Timeout-Ms {raw!r} is not a number") from None
    if not 0 < value < math.inf:  # NaN fails both
        raise BadRequest(f"X-Timeout-Ms must be a positive finite number of milliseconds, got {raw!r}")
    return value / 1000


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
    gateway = Gateway.build(config)

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


def _check_onnxruntime() -> None:
    """Local workers need onnxruntime; a gateway of Triton partitions alone does not."""
    try:
        found = importlib.util.find_spec("onnxruntime") is not None
    except ImportError:
        found = False
    if not found:
        raise ValueError(
            "onnxruntime is not installed, and the local partitions' workers need it: pip install 'migserve[cpu]', "
            "or 'migserve[gpu]' (onnxruntime-gpu) on NVIDIA GPUs, never both"
        )
