"""Per-partition activity from a dcgm-exporter `/metrics` scrape.

DCGM fields the bench reads: 1001 GR_ENGINE_ACTIVE, 1002 SM_ACTIVE, 1005 DRAM_ACTIVE
(per GPU instance when the line carries GPU_I_ID) and 252 FB_USED. Lines without
GPU_I_ID are whole-GPU (board) values and are reported as such, never as a
partition's. Label sets differ between exporter versions (`Hostname` or
`hostname`, with or without `pci_bus_id`, `modelName`, pod labels); only `gpu`,
`UUID`, `GPU_I_ID` and `GPU_I_PROFILE` are relied on. The exporter can name a
profile differently from nvidia-smi (`7g.79gb` for 7g.80gb on an A100 80GB PCIe):
`match_profile` maps it by its compute slices when memory does not match exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

FIELDS = {
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "gr_engine_active",  # 1001
    "DCGM_FI_PROF_SM_ACTIVE": "sm_active",  # 1002
    "DCGM_FI_PROF_DRAM_ACTIVE": "dram_active",  # 1005
    "DCGM_FI_DEV_FB_USED": "fb_used_mib",  # 252
}
_LINE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\d+)?$")
_LABEL = re.compile(r'(?P<key>[A-Za-z_][A-Za-z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Activity:
    """The fields of one GPU instance (gpu_instance set) or of a whole GPU (gpu_instance None)."""

    gpu: str
    uuid: str
    gpu_instance: str | None
    profile: str | None
    values: dict[str, float] = field(default_factory=dict)

    @property
    def board_level(self) -> bool:
        return self.gpu_instance is None


def parse_samples(text: str) -> list[Sample]:
    """Prometheus text exposition lines (comments and blank lines skipped)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"not a Prometheus sample line: {line[:120]!r}")
        labels = {m["key"]: m["value"] for m in _LABEL.finditer(match["labels"] or "")}
        samples.append(Sample(match["name"], labels, float(match["value"])))
    return samples


def activity(samples: Iterable[Sample]) -> list[Activity]:
    """The bench's fields grouped per GPU instance (or whole GPU), in first-seen order."""
    found: dict[tuple[str, str, str | None], Activity] = {}
    for sample in samples:
        key_name = FIELDS.get(sample.name)
        if key_name is None or math.isnan(sample.value):
            continue
        gpu, uuid = sample.labels.get("gpu", "?"), sample.labels.get("UUID", "?")
        instance = sample.labels.get("GPU_I_ID")
        key = (gpu, uuid, instance)
        if key not in found:
            found[key] = Activity(gpu, uuid, instance, sample.labels.get("GPU_I_PROFILE"))
        found[key].values[key_name] = sample.value
    return list(found.values())


def match_profile(exported: str, known: Iterable[str]) -> str | None:
    """nvidia-smi's name for a profile as dcgm-exporter labels it: exact, else the only one with the same slices."""
    names = list(known)
    if exported in names:
        return exported
    slices = exported.split(".", 1)[0]
    same = [n for n in names if n.split(".", 1)[0] == slices and "+" not in n]
    return same[0] if len(same) == 1 else None
