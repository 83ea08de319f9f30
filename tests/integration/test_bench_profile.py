"""`migserve bench profile` on CPU slices at a small size: outputs complete, consistent and valid."""

from __future__ import annotations

import csv
import http.server
import io
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from bench.ports import free_port
from migserve.contract import read_contract
from tests.helpers import MIGSERVE, PARENT, ROOT, ExportedRepo, Gateway, migserve, processes_where, running, sigint_not_ignored

COLUMNS = {
    "mode", "arrival", "model", "family", "contract_sha256", "partition", "profile", "batch", "concurrency", "requests", "errors",
    "requests_per_s", "samples_per_s", "latency_mean_ms", "latency_p50_ms", "latency_p90_ms", "latency_p95_ms", "latency_p99_ms",
    "worker_cpu_s", "worker_rss_mb",
}  # fmt: skip
PLOTS = ("throughput_vs_batch.png", "latency_vs_concurrency.png", "throughput_vs_p99.png")


def _profile(repo: ExportedRepo, out: Path, *args: str) -> None:
    run = migserve("bench", "profile", "--model-repo", repo.root, "--out", out, "--cpu-slices", "1", "--duration", "0.3s", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done" in run.stderr, "the progress bar ran to the end"


def test_direct_sweep_writes_every_output(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    _profile(tiny_repo, tmp_path, "--models", "crowd-csrnet,grounding-mgsl", "--batch", "1,2", "--concurrency", "1,2")
    with (tmp_path / "points.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and set(rows[0]) >= COLUMNS
    for row in rows:
        p = [float(row[f"latency_p{q}_ms"]) for q in (50, 90, 95, 99)]
        assert p == sorted(p) and p[0] > 0, "percentiles are monotone"
        assert int(row["requests"]) > 0 and row["errors"] == "0"
        assert float(row["samples_per_s"]) == float(row["requests_per_s"]) * int(row["batch"])
        assert float(row["worker_rss_mb"]) > 10 and float(row["worker_cpu_s"]) > 0
    points = json.loads((tmp_path / "points.json").read_text())
    assert points[0]["contract_sha256"] == read_contract(tiny_repo.root / "crowd-csrnet").model_sha256
    assert {"migserve", "onnxruntime", "numpy", "python"} <= set(points[0]["versions"]) and points[0]["host"]["cpus"] >= 1
    for name in PLOTS:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size[0] > 300
    report = (tmp_path / "report.md").read_text()
    assert "crowd-csrnet" in report and "grounding-mgsl" in report and "throughput_vs_p99.png" in report


def test_gateway_mode_and_poisson_arrivals(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    _profile(tiny_repo, tmp_path, "--models", "crowd-csrnet", "--batch", "1", "--concurrency", "2", "--mode", "gateway")
    row = json.loads((tmp_path / "points.json").read_text())[0]
    assert row["mode"] == "gateway" and row["partition"] == "cpu-0" and row["requests"] > 0 and row["errors"] == 0
    _profile(
        tiny_repo,
        tmp_path / "open",
        "--models",
        "crowd-csrnet",
        "--batch",
        "1",
        "--concurrency",
        "1",
        "--arrival",
        "poisson",
        "--rate",
        "40",
    )
    row = json.loads((tmp_path / "open" / "points.json").read_text())[0]
    assert row["arrival"] == "poisson" and 4 <= row["requests"] <= 30, "about 40/s for 0.3 s"


@pytest.mark.parametrize(("stop", "status", "said"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_keeps_the_points_that_finished(
    tiny_repo: ExportedRepo, tmp_path: Path, stop: signal.Signals, status: int, said: str
) -> None:
    """Ctrl-C, or SIGTERM (`timeout`, a supervisor's stop; before, it ended the sweep at once, with no report and its
    workers left to notice): the points that finished are kept and reported, and the workers stopped."""
    command = [MIGSERVE, "bench", "profile", "--model-repo", str(tiny_repo.root), "--out", str(tmp_path)]
    command += ["--models", "crowd-csrnet", "--cpu-slices", "1", "--batch", "1,2,4,8", "--concurrency", "1,2", "--duration", "0.5s"]
    # SIGINT as a terminal gives it: a shell running this suite in the background ignores SIGINT, and children inherit that
    with sigint_not_ignored():
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (tmp_path / "points.json").is_file():
        time.sleep(0.1)
    workers = processes_where(PARENT, process.pid)
    process.send_signal(stop)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status and f"{said}: keeping the points that finished" in err, err
    assert "Traceback" not in err, err
    kept = json.loads((tmp_path / "points.json").read_text())
    assert 1 <= len(kept) < 8 and (tmp_path / "report.md").is_file()
    deadline = time.monotonic() + 10  # a worker ends once it sees its connection closed
    while [pid for pid in workers if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in workers if running(pid)}
    assert workers and not left, f"outlived the sweep: {left}"


def test_dcgm_activity_is_recorded_per_gpu_instance(tiny_repo: ExportedRepo, tmp_path: Path, shared: Path) -> None:
    """A dcgm-exporter stand-in serving a captured real scrape (these machines have no GPU)."""
    scrape = (shared / "fixtures" / "nvidia" / "dcgm-exporter-mig.txt").read_bytes()

    class Exporter(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(scrape)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Exporter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        _profile(tiny_repo, tmp_path, "--models", "crowd-csrnet", "--batch", "1", "--concurrency", "1", "--dcgm-url", url)
    finally:
        server.shutdown()
        server.server_close()
    row = json.loads((tmp_path / "points.json").read_text())[0]
    assert [(i["gpu_instance"], i["profile"]) for i in row["dcgm_instances"]] == [("13", "1g.5gb")]
    assert row["dcgm_instances"][0]["gr_engine_active"] > 0.99
    assert row["dcgm_board_level"][0]["fb_used_mib"] == 4845.0, "whole-GPU values stay labelled board-level"
    assert "dcgm_instances" not in (tmp_path / "points.csv").read_text().splitlines()[0]


def test_unknown_models_are_refused(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    run = migserve("bench", "profile", "--model-repo", tiny_repo.root, "--out", tmp_path, "--models", "resnet")
    assert run.returncode == 2 and "models not in" in run.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "0"], "argument --batch: expected whole numbers of 1 or more, comma-separated, e.g. 1,8,32; got '0'"),
        (["--concurrency", "8,x"], "argument --concurrency: expected whole numbers of 1 or more"),
        (["--cpu-slices", "0"], "argument --cpu-slices: expected whole numbers of 1 or more"),
        (["--duration", "0s"], "argument --duration: expected seconds above 0, e.g. 10s; got '0s'"),
        (["--duration", "ten"], "argument --duration: expected seconds above 0, e.g. 10s; got 'ten'"),
        (["--arrival", "poisson", "--rate", "0"], "argument --rate: expected requests per second above 0, e.g. 50; got '0'"),
        (["--arrival", "poisson", "--rate=-5"], "argument --rate: expected requests per second above 0"),
        (["--arrival", "poisson", "--rate", "nan"], "argument --rate: expected requests per second above 0"),
        (["--dims", "height=0"], "--dims height=0: crowd-csrnet takes height from 8 to 1024"),
        (["--dims", "depth=4"], "--dims depth: not an input dim of crowd-csrnet (theirs: height, width; the batch is --batch)"),
    ],
)
def test_values_that_measure_nothing_are_refused_before_any_point(
    tiny_repo: ExportedRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Before, a batch of 0 killed the direct mode's workers (each point's error: WorkerDied), a rate of 0 raised
    ZeroDivisionError, a negative one never ended, and a dim out of range gave a point of nothing but errors."""
    from bench import profile
    from migserve.cli import build_parser

    out, err = tmp_path / "out", io.StringIO()
    argv = ["bench", "profile", "--model-repo", str(tiny_repo.root), "--out", str(out), "--models", "crowd-csrnet", *args]
    try:
        parsed = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's refusal, on sys.stderr
        assert exc.code == 2
        said = capsys.readouterr().err
    else:
        assert profile.run(parsed, io.StringIO(), err) == 2
        said = err.getvalue()
    assert message in said
    assert not out.exists(), "no point ran"


def test_a_url_with_no_server_or_without_the_model_is_one_error(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """Before, each point spent its --duration on connection errors (10 s each by default)."""
    from bench import profile
    from migserve.cli import build_parser

    def said(url: str) -> str:
        argv = ["bench", "profile", "--model-repo", str(tiny_repo.root), "--out", str(tmp_path / "out"), "--models", "crowd-csrnet"]
        err = io.StringIO()
        assert profile.run(build_parser().parse_args([*argv, "--mode", "gateway", "--url", url]), io.StringIO(), err) == 2
        return err.getvalue()

    nobody = f"127.0.0.1:{free_port()}"
    assert f"error: --url {nobody}: cannot reach a server there" in said(nobody)
    gateway = Gateway(tiny_repo.root, "--models", "face-pros", log=tmp_path / "gateway.log")
    try:
        assert f"error: --url {gateway.url}: model crowd-csrnet is not ready there (HTTP 404 to its ready check)" in said(gateway.url)
    finally:
        gateway.close()
