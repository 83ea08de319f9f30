"""A real `tritonserver` (the binary in the nvidia-pytriton wheel) started on free local ports for tests.

As shared/FACTS.md says: a clean environment, LD_LIBRARY_PATH at the wheel's
libraries, and a backend directory whose python/ holds libtriton_python.so, its
utils and the 3.11 stub. The models are python-backend twins
(`migserve export --triton-backend python`); MIGSERVE_SITE_PACKAGES tells their
model.py where numpy and onnxruntime are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import site
import subprocess
from collections.abc import Sequence
from pathlib import Path

from bench.ports import free_port
from tests.helpers import GROUP, processes_where, wait_ready

REGION_PREFIX = "/dev/shm/triton_python_backend_shm_region_"


def _pytriton() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def backend_directory(root: Path) -> Path:
    """A backends folder with the python backend and the 3.11 stub beside it."""
    source = _pytriton()
    python = root / "backends" / "python"
    if not python.is_dir():
        python.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(source / "backends" / "python" / name, python / name)
        shutil.copy2(source / "python_backend_stubs" / "3.11" / "triton_python_backend_stub", python / "triton_python_backend_stub")
    return root / "backends"


class TritonServer:
    def __init__(self, repo: Path, workdir: Path, *, log: Path) -> None:
        self.repo = repo
        self.workdir = workdir
        self.log = log
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.home = workdir / "home"  # the server's HOME and TMPDIR, where nothing should write (test_offline.py)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 120, prefix: Sequence[str] = ()) -> None:
        """prefix: a command that execs the rest (e.g. taskset, to serve on some cores)."""
        source = _pytriton()
        libs = source.parent.parent / "nvidia_pytriton.libs"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "TMPDIR": str(self.home),
            "LD_LIBRARY_PATH": str(libs),
            "MIGSERVE_SITE_PACKAGES": ":".join(site.getsitepackages()),
        }
        command = [
            *prefix,
            str(source / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={backend_directory(self.workdir)}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
            "--exit-timeout-secs=3",
        ]
        self.home.mkdir(exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(self.url, self.process, self.log, "tritonserver", timeout)
        except RuntimeError:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL the server and its python stubs, as a crash would. Its python backend's shared memory regions
        (1 MiB each, one per model instance) are left behind by a killed server: they are removed here, those its
        processes had mapped (another server's, in another test process or suite on this host, are not touched)."""
        if self.process is not None and self.process.poll() is None:
            regions = _backend_regions(processes_where(GROUP, self.process.pid))
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            for region in regions:
                region.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def _backend_regions(pids: set[int]) -> set[Path]:
    """The python backend's /dev/shm regions that processes `pids` have mapped."""
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                path = line.split(maxsplit=5)[-1]
                if path.startswith(REGION_PREFIX):
                    found.add(Path(path))
    return found
