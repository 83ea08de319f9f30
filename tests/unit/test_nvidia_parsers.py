"""The nvidia-smi and dcgm-exporter parsers on every captured real output in shared/fixtures/nvidia/."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.dcgm import activity, match_profile, parse_samples
from bench.mig import MigError
from bench.share import GpuState, parse_mig_mode, refusals
from bench.smi import EventKind, parse_compute_instances, parse_devices, parse_events, parse_gpu_instances, parse_profiles
from tests.helpers import LOCAL_NVIDIA_FIXTURES

LGIP = {  # file: (profiles, first, last with its id and memory)
    "lgip-a100-80gb.txt": (6, "1g.10gb", ("7g.80gb", 0, 79.0)),
    "lgip-a100-40gb.txt": (7, "1g.5gb", ("7g.40gb", 0, 39.5)),
    "lgip-a100-40gb-oldfmt.txt": (7, "1g.5gb", ("7g.40gb", 0, 39.25)),
    "lgip-h100.txt": (7, "1g.10gb", ("7g.80gb", 0, 79.0)),
    "lgip-a30.txt": (4, "1g.6gb", ("4g.24gb", 0, 23.5)),
    "lgip-gh200.txt": (7, "1g.12gb", ("7g.96gb", 0, 93.0)),
    "lgip-rtxpro6000.txt": (11, "1g.24gb", ("4g.96gb+gfx", 32, 95.12)),
}


def fixture(shared: Path, name: str) -> str:
    return (shared / "fixtures" / "nvidia" / name).read_text()


def test_every_lgip_fixture_is_covered(shared: Path) -> None:
    assert set(LGIP) == {p.name for p in (shared / "fixtures" / "nvidia").glob("lgip-*.txt")}


@pytest.mark.parametrize("name", sorted(LGIP))
def test_lgip(shared: Path, name: str) -> None:
    count, first, (last, last_id, memory) = LGIP[name]
    profiles = parse_profiles(fixture(shared, name))
    assert len(profiles) == count and profiles[0].name == first
    assert (profiles[-1].name, profiles[-1].id) == (last, last_id) and profiles[-1].memory_gib == pytest.approx(memory, abs=0.6)
    assert all(p.free <= p.total and p.sm > 0 and p.ce >= 1 for p in profiles)
    if name == "lgip-a30.txt":
        assert all(p.free == 0 for p in profiles), "every A30 instance was in use"


def test_lgip_numbers(shared: Path) -> None:
    by_name = {p.name: p for p in parse_profiles(fixture(shared, "lgip-a100-80gb.txt"))}
    one, seven = by_name["1g.10gb"], by_name["7g.80gb"]
    assert (one.id, one.free, one.total, one.memory_gib, one.sm, one.slices) == (19, 7, 7, 9.5, 14, 1)
    assert (seven.id, seven.sm, seven.dec, seven.jpeg, seven.ofa, seven.slices) == (0, 98, 5, 1, 1, 7)
    h100 = {p.name: p for p in parse_profiles(fixture(shared, "lgip-h100.txt"))}
    assert h100["1g.20gb"].id == 15 and h100["3g.40gb"].id == 9


def test_lgip_of_an_h200_captured_here() -> None:
    # A profile with a "+me" suffix (one media engine) beside plain ones; MIG was disabled, and -lgip still lists them all.
    profiles = parse_profiles((LOCAL_NVIDIA_FIXTURES / "lgip-h200.txt").read_text())
    assert [(p.name, p.id, p.sm) for p in profiles] == [
        ("1g.18gb", 19, 16),
        ("1g.18gb+me", 20, 16),
        ("1g.35gb", 15, 26),
        ("2g.35gb", 14, 32),
        ("3g.71gb", 9, 60),
        ("4g.71gb", 5, 64),
        ("7g.141gb", 0, 132),
    ]
    assert profiles[0].free == profiles[0].total == 7 and profiles[-1].memory_gib == 140.0


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lgi-a100.txt", [("1g.5gb", 19, 9, 6, 1), ("2g.10gb", 14, 3, 4, 2), ("4g.20gb", 5, 2, 0, 4)]),
        ("lgi-a100-40gb-oldfmt.txt", [("3g.20gb", 9, 1, 4, 4), ("3g.20gb", 9, 2, 0, 4)]),
        ("lgi-a100-80gb.txt", [("3g.40gb", 9, 1, 4, 4), ("3g.40gb", 9, 2, 0, 4)]),
        ("lgi-h100.txt", [("1g.10gb", 19, 7, 0, 1), ("1g.10gb", 19, 8, 1, 1), ("1g.10gb", 19, 9, 2, 1), ("3g.40gb", 9, 2, 4, 4)]),
    ],
)
def test_lgi(shared: Path, name: str, expected: list[tuple[str, int, int, int, int]]) -> None:
    assert [(g.name, g.profile_id, g.instance_id, g.start, g.size) for g in parse_gpu_instances(fixture(shared, name))] == expected


def test_lci(shared: Path) -> None:
    cis = parse_compute_instances(fixture(shared, "lci-a100.txt"))
    assert [(c.gpu_instance_id, c.name, c.profile_id, c.instance_id) for c in cis] == [
        (9, "1g.5gb", 0, 0),
        (3, "1c.2g.10gb", 0, 0),
        (3, "1c.2g.10gb", 0, 1),
        (2, "4g.20gb", 3, 0),
    ]
    assert [c.instance_id for c in parse_compute_instances(fixture(shared, "lci-a100-80gb.txt"))] == [0, 1]


@pytest.mark.parametrize(
    ("name", "gpus", "migs"),
    [
        ("smi-L-a100-mig.txt", 2, ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"] * 2),
        ("smi-L-a100-40gb-mig.txt", 1, ["4g.20gb", "1c.2g.10gb", "1c.2g.10gb", "1g.5gb"]),
        ("smi-L-h100-mig.txt", 1, ["3g.40gb", "1g.10gb", "1g.10gb", "1g.10gb"]),
        ("smi-L-gh200-mig.txt", 1, ["1g.24gb", "1g.24gb", "1g.24gb", "1g.12gb"]),
        ("smi-L-nomig.txt", 8, []),
    ],
)
def test_smi_L(shared: Path, name: str, gpus: int, migs: list[str]) -> None:
    devices = parse_devices(fixture(shared, name))
    assert sum(d.mig_index is None for d in devices) == gpus
    assert [d.name for d in devices if d.mig_index is not None] == migs
    assert all(d.uuid.startswith("MIG-" if d.mig_index is not None else "GPU-") for d in devices)


@pytest.mark.parametrize(
    ("name", "kinds", "reason"),
    [
        ("cgi-success.txt", [EventKind.CREATED_GI, EventKind.CREATED_CI] * 4, None),
        ("cgi-success-a100-40gb.txt", [EventKind.CREATED_GI, EventKind.CREATED_CI] * 2, None),
        ("cgi-success-gh200.txt", [EventKind.CREATED_GI, EventKind.CREATED_CI] * 3, None),
        ("cgi-noC-success-a100-80gb.txt", [EventKind.CREATED_GI] * 2, None),
        ("cci-success-a100-80gb.txt", [EventKind.CREATED_CI] * 2, None),
        ("cgi-errors.txt", [EventKind.ERROR] * 2, "Insufficient Resources"),
        ("cgi-errors-inuse.txt", [EventKind.ERROR] * 2, "In use by another client"),
        ("dgi-errors.txt", [EventKind.ERROR] * 2, "In use by another client"),
        ("dci-dgi-success-h100.txt", [EventKind.DESTROYED_CI] * 4 + [EventKind.DESTROYED_GI] * 4, None),
        ("mig-enable.txt", [EventKind.MODE_CHANGED], None),
        ("mig-enable-pending-reset.txt", [EventKind.PENDING], "Not Supported"),
        ("mig-enable-pending-inuse.txt", [EventKind.PENDING], "In use by another client"),
        ("mig-disable-pending-inuse.txt", [EventKind.PENDING], "In use by another client"),
        ("mig-disable-errors.txt", [EventKind.ERROR], "In use by another client"),
    ],
)
def test_events(shared: Path, name: str, kinds: list[EventKind], reason: str | None) -> None:
    events = parse_events(fixture(shared, name))
    assert [e.kind for e in events] == kinds
    assert events[0].reason == reason


def test_event_details(shared: Path) -> None:
    created = parse_events(fixture(shared, "cgi-success.txt"))
    assert (created[0].instance_id, created[0].gpu, created[0].profile) == (2, "0", "3g.40gb")
    assert (created[1].instance_id, created[1].gpu_instance_id) == (0, 2)
    assert parse_events(fixture(shared, "mig-disable-errors.txt"))[0].gpu == "00000009:01:00.0"
    assert parse_events(fixture(shared, "dgi-errors.txt"))[0].gpu == "0"


DCGM = {  # file: (samples, [(gpu, GPU_I_ID, profile, fields)] of the bench's fields)
    "dcgm-exporter-mig.txt": 21,
    "dcgm-exporter-mig-h100.txt": 3,
    "dcgm-exporter-mig-a100-7g79gb.txt": 1,
    "dcgm-exporter-mixed.txt": 4,
    "dcgm-exporter-nomig.txt": 3,
    "dcgm-exporter-nomig-t2000.txt": 4,
    "dcgm-exporter-nomig-l40s.txt": 3,
}


@pytest.mark.parametrize("name", sorted(DCGM))
def test_dcgm_every_fixture_parses(shared: Path, name: str) -> None:
    samples = parse_samples(fixture(shared, name))
    assert len(samples) == DCGM[name]
    assert all(s.labels.get("gpu") is not None and s.labels.get("UUID", "").startswith("GPU-") for s in samples)
    assert {p.name for p in (shared / "fixtures" / "nvidia").glob("dcgm-*.txt")} == set(DCGM)


def test_dcgm_old_labels_split_board_and_instance_values(shared: Path) -> None:
    groups = activity(parse_samples(fixture(shared, "dcgm-exporter-mig.txt")))
    board = [g for g in groups if g.board_level]
    instances = [g for g in groups if not g.board_level]
    assert len(board) == 1 and board[0].values["fb_used_mib"] == 4845.0, "FB_USED here is a whole-GPU line"
    assert [(g.gpu_instance, g.profile) for g in instances] == [("13", "1g.5gb")]
    assert instances[0].values["gr_engine_active"] == pytest.approx(0.995687)


def test_dcgm_new_labels_and_pod_labels(shared: Path) -> None:
    groups = activity(parse_samples(fixture(shared, "dcgm-exporter-mig-h100.txt")))
    assert [(g.gpu_instance, g.profile, g.values) for g in groups] == [(i, "1g.10gb", {"gr_engine_active": 0.0}) for i in ("7", "8", "9")]
    mixed = parse_samples(fixture(shared, "dcgm-exporter-mixed.txt"))
    assert {s.labels.get("GPU_I_PROFILE") for s in mixed} == {None, "1g.6gb"} and all("hostname" in s.labels for s in mixed)


def test_dcgm_7g79gb_is_nvidia_smi_s_7g80gb(shared: Path) -> None:
    sample = parse_samples(fixture(shared, "dcgm-exporter-mig-a100-7g79gb.txt"))[0]
    assert sample.labels["GPU_I_PROFILE"] == "7g.79gb"
    known = [p.name for p in parse_profiles(fixture(shared, "lgip-a100-80gb.txt"))]
    assert match_profile("7g.79gb", known) == "7g.80gb"
    assert match_profile("3g.40gb", known) == "3g.40gb"
    h100 = [p.name for p in parse_profiles(fixture(shared, "lgip-h100.txt"))]
    assert match_profile("1g.9gb", h100) is None, "1g.10gb or 1g.20gb: an ambiguous name is not guessed"


def test_dcgm_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a Prometheus sample"):
        parse_samples("this is { not metrics")


@pytest.mark.parametrize(
    ("name", "current"),
    [
        ("query-mig-mode-a100-enabled.txt", "Enabled"),
        ("query-mig-mode-rtx4070-na.txt", "[N/A]"),
        ("query-mig-mode-h200-disabled.txt", "Disabled"),
    ],
)
def test_mig_mode_query_is_read_by_column(name: str, current: str) -> None:
    mode = parse_mig_mode((LOCAL_NVIDIA_FIXTURES / name).read_text())
    assert mode["mig.mode.current"] == current and mode["mig.mode.pending"] == current


def test_mig_mode_query_rejects_other_text() -> None:
    with pytest.raises(MigError, match="unexpected nvidia-smi query output"):
        parse_mig_mode("No devices were found\n")


def test_share_guard_refuses_everything_while_a_mode_change_is_pending() -> None:
    state = GpuState(index=0, name="NVIDIA A100-SXM4-80GB", mig_current="Disabled", mig_pending="Enabled", uuid="GPU-x")
    [why] = refusals(["timeslice"], state, 2, "/usr/bin/nvidia-cuda-mps-control", mps_running=False)
    assert "MIG mode change pending (current Disabled, pending Enabled)" in why


def test_share_guard_on_a_gpu_with_mig_disabled() -> None:
    state = GpuState(index=1, name="NVIDIA A100-SXM4-80GB", mig_current="Disabled", mig_pending="Disabled", uuid="GPU-x")
    assert refusals(["mps", "timeslice"], state, 2, "/usr/bin/nvidia-cuda-mps-control", mps_running=False) == []
    [mig] = refusals(["mig"], state, 2, None, mps_running=False)
    assert "MIG is disabled on GPU 1" in mig and "nvidia-smi -i 1 -mig 1" in mig and "never does" in mig
    assert refusals(["mps"], state, 2, None, mps_running=False) == ["mps: nvidia-cuda-mps-control is not on PATH"]
    [busy] = refusals(["mps"], state, 2, "/usr/bin/nvidia-cuda-mps-control", mps_running=True)
    assert "already runs" in busy
