"""Placement of the real exported models on partitions of bounded memory."""

from __future__ import annotations

from service.partitions import Partition, PartitionKind
from service.placement import MEMORY_FACTOR, place
from service.repository import load_repository
from tests.helpers import ExportedRepo


def test_every_model_everywhere_unless_memory_runs_out(tiny_repo: ExportedRepo) -> None:
    models = load_repository(tiny_repo.root).models
    sizes = {name: e.model_path.stat().st_size * MEMORY_FACTOR for name, e in models.items()}
    budget = sum(sorted(sizes.values())[:3]) + 1  # room for exactly the three smallest
    partitions = [
        Partition(id="mig-0-0", kind=PartitionKind.MIG, device="MIG-a", memory_bytes=budget),
        Partition(id="cpu-0", kind=PartitionKind.CPU, cores=(0,)),
    ]
    placement = place(partitions, models)
    assert sorted(placement["cpu-0"]) == sorted(models)
    assert sorted(placement["mig-0-0"]) == sorted(sorted(sizes, key=sizes.__getitem__)[:3])
    assert sum(sizes[m] for m in placement["mig-0-0"]) <= budget
    spec = placement["cpu-0"]["crowd-csrnet"]
    assert spec.path.endswith("crowd-csrnet/1/model.onnx") and spec.sha256 == models["crowd-csrnet"].contract.model_sha256
    assert spec.warmup == {"image": ((1, 3, 256, 256), "float32")}
