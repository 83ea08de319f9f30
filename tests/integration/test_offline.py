"""No network at run time: onnxruntime's own usage events stay off in every process migserve runs.

onnxruntime's Linux wheels record events in ~/.cache/Microsoft/DeveloperTools/.onnxruntime (and a .ses file in
TMPDIR) and upload them unless ORT_DISABLE_TELEMETRY is set before onnxruntime is imported (migserve/__init__.py).
There is no network here to watch, so these tests watch the files that come before any upload: with HOME and TMPDIR
pointed at empty folders, a process that left telemetry on leaves them there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from exporters.triton import switch_backend
from migserve.contract import read_contract
from tests.helpers import MIGSERVE, ROOT, ExportedRepo, Gateway
from tests.integration.test_gateway_protocol import make_inputs, triton_inputs
from tests.triton_server import TritonServer

# onnxruntime also stays quiet where one of these says it runs under a CI service (the names are in its library next
# to ORT_DISABLE_TELEMETRY; `CI=true` alone turns it off). The project's CI sets one, so they are removed here: with
# them left in, the control below would fail there and the checks after it could not fail.
CI_MARKERS = {
    "CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL", "CODEBUILD_BUILD_ID",
    "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER",
}  # fmt: skip


def _bare_environment(tmp_path: Path) -> tuple[dict[str, str], list[Path]]:
    """This environment without the opt-out (the tests' own process has it) or a CI service's marks, HOME and TMPDIR
    in empty folders."""
    folders = [tmp_path / "home", tmp_path / "tmp"]
    for folder in folders:
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in {"ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME"} | CI_MARKERS}
    return env | {"HOME": str(folders[0]), "TMPDIR": str(folders[1])}, folders  # its cache is $XDG_CACHE_HOME or ~/.cache


def _telemetry(folders: list[Path]) -> list[str]:
    return sorted(str(p) for folder in folders for p in folder.rglob("*") if "onnxruntime" in str(p) or p.name.endswith(".ses"))


def test_onnxruntime_left_alone_writes_telemetry_so_the_checks_below_can_fail(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    env, folders = _bare_environment(tmp_path)
    model = tiny_repo.root / "crowd-csrnet" / "1" / "model.onnx"
    script = f"import onnxruntime; onnxruntime.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])"
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    assert _telemetry(folders), "onnxruntime wrote no telemetry files: the tests in this file no longer show anything"


def test_exporting_and_serving_write_no_onnxruntime_telemetry(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    env, folders = _bare_environment(tmp_path)
    export = [MIGSERVE, "export", "--model", "crowd-csrnet", "--out", str(tmp_path / "repo")]
    subprocess.run(export, cwd=ROOT, env=env, check=True, capture_output=True)  # parity runs onnxruntime
    server = Gateway(tiny_repo.root, "--cpu-slices", "1,1", "--models", "crowd-csrnet", log=tmp_path / "serve.log", env=env)
    try:
        inputs = make_inputs(read_contract(tiny_repo.root / "crowd-csrnet"), batch=1, seed=0)
        body = {"inputs": [{"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.ravel().tolist()} for n, a in inputs.items()]}
        response = httpx.post(f"http://{server.url}/v2/models/crowd-csrnet/infer", json=body, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        server.close()
    assert _telemetry(folders) == []


def test_a_triton_python_backend_twin_writes_no_onnxruntime_telemetry(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    # The twin's model.py runs in Triton's stub, which migserve's package never reaches: it opts out itself.
    import tritonclient.http as httpclient

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo.root / "crowd-csrnet", repo / "crowd-csrnet")
    assert switch_backend(repo / "crowd-csrnet", read_contract(repo / "crowd-csrnet"), "python")  # as export writes twins
    server = TritonServer(repo, tmp_path, log=tmp_path / "triton.log")
    server.start()
    try:
        inputs = make_inputs(read_contract(repo / "crowd-csrnet"), batch=1, seed=0)
        result = httpclient.InferenceServerClient(url=server.url).infer("crowd-csrnet", triton_inputs(inputs))
        assert result.as_numpy("density") is not None
    finally:
        server.stop()
    assert server.home.is_dir() and _telemetry([server.home]) == []
