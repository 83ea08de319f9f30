"""CT jobs kept in a directory (`serve --jobs-dir`): a gateway started again answers for them, and runs again those the
last was running."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np

from bench.ports import free_port
from tests.helpers import MIGSERVE, ROOT, ExportedRepo, Gateway
from tests.integration.test_family_endpoints import nifti_gz

VOLUME = nifti_gz(np.random.default_rng(5).normal(-300, 400, (60, 60, 40)).astype(np.int16), np.diag([1.5, 1.5, 2.5, 1.0]))


def _submitted(base: str) -> dict[str, Any]:
    response = httpx.post(f"{base}/v1/lns/segment", files={"volume": ("ct.nii.gz", VOLUME)}, data={"mode": "job"}, timeout=60)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def _finished(base: str, job: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = httpx.get(base + job["status_url"]).json()
    return job


def _labels(nifti_gz: bytes) -> np.ndarray[Any, Any]:
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(nifti_gz)).dataobj)


@contextlib.contextmanager
def _worker_stopped(base: str) -> Iterator[None]:
    """The gateway's one worker SIGSTOPped, so that a job sent now is still running when the gateway stops or dies."""
    (worker,) = [p["pid"] for p in httpx.get(f"{base}/v1/partitions").json()["partitions"]]
    os.kill(worker, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)


def test_a_gateway_started_again_answers_for_the_jobs_of_the_last_and_runs_its_running_ones_again(
    tiny_repo: ExportedRepo, tmp_path: Path
) -> None:
    """The first gateway finishes job A, refuses a second gateway on its directory, and is killed (SIGKILL: no chance
    to write anything more) while its stopped worker holds job B. The next gateway on the directory answers A's result
    and label map as before, and runs B again from its upload (the same label map as A's: the same volume), under the
    same URL. It is then stopped (SIGTERM) with job C running: C is left on disk to run again, and the third
    gateway, serving no CT model, answers A and B and fails C saying why, with its upload removed."""
    jobs = tmp_path / "jobs"
    ct = ("--cpu-slices", "1", "--models", "lns-organs", "lns-stations", "--jobs-dir", str(jobs))
    first = Gateway(tiny_repo.root, *ct, log=tmp_path / "first.log")
    base = f"http://{first.url}"
    try:
        done = _finished(base, _submitted(base))
        assert done["state"] == "done" and done["resumes"] == 0, done
        labels = httpx.get(base + done["result"]["label_map_url"])
        assert labels.status_code == 200
        _refused(tiny_repo, ct, f"--jobs-dir {jobs} is in use by another gateway (pid {first.process.pid})")
        with _worker_stopped(base):
            killed = _submitted(base)
            assert json.loads((jobs / f"{killed['id']}.json").read_text())["state"] == "running"
            assert (jobs / f"{killed['id']}.input").read_bytes() == VOLUME, "the upload kept as it was sent"
            first.process.kill()
            first.process.wait(timeout=30)
    finally:
        first.close()
    second = Gateway(tiny_repo.root, *ct, log=tmp_path / "second.log")
    base = f"http://{second.url}"
    try:
        again = httpx.get(base + done["status_url"]).json()
        assert again["state"] == "done" and again["result"] == done["result"]
        resumed = _finished(base, httpx.get(base + killed["status_url"]).json())
        assert resumed["state"] == "done" and resumed["resumes"] == 1, resumed
        assert resumed["created"] == killed["created"] and resumed["progress"] == done["progress"]
        kept = httpx.get(base + resumed["result"]["label_map_url"])
        assert kept.status_code == 200
        same = np.mean(_labels(kept.content) == _labels(labels.content))
        assert same > 0.999, f"run again on the same volume, {same:.4%} of the voxels have the same label"
        assert not (jobs / f"{killed['id']}.input").exists(), "the upload goes when the job ends"
        paused, answered = _stopped_with_a_job_and_a_request(second, jobs)
        assert answered.status_code == 200, "the request in flight at the stop is answered"
        second.process.wait(timeout=60)
        assert "1 jobs the last gateway was running are run again from their uploads" in (tmp_path / "second.log").read_text()
    finally:
        second.close()
    _third(tiny_repo, jobs, tmp_path, (done, resumed), labels.content, paused)


def _stopped_with_a_job_and_a_request(gateway: Gateway, jobs: Path) -> tuple[dict[str, Any], httpx.Response]:
    """SIGTERM with a job and a synchronous request in its stopped worker: the job is paused in `jobs` at once, while
    the gateway still waits to answer the request (answered once the worker goes on)."""
    base = f"http://{gateway.url}"
    with ThreadPoolExecutor(1) as pool, _worker_stopped(base):
        paused = _submitted(base)
        files = {"volume": ("ct.nii.gz", VOLUME)}
        request = pool.submit(httpx.post, f"{base}/v1/lns/segment", files=files, data={"mode": "sync"}, timeout=60)
        deadline = time.monotonic() + 30
        while _running_jobs(base) < 2:
            assert time.monotonic() < deadline, "the synchronous request's job did not start"
            time.sleep(0.05)
        gateway.process.send_signal(signal.SIGTERM)
        record: dict[str, Any] = {}
        while not record.get("paused"):
            assert time.monotonic() < deadline, f"not paused as the stop began: {record}"
            time.sleep(0.05)
            record = json.loads((jobs / f"{paused['id']}.json").read_text())
        assert (record["state"], record["error"], record["stage"]) == ("running", None, "paused"), record
        assert gateway.process.poll() is None, "paused while the gateway still answers the request in flight"
    return paused, request.result(timeout=60)


def _running_jobs(base: str) -> int:
    """Jobs running, by the gateway's metrics (a synchronous request's job among them)."""
    line = next(x for x in httpx.get(f"{base}/metrics").text.splitlines() if x.startswith("migserve_jobs_running "))
    return int(float(line.split()[1]))


def _refused(repo: ExportedRepo, args: tuple[str, ...], message: str) -> None:
    refused = subprocess.run(
        [MIGSERVE, "serve", "--model-repo", str(repo.root), "--port", str(free_port()), *args],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr
    assert message in refused.stderr


def _third(
    repo: ExportedRepo, jobs: Path, tmp_path: Path, finished: tuple[dict[str, Any], ...], labels: bytes, paused: dict[str, Any]
) -> None:
    """A gateway serving no CT model: the finished jobs answered as before, the paused one failed, saying why."""
    done = finished[0]
    third = Gateway(repo.root, "--cpu-slices", "1", "--models", "crowd-csrnet", "--jobs-dir", str(jobs), log=tmp_path / "third.log")
    base = f"http://{third.url}"
    try:
        for job in finished:
            again = httpx.get(base + job["status_url"]).json()
            assert again["state"] == "done" and again["result"] == job["result"], "the answer needs no CT model served"
            assert again["progress"] == job["progress"] and again["finished"] == job["finished"]
        assert httpx.get(base + done["result"]["label_map_url"]).content == labels
        stopped = httpx.get(base + paused["status_url"], params={"wait_s": 30}).json()
        assert stopped["state"] == "failed" and stopped["resumes"] == 1, stopped
        assert stopped["error"] == {
            "status": 503,
            "message": "the gateway stopped while this job ran, and the one started since cannot run it again: lymph node "
            "station parsing needs both lns-organs and lns-stations served by this gateway; send it again",
        }
        lost = httpx.get(base + paused["status_url"] + "/labels.nii.gz")
        assert lost.status_code == 422 and "cannot run it again" in lost.json()["error"]
        assert not list(jobs.glob("*.input")), "no upload is kept for a job that ended"
    finally:
        third.close()


def test_with_explicit_model_control_a_job_waits_for_its_models_to_be_loaded(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """A gateway with explicit model control that starts without the CT models (--models crowd-csrnet) holds the job
    the last gateway left running until they are loaded, its stage saying so, and then runs it to the end."""
    jobs = tmp_path / "jobs"
    ct = ("--cpu-slices", "1", "--models", "lns-organs", "lns-stations", "--jobs-dir", str(jobs))
    first = Gateway(tiny_repo.root, *ct, log=tmp_path / "first.log")
    base = f"http://{first.url}"
    try:
        with _worker_stopped(base):
            job = _submitted(base)
            first.process.kill()
            first.process.wait(timeout=30)
    finally:
        first.close()
    explicit = ("--model-control-mode", "explicit", "--models", "crowd-csrnet")
    second = Gateway(tiny_repo.root, "--cpu-slices", "1", *explicit, "--jobs-dir", str(jobs), log=tmp_path / "second.log")
    base = f"http://{second.url}"
    waiting = "waiting for lns-organs and lns-stations to be loaded (POST /v2/repository/models/NAME/load)"
    try:
        for model in ("lns-organs", "lns-stations"):
            held = httpx.get(base + job["status_url"], params={"wait_s": 1}).json()
            assert (held["state"], held["stage"], held["progress"]["done"]) == ("running", waiting, 0), held
            assert httpx.post(f"{base}/v2/repository/models/{model}/load", timeout=120).status_code == 200
        done = _finished(base, httpx.get(base + job["status_url"]).json())
        assert done["state"] == "done" and done["resumes"] == 1, done
        assert httpx.get(base + done["result"]["label_map_url"]).status_code == 200
    finally:
        second.close()
