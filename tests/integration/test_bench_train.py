"""`migserve bench train`: training steps per CPU slice, checked for real learning steps and sane figures."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.gateway_bench import _children
from tests.helpers import MIGSERVE, ROOT, migserve, running, sigint_not_ignored

PNG = b"\x89PNG\r\n\x1a\n"


def test_training_steps_on_each_slice(tmp_path: Path) -> None:
    # a point is a child process that imports torch (3-5 s here): four of them, a 2D and a 3D model on each slice
    args = ["--models", "face-pros,lns-organs", "--size", "tiny", "--batch", "2", "--steps", "3", "--warmup", "1"]
    run = migserve("bench", "train", *args, "--cpu-slices", "1,1", "--out", tmp_path)
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "points.json").read_text())
    assert [(r["model"], r["partition"], r["batch"]) for r in rows] == [
        (m, p, 2) for m in ("face-pros", "lns-organs") for p in ("cpu-0", "cpu-1")
    ]
    for row in rows:
        assert row["steps"] == 3 and row["threads"] == 1, "one core per slice, one torch thread"
        assert row["weights_moved"] > 0, "the optimizer changed the weights"
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
        assert row["step_p50_ms"] <= row["step_p90_ms"] <= row["step_p99_ms"]
        assert math.isclose(row["images_per_s"], row["batch"] * 1000 / row["step_mean_ms"], rel_tol=1e-6)
        assert 0 < row["cpu_util"] <= 1.2 and row["peak_rss_mb"] > 50
        assert row["cuda_peak_allocated_mb"] is None and row["device"] == "cpu"
    with (tmp_path / "points.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    assert (tmp_path / "train_images_per_s.png").read_bytes().startswith(PNG)
    assert "| face-pros | tiny | cpu-1 | 1 | 2 |" in (tmp_path / "report.md").read_text()


def test_a_failing_point_is_reported_and_the_rest_kept(tmp_path: Path) -> None:
    # the first point's child is killed (as the OOM killer would) while it imports torch; the second still runs
    args = ["--models", "crowd-csrnet,grounding-mhst", "--size", "tiny", "--batch", "1", "--steps", "1"]
    command = [MIGSERVE, "bench", "train", *args, "--cpu-slices", "1", "--partitions", "cpu-0", "--out", str(tmp_path)]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as bench:
        child = _wait_for_child(bench.pid, "crowd-csrnet")
        os.kill(child, signal.SIGKILL)
        _, stderr = bench.communicate(timeout=300)
    rows = json.loads((tmp_path / "points.json").read_text())
    assert bench.returncode == 1 and f"crowd-csrnet b=1 on cpu-0: child exited {-signal.SIGKILL}" in stderr
    assert rows[0]["error"] and not rows[1].get("error")


@pytest.mark.parametrize(("how", "status", "said"), [("ctrl-c", 130, "interrupted"), ("sigterm", 143, "terminated")])
def test_a_stopped_run_keeps_the_points_that_finished_and_leaves_no_child(tmp_path: Path, how: str, status: int, said: str) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM to the command alone (`timeout`, a supervisor's
    stop) while a point's child runs: the points that finished are reported, the running one's child is killed, not
    left to train on as an orphan (before, SIGTERM ended the command at once, with no report, its child running on)."""
    args = ["--models", "crowd-csrnet,grounding-mhst", "--size", "tiny", "--batch", "1", "--steps", "1"]
    command = [MIGSERVE, "bench", "train", *args, "--cpu-slices", "1", "--partitions", "cpu-0", "--out", str(tmp_path)]
    with sigint_not_ignored():
        bench = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = _wait_for_child(bench.pid, "grounding-mhst", limit_s=120)  # the first point has finished
        if how == "ctrl-c":
            os.killpg(bench.pid, signal.SIGINT)
        else:
            bench.send_signal(signal.SIGTERM)
        _, stderr = bench.communicate(timeout=60)
        assert bench.returncode == status and f"{said}: keeping the points that finished" in stderr, stderr
        assert "Traceback" not in stderr, stderr
        assert [row["model"] for row in json.loads((tmp_path / "points.json").read_text())] == ["crowd-csrnet"]
        assert (tmp_path / "report.md").is_file()
        assert not running(child), "the running point's child outlived the command"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bench.pid, signal.SIGKILL)


def _wait_for_child(bench: int, model: str, limit_s: float = 60) -> int:
    """The pid of the bench process's training child for `model` (`python -m bench.train --child SPEC`), once it runs."""
    until = time.monotonic() + limit_s
    while time.monotonic() < until:
        for pid in _children(bench):
            with contextlib.suppress(OSError):
                if f'"model": "{model}"'.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        time.sleep(0.05)
    raise AssertionError(f"no training child of {model} in {limit_s:g} s")


def test_dims_a_model_does_not_take_are_refused_before_any_point(tmp_path: Path) -> None:
    """Read from the zoo (torch imported for it only when --dims is given): before, a value out of range failed in
    each point's child, and a name no model has was ignored."""
    args: list[str | Path] = ["--models", "crowd-csrnet,grounding-mhst", "--size", "tiny", "--out", tmp_path / "out"]
    run = migserve("bench", "train", *args, "--dims", "height=2,width=2")
    assert run.returncode == 2 and "error: --dims height=2: crowd-csrnet takes height from 8 to 1024" in run.stderr
    run = migserve("bench", "train", *args, "--dims", "depth=4")
    assert run.returncode == 2
    assert "error: --dims depth: not an input dim of crowd-csrnet, grounding-mhst (theirs: frames, height, width, words" in run.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_models_and_bad_steps_are_refused(tmp_path: Path) -> None:
    run = migserve("bench", "train", "--models", "resnet50", "--out", tmp_path)
    assert run.returncode == 2 and "unknown models ['resnet50']" in run.stderr
    run = migserve("bench", "train", "--models", "face-pros", "--steps", "0", "--out", tmp_path)
    assert run.returncode == 2 and "--steps" in run.stderr
