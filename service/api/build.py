"""The gateway as `serve` starts it: partitions discovered, models loaded and placed, workers and front-ends planned.

Nothing starts here (Gateway.start does); what is wrong with the arguments or the repository is raised first."""

from __future__ import annotations

import importlib.util
import logging

from ..backends.local import LocalBackend
from ..config import MB, ServeConfig
from ..errors import ServiceError, UnknownModel
from ..partitions import Partition, PartitionKind, discover
from ..placement import SharedMemory, arena_slots, arenas_per_worker, cpu_placed_bytes, place
from ..repository import ModelEntry, Repository, load_repository
from ..shared import SharedCounts
from ..workers.protocol import ModelSpec
from .frontends import GRPC_SOCKET, Frontends, FrontendSpec, run_dir
from .gateway import Gateway, job_memory, worker_options

logger = logging.getLogger(__name__)


def build_gateway(config: ServeConfig) -> Gateway:
    partitions = discover(config.topology, config.cpu_slices)  # cheap checks of the arguments first
    if any(p.kind is not PartitionKind.TRITON for p in partitions):
        _check_onnxruntime()
    repo = load_repository(config.model_repo)
    models = _chosen(config, repo)
    cpu_memory = _cpu_memory(config, partitions, models)
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
    gateway = Gateway(
        config, models, partitions, placement, backend, not_served=not_served, frontends=frontends, shared=shared, cpu_memory=cpu_memory
    )
    if config.jobs_dir is not None:
        gateway.jobs.keep_in(config.jobs_dir)
    return gateway


def _chosen(config: ServeConfig, repo: Repository) -> dict[str, ModelEntry]:
    """The repository's models that `serve --models` names (all of them without it)."""
    models = {n: e for n, e in repo.models.items() if config.models is None or n in config.models}
    if config.models is not None and (missing := sorted(set(config.models) - set(models))):
        raise UnknownModel(f"models not in {config.model_repo}: {missing}")
    if not models:
        raise UnknownModel(f"no servable models in {config.model_repo}; run: migserve export --all --out {config.model_repo}")
    return models


def _cpu_memory(config: ServeConfig, partitions: list[Partition], models: dict[str, ModelEntry]) -> SharedMemory | None:
    """What the models on CPU slices share of the host's memory, after what the gateway itself may hold (None without
    a CPU slice)."""
    if not any(p.kind is PartitionKind.CPU for p in partitions):
        return None
    workers = sum(p.kind is not PartitionKind.TRITON for p in partitions)
    slots = arena_slots(partitions, config.batches_in_flight, config.worker_threads)
    arenas = arenas_per_worker(models.values(), config.arena_keep_bytes) * slots
    job_bytes = job_memory(config, models)
    return SharedMemory.of_host(config.max_pending_bytes, workers, job_bytes=job_bytes, frontends=config.frontends, arena_bytes=arenas)


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
