"""Discovery against NVML replaying real nvidia-smi listings, CPU slices, declared topologies, placement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.partitions import PartitionKind, TopologyError, cpu_slices, discover, load_topology, memory_used
from tests.fake_nvml import USED_MIB, fake_nvml
from tests.helpers import LOCAL_NVIDIA_FIXTURES

GIB = 1 << 30


def test_two_dgx_a100_gpus_with_mig(shared: Path) -> None:
    nvml = fake_nvml(shared / "fixtures" / "nvidia" / "smi-L-a100-mig.txt")
    found = discover(nvml=nvml)
    assert [p.id for p in found] == ["mig-0-0", "mig-0-1", "mig-0-2", "mig-0-3", "mig-1-0", "mig-1-1", "mig-1-2", "mig-1-3"]
    assert {p.kind for p in found} == {PartitionKind.MIG}
    assert [p.profile for p in found[:4]] == ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]
    assert found[0].device == "MIG-dcf43e8e-5d19-5fa8-8b1d-8aaca1e467f0"
    assert found[7].device == "MIG-91e26891-6f5b-5ff3-9c66-310e47d6b059"
    assert [p.memory_bytes for p in found[:4]] == [40 * GIB, 20 * GIB, 10 * GIB, 10 * GIB]
    assert nvml.calls == {"init": 1, "shutdown": 1}


@pytest.mark.parametrize(
    ("listing", "profiles"),
    [
        ("smi-L-h100-mig.txt", ["3g.40gb", "1g.10gb", "1g.10gb", "1g.10gb"]),
        ("smi-L-gh200-mig.txt", ["1g.24gb", "1g.24gb", "1g.24gb", "1g.12gb"]),
        ("smi-L-a100-40gb-mig.txt", ["4g.20gb", "1c.2g.10gb", "1c.2g.10gb", "1g.5gb"]),
    ],
)
def test_other_mig_gpus(shared: Path, listing: str, profiles: list[str]) -> None:
    found = discover(nvml=fake_nvml(shared / "fixtures" / "nvidia" / listing))
    assert [p.profile for p in found] == profiles
    assert all(p.device and p.device.startswith("MIG-") for p in found)


def test_whole_gpus_without_mig(shared: Path) -> None:
    found = discover(nvml=fake_nvml(shared / "fixtures" / "nvidia" / "smi-L-nomig.txt"))
    assert [p.id for p in found] == [f"gpu-{i}" for i in range(8)]
    assert {p.kind for p in found} == {PartitionKind.GPU}
    assert found[0].device == "GPU-8b89b58e-b427-108d-ac50-06138d78fe78"
    assert found[0].profile == "NVIDIA RTX PRO 6000 Blackwell Server Edition"
    assert found[0].memory_bytes is None  # NVML could not say: no memory bound in placement


def test_replayed_h200_listing_discovers_what_the_real_driver_did() -> None:
    # discovery-h200.json is what discover() returned against the real driver on an H200 (bench/gpu_check.py);
    # the fake NVML replaying that machine's `nvidia-smi -L` must find the same partition.
    real = json.loads((LOCAL_NVIDIA_FIXTURES / "discovery-h200.json").read_text())
    (found,) = discover(nvml=fake_nvml(LOCAL_NVIDIA_FIXTURES / "smi-L-h200.txt"))
    keys = ("id", "kind", "device", "profile")
    replayed = found.describe()
    assert [{k: replayed[k] for k in keys}] == [{k: p[k] for k in keys} for p in real]
    assert real[0]["memory_bytes"] == 150_754_820_096  # NVML's total for the whole GPU (nvidia-smi shows 143771 MiB usable)
    assert replayed["memory_bytes"] is None  # `-L` prints no size and "H200" names none: the replay cannot say


def test_cpu_slices() -> None:
    assert [p.cores for p in cpu_slices(cores=[0, 1, 2, 3])] == [(0,), (1,), (2,), (3,)]
    slices = cpu_slices([2, 1], cores=[0, 1, 2, 3])
    assert [(p.id, p.cores) for p in slices] == [("cpu-0", (0, 1)), ("cpu-1", (2,))]
    with pytest.raises(TopologyError, match=r"--cpu-slices 2,2,2 needs 6 cores; 4 are usable"):
        cpu_slices([2, 2, 2], cores=[0, 1, 2, 3])


def test_default_cpu_slices_fit_a_cpu_quota() -> None:
    # docker --cpus 2 on a 4-core host: every core listed, 2 CPUs' time (service/cgroups.py reads it)
    assert [p.cores for p in cpu_slices(cores=[0, 1, 2, 3], quota=2.0)] == [(0,), (1,)]
    assert [p.cores for p in cpu_slices(cores=[4, 5, 6, 7], quota=2.5)] == [(4,), (5,)]
    assert [p.cores for p in cpu_slices(cores=[0, 1, 2, 3], quota=0.5)] == [(0,)], "at least one slice"
    assert len(cpu_slices(cores=[0, 1, 2, 3], quota=8.0)) == 4
    assert [p.cores for p in cpu_slices([2, 2], cores=[0, 1, 2, 3], quota=1.0)] == [(0, 1), (2, 3)], "--cpu-slices wins"


def test_without_nvml_discovery_falls_back_to_cpu_slices() -> None:
    found = discover(slices=[1])
    assert len(found) == 1 and found[0].kind is PartitionKind.CPU


def test_declared_topology_wins(tmp_path: Path, shared: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(
        "partitions:\n"
        "  - {id: big, kind: mig, device: MIG-dcf43e8e-5d19-5fa8-8b1d-8aaca1e467f0, profile: 3g.40gb, memory_bytes: 42949672960}\n"
        "  - {id: spare, kind: cpu, cores: [0]}\n"
        "  - {id: remote, kind: triton, url: 'triton-0:8001', protocol: grpc, batching: triton}\n"
    )
    found = discover(topology=path, nvml=fake_nvml(shared / "fixtures" / "nvidia" / "smi-L-nomig.txt"))
    assert [(p.id, p.kind, p.profile) for p in found] == [
        ("big", PartitionKind.MIG, "3g.40gb"),
        ("spare", PartitionKind.CPU, None),
        ("remote", PartitionKind.TRITON, None),
    ]
    assert (found[2].url, found[2].protocol, found[2].batching) == ("triton-0:8001", "grpc", "triton")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("partitions: []", "^invalid topology .*: partitions: List should have at least 1 item"),
        ("partitions:\n  - {id: a, kind: tpu}", r"partitions\.0\.kind: Input should be 'mig', 'gpu', 'cpu' or 'triton'$"),
        ("partitions:\n  - {id: a, kind: mig}", "needs a device UUID"),
        ("partitions:\n  - {id: a, kind: cpu}", "lists no cores"),
        ("partitions:\n  - {id: a, kind: triton}", "needs a url"),
        ("partitions:\n  - {id: a, kind: triton, url: 'h:1', protocol: ftp}", "partitions.0.protocol: Input should be 'http' or 'grpc'$"),
        ("partitions:\n  - {id: a, kind: cpu, cores: [0]}\n  - {id: a, kind: cpu, cores: [1]}", "ids repeat"),
        ("partitions: [", "not YAML: expected the node content, but found '<stream end>' at line 1, column 14$"),
        ("partitions: {", "not YAML: .* at line 1, column 14$"),
        ("- {id: a, kind: cpu, cores: [0]}", "expected a mapping with a 'partitions' list, got a list$"),
        ("", "expected a mapping with a 'partitions' list, got an empty file$"),
        ("partitions: \udcff", r"not UTF-8 text \(byte 0xff at offset 12\)$"),
        ("partitions:\n  - {id: a, kind: cpu, cores: [0, 4096]}", r"cpu partition a lists cores \[4096\] that this process cannot run on"),
        ("partitions:\n  - {id: a, kind: cpu, cores: [0, 0]}", r"lists a core twice: \[0, 0\]"),
        ("partitions:\n  - {id: a, kind: triton, url: 'http://h:8000'}", "has url 'http://h:8000'; give host:port without a scheme"),
        ("partitions:\n  - {id: a, kind: triton, url: 'h'}", "has url 'h'; give host:port"),
        ("partitions:\n  - {id: a, kind: cpu, cores: [0], memory_bytes: -5}", "partitions.0.memory_bytes: Input should be greater than 0$"),
    ],
)
def test_bad_topologies_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    """In one line each: where the file went wrong and how, not pydantic's or PyYAML's multi-line reports."""
    path = tmp_path / "topology.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))  # \udcff: the byte 0xff
    with pytest.raises(TopologyError, match=message) as refused:
        load_topology(path)
    assert "\n" not in str(refused.value)
    with pytest.raises(TopologyError, match="cannot read topology"):
        load_topology(tmp_path / "missing.yaml")


def test_memory_used_is_read_per_device_at_each_call(shared: Path) -> None:
    nvml = fake_nvml(shared / "fixtures" / "nvidia" / "smi-L-a100-mig.txt")
    mig, gpu = "MIG-6b84cf06-0978-530f-bea3-dd6108f98ebf", "GPU-938c4705-98bf-1735-e98b-c2a5872a8022"
    used = memory_used([mig, gpu, "MIG-00000000-0000-0000-0000-000000000000"], nvml)
    assert used == {mig: USED_MIB << 20, gpu: 0}, "the instance's own usage; an unknown UUID is left out"
    assert ("memory", "NVIDIA A100-SXM4-80GB MIG 2g.20gb") in nvml.log
    assert nvml.calls == {"init": 1, "shutdown": 1}
    assert memory_used([], nvml) == {} and nvml.calls["init"] == 1, "no devices: NVML is not touched"
