"""`migserve bench share`: the guard against a replay of captured nvidia-smi outputs (no GPU here),
and the CPU analogue run for real."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import MIGSERVE, PARENT, ROOT, ExportedRepo, Replies, SmiRun, fake_smi_runner, migserve, processes_where, running

QUERY = "-i 0 --query-gpu=index,name,mig.mode.current,mig.mode.pending --format=csv"
A100_MIG: Replies = {QUERY: ("query-mig-mode-a100-enabled.txt", 0), "-L": ("smi-L-a100-mig.txt", 0)}
NO_MIG: Replies = {QUERY: ("query-mig-mode-rtx4070-na.txt", 0), "-L": ("smi-L-rtx4070-laptop.txt", 0)}


@pytest.fixture
def share(shared: Path, tmp_path: Path) -> SmiRun:
    replay = fake_smi_runner(shared, tmp_path)
    return lambda replies, *args: replay(replies, "bench", "share", "--models", "crowd-csrnet", "--out", tmp_path / "out", *args)


def test_mig_enabled_refuses_mps_and_timeslice_and_changes_nothing(share: SmiRun, tmp_path: Path) -> None:
    run, calls = share(A100_MIG, "--modes", "mig,mps,timeslice")
    assert run.returncode == 2
    assert "mps: needs the whole GPU, but MIG is enabled on GPU 0 (4 instances)" in run.stderr
    assert "timeslice: needs the whole GPU" in run.stderr and "nothing was run and nothing was changed" in run.stderr
    assert "mig:" not in run.stderr, "mig itself can run here"
    assert sorted(calls) == sorted([QUERY, "-L"]), "only reads: no -mig, -cgi, -dgi"
    assert not (tmp_path / "out").exists()


def test_mig_mode_places_one_process_per_instance(share: SmiRun) -> None:
    run, _ = share(A100_MIG, "--modes", "mig", "--processes", "3", "--dry-run")
    assert run.returncode == 0, run.stderr
    plan = run.stdout.splitlines()[0]
    assert plan.startswith("mig: 3 x infer crowd-csrnet b=8 on MIG-dcf43e8e-5d19-5fa8-8b1d-8aaca1e467f0; MIG-6b84cf06")
    assert "GPU 1" not in run.stdout and "MIG-51872ee5" not in plan, "GPU 1's instances are not GPU 0's"
    assert "dry run: nothing was run" in run.stdout


def test_mig_mode_needs_enough_instances(share: SmiRun) -> None:
    run, _ = share(A100_MIG, "--modes", "mig", "--processes", "5")
    assert run.returncode == 2 and "5 processes need 5 MIG instances on GPU 0, it has 4; use --processes 4" in run.stderr


def test_a_gpu_without_mig_runs_timeslice_and_refuses_mig(share: SmiRun) -> None:
    run, _ = share(NO_MIG, "--modes", "mig")
    assert run.returncode == 2 and "mig: GPU 0 (NVIDIA GeForce RTX 4070 Laptop GPU) does not support MIG" in run.stderr
    run, _ = share(NO_MIG, "--modes", "timeslice", "--processes", "3", "--dry-run")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].endswith("on " + "; ".join(["GPU-1b724e78-eef5-4163-d43c-e4da15d41176"] * 3))


def test_without_nvidia_smi_it_says_a_gpu_is_needed(tmp_path: Path) -> None:
    run = migserve("bench", "share", "--models", "crowd-csrnet", "--modes", "timeslice", "--out", tmp_path)
    assert run.returncode == 2 and "bench share needs an NVIDIA GPU" in run.stderr


def test_cpu_analogue_runs_both_modes_side_by_side(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    common: list[str | Path] = ["bench", "share", "--device", "cpu", "--processes", "2", "--batch", "1", "--duration", "1s"]
    common += ["--out", tmp_path]
    run = migserve(*common, "--model-repo", tiny_repo.root, "--models", "crowd-csrnet", "--modes", "mig,timeslice")
    assert run.returncode == 0, run.stderr
    assert "mig: 2 x infer crowd-csrnet b=1 on cores " in run.stdout
    run = migserve(*common, "--workload", "train", "--size", "tiny", "--models", "face-pros", "--modes", "mig")
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "points.json").read_text())
    assert [(r["workload"], r["mode"], r["process"]) for r in rows] == [
        ("infer", "mig", 0),
        ("infer", "mig", 1),
        ("infer", "timeslice", 0),
        ("infer", "timeslice", 1),
        ("train", "mig", 0),
        ("train", "mig", 1),
    ], "the second run appended to the first"
    for row in rows:
        assert not row.get("error") and row["images_per_s"] > 0
    own = [set(r["placement"].removeprefix("cores ").split(",")) for r in rows[:2]]
    assert not own[0] & own[1], "mig: each process on its own cores"
    assert all(set(r["placement"].removeprefix("cores ").split(",")) == own[0] | own[1] for r in rows[2:4]), "timeslice: all share"
    report = (tmp_path / "report.md").read_text()
    assert "| crowd-csrnet | infer | cpu | mig | 2 |" in report and "| crowd-csrnet | infer | cpu | timeslice | 2 |" in report
    assert "| face-pros | train | cpu | mig | 2 |" in report


def test_sigterm_stops_a_mode_with_its_processes(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """SIGTERM to the command (`timeout`, a supervisor's stop) while a mode's processes run: they are killed with it,
    not left to measure on as orphans, and it says so and exits 143 (before, it died at once and they ran on)."""
    command = [MIGSERVE, "bench", "share", "--device", "cpu", "--processes", "2", "--batch", "1", "--duration", "60s"]
    command += ["--model-repo", str(tiny_repo.root), "--models", "crowd-csrnet", "--modes", "mig", "--out", str(tmp_path)]
    bench = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(children := processes_where(PARENT, bench.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(children) == 2, "the mode's two processes"
        bench.send_signal(signal.SIGTERM)
        _, stderr = bench.communicate(timeout=30)
        assert bench.returncode == 143 and "terminated: keeping the modes that finished" in stderr, stderr
        assert "no mode finished" in stderr and "Traceback" not in stderr, stderr
        assert not [pid for pid in children if running(pid)], "the mode's processes outlived the command"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bench.pid, signal.SIGKILL)


def test_cpu_analogue_has_no_mps(tmp_path: Path) -> None:
    run = migserve("bench", "share", "--device", "cpu", "--models", "crowd-csrnet", "--modes", "mps", "--out", tmp_path)
    assert run.returncode == 2 and "MPS is a GPU feature" in run.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "0"], "refused: --batch must be at least 1"),
        (["--models", "nope"], "refused: models not in REPO: ['nope']; there: ['crowd-csrnet',"),
        (["--workload", "train", "--models", "nope"], "refused: unknown models ['nope']; the zoo has: face-pros,"),
        (["--dims", "height=4"], "refused: --dims height=4: crowd-csrnet takes height from 8 to 1024"),
        (["--dims", "depth=4"], "refused: --dims depth: not an input dim of crowd-csrnet"),
    ],
)
def test_a_workload_that_cannot_run_is_refused_before_any_process_starts(
    tiny_repo: ExportedRepo, tmp_path: Path, args: list[str], message: str
) -> None:
    """Before, each process of each mode started and failed on its own (an unknown model: `KeyError: 'nope'`)."""
    from bench import share
    from migserve.cli import build_parser

    argv = ["bench", "share", "--device", "cpu", "--modes", "timeslice", "--processes", "1", "--models", "crowd-csrnet"]
    argv += ["--model-repo", str(tiny_repo.root), "--duration", "1s", "--out", str(tmp_path / "out"), *args]
    err = io.StringIO()
    assert share.run(build_parser().parse_args(argv), io.StringIO(), err) == 2
    assert message.replace("REPO", str(tiny_repo.root)) in err.getvalue()
    assert not (tmp_path / "out").exists(), "no process ran"


def test_training_dims_are_checked_against_the_zoo_before_any_process_starts(tmp_path: Path) -> None:
    args = ["--device", "cpu", "--modes", "timeslice", "--processes", "1", "--workload", "train", "--size", "tiny"]
    run = migserve("bench", "share", *args, "--models", "crowd-csrnet", "--dims", "height=4", "--out", tmp_path / "out")
    assert run.returncode == 2 and "refused: --dims height=4: crowd-csrnet takes height from 8 to 1024" in run.stderr
    assert not (tmp_path / "out").exists(), "no process ran"
