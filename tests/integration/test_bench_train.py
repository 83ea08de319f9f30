"""`migserve bench train`: training steps per CPU slice, checked for real learning steps and sane figures."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from tests.helpers import migserve

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
    # CSRNet pools three times: a 2x2 image fails in its child; grounding has no height or width and still runs
    args = ["--models", "crowd-csrnet,grounding-mhst", "--size", "tiny", "--batch", "1", "--steps", "1", "--dims", "height=2,width=2"]
    run = migserve("bench", "train", *args, "--cpu-slices", "1", "--partitions", "cpu-0", "--out", tmp_path)
    rows = json.loads((tmp_path / "points.json").read_text())
    assert run.returncode == 1 and "crowd-csrnet b=1 on cpu-0: child exited 1" in run.stderr
    assert rows[0]["error"] and not rows[1].get("error")


def test_unknown_models_and_bad_steps_are_refused(tmp_path: Path) -> None:
    run = migserve("bench", "train", "--models", "resnet50", "--out", tmp_path)
    assert run.returncode == 2 and "unknown models ['resnet50']" in run.stderr
    run = migserve("bench", "train", "--models", "face-pros", "--steps", "0", "--out", tmp_path)
    assert run.returncode == 2 and "--steps" in run.stderr
