"""Long requests as jobs: `202 Accepted` with a status URL that reports progress, then the result.

A job is an asyncio task in the gateway process. At most `max_running` run at
once, and together they hold at most `max_bytes` by their own estimates (`submit`'s
`nbytes`): past either, more are answered 503 with Retry-After, and a job that would
pass `max_bytes` alone 413. Finished jobs are kept for
`ttl_s` and then forgotten, and their results (a label map is megabytes) together
take at most `max_kept_bytes`: past it the oldest finished jobs are dropped first,
so memory stays bounded however fast jobs finish. A dropped job's URL says why.

With a directory (`serve --jobs-dir`, `keep_in`), every job is also written there as it is
submitted and as it ends, and a finished result's bytes go to a file instead of staying in
memory (service/jobfiles.py): a gateway started again on the directory answers for the jobs the
last one finished. A job submitted with its upload (`submit_kept`: a CT volume sent as a job) keeps
the upload there while it runs, and a gateway started again runs such a job again from the start
(`resume_pending`, by its kind's resumer), under the same id; one that was running in gateways killed
twice (MAX_INTERRUPTED) is failed instead, so that an upload that kills the gateway does not kill
every gateway after it. Of a job without an upload, it says that it was stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from migserve.types import Array

from .config import MB
from .errors import Gone, NotFound, ServiceError, TooLarge, Unavailable
from .jobfiles import JobFiles, Parts, Record

logger = logging.getLogger(__name__)
T = TypeVar("T")
STOP_WAIT_S = 5.0  # how long a stop waits for the jobs it cancels to end
MAX_INTERRUPTED = 1  # gateways killed under a job (not stopped) after which it is not run again


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Kept(Protocol):
    """Where a job keeps the parts of its work it has done, to take them when it is run again (jobfiles.Parts)."""

    def save(self, name: str, array: Array) -> None: ...

    def load(self, name: str) -> Array | None: ...


@dataclass
class Progress:
    """Shared with the work: it counts units done out of total, and names its current stage; and for a job kept with
    its upload in --jobs-dir, `parts` keeps what it has done (called in a thread), for when it is run again."""

    total: int
    done: int = 0
    stage: str = "starting"
    parts: Kept | None = None

    def advance(self) -> None:
        self.done += 1


@runtime_checkable
class Measured(Protocol):
    """A result that says how many bytes it holds."""

    @property
    def nbytes(self) -> int: ...


def stopped(progress: Progress) -> Unavailable:
    """Why a job the gateway was running when it stopped has no result."""
    return Unavailable(f"the gateway stopped while this job ran ({progress.done}/{progress.total} tiles done); send it again")


@dataclass(frozen=True)
class Plan(Generic[T]):
    """What a job runs: `work` over `total` units, holding about `nbytes` of memory until it ends."""

    total: int
    work: Callable[[Progress], Awaitable[T]]
    nbytes: int = 0


# A kind's job again (JobStore.resumer), given how to read its upload (in a thread) and its progress (to name a stage
# it waits in); ServiceError where it cannot be run here.
Resumer = Callable[[Callable[[], bytes], "Progress"], Awaitable[Plan[Any]]]


@runtime_checkable
class Keepable(Protocol):
    """A result a directory can keep: a summary (JSON) and bytes (a label map)."""

    @property
    def summary(self) -> dict[str, Any]: ...

    def payload(self) -> bytes: ...  # a method: isinstance on a runtime protocol reads every property (Python 3.11)


@dataclass(frozen=True)
class Answer:
    """A finished job's answer: what its URL shows (JSON) and its bytes (a label map), as a directory keeps them."""

    summary: dict[str, Any]
    data: bytes

    @property
    def nbytes(self) -> int:  # counted against --job-results-mb
        return len(self.data)

    def payload(self) -> bytes:
        return self.data


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
    reserved: int = 0  # of JobStore.max_bytes, while it runs
    cancelled: bool = False  # it ended by a cancel (deleted, its synchronous client gone, the gateway stopping)
    resumable: bool = False  # its upload is kept in --jobs-dir while it runs, to run it again after a restart
    interrupted: int = 0  # gateways killed while it ran
    resumes: int = 0  # times a gateway started again ran it from its upload
    paused: bool = False  # stopped with the gateway, left running in --jobs-dir for the next one to run again
    over: bool = False  # its task has ended (done, failed, cancelled or paused)

    @property
    def nbytes(self) -> int:
        return self.result.nbytes if isinstance(self.result, Measured) else 0

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
            "resumes": self.resumes,
        }


class JobStore:
    def __init__(
        self, max_running: int, ttl_s: float, max_kept_bytes: int, max_bytes: int, on_end: Callable[[Job[Any], str], None] | None = None
    ) -> None:
        self.max_running = max_running
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_kept_bytes = max_kept_bytes
        self._jobs: dict[str, Job[Any]] = {}  # in the order they were submitted
        self._gone: dict[str, tuple[float, str]] = {}  # job id -> when it was dropped for room or deleted, and why (for ttl_s)
        self._files: JobFiles | None = None  # serve --jobs-dir
        self._on_end = on_end  # told of each job that ends, and how: "done", "failed" or "cancelled" (the gateway's metrics)
        self._stopping = asyncio.Event()  # set as the gateway begins to stop: long polls answer at once
        self._resumers: dict[str, Resumer] = {}
        self._pending: list[Job[Any]] = []  # taken up from --jobs-dir to be run again (resume_pending)
        self._resuming = asyncio.Lock()  # one resumed job's upload read and decoded at a time

    def keep_in(self, directory: Path) -> None:
        """Keep every job in `directory` from now on, and take up what a gateway before this one left there (JobsDirUnusable
        where another gateway holds it)."""
        self._files = files = JobFiles.open(directory)
        now, taken = time.time(), 0
        records, gone = files.records()
        for job_id, (when, why) in gone.items():
            if when < now - self.ttl_s:
                files.remove(job_id)
            else:
                self._gone[job_id] = (when, why)
        for record in records:
            if record.finished is not None and record.finished < now - self.ttl_s:
                files.remove(record.id)
                continue
            job = self._taken_up(record, now)
            self._jobs[job.id], taken = job, taken + 1
            if job.state is JobState.RUNNING:
                self._pending.append(job)  # its file is written again as it is run again, counting a kill
                continue
            if record.resumable:  # not to be run again (or the last gateway stopped as the job ended): its upload goes
                files.remove_kept(record.id)
            if record.finished is None or job.error is not record.error:
                self._write(job)
        self._make_room()
        if taken:
            logger.info("%d jobs taken up from --jobs-dir %s", taken, directory)

    @staticmethod
    def _taken_up(record: Record, now: float) -> Job[Any]:
        """A job as the last gateway left it: one it was running, kept with its upload, left running to be run again
        (unless gateways were killed under it more than MAX_INTERRUPTED times); one without, failed, saying so; one whose
        result file went, too."""
        job: Job[Any] = Job(
            id=record.id,
            kind=record.kind,
            progress=Progress(record.total, record.done, record.stage),
            created=record.created,
            finished=record.finished,
            result=record.result,
            error=record.error,
        )
        interrupted = record.interrupted + (0 if record.paused else 1)
        if record.finished is None and record.resumable and interrupted <= MAX_INTERRUPTED:
            job.resumable, job.interrupted, job.resumes = True, interrupted, record.resumes
            job.progress = Progress(record.total, 0, "resuming")
        elif record.finished is None and record.resumable:
            job.finished, job.resumes = now, record.resumes
            job.error = ServiceError(
                f"the gateway was killed {interrupted} times while this job ran, so it is not run again: send it again, and "
                "see what killed the gateway (the kernel's OOM killer?)"
            )
        elif record.finished is None:
            job.finished, job.error = now, stopped(job.progress)
        elif record.error is None and record.result is None:
            job.error = ServiceError("its result was lost: the file is gone from --jobs-dir; send it again")
        return job

    def _write(self, job: Job[Any]) -> None:
        """The job's state to its file, where jobs are kept in a directory; a failed write is logged, the job goes on. A
        paused job's view says it is running, as it is for the next gateway."""
        if self._files is None:
            return
        resuming = {"resumable": True, "paused": job.paused, "interrupted": job.interrupted} if job.resumable else None
        try:
            self._files.write_record(job.view(), job.result.summary if isinstance(job.result, Keepable) else None, resuming)
        except OSError as exc:
            logger.error("job %s: cannot write its state to --jobs-dir: %s", job.id, exc)

    async def _kept(self, job: Job[Any], result: T) -> Any:
        """The result written to its file and dropped from memory, where jobs are kept in a directory (else itself)."""
        files = self._files
        if files is None or not isinstance(result, Keepable):
            return result
        try:
            return await asyncio.to_thread(files.write_result, job.id, result.summary, result.payload())
        except OSError as exc:
            logger.error("job %s: cannot write its result to --jobs-dir, kept in memory: %s", job.id, exc)
            return result

    def running(self) -> int:
        return sum(1 for job in self._jobs.values() if job.state is JobState.RUNNING)

    def reserved(self) -> int:
        """What the running jobs hold, by their estimates."""
        return sum(job.reserved for job in self._jobs.values())

    def submit(
        self,
        kind: str,
        total: int,
        work: Callable[[Progress], Awaitable[T]],
        nbytes: int = 0,
        *,
        job_id: str | None = None,
        resumable: bool = False,
    ) -> Job[T]:
        """Start `work`, which holds about `nbytes` of memory until it ends (`resumable`: its upload is in --jobs-dir
        under `job_id`, submit_kept)."""
        self._forget_expired()
        self._check_room(kind, nbytes)
        job: Job[T] = Job(id=job_id or uuid.uuid4().hex, kind=kind, progress=Progress(total), reserved=nbytes, resumable=resumable)
        self._start(job, work)
        self._write(job)
        return job

    async def submit_kept(self, kind: str, total: int, work: Callable[[Progress], Awaitable[T]], nbytes: int, upload: bytes) -> Job[T]:
        """As submit, and where jobs are kept in a directory, with `upload` (what the client sent) kept there until the job
        ends: a gateway started again on the directory runs the job again from it (resume_pending). An upload that
        cannot be written (a full disk) is logged, and the job runs without it."""
        files = self._files
        if files is None:
            return self.submit(kind, total, work, nbytes)
        self._check_room(kind, nbytes)  # before writing megabytes for a job that would be refused
        job_id = uuid.uuid4().hex
        try:
            await asyncio.to_thread(files.write_input, job_id, upload)
        except OSError as exc:
            logger.error("job %s: cannot keep its upload in --jobs-dir (%s): a gateway started again will not run it again", job_id, exc)
            return self.submit(kind, total, work, nbytes, job_id=job_id)
        try:
            return self.submit(kind, total, work, nbytes, job_id=job_id, resumable=True)
        except ServiceError:  # the room went to another job while the upload was written
            files.remove_kept(job_id)
            raise

    def resumer(self, kind: str, resumer: Resumer) -> None:
        """How a job of `kind` is run again from its upload (resume_pending)."""
        self._resumers[kind] = resumer

    def resume_pending(self) -> None:
        """Run again the jobs the last gateway on --jobs-dir left running with their uploads, each from the start, under
        its id: called once this gateway serves its models. A job whose kind has no resumer, or whose resumer refuses
        its upload (its models not served here, say), fails, saying why."""
        for job in self._pending:
            if self._jobs.get(job.id) is job:  # not deleted since
                self._start(job, self._resumed(job))
        if self._pending:
            logger.info("%d jobs the last gateway was running are run again from their uploads", len(self._pending))
        self._pending.clear()

    def _resumed(self, job: Job[Any]) -> Callable[[Progress], Awaitable[Any]]:
        """The work of running `job` again: its upload read and planned by its kind's resumer, then that plan's work."""

        async def work(progress: Progress) -> Any:
            async with self._resuming:
                job.resumes += 1
                self._write(job)  # before it runs: a gateway killed while it runs again counts (keep_in)
                plan = await self._plan_again(job)
                job.reserved = plan.nbytes
                progress.total, progress.done, progress.stage = plan.total, 0, "starting"
            return await plan.work(progress)

        return work

    async def _plan_again(self, job: Job[Any]) -> Plan[Any]:
        why = "the gateway stopped while this job ran, and the one started since cannot run it again"
        resumer, files = self._resumers.get(job.kind), self._files
        if resumer is None or files is None:
            raise Unavailable(f"{why}: it runs no {job.kind} jobs; send it again")

        def read() -> bytes:
            try:
                return files.read_input(job.id)
            except OSError as exc:
                raise Unavailable(f"its upload cannot be read from --jobs-dir ({exc.strerror or exc})") from None

        try:
            plan = await resumer(read, job.progress)
            self._check_room(job.kind, plan.nbytes, counted=True)
        except ServiceError as exc:  # its models not served here, or their memory taken: another gateway may run it
            raise Unavailable(f"{why}: {exc}; send it again") from None
        return plan

    def _check_room(self, kind: str, nbytes: int, counted: bool = False) -> None:
        """TooLarge or Unavailable where a job of `kind` holding `nbytes` cannot start now (`counted`: a job run again,
        taken by the last gateway and among those running here already, so bound by its memory alone)."""
        if nbytes > self.max_bytes:
            raise TooLarge(
                f"this {kind} job would hold about {nbytes / MB:.0f} MB of the gateway's memory, over --max-job-mb "
                f"{self.max_bytes / MB:g} even with no other job running"
            )
        if not counted and self.running() >= self.max_running:
            raise Unavailable(f"{self.max_running} jobs are already running; try again later", retry_after_s=5.0)
        if (held := self.reserved()) + nbytes > self.max_bytes:
            raise Unavailable(
                f"the running jobs hold about {held / MB:.0f} MB; this {kind} job's {nbytes / MB:.0f} MB more would pass "
                f"--max-job-mb {self.max_bytes / MB:g}; try again when one has finished",
                retry_after_s=5.0,
            )

    def _start(self, job: Job[T], work: Callable[[Progress], Awaitable[T]]) -> None:
        if job.resumable and self._files is not None:  # what it does is kept as it goes, to be taken when run again
            job.progress.parts = Parts(self._files, job.id)
        job.task = asyncio.get_running_loop().create_task(self._run(job, work), name=f"job-{job.id}")
        job.task.add_done_callback(lambda _: self._ended(job))  # also where it was cancelled before it began
        self._jobs[job.id] = job

    async def _run(self, job: Job[T], work: Callable[[Progress], Awaitable[T]]) -> None:
        try:
            job.result = await self._kept(job, await work(job.progress))
            job.progress.stage = "done"
        except ServiceError as exc:
            job.error = exc
        except asyncio.CancelledError:
            job.cancelled = True
            job.error = job.error or (None if job.paused else stopped(job.progress))
            raise
        except Exception as exc:
            logger.exception("job %s (%s) failed", job.id, job.kind)
            job.error = ServiceError(f"{job.kind} failed: {type(exc).__name__}: {exc}")
        finally:
            self._ended(job)

    def _ended(self, job: Job[Any]) -> None:
        if job.over:
            return
        job.over, job.reserved = True, 0
        job.cancelled = job.cancelled or (job.task is not None and job.task.cancelled())  # or before it began
        if job.paused:  # still running as far as its URL and file say: the next gateway on --jobs-dir runs it again
            job.error, job.progress.stage, outcome = None, "paused", "paused"
        else:
            job.finished = time.time()
            job.error = job.error or (ServiceError("cancelled before it began") if job.result is None else None)
            outcome = "cancelled" if job.cancelled else "failed" if job.error is not None else "done"
        if self._on_end is not None:
            self._on_end(job, outcome)
        self._write(job)
        if job.resumable and not job.paused and self._files is not None:
            self._files.remove_kept(job.id)
        self._make_room()

    def kept_bytes(self) -> int:
        return sum(job.nbytes for job in self._jobs.values())

    def _make_room(self) -> None:
        """Drop the jobs that finished first until the kept results fit max_kept_bytes."""
        kept = self.kept_bytes()
        for job in sorted((j for j in self._jobs.values() if j.finished is not None and j.nbytes), key=lambda j: j.finished or 0):
            if kept <= self.max_kept_bytes:
                break
            kept -= job.nbytes
            self._forget(job.id)
            self._mark_gone(
                job.id,
                f"job {job.id!r} finished, and its result was dropped to keep finished results under "
                f"{self.max_kept_bytes / (1 << 20):.3g} MB (serve --job-results-mb): fetch results sooner after they finish",
            )
            logger.info("dropped finished job %s (%s, %d bytes): finished results are over --job-results-mb", job.id, job.kind, job.nbytes)

    def cancel(self, job: Job[Any], why: str, error: type[ServiceError] = ServiceError) -> None:
        """Stop a running job; it is kept as failed with `why` (its tiles leave the batch queues)."""
        if job.task is not None and not job.task.done():
            job.error = error(why)
            job.task.cancel()

    def get(self, job_id: str) -> Job[Any]:
        self._forget_expired()
        if job_id in self._gone:
            raise NotFound(self._gone[job_id][1])
        if job_id not in self._jobs:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept for {self.ttl_s:.0f} s)")
        return self._jobs[job_id]

    async def ended(self, job_id: str, wait_s: float) -> Job[Any]:
        """The job, once it has ended or `wait_s` has passed (a long poll: GET /v1/jobs/ID?wait_s=)."""
        job = self.get(job_id)
        if job.task is not None and not job.task.done() and wait_s > 0 and not self._stopping.is_set():
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:  # the job goes on if this poll's client leaves
                await asyncio.wait({job.task, stopping}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
        return job

    def stopping(self) -> None:
        """The gateway begins to stop (before it answers the requests in flight): long polls answer now, so that their
        connections do not hold up the stop, and the jobs kept with their uploads are paused now, left in --jobs-dir for
        the next gateway to run again: run on through the stop they would only be paused at its end and run again from
        the start anyway, taking the workers from the requests being answered, or killed with the gateway past its
        grace period (counting against them, _taken_up)."""
        self._stopping.set()
        for job in self._jobs.values():
            if job.resumable and job.task is not None and not job.task.done():
                job.paused = True
                job.task.cancel()

    async def delete(self, job_id: str) -> None:
        """Forget a job and its result (DELETE /v1/jobs/ID); one still running is cancelled first, and its tiles leave
        the batch queues. Its URL then says it was deleted, for ttl_s."""
        job = self.get(job_id)
        task = job.task
        running = task is not None and not task.done()
        if task is not None and running:
            self.cancel(job, f"cancelled: deleted (DELETE /v1/jobs/{job_id})", Gone)
            await asyncio.wait({task}, timeout=STOP_WAIT_S)  # its memory given back as it ends
        if job_id in self._jobs:
            self._forget(job_id)
        self._mark_gone(job_id, f"job {job_id!r} was deleted (DELETE /v1/jobs/{job_id})")
        logger.info("job %s (%s) deleted%s", job_id, job.kind, " while it ran" if running else "")

    async def wait(self, job: Job[T]) -> T:
        """The job's result, or its error raised."""
        if job.task is not None:
            try:
                await asyncio.shield(job.task)
            except asyncio.CancelledError:
                waiting = asyncio.current_task()
                if not job.task.cancelled() or waiting is None or waiting.cancelling():
                    raise  # this wait was cancelled (its client hung up), not the job
        if job.error is not None:
            raise job.error
        if job.result is None:
            raise ServiceError(f"job {job.id} finished without a result")
        return job.result

    def _forget_expired(self) -> None:
        cutoff = time.time() - self.ttl_s
        for job_id in [j.id for j in self._jobs.values() if j.finished is not None and j.finished < cutoff]:
            self._forget(job_id)
        for job_id in [i for i, (when, _) in self._gone.items() if when < cutoff]:
            del self._gone[job_id]
            if self._files is not None:
                self._files.remove(job_id)

    def _mark_gone(self, job_id: str, why: str) -> None:
        """The job's URL says `why` for ttl_s (in --jobs-dir too, for a gateway started again)."""
        self._gone[job_id] = when = (time.time(), why)
        if self._files is not None:
            try:
                self._files.write_gone(job_id, *when)
            except OSError as exc:
                logger.error("job %s: cannot write to --jobs-dir why it is gone: %s", job_id, exc)

    def _forget(self, job_id: str) -> None:
        del self._jobs[job_id]
        if self._files is not None:
            self._files.remove(job_id)

    async def stop(self) -> None:
        """Cancel the running jobs, and wait (STOP_WAIT_S at most) for them to say so in their files: those kept with
        their uploads as still running, to be run again by the next gateway on the directory."""
        self.stopping()
        tasks = [job.task for job in self._jobs.values() if job.task is not None and not job.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_WAIT_S)
        if self._files is not None:
            self._files.close()
