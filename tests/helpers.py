"""Helpers shared by the test folders: running the CLI as a user does."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import tritonclient.http as httpclient

from bench.ports import free_port
from migserve.types import Array

ROOT = Path(__file__).resolve().parents[1]
# The installed command, as a user runs it. `python -m migserve` would also import what the working directory
# holds (tests/, say), which the installed command cannot: `migserve bench profile --mode gateway` once failed so.
MIGSERVE = str(Path(sys.executable).with_name("migserve"))
T = TypeVar("T")


def with_http_client(url: str, call: Callable[[httpclient.InferenceServerClient], T]) -> T:
    """`call` on a tritonclient HTTP client made for it and closed after: one left to the garbage collector closes
    its gevent pool from whichever thread collects it, and fails there (an unraisable error in another test)."""
    client = httpclient.InferenceServerClient(url=url)
    try:
        return call(client)
    finally:
        client.close()


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def migserve(*args: str | Path, cwd: Path = ROOT, timeout: float = 600) -> CliRun:
    """Run the CLI in a fresh interpreter, as a user would."""
    proc = subprocess.run([MIGSERVE, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    return CliRun(proc.returncode, proc.stdout, proc.stderr)


def migserve_imports(module: str, *args: str) -> tuple[CliRun, bool]:
    """The CLI's `main(args)` in a fresh interpreter (its exit status as `returncode`), and whether it imported
    `module` (e.g. torch, which takes seconds)."""
    code = f"import sys; from migserve.cli import main; code = main({list(args)!r}); print(code, {module!r} in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    status, imported = proc.stdout.splitlines()[-1].split() if proc.stdout else ("-1", "True")
    return CliRun(int(status), proc.stdout, proc.stderr), imported == "True"


@dataclass(frozen=True)
class ExportedRepo:
    root: Path
    run: CliRun


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, what: str, timeout: float) -> None:
    """Until GET /v2/health/ready answers 200; RuntimeError with the log's tail if the process exits or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """Processes started in this block get SIGINT's default action, as a terminal's do, whatever this process has: an
    ignored signal stays ignored across exec, a handled one is reset to the default."""
    was = signal.getsignal(signal.SIGINT)
    if was is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if was is signal.SIG_IGN:
            signal.signal(signal.SIGINT, was)


def shm_key(name: str) -> str:
    """A /dev/shm key of this test process's own: two suites on one host share /dev/shm, and a fixed key let one
    write into, or unlink, the other's region (tritonclient opens a key that is there instead of refusing it)."""
    return f"/migserve_test_{os.getpid()}_{name}"


def ipv6_loopback() -> bool:
    """Whether this host can bind its IPv6 loopback address (some containers have no IPv6)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class Gateway:
    """A real `migserve serve` process on a free local port; stopped on close."""

    def __init__(
        self,
        repo: Path,
        *args: str,
        log: Path,
        grpc: bool = False,
        new_session: bool = False,
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log = log
        # prefix: a command that execs the rest (e.g. unshare, to serve in a mount namespace of its own)
        command = [*prefix, MIGSERVE, "serve", "--model-repo", str(repo), "--port", str(self.port), *args]
        self.grpc_url: str | None = None  # host:port of its gRPC endpoint, when asked for
        if grpc:
            grpc_port = free_port()
            self.grpc_url = f"127.0.0.1:{grpc_port}"
            command += ["--grpc-port", str(grpc_port)]
        self._out = log.open("w")
        # new_session: a process group of its own, as a terminal's foreground job, to signal it as Ctrl-C does; and
        # SIGINT's default action, as a terminal gives, whatever this process inherited (a job a shell put in the
        # background, as some CI runners do, starts with SIGINT ignored, and so would the gateway)
        with sigint_not_ignored() if new_session else contextlib.nullcontext():
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=new_session
            )
        try:
            wait_ready(self.url, self.process, log, "gateway", 120)
        except RuntimeError:
            self.close()
            raise

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._out.close()


Replies = dict[str, tuple[str | None, int]]
SmiRun = Callable[..., tuple[CliRun, list[str]]]
LOCAL_NVIDIA_FIXTURES = ROOT / "tests" / "fixtures" / "nvidia"


@dataclass(frozen=True)
class FakeSmi:
    """nvidia-smi replaced by a replay of captured outputs (shared/fixtures/nvidia and tests/fixtures/nvidia):
    `MIGSERVE_NVIDIA_SMI` and the replay's settings in `env`, the calls it was given in `calls`."""

    wrapper: Path
    captured: Path
    log: Path

    def env(self, replies: Replies, slow: Mapping[str, float] | None = None) -> dict[str, str]:
        """`slow`: seconds a call takes before it answers (its end logged too, as "ARGS (finished)")."""
        return os.environ | {
            "MIGSERVE_NVIDIA_SMI": str(self.wrapper),
            "FAKE_SMI_DIR": str(self.captured),
            "FAKE_SMI_REPLIES": json.dumps(replies),
            "FAKE_SMI_SLOW": json.dumps(slow or {}),
            "FAKE_SMI_LOG": str(self.log),
        }

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def fake_smi(shared: Path, tmp_path: Path) -> FakeSmi:
    captured = tmp_path / "captured"
    captured.mkdir()
    for folder in (shared / "fixtures" / "nvidia", LOCAL_NVIDIA_FIXTURES):
        for path in folder.glob("*.txt"):
            shutil.copy(path, captured / path.name)
    wrapper = tmp_path / "nvidia-smi"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_nvidia_smi.py"}" "$@"\n')
    wrapper.chmod(0o755)
    return FakeSmi(wrapper, captured, tmp_path / "calls.log")


def fake_smi_runner(shared: Path, tmp_path: Path) -> SmiRun:
    """`run(replies, *migserve_args)`: the CLI with nvidia-smi replaced by the replay (`fake_smi`); returns the run and
    the nvidia-smi calls it made."""
    smi = fake_smi(shared, tmp_path)

    def run(replies: Replies, *args: str | Path) -> tuple[CliRun, list[str]]:
        smi.log.write_text("")
        command = [MIGSERVE, *map(str, args)]
        done = subprocess.run(command, cwd=ROOT, env=smi.env(replies), capture_output=True, text=True, check=False)
        return CliRun(done.returncode, done.stdout, done.stderr), smi.calls()

    return run


def read_response(reader: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a socket's reader (interim 100s skipped): status, headers by lower-case name, body."""
    while True:
        status_line = reader.readline()
        assert status_line, "the connection closed before a response"
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 100:
            return status, headers, reader.read(int(headers.get("content-length", "0")))


def small_dev_shm(size: str) -> tuple[str, ...] | None:
    """A command prefix that runs the rest with a /dev/shm of `size` (e.g. "6m") of its own, in a mount namespace:
    what a container's small /dev/shm does. None where this machine cannot (not root, no unshare, no mount)."""
    prefix = ("unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"', "sh")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
    return prefix if probe.returncode == 0 else None


def assert_equal_but_rounding(got: Array, expected: Array) -> None:
    """Equal up to float32 rounding, as a run of a different number of rows gives (onnxruntime's kernels block the
    rows differently): a few units in the last place of the output's largest value."""
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


PARENT, GROUP = 1, 2  # fields of /proc/PID/stat after the command name: the parent's pid, the process group


def processes_where(field: int, value: int) -> set[int]:
    """Processes whose /proc/PID/stat `field` (PARENT, GROUP) is `value`; those that end meanwhile are left out."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[field]) == value:
                found.add(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Whether process `pid` is there and not a zombie (one ended whose parent has not reaped it yet)."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def thread_affinities(pid: int) -> set[tuple[int, ...]]:
    """The cores each thread of process `pid` may run on, as sorted tuples (one entry per distinct mask); none for a
    process that has ended."""
    found: set[tuple[int, ...]] = set()
    with contextlib.suppress(FileNotFoundError):
        for thread in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                found.add(tuple(sorted(os.sched_getaffinity(int(thread.name)))))
    return found
