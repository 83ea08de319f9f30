"""A fake `pynvml` that replays a captured `nvidia-smi -L` listing (shared/fixtures/nvidia).

Only for the hardware these machines lack. It answers the NVML calls the gateway
makes with what the listing shows: GPU names and UUIDs, MIG mode (on when MIG
devices are listed), MIG device handles in slot order, their names
("<GPU> MIG <profile>") and UUIDs. Memory is the size in the profile or GPU name
(e.g. 3g.40gb -> 40 GiB), since `-L` does not print it; where neither has one,
nvmlDeviceGetMemoryInfo raises NotSupported, as NVML does for some queries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace

GPU_LINE = re.compile(r"^GPU (\d+): (.+) \(UUID: (GPU-[0-9a-f-]+)\)$")
MIG_LINE = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[0-9a-f-]+)\)$")
GIB = 1 << 30


class NVMLError(Exception):
    pass


@dataclass
class Device:
    name: str
    uuid: str
    slot: int = 0
    migs: list[Device] = field(default_factory=list)

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
            gpu.migs.append(Device(name=f"{gpu.name} MIG {m.group(1)}", uuid=m.group(3), slot=int(m.group(2))))
    return gpus


def fake_nvml(listing: Path) -> ModuleType:
    gpus = parse_listing(listing.read_text())
    module = ModuleType("fake_pynvml")
    calls = {"init": 0, "shutdown": 0}

    def mig_handle(gpu: Device, slot: int) -> Device:
        for mig in gpu.migs:
            if mig.slot == slot:
                return mig
        raise NVMLError("Not Found")

    def memory(device: Device) -> SimpleNamespace:
        if device.memory is None:
            raise NVMLError("Not Supported")
        return SimpleNamespace(total=device.memory, used=0, free=device.memory)

    def mig_mode(gpu: Device) -> tuple[int, int]:
        return (1, 1) if gpu.migs else (0, 0)

    module.__dict__.update(
        NVMLError=NVMLError,
        calls=calls,
        nvmlInit=lambda: calls.__setitem__("init", calls["init"] + 1),
        nvmlShutdown=lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1),
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: gpus[i],
        nvmlDeviceGetName=lambda d: d.name,
        nvmlDeviceGetUUID=lambda d: d.uuid,
        nvmlDeviceGetMigMode=mig_mode,
        nvmlDeviceGetMaxMigDeviceCount=lambda gpu: 7 if gpu.migs else 0,
        nvmlDeviceGetMigDeviceHandleByIndex=mig_handle,
        nvmlDeviceGetMemoryInfo=memory,
    )
    return module
