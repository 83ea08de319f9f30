"""Prometheus metrics, one registry per gateway (so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

JOB_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)  # a CT volume: seconds to minutes
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("migserve_requests", "Inference requests answered", ["model", "status"], registry=r)
        self.latency = Histogram(
            "migserve_request_seconds", "Request latency in the gateway", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "migserve_batch_size", "Rows per batch sent to a partition", ["model", "partition"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "migserve_batch_seconds", "Batch round trip to a partition", ["model", "partition"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("migserve_queue_depth", "Requests waiting in a model's queue", ["model"], registry=r)
        self.retries = Counter("migserve_batch_retries", "Batches retried after a worker died", ["model"], registry=r)
        self.isolated = Counter(
            "migserve_requests_run_alone", "Requests run again as batches of one after their batch failed", ["model"], registry=r
        )
        self.restarts = Gauge("migserve_worker_restarts", "Times a partition's worker was restarted", ["partition"], registry=r)
        self.oom_kills = Gauge(
            "migserve_worker_oom_kills",
            "Times the kernel killed a partition's worker for want of memory (its OOM killer)",
            ["partition"],
            registry=r,
        )
        self.ready = Gauge("migserve_partition_ready", "1 while a partition's worker is ready", ["partition"], registry=r)
        self.memory = Gauge("migserve_partition_memory_bytes", "Partition memory (NVML; unset on CPU slices)", ["partition"], registry=r)
        self.memory_used = Gauge(
            "migserve_partition_memory_used_bytes",
            "Memory in use on a partition's GPU or MIG instance (NVML, read at each scrape)",
            ["partition"],
            registry=r,
        )
        self.memory_limit = Gauge(
            "migserve_memory_limit_bytes", "The memory limit of the gateway's cgroup (docker --memory, a Kubernetes limit)", registry=r
        )
        self.memory_in_use = Gauge(
            "migserve_memory_working_set_bytes",
            "Memory the gateway's cgroup holds against that limit, less the page cache the kernel can drop (read at each scrape)",
            registry=r,
        )
        self.v1_requests = Counter("migserve_v1_requests", "Family endpoint requests answered", ["endpoint", "status"], registry=r)
        self.v1_latency = Histogram(
            "migserve_v1_request_seconds", "Family endpoint latency, decoding to answer", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.jobs_running = Gauge("migserve_jobs_running", "Jobs (202 Accepted) still running", registry=r)
        self.job_bytes = Gauge("migserve_job_bytes", "Memory the running CT jobs hold, by their estimates (--max-job-mb)", registry=r)
        self.jobs_ended = Counter(
            "migserve_jobs_ended",
            "Jobs that ended: done, failed (a tile's inference, the deadline), cancelled (deleted, the client of a "
            "synchronous request gone, the gateway stopping), or paused (the gateway stopping, the job kept in --jobs-dir "
            "with its upload for the next gateway to run again)",
            ["kind", "outcome"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "migserve_job_seconds", "Time from a job's submission to its end, of jobs done", ["kind"], buckets=JOB_BUCKETS, registry=r
        )
        self.body_bytes = Gauge(
            "migserve_request_body_bytes",
            "What --max-pending-mb counts: request bodies from their head to their answer, what they unpack to, "
            "large batches' arenas, answers waiting for their client",
            registry=r,
        )
        self.disconnected = Counter(
            "migserve_clients_disconnected",
            "Connections the gateway closed: the client sent nothing in the middle of a request for --receive-timeout-s "
            "(receive_timeout), sent a request's head too slowly to have it whole within --head-timeout-s (head_timeout), "
            "took none of its answers for --send-timeout-s (send_timeout), or connected while its process held "
            "--max-connections others (max_connections: answered 503 at once); made_room: an idle connection closed for "
            "a new one at --max-connections",
            ["protocol", "reason"],
            registry=r,
        )
        self.invalid_http = Counter(
            "migserve_http_invalid_requests",
            "Requests answered 400 because their HTTP could not be parsed (request line, headers, framing); uvicorn "
            "logs the first of each minute",
            registry=r,
        )
        self._children: dict[tuple[str, ...], Any] = {}
        for protocol, reason in (
            ("http", "receive_timeout"),
            ("http", "head_timeout"),
            ("http", "send_timeout"),
            ("http", "max_connections"),
            ("http", "made_room"),
            ("grpc", "send_timeout"),
        ):
            self.disconnection(protocol, reason)  # each at 0 from the start, as Prometheus would have it

    def disconnection(self, protocol: str, reason: str) -> Callable[[], None]:
        """What counts one client the gateway disconnects for `reason` (receive_timeout, head_timeout, send_timeout,
        max_connections, made_room)."""
        child = self._children.get(("disconnected", protocol, reason))
        if child is None:
            child = self._children["disconnected", protocol, reason] = self.disconnected.labels(protocol, reason)
        return child.inc

    def count_compute(self, seconds: Callable[[], dict[str, float]]) -> None:
        """migserve_partition_compute_seconds_total, read from `seconds` (partition -> seconds) at each scrape."""
        self.registry.register(_ComputeSeconds(seconds))

    def request_done(self, model: str, status: str, seconds: float) -> None:
        """Count one inference request and its latency (the labelled children are looked up once)."""
        counter = self._children.get(("requests", model, status))
        if counter is None:
            counter = self._children["requests", model, status] = self.requests.labels(model, status)
        histogram = self._children.get(("latency", model))
        if histogram is None:
            histogram = self._children["latency", model] = self.latency.labels(model)
        counter.inc()
        histogram.observe(seconds)


class _ComputeSeconds:
    """The time each partition's worker spent running this gateway's batches, as the worker measured it: on a CPU
    slice its rate is the partition's utilisation (1.0: always running a batch); a GPU worker running several batches
    at once (--worker-threads) adds each one's time, so there the rate is the mean number of batches running."""

    def __init__(self, seconds: Callable[[], dict[str, float]]) -> None:
        self.seconds = seconds

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "migserve_partition_compute_seconds",
            "Seconds a partition's worker spent running batches (summed over batches run at once)",
            labels=["partition"],
        )
        for partition, seconds in self.seconds().items():
            family.add_metric([partition], seconds)
        yield family
