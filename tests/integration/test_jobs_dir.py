"""CT jobs kept in a directory (`serve --jobs-dir`): a gateway started again answers for them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
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


def test_a_gateway_started_again_answers_for_the_jobs_of_the_last(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """The first gateway finishes one job and is killed (SIGKILL: no chance to write anything more) while its worker,
    stopped, holds another. The next gateway on the directory, serving another model, answers the first job's result
    and label map as before, and says the second was stopped, where both were unknown ("no job") before."""
    jobs = tmp_path / "jobs"
    args = ("--cpu-slices", "1", "--models", "lns-organs", "lns-stations", "--jobs-dir", str(jobs))
    first = Gateway(tiny_repo.root, *args, log=tmp_path / "first.log")
    base = f"http://{first.url}"
    worker = None
    try:
        done = _finished(base, _submitted(base))
        assert done["state"] == "done", done
        labels = httpx.get(base + done["result"]["label_map_url"])
        assert labels.status_code == 200
        refused = subprocess.run(
            [MIGSERVE, "serve", "--model-repo", str(tiny_repo.root), "--port", str(free_port()), *args],
            cwd=ROOT,
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2, refused.stderr
        assert f"--jobs-dir {jobs} is in use by another gateway (pid {first.process.pid})" in refused.stderr
        (worker,) = [p["pid"] for p in httpx.get(f"{base}/v1/partitions").json()["partitions"]]
        os.kill(worker, signal.SIGSTOP)
        running = _submitted(base)
        assert json.loads((jobs / f"{running['id']}.json").read_text())["state"] == "running"
        first.process.kill()
        first.process.wait(timeout=30)
    finally:
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGCONT)
        first.close()
    second = Gateway(tiny_repo.root, "--cpu-slices", "1", "--models", "crowd-csrnet", "--jobs-dir", str(jobs), log=tmp_path / "second.log")
    base = f"http://{second.url}"
    try:
        again = httpx.get(base + done["status_url"]).json()
        assert again["state"] == "done" and again["result"] == done["result"], "the answer needs no CT model served"
        assert again["progress"] == done["progress"] and again["finished"] == done["finished"]
        assert httpx.get(base + done["result"]["label_map_url"]).content == labels.content
        stopped = httpx.get(base + running["status_url"]).json()
        assert stopped["state"] == "failed", stopped
        assert stopped["error"]["status"] == 503
        assert stopped["error"]["message"].startswith("the gateway stopped while this job ran (0/"), stopped
        lost = httpx.get(base + running["status_url"] + "/labels.nii.gz")
        assert lost.status_code == 422 and "the gateway stopped while this job ran" in lost.json()["error"]
    finally:
        second.close()
