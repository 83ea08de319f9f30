"""NVML readings for one partition over one bench point.

What NVML can say per MIG instance and what only per board differs, and MIGPerf's code read
GPU utilisation where NVML returns nothing on MIG. Here each value carries its scope:

- memory used: from the partition's own handle (the MIG device handle on MIG), scope
  `mig-instance` or `gpu`;
- activity: NVML GPM (Hopper and newer) sampled at the start and end of the point, per GPU
  instance on MIG (`nvmlGpmMigSampleGet`), else for the whole GPU; older GPUs have no GPM
  (use --dcgm-url there);
- power and energy: the parent GPU's, always named `board_*`, never per instance.

Every call that NVML does not support on this device leaves its field None and is listed in
`nvml_unsupported`.
"""

from __future__ import annotations

import functools
import time
from types import ModuleType
from typing import Any

MIB = 1 << 20
GPM_METRICS = {"gpm_graphics_util_pct": 1, "gpm_sm_util_pct": 2, "gpm_sm_occupancy_pct": 3, "gpm_dram_bw_util_pct": 10}


class NvmlProbe:
    def __init__(self, nvml: ModuleType, uuid: str) -> None:
        self.nvml = nvml
        self.unsupported: list[str] = []
        self.handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
        self.is_mig = bool(self._try("is_mig", nvml.nvmlDeviceIsMigDeviceHandle, self.handle))
        self.parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self.handle) if self.is_mig else self.handle
        self.gpu_instance = nvml.nvmlDeviceGetGpuInstanceId(self.handle) if self.is_mig else None
        support = self._try("gpm", nvml.nvmlGpmQueryDeviceSupport, self.parent)
        self.gpm = bool(support is not None and support.isSupportedDevice)
        if support is not None and not self.gpm:
            self.unsupported.append("gpm")
        self._energy: int | None = None
        self._started = 0.0
        self._sample: Any = None

    def _try(self, what: str, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except self.nvml.NVMLError:
            if what not in self.unsupported:
                self.unsupported.append(what)
            return None

    def _gpm_sample(self) -> Any:
        sample = self.nvml.nvmlGpmSampleAlloc()
        if self.is_mig:
            return self.nvml.nvmlGpmMigSampleGet(self.parent, self.gpu_instance, sample)
        return self.nvml.nvmlGpmSampleGet(self.parent, sample)

    def begin(self) -> None:
        self._started = time.monotonic()
        self._energy = self._try("energy", self.nvml.nvmlDeviceGetTotalEnergyConsumption, self.parent)
        if self.gpm:
            self._sample = self._try("gpm", self._gpm_sample)

    def end(self) -> dict[str, Any]:
        seconds = time.monotonic() - self._started
        memory = self._try("memory", self.nvml.nvmlDeviceGetMemoryInfo, self.handle)
        power = self._try("power", self.nvml.nvmlDeviceGetPowerUsage, self.parent)
        energy = self._try("energy", self.nvml.nvmlDeviceGetTotalEnergyConsumption, self.parent)
        board_energy_j = (energy - self._energy) / 1000 if energy is not None and self._energy is not None else None
        row: dict[str, Any] = {
            "nvml_scope": "mig-instance" if self.is_mig else "gpu",
            "nvml_gpu_instance": self.gpu_instance,
            "nvml_memory_used_mib": memory.used / MIB if memory is not None else None,
            "board_power_w": power / 1000 if power is not None else None,
            "board_energy_j": board_energy_j,
            "board_avg_power_w": board_energy_j / seconds if board_energy_j is not None and seconds > 0 else None,
        } | dict.fromkeys(GPM_METRICS)
        if self.gpm and self._sample is not None:
            row |= self._try("gpm", self._gpm_metrics, self._sample) or {}
        row["nvml_unsupported"] = ",".join(self.unsupported) or None
        return row

    def _gpm_metrics(self, first: Any) -> dict[str, float]:
        nvml = self.nvml
        second = self._gpm_sample()
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(GPM_METRICS)
        request.sample1, request.sample2 = first, second
        for i, metric in enumerate(GPM_METRICS.values()):
            request.metrics[i].metricId = metric
        nvml.nvmlGpmMetricsGet(request)
        for sample in (first, second):
            nvml.nvmlGpmSampleFree(sample)
        return {name: float(request.metrics[i].value) for i, name in enumerate(GPM_METRICS) if request.metrics[i].nvmlReturn == 0}


@functools.cache
def _nvml() -> ModuleType | None:
    """NVML, initialised once for the bench's lifetime; None without a driver."""
    from service.partitions import import_nvml

    nvml = import_nvml()
    if nvml is not None:
        nvml.nvmlInit()
    return nvml


def probe_for(device: str | None, nvml: ModuleType | None = None) -> NvmlProbe | None:
    """A probe for a GPU or MIG partition (its UUID), or None on a CPU slice or without NVML."""
    if device is None:
        return None
    module = nvml if nvml is not None else _nvml()
    return NvmlProbe(module, device) if module is not None else None
