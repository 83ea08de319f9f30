"""Which models run on which partitions: every model everywhere, bounded by partition memory."""

from __future__ import annotations

from pathlib import Path

from .partitions import Partition, PartitionKind
from .repository import ModelEntry
from .workers.protocol import ModelSpec

# A session needs its weights plus activations and workspace; 4x the file is a
# conservative rule of thumb for these models at their max batch.
MEMORY_FACTOR = 4


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
    )


def place(partitions: list[Partition], models: dict[str, ModelEntry]) -> dict[str, dict[str, ModelSpec]]:
    """partition id -> {model: its spec}; models that do not fit are left off that partition."""
    placement: dict[str, dict[str, ModelSpec]] = {}
    for partition in partitions:
        budget = partition.memory_bytes
        chosen: dict[str, ModelSpec] = {}
        for name, entry in sorted(models.items(), key=lambda kv: kv[1].model_path.stat().st_size):
            need = entry.model_path.stat().st_size * MEMORY_FACTOR
            if budget is not None:
                if need > budget:
                    continue
                budget -= need
            chosen[name] = model_spec(entry)
        placement[partition.id] = chosen
    return placement


def place_one(partitions: list[Partition], placement: dict[str, dict[str, ModelSpec]], entry: ModelEntry) -> dict[str, ModelSpec]:
    """Where a model loaded at run time goes: every local partition with memory left beside what is placed there
    (the model's own older placement not counted: a reload replaces it). Triton partitions serve their own models."""
    name, need = entry.contract.name, entry.model_path.stat().st_size * MEMORY_FACTOR
    chosen: dict[str, ModelSpec] = {}
    for partition in partitions:
        if partition.kind is PartitionKind.TRITON:
            continue
        if partition.memory_bytes is not None:
            used = sum(Path(s.path).stat().st_size * MEMORY_FACTOR for m, s in placement.get(partition.id, {}).items() if m != name)
            if used + need > partition.memory_bytes:
                continue
        chosen[partition.id] = model_spec(entry)
    return chosen
