"""A fake `pynvml` that replays a captured `nvidia-smi -L` listing (shared/fixtures/nvidia).

Only for the hardware these machines lack. It answers the NVML calls the gateway
makes with what the listing shows: GPU names and UUIDs, MIG mode (on when MIG
devices are listed), MIG device handles in slot order, their names
("<GPU> MIG <profile>") and UUIDs. Memory is the size in the profile or GPU name
(e.g. 3g.40gb -> 40 GiB), since `-L` does not print it; where neither has one,
nvmlDeviceGetMemoryInfo raises NotSupported, as NVML does for some queries.

For the bench's per-point readings it also answers what `-L` cannot show, with values
from a captured dcgm-exporter scrape of an A100 with MIG (shared/fixtures/nvidia/
dcgm-exporter-mig.txt): board power 409.692 W, an energy counter starting at its
319159391 mJ and advancing at that power on the fake's clock, and 4845 MiB used. GPU
instance IDs are numbered by MIG device slot (`-L` prints no GI IDs). GPM answers on
Hopper names only (H100, GH200), as NVML does, with GR_ENGINE_ACTIVE 0.0 as in the H100
scrape (dcgm-exporter-mig-h100.txt). `log` records (reading, device name) pairs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

GPU_LINE = re.compile(r"^GPU (\d+): (.+) \(UUID: (GPU-[0-9a-f-]+)\)$")
MIG_LINE = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[0-9a-f-]+)\)$")
GIB = 1 << 30
MIB = 1 << 20
BOARD_POWER_MW = 409_692
ENERGY_START_MJ = 319_159_391
USED_MIB = 4845


class NVMLError(Exception):
    pass


@dataclass
class Device:
    name: str
    uuid: str
    slot: int = 0
    migs: list[Device] = field(default_factory=list)
    parent: Device | None = None

    @property
    def hopper(self) -> bool:
        return any(name in self.name for name in ("H100", "GH200"))

    @property
    def memory(self) -> int | None:
        sizes = re.findall(r"(\d+)\s*GB", self.name, re.IGNORECASE)  # the profile's size comes last
        return int(sizes[-1]) * GIB if sizes else None


def parse_listing(text: str) -> list[Device]:
    gpus: list[Device] = []
    for line in text.splitlines():
        if m := GPU_LINE.match(line):
            gpus.append(Device(name=m.group(2), uuid=m.group(3)))
        elif m := MIG_LINE.match(line):
            gpu = gpus[-1]
            gpu.migs.append(Device(name=f"{gpu.name} MIG {m.group(1)}", uuid=m.group(3), slot=int(m.group(2)), parent=gpu))
    return gpus


def fake_nvml(listing: Path) -> ModuleType:
    gpus = parse_listing(listing.read_text())
    module = ModuleType("fake_pynvml")
    calls = {"init": 0, "shutdown": 0}
    log: list[tuple[str, str]] = []
    started = time.monotonic()
    by_uuid = {d.uuid: d for gpu in gpus for d in (gpu, *gpu.migs)}

    def logged(name: str, answer: Callable[..., Any]) -> Callable[..., Any]:
        def call(device: Device, *args: object) -> Any:
            log.append((name, device.name))
            return answer(device, *args)

        return call

    def by_uuid_or_raise(uuid: str) -> Device:
        if uuid not in by_uuid:
            raise NVMLError("Not Found")
        return by_uuid[uuid]

    def parent_of(device: Device) -> Device:
        if device.parent is None:
            raise NVMLError("Invalid Argument")
        return device.parent

    def board_only(device: Device) -> None:
        if device.parent is not None:
            raise NVMLError("Not Supported")  # power and energy are the board's; NVML refuses them on MIG handles

    def power(device: Device) -> int:
        board_only(device)
        return BOARD_POWER_MW

    def energy(device: Device) -> int:
        board_only(device)
        return ENERGY_START_MJ + int(BOARD_POWER_MW * (time.monotonic() - started))

    def gpm_support(device: Device) -> SimpleNamespace:
        return SimpleNamespace(isSupportedDevice=int(device.hopper))

    def gpm_sample(device: Device, *gi: object) -> SimpleNamespace:
        if not device.hopper:
            raise NVMLError("Not Supported")
        return SimpleNamespace(device=device.name, gpu_instance=gi[0] if gi else None)

    class MetricsGet:
        def __init__(self) -> None:
            self.version = self.numMetrics = 0
            self.sample1 = self.sample2 = None
            self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(8)]

    def metrics_get(request: MetricsGet) -> MetricsGet:
        for metric in request.metrics[: request.numMetrics]:
            metric.value = 0.0  # GR_ENGINE_ACTIVE 0.000000 in the captured H100 scrape, for every instance
        return request

    def mig_handle(gpu: Device, slot: int) -> Device:
        for mig in gpu.migs:
            if mig.slot == slot:
                return mig
        raise NVMLError("Not Found")

    def memory(device: Device) -> SimpleNamespace:
        if device.memory is None:
            raise NVMLError("Not Supported")
        used = USED_MIB * MIB if device.parent is not None else 0
        return SimpleNamespace(total=device.memory, used=used, free=device.memory - used)

    def mig_mode(gpu: Device) -> tuple[int, int]:
        return (1, 1) if gpu.migs else (0, 0)

    module.__dict__.update(
        NVMLError=NVMLError,
        calls=calls,
        log=log,
        nvmlInit=lambda: calls.__setitem__("init", calls["init"] + 1),
        nvmlShutdown=lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1),
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: gpus[i],
        nvmlDeviceGetName=lambda d: d.name,
        nvmlDeviceGetUUID=lambda d: d.uuid,
        nvmlDeviceGetMigMode=mig_mode,
        nvmlDeviceGetMaxMigDeviceCount=lambda gpu: 7 if gpu.migs else 0,
        nvmlDeviceGetMigDeviceHandleByIndex=mig_handle,
        nvmlDeviceGetMemoryInfo=logged("memory", memory),
        nvmlDeviceGetHandleByUUID=by_uuid_or_raise,
        nvmlDeviceIsMigDeviceHandle=lambda d: int(d.parent is not None),
        nvmlDeviceGetDeviceHandleFromMigDeviceHandle=parent_of,
        nvmlDeviceGetGpuInstanceId=lambda d: d.slot,
        nvmlDeviceGetPowerUsage=logged("power", power),
        nvmlDeviceGetTotalEnergyConsumption=logged("energy", energy),
        nvmlGpmQueryDeviceSupport=gpm_support,
        nvmlGpmSampleAlloc=lambda: None,
        nvmlGpmSampleGet=lambda device, _sample: gpm_sample(device),
        nvmlGpmMigSampleGet=lambda device, gi, _sample: logged("gpm-mig", gpm_sample)(device, gi),
        nvmlGpmSampleFree=lambda _sample: None,
        nvmlGpmMetricsGet=metrics_get,
        c_nvmlGpmMetricsGet_t=MetricsGet,
        NVML_GPM_METRICS_GET_VERSION=1,
    )
    return module
