"""Placement of the real exported models on partitions of bounded memory (service/placement.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from service.partitions import Partition, PartitionKind
from service.placement import (
    GATEWAY_BYTES,
    MB,
    MEMORY_FACTOR,
    SESSION_BYTES,
    WEIGHT_COPIES,
    WORKER_BYTES,
    SharedMemory,
    arena_slots,
    arenas_per_worker,
    footprint,
    model_spec,
    place,
    place_one,
)
from service.repository import load_repository
from tests.helpers import ExportedRepo


def _slices(n: int) -> list[Partition]:
    return [Partition(id=f"cpu-{i}", kind=PartitionKind.CPU, cores=(i,)) for i in range(n)]


def test_every_model_everywhere_unless_memory_runs_out(tiny_repo: ExportedRepo) -> None:
    models = load_repository(tiny_repo.root).models
    sizes = {name: footprint(e) for name, e in models.items()}
    budget = sum(sorted(sizes.values())[:3]) + 1  # room for exactly the three smallest
    partitions = [
        Partition(id="mig-0-0", kind=PartitionKind.MIG, device="MIG-a", memory_bytes=budget),
        Partition(id="cpu-0", kind=PartitionKind.CPU, cores=(0,)),
    ]
    placed = place(partitions, models)
    assert sorted(placed.by_partition["cpu-0"]) == sorted(models) and placed.left_off == {}
    assert sorted(placed.by_partition["mig-0-0"]) == sorted(sorted(sizes, key=sizes.__getitem__)[:3])
    assert sum(sizes[m] for m in placed.by_partition["mig-0-0"]) <= budget
    spec = placed.by_partition["cpu-0"]["crowd-csrnet"]
    assert spec.path.endswith("crowd-csrnet/1/model.onnx") and spec.sha256 == models["crowd-csrnet"].contract.model_sha256
    assert spec.warmup == {"image": ((1, 3, 256, 256), "float32")}


def test_cpu_slices_share_memory_each_model_once_before_any_twice(tiny_repo: ExportedRepo) -> None:
    models = load_repository(tiny_repo.root).models
    sizes = {name: footprint(e) for name, e in models.items()}
    smallest = sorted(sizes, key=lambda n: (sizes[n], n))
    everything = sum(sizes.values())
    extra = sizes[smallest[0]] + sizes[smallest[1]]  # room for the two smallest models' second replicas, no more
    shared = SharedMemory(everything + extra, "a test's")
    placed = place(_slices(3), models, shared)
    by_partition = placed.by_partition
    replicas = {name: sum(name in there for there in by_partition.values()) for name in models}
    assert placed.left_off == {}
    assert replicas == {name: 2 if name in smallest[:2] else 1 for name in models}, "one each first, then the smallest again"
    used = {pid: sum(sizes[m] for m in there) for pid, there in by_partition.items()}
    assert sum(used.values()) <= shared.bytes
    assert all(by_partition.values()), "spread: each model on the slice with the least placed"
    assert max(used.values()) - min(used.values()) <= max(sizes.values()), used

    roomy = place(_slices(3), models, SharedMemory(3 * everything, "a test's"))
    assert all(sorted(there) == sorted(models) for there in roomy.by_partition.values()), "room for all: every model everywhere"


def test_a_model_the_shared_memory_cannot_hold_is_left_off_saying_why(tiny_repo: ExportedRepo) -> None:
    models = load_repository(tiny_repo.root).models
    sizes = {name: footprint(e) for name, e in models.items()}
    largest = max(sizes, key=lambda n: (sizes[n], n))
    shared = SharedMemory(sum(sizes.values()) - 1, "the cgroup's memory limit of 1 MB")  # one byte short of them all
    placed = place(_slices(2), models, shared)
    assert list(placed.left_off) == [largest], "the others first: smallest first"
    why = placed.left_off[largest]
    assert f"it needs about {sizes[largest] / MB:.1f} MB of memory at its largest batch" in why
    used = {pid: sum(sizes[m] for m in there) for pid, there in placed.by_partition.items()}
    left = shared.bytes - sum(used.values())  # after the smaller models' second replicas, which took what room was left
    assert 0 <= left < sizes[largest]
    assert f"the CPU slices' models share {shared.bytes / MB:.0f} MB (the cgroup's memory limit of 1 MB), {left / MB:.1f} MB of it" in why

    # loaded at run time: on as many slices as the shared memory holds beside the others, the least used first
    entry = models[largest]
    assert place_one(_slices(2), placed.by_partition, entry, shared) == {}
    once = SharedMemory(sum(used.values()) + sizes[largest], "a test's")
    assert list(place_one(_slices(2), placed.by_partition, entry, once)) == [min(used, key=lambda pid: (used[pid], pid))]
    twice = SharedMemory(sum(used.values()) + 2 * sizes[largest], "a test's")
    assert sorted(place_one(_slices(2), placed.by_partition, entry, twice)) == ["cpu-0", "cpu-1"]
    # a reload: its own placement is not counted (it is replaced)
    reloaded = {pid: dict(there) for pid, there in placed.by_partition.items()} | {
        "cpu-0": placed.by_partition["cpu-0"] | {largest: model_spec(entry)}
    }
    assert sorted(place_one(_slices(2), reloaded, entry, twice)) == ["cpu-0", "cpu-1"]


def test_a_slice_the_topology_bounds_is_named_when_a_model_fits_in_the_shared_memory_but_not_there(tiny_repo: ExportedRepo) -> None:
    """Before, the reason gave only the shared memory, with room to spare: the slice's memory_bytes went unsaid."""
    models = {name: e for name, e in load_repository(tiny_repo.root).models.items() if name == "crowd-csrnet"}
    need = footprint(models["crowd-csrnet"])
    bounded = [dataclasses.replace(p, memory_bytes=need - MB) for p in _slices(1)]
    placed = place(bounded, models, SharedMemory(100 * need, "a test's"))
    why = placed.left_off["crowd-csrnet"]
    assert f"of it left, and the topology's memory_bytes leaves at most {(need - MB) / MB:.1f} MB on a slice (cpu-0)" in why, why


def test_the_shared_memory_is_the_cgroup_limit_else_what_the_host_has_available(tmp_path: Path) -> None:
    meminfo = "MemTotal:       24598304 kB\nMemFree:         1205968 kB\nMemAvailable:   20457872 kB\n"  # as on this machine
    v2 = "24 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
    files = {"proc/meminfo": meminfo, "proc/self/mountinfo": v2, "proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "max\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    host = SharedMemory.of_host(256 * MB, 2, tmp_path)
    own = GATEWAY_BYTES + 2 * WORKER_BYTES
    assert host == SharedMemory(
        20457872 * 1024 - 256 * MB - own,
        "the 19978 MB the host had available at start, less --max-pending-mb 256 for request bodies and 192 MB for the "
        "processes' own (the gateway and 2 workers)",
    )
    (tmp_path / "sys/fs/cgroup/memory.max").write_text(f"{2 << 30}\n")
    limited = SharedMemory.of_host(512 * MB, 2, tmp_path)
    assert limited is not None and limited.bytes == 1536 * MB - own
    assert limited.source.startswith("the cgroup's memory limit of 2048 MB, less --max-pending-mb 512 for request bodies")
    assert SharedMemory.of_host(4096 * MB, 2, tmp_path) == SharedMemory(0, limited.source.replace("512", "4096"))
    with_jobs = SharedMemory.of_host(512 * MB, 2, tmp_path, job_bytes=512 * MB)  # where the gateway serves the CT models
    assert with_jobs == SharedMemory(
        1024 * MB - own,
        "the cgroup's memory limit of 2048 MB, less --max-pending-mb 512 for request bodies, --max-job-mb 512 for CT jobs "
        "and 192 MB for the processes' own (the gateway and 2 workers)",
    )
    two_frontends = SharedMemory.of_host(512 * MB, 2, tmp_path, frontends=2, arena_bytes=2 * 40 * MB)  # serve --frontends 2
    assert two_frontends == SharedMemory(
        1536 * MB - own - GATEWAY_BYTES - 2 * 2 * 40 * MB,
        "the cgroup's memory limit of 2048 MB, less --max-pending-mb 512 for request bodies and 320 MB for the processes' "
        "own (the gateway's 2 processes and 2 workers) and 160 MB for batch arenas in shared memory (--arena-keep-mb)",
    )
    (tmp_path / "proc/meminfo").unlink()
    (tmp_path / "sys/fs/cgroup/memory.max").write_text("max\n")
    assert SharedMemory.of_host(0, 2, tmp_path) is None, "nothing to read: nothing bounds the slices"


def test_a_workers_arenas_hold_up_to_twice_its_models_largest_batch_each_way_within_what_is_kept(tiny_repo: ExportedRepo) -> None:
    """The gateway's arena for a worker's inputs and the worker's for its outputs grow to twice a batch's size, at
    most --arena-keep-mb (larger ones are counted in --max-pending-mb and released when idle): placement takes the
    largest batch of the models served, at their largest dims, from the contracts."""
    models = load_repository(tiny_repo.root).models
    face = 32 * 3 * 224 * 224 * 4  # 32 images of 224x224: face-pros's largest batch
    crowd_in, crowd_out = 8 * 3 * 1024 * 1024 * 4, 8 * 1 * 128 * 128 * 4  # 8 images of 1024x1024, their densities
    assert arenas_per_worker([models["face-pros"]], 64 * MB) == 2 * face + MB  # its outputs are small: the least arena
    assert arenas_per_worker([models["crowd-csrnet"]], 64 * MB) == 64 * MB + max(MB, 2 * crowd_out)
    assert arenas_per_worker([models["crowd-csrnet"]], 256 * MB) == 2 * crowd_in + max(MB, 2 * crowd_out)
    organs_out = 4 * 23 * 16 * 32 * 32 * 4  # lns-organs: 4 tiles' logits of 23 labels
    assert arenas_per_worker(models.values(), 64 * MB) == 64 * MB + 2 * organs_out
    assert arenas_per_worker([], 64 * MB) == 0


def test_each_batch_a_process_may_have_in_flight_on_a_worker_has_arenas_of_its_own() -> None:
    """serve --batches-in-flight N sends a worker up to N batches at once, each in arenas of its own, where the worker
    runs that many (--worker-threads; unset: 1 on a CPU slice, 4 on a GPU or MIG partition); Triton partitions take
    none. Placement sets that many workers' arenas aside per process."""
    gpu = Partition(id="gpu-0", kind=PartitionKind.GPU, device="GPU-a")
    mig = Partition(id="mig-0-0", kind=PartitionKind.MIG, device="MIG-a")
    triton = Partition(id="triton-0", kind=PartitionKind.TRITON, url="127.0.0.1:8000")
    assert arena_slots(_slices(2), in_flight=1, threads=0) == 2
    assert arena_slots(_slices(2), in_flight=2, threads=0) == 2, "a CPU slice's worker runs one batch at a time"
    assert arena_slots(_slices(2), in_flight=2, threads=2) == 4
    assert arena_slots([gpu, mig, triton], in_flight=2, threads=0) == 4
    assert arena_slots([gpu, mig, triton], in_flight=8, threads=0) == 8, "at most the 4 threads of a GPU worker"
    assert arena_slots([gpu, *_slices(1)], in_flight=3, threads=0) == 4
    assert arena_slots([triton], in_flight=2, threads=2) == 0


def test_a_model_needs_its_session_its_weights_twice_and_its_activations_at_the_largest_batch(tiny_repo: ExportedRepo) -> None:
    entry = load_repository(tiny_repo.root).models["crowd-csrnet"]
    memory = entry.contract.memory
    assert memory is not None and memory.batch == entry.contract.dims["batch"].max and memory.unsized_tensors == 0
    weights = entry.model_path.stat().st_size
    assert memory.activation_bytes > 10 * weights, "a convolutional net's activations at batch 8 outweigh its tiny weights"
    assert footprint(entry) == SESSION_BYTES + WEIGHT_COPIES * weights + memory.activation_bytes
    older = dataclasses.replace(entry, contract=entry.contract.model_copy(update={"memory": None}))  # an export made before
    assert footprint(older) == MEMORY_FACTOR * weights
    assert model_spec(entry).memory_bytes == footprint(entry)
