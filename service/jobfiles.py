"""Jobs kept in a directory (`serve --jobs-dir`), so that a gateway started again still answers for them.

Each job is `ID.json`, its state as `GET /v1/jobs/ID` shows it and the result's summary, written when it is
submitted, as it is resumed and as it ends; a finished job's result bytes (a label map) are `ID.result`, and a job
submitted as a job (202) keeps its upload, as the client sent it, in `ID.input` while it runs, so that it can be run
again, and the parts of its work done so far that it keeps (`Parts`: a CT job's organ labels, `ID.organs.npy`), so
that it is run again from there. A job dropped for room or deleted leaves `ID.json` saying so, until its time runs out. Each is written to
a temporary name first and then renamed, so a reader sees a whole file or none. A gateway holds an exclusive lock
on `.lock` in the directory while it runs: a second gateway on the same directory refuses to start. At start, the
gateway takes up what the last one left: finished jobs are answered as before until their time runs out, a job
still running when that gateway stopped or died is run again from its upload (service/jobs.py), and one without an
upload is failed, saying so, instead of being unknown.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from migserve.types import Array

from .errors import (
    BadRequest,
    DeadlineExpired,
    Gone,
    HeadTooLarge,
    InferenceFailed,
    NotFound,
    NotReady,
    NotSupported,
    ReceiveTimeout,
    ServiceError,
    TooLarge,
    Unavailable,
    Unprocessable,
    UnsupportedMedia,
)

logger = logging.getLogger(__name__)

JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as JobStore makes them
ERRORS: dict[int, type[ServiceError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        NotFound,
        ReceiveTimeout,
        NotReady,
        Gone,
        TooLarge,
        UnsupportedMedia,
        Unprocessable,
        HeadTooLarge,
        Unavailable,
        DeadlineExpired,
        InferenceFailed,
        NotSupported,
    )
}


class JobsDirUnusable(ServiceError):
    """The directory cannot be made or written, or another gateway keeps its jobs there (`serve` refuses to start)."""


@dataclass(frozen=True)
class KeptResult:
    """A finished job's result kept in a file: its summary in memory, its bytes read when asked for."""

    summary: dict[str, Any]
    path: Path
    nbytes: int  # the file's size, counted against --job-results-mb as a result in memory is

    def payload(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"the job's result file {self.path} is gone from --jobs-dir") from None


@dataclass(frozen=True)
class Record:
    """A job as its file has it."""

    id: str
    kind: str
    stage: str
    done: int
    total: int
    created: float
    finished: float | None
    error: ServiceError | None
    result: KeptResult | None
    resumable: bool = False  # its upload is kept (ID.input)
    paused: bool = False  # the gateway running it stopped cleanly (not killed), saying so
    interrupted: int = 0  # gateways killed while it ran (a job that kills every gateway is not run a third time)
    resumes: int = 0  # times a gateway started again ran it from its upload


def error_of(view: dict[str, Any] | None) -> ServiceError | None:
    """The error a record's view holds, of the class its status names."""
    if view is None:
        return None
    return ERRORS.get(int(view["status"]), ServiceError)(str(view["message"]))


@dataclass(frozen=True)
class Parts:
    """Where a job kept with its upload keeps the parts of its work it has done (Progress.parts): run again after a
    restart, it takes them instead of doing that work again. A part that cannot be written is logged and the job goes
    on; one that cannot be read (a file cut short) counts as not there. Called in a thread: a part is megabytes."""

    files: JobFiles
    job_id: str

    def save(self, name: str, array: Array) -> None:
        try:
            self.files.write_part(self.job_id, name, array)
        except OSError as exc:
            logger.error("job %s: cannot keep its %s in --jobs-dir (%s): run again, it does that part again", self.job_id, name, exc)

    def load(self, name: str) -> Array | None:
        try:
            return self.files.read_part(self.job_id, name)
        except (OSError, ValueError) as exc:
            logger.warning("job %s: its kept %s cannot be read (%s): it does that part again", self.job_id, name, exc)
            return None


class JobFiles:
    def __init__(self, directory: Path, lock: int) -> None:
        self.directory = directory
        self._lock = lock

    @classmethod
    def open(cls, directory: Path) -> JobFiles:
        """The directory made if needed and locked; JobsDirUnusable where another gateway holds it."""
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # label maps of patients: the gateway's user's alone
            lock = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JobsDirUnusable(f"--jobs-dir {directory}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(lock)
            raise JobsDirUnusable(
                f"--jobs-dir {directory} is in use by another gateway (pid {holder}): each gateway needs a directory of its own"
            ) from None
        os.ftruncate(lock, 0)
        os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
        return cls(directory, lock)

    def close(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)  # and with it the lock
            self._lock = -1

    def write_record(self, view: dict[str, Any], summary: dict[str, Any] | None, resuming: dict[str, Any] | None = None) -> None:
        """`view` is Job.view(); `summary` the result's, where it finished with one; `resuming` what a job kept to be run
        again has besides (Record's resumable, paused, interrupted)."""
        self._replace(self.directory / f"{view['id']}.json", json.dumps(view | {"summary": summary} | (resuming or {})).encode())

    def write_input(self, job_id: str, data: bytes) -> None:
        """The job's upload, as the client sent it, to run it again after a restart."""
        self._replace(self._input(job_id), data)

    def read_input(self, job_id: str) -> bytes:
        return self._input(job_id).read_bytes()

    def remove_kept(self, job_id: str) -> None:
        """The upload and parts of a job that ended; one that cannot be removed is logged (the next start removes it)."""
        for kept in [self._input(job_id), *self.directory.glob(f"{job_id}.*.npy")]:
            try:
                kept.unlink(missing_ok=True)
            except OSError as exc:
                logger.error("job %s: cannot remove %s from --jobs-dir: %s", job_id, kept.name, exc)

    def _input(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.input"

    def write_gone(self, job_id: str, when: float, why: str) -> None:
        """What the job's URL says now that it is gone (dropped for room, or deleted), from `when` on."""
        self._replace(self.directory / f"{job_id}.json", json.dumps({"id": job_id, "gone": why, "when": when}).encode())

    def write_result(self, job_id: str, summary: dict[str, Any], payload: bytes) -> KeptResult:
        path = self.directory / f"{job_id}.result"
        self._replace(path, payload)
        return KeptResult(summary, path, len(payload))

    def remove(self, job_id: str) -> None:
        for suffix in (".json", ".result"):
            (self.directory / f"{job_id}{suffix}").unlink(missing_ok=True)
        self.remove_kept(job_id)

    def write_part(self, job_id: str, name: str, array: Array) -> None:
        self._replace(self.directory / f"{job_id}.{name}.npy", lambda out: np.save(out, array, allow_pickle=False))

    def read_part(self, job_id: str, name: str) -> Array | None:
        path = self.directory / f"{job_id}.{name}.npy"
        if not path.exists():
            return None
        return np.asarray(np.load(path, allow_pickle=False))

    def _replace(self, path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
        """`data` (or what `data` writes) to `path`, through a temporary name: a reader sees a whole file or none."""
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:  # noqa: PTH123 (a mode)
                if isinstance(data, bytes):
                    out.write(data)
                else:
                    data(out)
            temporary.replace(path)
        except OSError:
            temporary.unlink(missing_ok=True)  # a full disk: no half-written upload left taking room
            raise

    def records(self) -> tuple[list[Record], dict[str, tuple[float, str]]]:
        """Every job the directory holds, oldest first, and the jobs gone (id -> when, why); a file that cannot be read
        is left, with a warning (and one a gateway was writing when it died, removed)."""
        for partial in self.directory.glob(".*.tmp"):
            partial.unlink(missing_ok=True)
        records, gone = [], {}
        for path in self.directory.glob("*.json"):
            if not JOB_ID.fullmatch(path.stem):
                continue
            try:
                view = json.loads(path.read_bytes())
                if "gone" in view:
                    gone[path.stem] = (float(view["when"]), str(view["gone"]))
                else:
                    records.append(self._record(path, view))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("--jobs-dir: %s is not a job this gateway wrote (%s: %s); left as it is", path, type(exc).__name__, exc)
        for kept in [*self.directory.glob("*.input"), *self.directory.glob("*.*.npy")]:  # their job's file gone: unused
            job_id = kept.name.split(".")[0]
            if JOB_ID.fullmatch(job_id) and not (self.directory / f"{job_id}.json").exists():
                kept.unlink(missing_ok=True)
        return sorted(records, key=lambda r: r.created), gone

    def _record(self, path: Path, view: dict[str, Any]) -> Record:
        result_path = path.with_suffix(".result")
        result = None
        if view["summary"] is not None and result_path.exists():
            result = KeptResult(view["summary"], result_path, result_path.stat().st_size)
        return Record(
            id=str(view["id"]),
            kind=str(view["kind"]),
            stage=str(view["stage"]),
            done=int(view["progress"]["done"]),
            total=int(view["progress"]["total"]),
            created=float(view["created"]),
            finished=None if view["finished"] is None else float(view["finished"]),
            error=error_of(view["error"]),
            result=result,
            resumable=bool(view.get("resumable")) and self._input(path.stem).exists(),
            paused=bool(view.get("paused")),
            interrupted=int(view.get("interrupted", 0)),
            resumes=int(view.get("resumes", 0)),
        )
