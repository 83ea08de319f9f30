"""Partitions: the isolated compute slices the gateway runs workers on.

Discovery order: a declared topology file wins; else NVML (every MIG instance of
every MIG-enabled GPU, and every whole GPU without MIG); else CPU slices. NVML is
imported lazily (the `gpu` extra); tests pass a fake module that replays captured
`nvidia-smi` devices.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .cgroups import cpu_quota
from .config import first_problem

logger = logging.getLogger(__name__)


class PartitionKind(StrEnum):
    MIG = "mig"
    GPU = "gpu"
    CPU = "cpu"
    TRITON = "triton"  # a remote Triton server, declared in a topology file


@dataclass(frozen=True)
class Partition:
    id: str  # stable, URL-safe: mig-0-1, gpu-0, cpu-0
    kind: PartitionKind
    device: str | None = None  # the UUID given to CUDA_VISIBLE_DEVICES (MIG-... or GPU-...)
    profile: str | None = None  # e.g. 3g.40gb, or the GPU name
    memory_bytes: int | None = None
    cores: tuple[int, ...] = ()  # CPU slices only
    url: str | None = None  # Triton partitions: host:port of its HTTP or gRPC endpoint
    protocol: str = "http"  # Triton partitions: http or grpc
    batching: str = "gateway"  # Triton partitions: "gateway" batches before Triton; "triton" sends each request, Triton batches

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind.value,
            "device": self.device,
            "profile": self.profile,
            "memory_bytes": self.memory_bytes,
            "cores": list(self.cores),
        } | ({"url": self.url, "protocol": self.protocol, "batching": self.batching} if self.kind is PartitionKind.TRITON else {})


class TopologyError(ValueError):
    """A topology file or --cpu-slices value that cannot be used; the message says how to fix it."""


def cpu_slices(sizes: Sequence[int] | None = None, cores: Sequence[int] | None = None, quota: float | None = None) -> list[Partition]:
    """Split the usable cores into slices: `sizes` cores each, or by default one per core, and no more of them than a
    CPU quota of `quota` CPUs (service/cgroups.py) can keep busy: the first cores, one slice each."""
    available = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if not sizes and quota is not None and quota < len(available):
        kept = max(1, math.floor(quota))
        logger.warning(
            "this process may use %g CPUs' time (its cgroup's CPU quota: docker --cpus, a Kubernetes CPU limit) of the %d cores "
            "it sees: %d CPU slice%s, not %d (--cpu-slices sets them)",
            quota,
            len(available),
            kept,
            "" if kept == 1 else "s",
            len(available),
        )
        available = available[:kept]
    sizes = list(sizes) if sizes else [1] * len(available)
    if any(s < 1 for s in sizes) or sum(sizes) > len(available):
        raise TopologyError(f"--cpu-slices {','.join(map(str, sizes))} needs {sum(sizes)} cores; {len(available)} are usable: {available}")
    slices, start = [], 0
    for i, size in enumerate(sizes):
        slices.append(Partition(id=f"cpu-{i}", kind=PartitionKind.CPU, cores=tuple(available[start : start + size])))
        start += size
    return slices


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def nvml_partitions(nvml: ModuleType) -> list[Partition]:
    """Every MIG instance of MIG-enabled GPUs and every whole GPU otherwise, via an NVML module."""
    nvml.nvmlInit()
    try:
        found: list[Partition] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            gpu = nvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(nvml.nvmlDeviceGetName(gpu))
            try:
                current, _pending = nvml.nvmlDeviceGetMigMode(gpu)
            except nvml.NVMLError:
                current = 0  # GPUs without MIG support raise NotSupported
            if current != 1:
                uuid = _text(nvml.nvmlDeviceGetUUID(gpu))
                found.append(
                    Partition(id=f"gpu-{index}", kind=PartitionKind.GPU, device=uuid, profile=name, memory_bytes=_memory(nvml, gpu))
                )
                continue
            for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu)):
                try:
                    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, slot)
                except nvml.NVMLError:
                    continue  # empty slot
                mig_name = _text(nvml.nvmlDeviceGetName(mig))  # "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
                found.append(
                    Partition(
                        id=f"mig-{index}-{slot}",
                        kind=PartitionKind.MIG,
                        device=_text(nvml.nvmlDeviceGetUUID(mig)),
                        profile=mig_name.rsplit("MIG ", 1)[-1],
                        memory_bytes=_memory(nvml, mig),
                    )
                )
        return found
    finally:
        nvml.nvmlShutdown()


def memory_used(uuids: Sequence[str], nvml: ModuleType | None = None) -> dict[str, int]:
    """Bytes in use on each GPU or MIG device (by UUID; on MIG, the instance's own), read now;
    devices NVML cannot answer for are left out, and so is everything without NVML."""
    module = nvml if nvml is not None else import_nvml()
    if module is None or not uuids:
        return {}
    used: dict[str, int] = {}
    module.nvmlInit()
    try:
        for uuid in uuids:
            try:
                used[uuid] = int(module.nvmlDeviceGetMemoryInfo(module.nvmlDeviceGetHandleByUUID(uuid)).used)
            except module.NVMLError:
                continue
    finally:
        module.nvmlShutdown()
    return used


def _memory(nvml: ModuleType, handle: Any) -> int | None:
    """Total memory of a GPU or MIG handle; None where NVML cannot say."""
    try:
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    except nvml.NVMLError:
        return None


@functools.cache  # the import and the driver check, once per process (discovery, each /metrics scrape, the bench)
def import_nvml() -> ModuleType | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        module: ModuleType = pynvml
        return module
    except Exception:  # no package, no driver, no GPU: all mean "use CPU slices"
        return None


class _DeclaredPartition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="URL-safe name")
    kind: PartitionKind
    device: str | None = Field(None, description="MIG-... or GPU-... UUID for mig and gpu partitions")
    profile: str | None = None
    memory_bytes: int | None = Field(None, gt=0, description="what the partition's models may take; default: NVML's, or the host's")
    cores: list[int] = Field(default_factory=list, description="CPU cores for a cpu partition")
    url: str | None = Field(None, description="triton partitions: host:port of the server's HTTP or gRPC endpoint")
    protocol: Literal["http", "grpc"] = "http"
    batching: Literal["gateway", "triton"] = Field("triton", description="who batches for a triton partition (bench/RESULTS.md)")


class _Topology(BaseModel):
    model_config = ConfigDict(extra="forbid")
    partitions: list[_DeclaredPartition] = Field(min_length=1)


HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}")  # a name, IPv4 or [IPv6], and a port


def usable_cores() -> set[int]:
    """The cores this process may run on (its affinity: a container's cpuset, taskset)."""
    return os.sched_getaffinity(0)


def _read_topology(path: Path) -> _Topology:
    """The file's declarations, or a TopologyError in one line saying what is wrong and where."""
    try:
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            got = "an empty file" if raw is None else f"a {type(raw).__name__}"
            raise TopologyError(f"invalid topology {path}: expected a mapping with a 'partitions' list, got {got}")
        return _Topology.model_validate(raw)
    except OSError as exc:
        raise TopologyError(f"cannot read topology {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TopologyError(f"invalid topology {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except yaml.MarkedYAMLError as exc:
        at = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}" if exc.problem_mark else ""
        raise TopologyError(f"invalid topology {path}: not YAML: {exc.problem or exc.context}{at}") from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"invalid topology {path}: not YAML: {exc}") from None
    except ValidationError as exc:
        raise TopologyError(f"invalid topology {path}: {first_problem(exc)}") from None


def load_topology(path: Path) -> list[Partition]:
    declared = _read_topology(path)
    ids = [p.id for p in declared.partitions]
    if len(set(ids)) != len(ids):
        raise TopologyError(f"invalid topology {path}: partition ids repeat: {ids}")
    partitions, usable = [], usable_cores()
    for p in declared.partitions:
        if p.kind is PartitionKind.CPU and not p.cores:
            raise TopologyError(f"invalid topology {path}: cpu partition {p.id} lists no cores")
        if p.kind is PartitionKind.CPU and (absent := sorted(set(p.cores) - usable)):
            # sched_setaffinity takes a set of which some cores exist, and the worker ran on those at the thread count
            # of them all; a core listed twice would have counted twice
            raise TopologyError(
                f"invalid topology {path}: cpu partition {p.id} lists cores {absent} that this process cannot run on "
                f"(it may use {sorted(usable)})"
            )
        if p.kind is PartitionKind.CPU and len(set(p.cores)) != len(p.cores):
            raise TopologyError(f"invalid topology {path}: cpu partition {p.id} lists a core twice: {p.cores}")
        if p.kind is PartitionKind.TRITON and not p.url:
            raise TopologyError(f"invalid topology {path}: triton partition {p.id} needs a url (host:port)")
        if p.kind is PartitionKind.TRITON and not HOST_PORT.fullmatch(p.url or ""):
            # tritonclient's asyncio HTTP client answered a scheme with a NameError of its own
            raise TopologyError(
                f"invalid topology {path}: triton partition {p.id} has url {p.url!r}; give host:port without a scheme, "
                f"e.g. triton-mig-0-0:8001 (`protocol: http` or `grpc` says how to talk to it)"
            )
        if p.kind in (PartitionKind.MIG, PartitionKind.GPU) and not p.device:
            raise TopologyError(f"invalid topology {path}: {p.kind.value} partition {p.id} needs a device UUID")
        partitions.append(
            Partition(
                id=p.id,
                kind=p.kind,
                device=p.device,
                profile=p.profile,
                memory_bytes=p.memory_bytes,
                cores=tuple(p.cores),
                url=p.url,
                protocol=p.protocol,
                batching=p.batching,
            )
        )
    return partitions


def discover(topology: Path | None = None, slices: Sequence[int] | None = None, nvml: ModuleType | None = None) -> list[Partition]:
    if topology is not None:
        return load_topology(topology)
    module = nvml if nvml is not None else import_nvml()
    if module is not None:
        found = nvml_partitions(module)
        if found:
            return found
        logger.warning("NVML found no GPUs; using CPU slices")
    return cpu_slices(slices, quota=None if slices else cpu_quota())
