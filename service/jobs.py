"""Long requests as jobs: `202 Accepted` with a status URL that reports progress, then the result.

A job is an asyncio task in the gateway process. At most `max_running` run at
once (more are answered 503 with Retry-After); finished jobs are kept for
`ttl_s` and then forgotten, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

from .errors import NotFound, ServiceError, Unavailable

logger = logging.getLogger(__name__)
T = TypeVar("T")


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Progress:
    """Shared with the work: it counts units done out of total, and names its current stage."""

    total: int
    done: int = 0
    stage: str = "starting"

    def advance(self) -> None:
        self.done += 1


@dataclass(eq=False)
class Job(Generic[T]):
    id: str
    kind: str
    progress: Progress
    created: float = field(default_factory=time.time)
    finished: float | None = None
    result: T | None = None
    error: ServiceError | None = None
    task: asyncio.Task[None] | None = None

    @property
    def state(self) -> JobState:
        if self.error is not None:
            return JobState.FAILED
        return JobState.DONE if self.finished is not None else JobState.RUNNING

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state.value,
            "stage": self.progress.stage,
            "progress": {"done": self.progress.done, "total": self.progress.total},
            "created": self.created,
            "finished": self.finished,
            "error": {"status": self.error.status, "message": str(self.error)} if self.error else None,
        }


class JobStore:
    def __init__(self, max_running: int, ttl_s: float) -> None:
        self.max_running = max_running
        self.ttl_s = ttl_s
        self._jobs: dict[str, Job[Any]] = {}

    def running(self) -> int:
        return sum(1 for job in self._jobs.values() if job.state is JobState.RUNNING)

    def submit(self, kind: str, total: int, work: Callable[[Progress], Awaitable[T]]) -> Job[T]:
        self._forget_expired()
        if self.running() >= self.max_running:
            raise Unavailable(f"{self.max_running} jobs are already running; try again later", retry_after_s=5.0)
        job: Job[T] = Job(id=uuid.uuid4().hex, kind=kind, progress=Progress(total))
        job.task = asyncio.get_running_loop().create_task(self._run(job, work), name=f"job-{job.id}")
        self._jobs[job.id] = job
        return job

    async def _run(self, job: Job[T], work: Callable[[Progress], Awaitable[T]]) -> None:
        try:
            job.result = await work(job.progress)
            job.progress.stage = "done"
        except ServiceError as exc:
            job.error = exc
        except asyncio.CancelledError:
            job.error = job.error or ServiceError("cancelled: the server is shutting down")
            raise
        except Exception as exc:
            logger.exception("job %s (%s) failed", job.id, job.kind)
            job.error = ServiceError(f"{job.kind} failed: {type(exc).__name__}: {exc}")
        finally:
            job.finished = time.time()

    def cancel(self, job: Job[Any], why: str) -> None:
        """Stop a running job; it is kept as failed with `why` (its tiles leave the batch queues)."""
        if job.task is not None and not job.task.done():
            job.error = ServiceError(why)
            job.task.cancel()

    def get(self, job_id: str) -> Job[Any]:
        self._forget_expired()
        if job_id not in self._jobs:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept for {self.ttl_s:.0f} s)")
        return self._jobs[job_id]

    async def wait(self, job: Job[T]) -> T:
        """The job's result, or its error raised."""
        if job.task is not None:
            await asyncio.shield(job.task)
        if job.error is not None:
            raise job.error
        if job.result is None:
            raise ServiceError(f"job {job.id} finished without a result")
        return job.result

    def _forget_expired(self) -> None:
        cutoff = time.time() - self.ttl_s
        for job_id in [j.id for j in self._jobs.values() if j.finished is not None and j.finished < cutoff]:
            del self._jobs[job_id]

    async def stop(self) -> None:
        for job in self._jobs.values():
            if job.task is not None:
                job.task.cancel()
