"""Which models run on which partitions: every model everywhere, bounded by memory.

A GPU or MIG partition has memory of its own (NVML says how much, or a topology file): the models placed on it must
fit in it. CPU slices share the host's: what the gateway's cgroup may use (docker --memory, a Kubernetes memory limit)
or, with no limit, what the host has available at start, less the request bodies the gateway may hold
(--max-pending-mb), the processes' own memory and their batch arenas. There each model gets one replica before any gets a second, on
the slice with the least placed, so memory too small for every model on every slice still serves each model
somewhere before it replicates any. A model that fits nowhere is not served, saying why. Triton partitions serve
their own models: nothing bounds them here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from migserve.contract import TensorSpec

from .cgroups import memory_available, memory_limit
from .partitions import Partition, PartitionKind
from .repository import ModelEntry
from .workers import shm
from .workers.process import GPU_THREADS
from .workers.protocol import ModelSpec

MB = 1 << 20
# What a model takes on a partition: onnxruntime's session (its own structures, and arena slack a small model's run
# does not fill: SESSION_BYTES), the weights twice (the session's copy, and the pre-packed copies its matrix kernels
# make), and the tensors between the layers at the largest batch, which the export estimates from the graph
# (contract.json's `memory`, exporters/memory.py). Measured against it in bench/RESULTS.md (bench/footprint.py).
SESSION_BYTES = 32 * MB
WEIGHT_COPIES = 2
# An export made before contracts carried `memory`: 4x its file, the rule of thumb placement used before.
MEMORY_FACTOR = 4
# The processes' own memory, models aside, out of what CPU slices' models share: the gateway's (its Python, FastAPI,
# numpy, scipy, and the shared libraries every process maps, counted once) and each worker's (Python, numpy and
# onnxruntime), as bench/footprint.py measures them.
GATEWAY_BYTES = 128 * MB
WORKER_BYTES = 32 * MB


@dataclass(frozen=True)
class SharedMemory:
    """The memory the models on CPU slices share, and where the figure comes from, for messages."""

    bytes: int
    source: str

    @classmethod
    def of_host(
        cls, pending_bytes: int, workers: int, root: Path = Path("/"), job_bytes: int = 0, *, frontends: int = 1, arena_bytes: int = 0
    ) -> SharedMemory | None:
        """The cgroup's memory limit, else the host's available memory, less `pending_bytes` of request bodies,
        `job_bytes` for CT jobs (where the gateway serves them), the gateway's `frontends` processes' and its `workers`
        processes' own memory, and `arena_bytes` of batch arenas for each front-end process (`arenas_per_worker` for each
        batch it may have in flight, `arena_slots`); None where neither can be read (nothing bounds the slices)."""
        limit = memory_limit(root)
        if limit is not None:
            whence = f"the cgroup's memory limit of {limit / MB:.0f} MB"
        elif (available := memory_available(root)) is not None:
            limit, whence = available, f"the {available / MB:.0f} MB the host had available at start"
        else:
            return None
        own = frontends * GATEWAY_BYTES + workers * WORKER_BYTES
        arenas = frontends * arena_bytes
        jobs = f", --max-job-mb {job_bytes / MB:g} for CT jobs" if job_bytes else ""
        gateway = "the gateway" if frontends == 1 else f"the gateway's {frontends} processes"
        kept = f" and {arenas / MB:.0f} MB for batch arenas in shared memory (--arena-keep-mb)" if arenas else ""
        return cls(
            max(limit - pending_bytes - job_bytes - own - arenas, 0),
            f"{whence}, less --max-pending-mb {pending_bytes / MB:g} for request bodies{jobs} and {own / MB:.0f} MB for the "
            f"processes' own ({gateway} and {workers} worker{'s' if workers != 1 else ''}){kept}",
        )


@dataclass(frozen=True)
class Placement:
    by_partition: dict[str, dict[str, ModelSpec]]  # partition id -> {model: its spec}
    left_off: dict[str, str]  # models placed on no partition -> why


def model_spec(entry: ModelEntry) -> ModelSpec:
    """What a worker needs to load a model: its file, the contract's sha256, warm-up shapes."""
    contract = entry.contract
    dims = {name: r.default for name, r in contract.dims.items()} | {"batch": 1}
    warmup: dict[str, tuple[tuple[int, ...], str]] = {
        t.name: (tuple(d if isinstance(d, int) else dims[d] for d in t.shape), t.dtype) for t in contract.inputs
    }
    return ModelSpec(
        name=contract.name,
        path=str(entry.model_path),
        sha256=contract.model_sha256,
        warmup=warmup,
        max_batch=contract.dims["batch"].max,  # every tensor leads with the batch dim (the contract checks)
        memory_bytes=footprint(entry),
    )


def arenas_per_worker(models: Iterable[ModelEntry], keep: int) -> int:
    """What one process's two arenas for one worker (its batches' inputs, the worker's outputs for it) may hold between
    batches: each up to twice the largest batch of `models` at their largest dims (an arena grows to twice its size),
    at most `keep` (larger ones are counted in --max-pending-mb while they exist, service/workers/shm.py)."""
    entries = list(models)
    if not entries:
        return 0
    inputs = max(sum(_max_bytes(e, t) for t in e.contract.inputs) for e in entries)
    outputs = max(sum(_max_bytes(e, t) for t in e.contract.outputs) for e in entries)
    return sum(min(keep, max(shm.MIN_ARENA, 2 * largest)) for largest in (inputs, outputs))


def arena_slots(partitions: Iterable[Partition], in_flight: int, threads: int) -> int:
    """Batches one gateway process may have in flight on all its workers at once, each in arenas of its own: on each
    worker --batches-in-flight, at most the worker's threads (--worker-threads; 0: 1 on a CPU slice, GPU_THREADS on a
    GPU or MIG partition)."""
    return sum(
        min(in_flight, threads or (1 if p.kind is PartitionKind.CPU else GPU_THREADS))
        for p in partitions
        if p.kind is not PartitionKind.TRITON
    )


def _max_bytes(entry: ModelEntry, tensor: TensorSpec) -> int:
    dims = entry.contract.dims
    return math.prod(d if isinstance(d, int) else dims[d].max for d in tensor.shape) * np.dtype(tensor.dtype).itemsize


def footprint(entry: ModelEntry) -> int:
    """Bytes the model is taken to need on a partition, running at its largest batch."""
    weights = entry.model_path.stat().st_size
    if entry.contract.memory is None:
        return weights * MEMORY_FACTOR
    return SESSION_BYTES + WEIGHT_COPIES * weights + entry.contract.memory.activation_bytes


def place(partitions: list[Partition], models: Mapping[str, ModelEntry], shared: SharedMemory | None = None) -> Placement:
    """Every model on every partition with memory for it, smallest first; on CPU slices within `shared` (if given)."""
    specs = {name: model_spec(entry) for name, entry in models.items()}  # one each, shared by its partitions
    need = {name: spec.memory_bytes for name, spec in specs.items()}
    order = sorted(models, key=lambda name: (need[name], name))
    placed: dict[str, dict[str, ModelSpec]] = {p.id: {} for p in partitions}
    pooled = _pooled(partitions, shared)
    for partition in partitions:
        if partition not in pooled:
            for name in order:
                if need[name] <= _room(partition, placed[partition.id].values()):
                    placed[partition.id][name] = specs[name]
    left = shared.bytes if shared is not None else 0
    for _ in pooled:  # each round gives each model one more replica, while the shared memory lasts
        for name in order:
            slices = [p for p in pooled if name not in placed[p.id] and need[name] <= _room(p, placed[p.id].values())]
            if slices and need[name] <= left:
                target = min(slices, key=lambda p: _used(placed[p.id].values()))
                placed[target.id][name] = specs[name]
                left -= need[name]
    nowhere = [name for name in order if not any(name in there for there in placed.values())]
    return Placement(placed, {name: why_nowhere(partitions, placed, need[name], shared, name) for name in nowhere})


def place_one(
    partitions: list[Partition], placement: dict[str, dict[str, ModelSpec]], entry: ModelEntry, shared: SharedMemory | None = None
) -> dict[str, ModelSpec]:
    """Where a model loaded at run time goes: every local partition with memory left beside what is placed there (the
    model's own older placement not counted: a reload replaces it), on CPU slices as many as `shared` has room for.
    Triton partitions serve their own models."""
    spec = model_spec(entry)
    name, need = spec.name, spec.memory_bytes
    others = _others(partitions, placement, name)
    pooled = _pooled(partitions, shared)
    chosen = {p.id: spec for p in partitions if p.kind is not PartitionKind.TRITON and p not in pooled and need <= _room(p, others[p.id])}
    left = _left(shared, pooled, others)
    for partition in sorted(pooled, key=lambda p: _used(others[p.id])):
        if need <= min(left, _room(partition, others[partition.id])):
            chosen[partition.id] = spec
            left -= need
    return chosen


def why_nowhere(
    partitions: list[Partition], placement: Mapping[str, Mapping[str, ModelSpec]], need: int, shared: SharedMemory | None, name: str
) -> str:
    """Why a model that needs `need` bytes is on no partition: what each kind of partition has left beside the others."""
    others = _others(partitions, placement, name)
    pooled = _pooled(partitions, shared)
    rooms = [_room(p, others[p.id]) for p in partitions if p.kind is not PartitionKind.TRITON and p not in pooled]
    why = f"it needs about {need / MB:.1f} MB of memory at its largest batch"
    if rooms:
        why += f"; the most any partition has left of its own memory is {max(rooms) / MB:.1f} MB"
    if pooled and shared is not None:
        left = _left(shared, pooled, others)
        why += f"; the CPU slices' models share {shared.bytes / MB:.0f} MB ({shared.source}), {left / MB:.1f} MB of it left"
    if declared := {p.id: _room(p, others[p.id]) for p in pooled if p.memory_bytes is not None}:  # bounds of their own too
        most = max(declared, key=lambda i: declared[i])
        why += f", and the topology's memory_bytes leaves at most {declared[most] / MB:.1f} MB on a slice ({most})"
    return why


def cpu_placed_bytes(partitions: list[Partition], placement: Mapping[str, Mapping[str, ModelSpec]]) -> int:
    """What the models placed on CPU slices take of the memory they share."""
    return sum(_used(placement.get(p.id, {}).values()) for p in partitions if p.kind is PartitionKind.CPU)


def _others(partitions: list[Partition], placement: Mapping[str, Mapping[str, ModelSpec]], name: str) -> dict[str, list[ModelSpec]]:
    """Each partition's placed models but `name` (whose own older placement a reload replaces)."""
    return {p.id: [s for m, s in placement.get(p.id, {}).items() if m != name] for p in partitions}


def _left(shared: SharedMemory | None, pooled: list[Partition], others: Mapping[str, list[ModelSpec]]) -> int:
    """What the shared memory has left beside the pooled slices' other models."""
    return (shared.bytes if shared is not None else 0) - sum(_used(others[p.id]) for p in pooled)


def _pooled(partitions: list[Partition], shared: SharedMemory | None) -> list[Partition]:
    return [p for p in partitions if p.kind is PartitionKind.CPU] if shared is not None else []


def _used(specs: Iterable[ModelSpec]) -> int:
    return sum(s.memory_bytes for s in specs)


def _room(partition: Partition, specs: Iterable[ModelSpec]) -> float:
    """Bytes left on a partition of its own memory (a GPU's, or one a topology file declares); unbounded without."""
    return float("inf") if partition.memory_bytes is None else partition.memory_bytes - _used(specs)
