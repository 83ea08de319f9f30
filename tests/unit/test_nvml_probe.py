"""The bench's per-point NVML readings against the fake NVML (these machines have no NVIDIA GPU):
memory from the partition's own handle, power and energy from the board and named so, GPM only on Hopper."""

from __future__ import annotations

import time
from pathlib import Path

from bench.nvml_probe import GPM_METRICS, probe_for
from tests.fake_nvml import BOARD_POWER_MW, USED_MIB, fake_nvml


def nvidia(shared: Path, name: str) -> Path:
    return shared / "fixtures" / "nvidia" / name


def test_a_mig_instance_reads_its_own_memory_and_the_board_power(shared: Path) -> None:
    nvml = fake_nvml(nvidia(shared, "smi-L-a100-mig.txt"))
    probe = probe_for("MIG-6b84cf06-0978-530f-bea3-dd6108f98ebf", nvml)  # GPU 0, 2g.20gb, device 1
    assert probe is not None
    probe.begin()
    time.sleep(0.2)
    row = probe.end()
    assert row["nvml_scope"] == "mig-instance" and row["nvml_gpu_instance"] == 1
    assert row["nvml_memory_used_mib"] == USED_MIB
    assert ("memory", "NVIDIA A100-SXM4-80GB MIG 2g.20gb") in nvml.log, "memory from the MIG handle"
    assert ("power", "NVIDIA A100-SXM4-80GB") in nvml.log and ("energy", "NVIDIA A100-SXM4-80GB") in nvml.log, "power from the board"
    assert row["board_power_w"] == BOARD_POWER_MW / 1000
    assert 0.15 * BOARD_POWER_MW / 1000 < row["board_energy_j"] < 0.5 * BOARD_POWER_MW / 1000
    assert abs(row["board_avg_power_w"] - BOARD_POWER_MW / 1000) < 0.1 * BOARD_POWER_MW / 1000
    assert all(row[name] is None for name in GPM_METRICS) and row["nvml_unsupported"] == "gpm", "A100 has no GPM"


def test_hopper_gives_gpm_activity_per_gpu_instance(shared: Path) -> None:
    listing = nvidia(shared, "smi-L-h100-mig.txt")
    first_mig = next(line.split("UUID: ")[1].rstrip(")") for line in listing.read_text().splitlines() if "MIG-" in line)
    nvml = fake_nvml(listing)
    probe = probe_for(first_mig, nvml)
    assert probe is not None and probe.gpm
    probe.begin()
    row = probe.end()
    assert row["gpm_graphics_util_pct"] == 0.0 and row["gpm_sm_util_pct"] == 0.0 and row["nvml_unsupported"] is None
    assert [call for call in nvml.log if call[0] == "gpm-mig"] == [("gpm-mig", "NVIDIA H100 PCIe")] * 2, "sampled per GI, twice"


def test_a_whole_gpu_and_a_cpu_slice(shared: Path) -> None:
    nvml = fake_nvml(nvidia(shared, "smi-L-nomig.txt"))
    probe = probe_for("GPU-8b89b58e-b427-108d-ac50-06138d78fe78", nvml)
    assert probe is not None
    probe.begin()
    row = probe.end()
    assert row["nvml_scope"] == "gpu" and row["nvml_gpu_instance"] is None and row["board_power_w"] == BOARD_POWER_MW / 1000
    assert probe_for(None, nvml) is None, "a CPU slice has nothing to ask NVML"
