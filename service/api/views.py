"""What the gateway shows of itself, over both protocols: model metadata, configuration and statistics, the
repository index, /metrics' text and /v1/partitions; with front-end processes, their counts added to the first's."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from tritonclient.grpc import service_pb2

from ..placement import cpu_placed_bytes
from ..stats import ModelStatistics
from .tensors import NUMPY_TO_V2

if TYPE_CHECKING:
    from .gateway import Gateway

SUMMED_GAUGES = frozenset({"migserve_queue_depth", "migserve_request_body_bytes"})  # per process: the total is the sum


def model_metadata(gateway: Gateway, name: str) -> dict[str, Any]:
    """KServe v2 model metadata: the served model's inputs and outputs as its contract declares them."""
    contract = gateway.entry(name).contract

    def tensor(spec: Any) -> dict[str, Any]:
        return {"name": spec.name, "datatype": NUMPY_TO_V2[spec.dtype], "shape": [d if isinstance(d, int) else -1 for d in spec.shape]}

    return {
        "name": name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [tensor(s) for s in contract.inputs],
        "outputs": [tensor(s) for s in contract.outputs],
    }


def model_config(gateway: Gateway, name: str) -> Any:
    """Triton's ModelConfig message for a served model (the model configuration extension)."""
    gateway.entry(name)
    return gateway.configs[name]


def model_statistics(gateway: Gateway, name: str | None) -> Any:
    """Triton's ModelStatisticsResponse: one model's statistics, or every served model's (name None or "")."""
    if name:
        gateway.entry(name)
    names = [name] if name else sorted(gateway.models)
    others = gateway.frontends.latest if gateway.frontends is not None else []
    merged = {n: merge_statistics(gateway.stats[n], [c.stats[n] for c in others if n in c.stats]) for n in names}
    return service_pb2.ModelStatisticsResponse(model_stats=[merged[n].message() for n in names])


def metrics_text(gateway: Gateway) -> bytes:
    """/metrics: this process's metrics, with the other front-ends' (as of the last refresh) added."""
    own = generate_latest(gateway.metrics.registry)
    if gateway.frontends is None:
        return own
    return merge_metrics(own, [c.metrics for c in gateway.frontends.latest])


def repository_index(gateway: Gateway, ready_only: bool = False) -> list[dict[str, str]]:
    """Triton's repository index: served models READY while a replica is ready; the rest UNAVAILABLE, and why."""
    states = {name: "" if gateway.model_ready(name) else "no ready replica" for name in gateway.models} | gateway.not_served
    return [
        {"name": name, "version": "1", "state": "UNAVAILABLE", "reason": reason}
        if reason
        else {"name": name, "version": "1", "state": "READY"}
        for name, reason in sorted(states.items())
        if not (ready_only and reason)
    ]


async def partitions_document(gateway: Gateway) -> dict[str, Any]:
    """GET /v1/partitions: the partitions, and the other front-end processes with their latest counts."""
    await gateway.refresh_frontends()
    return {
        "partitions": partitions_view(gateway),
        "frontends": gateway.frontends.view() if gateway.frontends is not None else [],
        "cpu_models_memory": _cpu_models_memory(gateway),
    }


def _cpu_models_memory(gateway: Gateway) -> dict[str, Any] | None:
    """What the models on CPU slices share (service/placement.py), and how much of it those placed take."""
    if gateway.cpu_memory is None:
        return None
    placed = cpu_placed_bytes(gateway.partitions, gateway.placement)
    return {"bytes": gateway.cpu_memory.bytes, "placed_bytes": placed, "source": gateway.cpu_memory.source}


def partitions_view(gateway: Gateway) -> list[dict[str, Any]]:
    """Each partition, the models placed on it and its worker's state."""
    view = []
    for partition in gateway.partitions:
        worker = gateway.backend.workers.get(partition.id)
        view.append(
            partition.describe()
            | {
                "models": sorted(gateway.placement.get(partition.id, {})),
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


SCHEDULING = {os.SCHED_OTHER: "normal", os.SCHED_BATCH: "batch", os.SCHED_IDLE: "idle"}


def _scheduling(pid: int | None) -> str | None:
    """A worker's CPU scheduling policy as the kernel reports it (None for a remote partition or a process gone)."""
    if pid is None:
        return None
    try:
        return SCHEDULING.get(os.sched_getscheduler(pid), "realtime")
    except OSError:
        return None


def merge_metrics(own: bytes, others: Iterable[bytes]) -> bytes:
    """The first process's metrics with the front-ends' added: counters, histograms and the per-process gauges
    (queue depth, bodies held) summed; the other gauges (partition state) are the first process's alone."""
    families: dict[str, Any] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for first, text in itertools.chain([(True, own)], ((False, t) for t in others)):
        for family in text_string_to_metric_families(text.decode()):
            if not first and family.type == "gauge" and family.name not in SUMMED_GAUGES:
                continue
            families.setdefault(family.name, family)
            merged = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in merged:
                    merged[key] = sample.value
                elif sample.name.endswith("_created"):
                    merged[key] = min(merged[key], sample.value)
                else:
                    merged[key] += sample.value
    for name, family in families.items():
        family.samples = [Sample(sample_name, dict(labels), value) for (sample_name, labels), value in values[name].items()]
    registry = CollectorRegistry()
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def merge_statistics(own: ModelStatistics, others: Iterable[ModelStatistics]) -> ModelStatistics:
    """One model's statistics over every front-end."""
    total = ModelStatistics(own.name)
    for stats in (own, *others):
        total.merge(stats)
    return total
