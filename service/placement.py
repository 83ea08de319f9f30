"""Which models run on which partitions: every model everywhere, bounded by partition memory."""

from __future__ import annotations

from .partitions import Partition
from .repository import ModelEntry

# A session needs its weights plus activations and workspace; 4x the file is a
# conservative rule of thumb for these models at their max batch.
MEMORY_FACTOR = 4


def place(partitions: list[Partition], models: dict[str, ModelEntry]) -> dict[str, dict[str, tuple[str, str]]]:
    """partition id -> {model: (model path, sha256)}; models that do not fit are left off that partition."""
    placement: dict[str, dict[str, tuple[str, str]]] = {}
    for partition in partitions:
        budget = partition.memory_bytes
        chosen: dict[str, tuple[str, str]] = {}
        for name, entry in sorted(models.items(), key=lambda kv: kv[1].model_path.stat().st_size):
            need = entry.model_path.stat().st_size * MEMORY_FACTOR
            if budget is not None:
                if need > budget:
                    continue
                budget -= need
            chosen[name] = (str(entry.model_path), entry.contract.model_sha256)
        placement[partition.id] = chosen
    return placement
