"""`migserve mig` against a replay of captured real nvidia-smi outputs (these machines have no NVIDIA GPU)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import MIGSERVE, ROOT, Replies, SmiRun, fake_smi, fake_smi_runner, sigint_not_ignored


@pytest.fixture
def mig(shared: Path, tmp_path: Path) -> SmiRun:
    """Run `migserve mig ARGS` with nvidia-smi replaced by the replay; returns the run and the nvidia-smi calls made."""
    replay = fake_smi_runner(shared, tmp_path)
    return lambda replies, *args: replay(replies, "mig", *args)


NO_INSTANCES: Replies = {"mig -i 0 -lgi": (None, 6)}  # nvidia-smi exits non-zero when a GPU has no GPU instances


def test_profiles_are_read_from_the_driver(mig: SmiRun) -> None:
    run, calls = mig({"mig -i 0 -lgip": ("lgip-a100-80gb.txt", 0)}, "profiles", "--gpu", "0")
    assert run.returncode == 0, run.stderr
    assert calls == ["mig -i 0 -lgip"]
    rows = {line.split()[1]: line.split() for line in run.stdout.splitlines()[1:]}
    assert rows["7g.80gb"][2] == "0" and rows["1g.10gb"][2] == "19" and rows["3g.40gb"][-1] == "3"


def test_list_shows_devices_and_instances(mig: SmiRun) -> None:
    replies: Replies = {"-L": ("smi-L-a100-mig.txt", 0), "mig -lgi": ("lgi-a100-80gb.txt", 0), "mig -lci": ("lci-a100-80gb.txt", 0)}
    run, _ = mig(replies, "list")
    assert run.returncode == 0, run.stderr
    assert "MIG-dcf43e8e-5d19-5fa8-8b1d-8aaca1e467f0" in run.stdout and "GI  1  3g.40gb" in run.stdout
    assert run.stdout.count("1c.3g.40gb") == 2


def test_apply_is_a_dry_run_without_yes(mig: SmiRun) -> None:
    run, calls = mig(NO_INSTANCES | {"mig -i 0 -lgip": ("lgip-a100-80gb.txt", 0)}, "apply", "3g.40gb,2x2g.20gb")
    assert run.returncode == 0, run.stderr
    assert "would run:" in run.stdout and "mig -i 0 -cgi 9,14,14 -C" in run.stdout and "nothing changed" in run.stdout
    assert not any("-cgi" in c for c in calls), "nothing was created"


def test_apply_with_yes_creates_and_reports(mig: SmiRun) -> None:
    replies = NO_INSTANCES | {"mig -i 0 -lgip": ("lgip-h100.txt", 0), "mig -i 0 -cgi 9,19,19,19 -C": ("cgi-success.txt", 0)}
    run, calls = mig(replies, "apply", "3g.40gb,3x1g.10gb", "--yes")
    assert run.returncode == 0, run.stderr
    assert calls[-1] == "mig -i 0 -cgi 9,19,19,19 -C"
    assert run.stdout.count("Successfully created GPU instance") == 4


def test_apply_reports_driver_errors(mig: SmiRun) -> None:
    # Free counts can pass the plan and the driver still refuse (placement): the driver's words come through.
    replies = NO_INSTANCES | {"mig -i 0 -lgip": ("lgip-gh200.txt", 0), "mig -i 0 -cgi 20 -C": ("cgi-errors.txt", 6)}
    run, _ = mig(replies, "apply", "1g.12gb+me", "--yes")
    assert run.returncode == 1 and "Insufficient Resources" in run.stderr


@pytest.mark.parametrize(
    ("replies", "layout", "message"),
    [
        ({"mig -i 0 -lgi": ("lgi-h100.txt", 0)}, "7x1g.10gb", "already has GPU instances (GI 7 1g.10gb"),
        (NO_INSTANCES | {"mig -i 0 -lgip": ("lgip-a100-80gb.txt", 0)}, "3g.20gb", "not offered by GPU 0"),
        (NO_INSTANCES | {"mig -i 0 -lgip": ("lgip-a100-80gb.txt", 0)}, "2x4g.40gb", "1 of 1 free"),
        (NO_INSTANCES | {"mig -i 0 -lgip": ("lgip-a100-80gb.txt", 0)}, "2x3g.40gb,2g.20gb", "needs 8 compute slices"),
        (NO_INSTANCES | {"mig -i 0 -lgip": ("lgip-a30.txt", 0)}, "1g.6gb", "has 0 of 4 free"),
        (NO_INSTANCES | {"mig -i 0 -lgip": ("lgip-gh200.txt", 0)}, "3x1g.12gb+me", "has 1 of 1 free"),
        ({}, "three-gigs", "expected a profile"),
    ],
)
def test_apply_refuses_what_cannot_or_must_not_be_done(mig: SmiRun, replies: Replies, layout: str, message: str) -> None:
    run, calls = mig(replies, "apply", layout, "--yes")
    assert run.returncode == 1 and message in run.stderr, run.stderr
    assert not any("-cgi" in c for c in calls)


def test_clear_dry_run_and_in_use(mig: SmiRun) -> None:
    run, calls = mig({}, "clear", "--gpu", "0")
    assert run.returncode == 0 and "mig -i 0 -dci" in run.stdout and "mig -i 0 -dgi" in run.stdout and calls == []
    replies: Replies = {"mig -i 0 -dci": ("dci-dgi-success-h100.txt", 0), "mig -i 0 -dgi": ("dgi-errors.txt", 6)}
    run, calls = mig(replies, "clear", "--gpu", "0", "--yes")
    assert run.returncode == 1 and "In use by another client" in run.stderr and "stop the processes" in run.stderr
    assert calls == ["mig -i 0 -dci", "mig -i 0 -dgi"]


@pytest.mark.parametrize(("how", "status", "said"), [("ctrl-c", -signal.SIGINT, "interrupted"), ("sigterm", 143, "terminated")])
def test_a_stop_lets_the_running_mig_change_finish_and_runs_no_more(shared: Path, tmp_path: Path, how: str, status: int, said: str) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM while `mig clear --yes` runs its first nvidia-smi
    command: that command finishes and its answer is shown (cut half-way it could leave instances half-destroyed; before,
    Ctrl-C reached nvidia-smi too, and SIGTERM's exception killed it), then the command stops, the second one not run."""
    smi = fake_smi(shared, tmp_path)
    replies: Replies = {"mig -i 0 -dci": ("dci-dgi-success-h100.txt", 0), "mig -i 0 -dgi": ("dci-dgi-success-h100.txt", 0)}
    env = smi.env(replies, slow={"mig -i 0 -dci": 2.0})
    command = [MIGSERVE, "mig", "clear", "--gpu", "0", "--yes"]
    with sigint_not_ignored():
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 30
        while smi.calls() != ["mig -i 0 -dci"] and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the fake nvidia-smi is in its slow call
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert smi.calls() == ["mig -i 0 -dci", "mig -i 0 -dci (finished)"], "the first finished, the second never ran"
    assert process.returncode == status and f"migserve mig: {said}" in err and "Traceback" not in err, err
    assert "Successfully destroyed compute instance ID  0 from GPU  0 GPU instance ID  7" in out, "its answer is shown"
    assert f"stopped once {smi.wrapper} mig -i 0 -dci had finished; not run: mig -i 0 -dgi" in out
