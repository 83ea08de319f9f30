"""Stopping the gateway (SIGTERM: `docker stop`, a Kubernetes pod's termination; Ctrl-C) while requests are in it."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient

from migserve.contract import read_contract
from tests.helpers import ExportedRepo, Gateway
from tests.integration.test_family_endpoints import ASTRONAUT, encode, nifti_gz
from tests.integration.test_gateway_behaviour import _metric_reaches
from tests.integration.test_gateway_connection import PATH, _density, _infer_body
from tests.integration.test_gateway_protocol import grpc_inputs, make_inputs


def test_requests_in_the_gateway_when_it_stops_are_answered_and_new_ones_refused(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """Binary requests on the gateway's own connections, an upload on uvicorn's, a gRPC call: one running in the worker
    (stopped with SIGSTOP meanwhile), the rest queued behind it, when SIGTERM comes. Each is answered, a new
    connection is refused meanwhile, and the gateway exits."""
    gateway = Gateway(tiny_repo.root, "--cpu-slices", "1", "--models", "crowd-csrnet", log=tmp_path / "serve.log", grpc=True)
    base = f"http://{gateway.url}"
    body, n = _infer_body(tiny_repo, seed=1)
    image = make_inputs(read_contract(tiny_repo.root / "crowd-csrnet"), 1, seed=2, dims={"height": 16, "width": 16})
    assert gateway.grpc_url is not None
    grpc = grpcclient.InferenceServerClient(url=gateway.grpc_url)
    (worker,) = [p["pid"] for p in httpx.get(f"{base}/v1/partitions").json()["partitions"]]
    os.kill(worker, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(8) as pool:
            binary = [
                pool.submit(httpx.post, base + PATH, content=body, headers={"Inference-Header-Content-Length": str(n)}, timeout=60)
                for _ in range(6)
            ]
            upload = pool.submit(httpx.post, f"{base}/v1/crowd/count", files={"image": ("a.jpg", encode(ASTRONAUT))}, timeout=60)
            call = pool.submit(grpc.infer, "crowd-csrnet", grpc_inputs(image))
            queued = _metric_reaches(base, "migserve_queue_depth", lambda n: n >= 7, timeout=30)  # the first went to the worker
            assert queued >= 7, "all in the gateway"
            stopped = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            refused = False
            while not refused and time.monotonic() - stopped < 5:
                try:
                    httpx.get(f"{base}/v2/health/live", timeout=1)
                    time.sleep(0.05)
                except httpx.ConnectError:
                    refused = True
                except httpx.RemoteProtocolError:  # connected in the listener's backlog just as it closed: the kernel resets it
                    time.sleep(0.05)
            assert refused, "a new connection is refused once the gateway is stopping"
            os.kill(worker, signal.SIGCONT)
            for answer in binary:
                response = answer.result()
                assert response.status_code == 200, response.text
                assert _density({k.lower(): v for k, v in response.headers.items()}, response.content).shape == (1, 1, 2, 2)
            counted = upload.result()
            assert counted.status_code == 200 and counted.json()["count"] >= 0, counted.text
            assert call.result().as_numpy("density").shape == (1, 1, 2, 2)
        assert gateway.process.wait(timeout=30) in (0, -signal.SIGTERM), "it stopped, and was not killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
        grpc.close()
        gateway.close()


def test_a_long_poll_of_a_job_is_answered_when_the_gateway_stops(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """GET /v1/jobs/ID?wait_s=60 waits for the job; a stop answers it at once (the job as it is), where it held the
    stop for its full minute."""
    gateway = Gateway(tiny_repo.root, "--cpu-slices", "1", "--models", "lns-organs", "lns-stations", log=tmp_path / "serve.log")
    base = f"http://{gateway.url}"
    (worker,) = [p["pid"] for p in httpx.get(f"{base}/v1/partitions").json()["partitions"]]
    os.kill(worker, signal.SIGSTOP)  # the job waits for its first tiles until the end
    try:
        files = {"volume": ("ct.nii.gz", nifti_gz(np.zeros((60, 60, 40), np.int16), np.diag([1.5, 1.5, 2.5, 1.0])))}
        submitted = httpx.post(f"{base}/v1/lns/segment", files=files, data={"mode": "job"}, timeout=60)
        assert submitted.status_code == 202, submitted.text
        with ThreadPoolExecutor(1) as pool:
            poll = pool.submit(httpx.get, base + submitted.json()["status_url"], params={"wait_s": 60}, timeout=90)
            time.sleep(0.5)
            assert not poll.done(), "the poll waits"
            stopped = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            answer = poll.result()
            answered = time.monotonic() - stopped
        assert answer.status_code == 200 and answer.json()["state"] == "running", answer.text
        assert answered < 20, f"the poll held the stop for {answered:.1f} s"
        os.kill(worker, signal.SIGCONT)
        assert gateway.process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
        gateway.close()
