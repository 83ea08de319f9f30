"""The gateway: its models and their batchers, its partitions' backend, and what every request to it goes through.

One per process (front-end processes have theirs, service/api/frontend_process.py). Built by service/api/build.py, served by
service/api/app.py (HTTP) and service/api/grpc_service.py (gRPC); what it shows of itself is in views.py, loading and
unloading models in control.py."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

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
from ..partitions import Partition, PartitionKind, memory_used
from ..placement import SharedMemory
from ..regions import Regions
from ..repository import ModelEntry
from ..shared import Published, SharedCounts
from ..stats import ModelStatistics, model_config
from ..trace import TRACE_SYNC_S, Trace, Tracer
from ..workers.oom import ADVICE
from ..workers.protocol import ModelSpec, WorkerOptions
from .budget import BodyBudget
from .classification import classified
from .fastpath import Received
from .frontends import Frontends, SetLogs
from .kserve import Body, decode_request, encode_response
from .tensors import DecodedRequest

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

    async def unserve(self, name: str) -> None:
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

    def placed(self, name: str, entry: ModelEntry, specs: dict[str, ModelSpec]) -> None:
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

    def local_partitions(self, name: str) -> set[str]:
        """The local partitions a model is placed on now."""
        return {p.id for p in self.partitions if p.kind is not PartitionKind.TRITON and name in self.placement.get(p.id, {})}

    async def serve_attached(self, name: str, entry: ModelEntry, specs: dict[str, ModelSpec], column: int | None) -> None:
        """A front-end process: the first process loaded (or reloaded) a model on these partitions, its queue count in
        this column of the shared counts; serve it too."""
        if self.shared is not None:
            self.shared.learn(name, column)
        await self.backend.attach_model(name, specs)
        self.placed(name, entry, specs)

    async def unserve_attached(self, name: str, reason: str) -> None:
        """A front-end process: the first process unloads a model; answer what this process accepted of it first."""
        if name in self.models:
            await self._stop_serving(name)
            self.backend.detach_model(name)
        self.not_served[name] = reason

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
        usage, jobs = memory_usage(), job_memory(self.config, self.models)
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


def job_memory(config: ServeConfig, models: dict[str, ModelEntry]) -> int:
    """What CT jobs may hold in the gateway (--max-job-mb) where it serves a CT model, else nothing."""
    return config.max_job_bytes if any(e.contract.family == "lns" for e in models.values()) else 0


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
