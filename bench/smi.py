"""Parsers for what `nvidia-smi` prints about MIG: -L, mig -lgip / -lgi / -lci, and create/destroy/mode messages.

Tables are read by their rows, not by column offsets: the layouts differ between
drivers (79- and 81-character -lgip tables, 54- and 57-character -lgi tables).
Everything here is tested on the captured outputs in shared/fixtures/nvidia/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class GpuInstanceProfile:
    gpu: int
    name: str  # "1g.10gb", "1g.10gb+me", "7g.80gb"
    id: int
    free: int
    total: int
    memory_gib: float
    p2p: bool
    sm: int
    dec: int
    enc: int
    ce: int
    jpeg: int
    ofa: int

    @property
    def slices(self) -> int:
        """Compute slices: the number before 'g' (7 for 7g.80gb)."""
        return int(self.name.split("g", 1)[0])


@dataclass(frozen=True)
class GpuInstance:
    gpu: int
    name: str
    profile_id: int
    instance_id: int
    start: int
    size: int


@dataclass(frozen=True)
class ComputeInstance:
    gpu: int
    gpu_instance_id: int
    name: str  # "1g.5gb" or "1c.2g.10gb"
    profile_id: int
    instance_id: int
    start: int
    size: int


@dataclass(frozen=True)
class Device:
    """A line of `nvidia-smi -L`: a GPU, or a MIG device under the GPU before it."""

    gpu: int
    name: str  # the GPU model, or the MIG profile ("3g.40gb", "1c.2g.10gb")
    uuid: str
    mig_index: int | None = None  # MIG devices only: "Device N"


class EventKind(StrEnum):
    CREATED_GI = "created-gpu-instance"
    CREATED_CI = "created-compute-instance"
    DESTROYED_GI = "destroyed-gpu-instance"
    DESTROYED_CI = "destroyed-compute-instance"
    MODE_CHANGED = "mig-mode-changed"
    PENDING = "pending"  # the mode change waits for a reset or for other processes to let go
    ERROR = "error"


@dataclass(frozen=True)
class Event:
    kind: EventKind
    text: str
    gpu: str | None = None  # index, or PCI bus id for mode changes
    instance_id: int | None = None
    gpu_instance_id: int | None = None
    profile: str | None = None
    reason: str | None = None  # errors and pending states: "Insufficient Resources", "In use by another client"


def _rows(text: str) -> list[list[str]]:
    """The cells of each table row between the '====' rule and the end, split on whitespace."""
    rows, body = [], False
    for line in text.splitlines():
        if line.startswith("|=="):
            body = True
            continue
        if body and line.startswith("|") and not line.startswith("+"):
            rows.append(line.strip("| \n").split())
    return rows


def parse_profiles(text: str) -> list[GpuInstanceProfile]:
    """`nvidia-smi mig -lgip`: each profile is a row plus a continuation row (CE, JPEG, OFA)."""
    profiles: list[GpuInstanceProfile] = []
    rows = _rows(text)
    for first, second in zip(rows[::2], rows[1::2], strict=False):
        if len(first) < 10 or first[1] != "MIG" or len(second) != 3:
            raise ValueError(f"unexpected -lgip rows: {first} / {second}")
        gpu, _, name, pid, instances, memory, p2p, sm, dec, enc = first[:10]
        free, total = instances.split("/")
        ce, jpeg, ofa = second
        profiles.append(
            GpuInstanceProfile(
                gpu=int(gpu),
                name=name,
                id=int(pid),
                free=int(free),
                total=int(total),
                memory_gib=float(memory),
                p2p=p2p == "Yes",
                sm=int(sm),
                dec=int(dec),
                enc=int(enc),
                ce=int(ce),
                jpeg=int(jpeg),
                ofa=int(ofa),
            )
        )
    if not profiles:
        raise ValueError("no GPU instance profiles in the output (is MIG mode enabled?)")
    return profiles


def parse_gpu_instances(text: str) -> list[GpuInstance]:
    """`nvidia-smi mig -lgi`."""
    instances = []
    for row in _rows(text):
        gpu, _, name, pid, iid, placement = row[:6]
        start, size = placement.split(":")
        instances.append(GpuInstance(int(gpu), name, int(pid), int(iid), int(start), int(size)))
    return instances


def parse_compute_instances(text: str) -> list[ComputeInstance]:
    """`nvidia-smi mig -lci`."""
    instances = []
    for row in _rows(text):
        gpu, gi, _, name, pid, iid, placement = row[:7]
        start, size = placement.split(":")
        instances.append(ComputeInstance(int(gpu), int(gi), name, int(pid), int(iid), int(start), int(size)))
    return instances


_GPU_LINE = re.compile(r"^GPU (\d+): (.+?) \(UUID: (GPU-[0-9a-f-]+)\)$")
_MIG_LINE = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[0-9a-fA-F/-]+)\)$")


def parse_devices(text: str) -> list[Device]:
    """`nvidia-smi -L`: GPUs and the MIG devices listed under each."""
    devices: list[Device] = []
    gpu = -1
    for line in text.splitlines():
        if match := _GPU_LINE.match(line):
            gpu = int(match[1])
            devices.append(Device(gpu, match[2], match[3]))
        elif match := _MIG_LINE.match(line):
            devices.append(Device(gpu, match[1], match[3], int(match[2])))
    return devices


_EVENTS = [
    (
        EventKind.CREATED_GI,
        re.compile(r"Successfully created GPU instance ID\s+(?P<iid>\d+) on GPU\s+(?P<gpu>\d+) using profile MIG (?P<profile>\S+)"),
    ),
    (
        EventKind.CREATED_CI,
        re.compile(
            r"Successfully created compute instance ID\s+(?P<iid>\d+) on GPU\s+(?P<gpu>\d+) GPU instance ID\s+(?P<gi>\d+)"
            r" using profile MIG (?P<profile>\S+)"
        ),
    ),
    (
        EventKind.DESTROYED_CI,
        re.compile(r"Successfully destroyed compute instance ID\s+(?P<iid>\d+) from GPU\s+(?P<gpu>\d+) GPU instance ID\s+(?P<gi>\d+)"),
    ),
    (EventKind.DESTROYED_GI, re.compile(r"Successfully destroyed GPU instance ID\s+(?P<iid>\d+) from GPU\s+(?P<gpu>\d+)$")),
    (EventKind.MODE_CHANGED, re.compile(r"(?:Enabled|Disabled) MIG Mode for GPU (?P<gpu>\S+)$")),
    (EventKind.PENDING, re.compile(r"Warning: MIG mode is in pending \w+ state for GPU (?P<gpu>[^:]+:[^:]+:[^:]+):(?P<reason>.+)$")),
    (EventKind.ERROR, re.compile(r"^(?:Unable to|Failed to) (?P<what>.*): (?P<reason>[^:]+)$")),
]
_GPU_ID = re.compile(r"GPU\s+([0-9A-Fa-f]{8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d|\d+)\b")


def parse_events(text: str) -> list[Event]:
    """What a create, destroy or mode-change command reported, line by line (other lines are ignored)."""
    events = []
    for line in text.splitlines():
        line = line.rstrip()
        for kind, pattern in _EVENTS:
            if match := pattern.search(line):
                groups = match.groupdict()
                if kind is EventKind.ERROR and (where := _GPU_ID.findall(groups["what"])):
                    groups["gpu"] = where[-1]
                events.append(
                    Event(
                        kind=kind,
                        text=line,
                        gpu=groups.get("gpu"),
                        instance_id=int(groups["iid"]) if groups.get("iid") else None,
                        gpu_instance_id=int(groups["gi"]) if groups.get("gi") else None,
                        profile=groups.get("profile"),
                        reason=groups.get("reason", "").strip() or None,
                    )
                )
                break
    return events
