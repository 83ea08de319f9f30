"""Jobs: a synchronous request's job is cancelled when its client leaves, and says why; finished results are bounded; the
running jobs' memory is bounded by their estimates; jobs kept in a directory outlive the gateway."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.errors import Gone, NotFound, TooLarge, Unavailable
from service.jobfiles import JobsDirUnusable, KeptResult
from service.jobs import Answer, Job, JobState, JobStore, Plan, Progress


def test_a_cancelled_job_fails_with_the_reason_and_frees_its_slot() -> None:
    async def scenario() -> None:
        store = JobStore(max_running=1, ttl_s=60, max_kept_bytes=1 << 20, max_bytes=1 << 30)
        started, release = asyncio.Event(), asyncio.Event()

        async def work(progress: Progress) -> str:
            started.set()
            await release.wait()  # a long segmentation, never released here
            return "unreachable"

        job = store.submit("lns-segment", 10, work)
        await started.wait()
        assert store.running() == 1 and job.state is JobState.RUNNING
        store.cancel(job, "cancelled: the client disconnected before the answer")
        await asyncio.wait({job.task} if job.task else set())
        assert job.view()["state"] == JobState.FAILED.value and job.finished is not None
        assert str(job.error) == "cancelled: the client disconnected before the answer"
        assert store.running() == 0  # room for the next job
        store.cancel(job, "again")  # a finished job is left as it is
        assert str(job.error) == "cancelled: the client disconnected before the answer"

    asyncio.run(scenario())


class Labels:
    """A result that holds `nbytes` bytes, as a label map does."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_finished_results_past_the_budget_drop_the_oldest_first_and_say_so() -> None:
    async def scenario() -> None:
        store = JobStore(max_running=4, ttl_s=60, max_kept_bytes=250, max_bytes=1 << 30)

        def finishing(nbytes: int) -> Job[Labels]:
            async def work(progress: Progress) -> Labels:
                return Labels(nbytes)

            return store.submit("lns-segment", 1, work)

        jobs = []
        for nbytes in (100, 100, 0, 100):  # a failed or empty result holds nothing
            job = finishing(nbytes)
            assert job.task is not None
            await job.task
            jobs.append(job)
        assert store.kept_bytes() == 200
        with pytest.raises(NotFound, match=r"finished, and its result was dropped to keep finished results under 0.000238 MB"):
            store.get(jobs[0].id)
        assert [store.get(j.id) for j in jobs[1:]] == jobs[1:]
        with pytest.raises(NotFound, match="no job 'nope'"):
            store.get("nope")

    asyncio.run(scenario())


def test_running_jobs_hold_their_memory_within_the_bound_until_each_ends() -> None:
    """--max-job-mb: a job is started only where what the running jobs hold by their estimates and its own stay within
    it (503 with Retry-After, else); one over it alone is 413; each job gives its share back however it ends: done,
    failed, cancelled while it runs, or cancelled before it began; and how it ended is told (the gateway's metrics)."""
    outcomes: dict[str, str] = {}

    async def scenario() -> None:
        ended = lambda job, outcome: outcomes.__setitem__(job.id, outcome)  # noqa: E731
        store = JobStore(max_running=4, ttl_s=60, max_kept_bytes=1 << 20, max_bytes=100 << 20, on_end=ended)
        release = asyncio.Event()

        async def waiting(progress: Progress) -> str:
            await release.wait()
            return "labels"

        async def failing(progress: Progress) -> str:
            await release.wait()
            raise ValueError("a broken tile")

        with pytest.raises(TooLarge, match=r"would hold about 101 MB of the gateway's memory, over --max-job-mb 100 even with no"):
            store.submit("lns-segment", 1, waiting, 101 << 20)
        first, second = store.submit("lns-segment", 1, waiting, 60 << 20), store.submit("lns-segment", 1, failing, 30 << 20)
        assert store.reserved() == 90 << 20
        with pytest.raises(Unavailable, match=r"the running jobs hold about 90 MB; this lns-segment job's 20 MB more would") as refused:
            store.submit("lns-segment", 1, waiting, 20 << 20)
        assert refused.value.retry_after_s == 5.0 and store.running() == 2
        unstarted = store.submit("lns-segment", 1, waiting, 10 << 20)  # fits exactly
        store.cancel(unstarted, "cancelled: the client disconnected before the answer")  # before its task first ran
        await asyncio.wait({unstarted.task} if unstarted.task else set())
        assert unstarted.state is JobState.FAILED and unstarted.finished is not None and store.reserved() == 90 << 20
        release.set()
        await asyncio.wait({j.task for j in (first, second) if j.task})
        assert (first.state, second.state) == (JobState.DONE, JobState.FAILED) and "a broken tile" in str(second.error)
        assert store.reserved() == 0 and store.running() == 0
        release.clear()
        third = store.submit("lns-segment", 1, waiting, 100 << 20)  # all of it, now that nothing else runs
        await asyncio.sleep(0)  # running
        store.cancel(third, "cancelled: the server is shutting down")
        await asyncio.wait({third.task} if third.task else set())
        assert store.reserved() == 0
        assert outcomes == {first.id: "done", second.id: "failed", unstarted.id: "cancelled", third.id: "cancelled"}

    asyncio.run(scenario())


def _store(ttl_s: float = 60, max_kept_bytes: int = 1 << 20) -> JobStore:
    return JobStore(max_running=4, ttl_s=ttl_s, max_kept_bytes=max_kept_bytes, max_bytes=1 << 30)


def _on_disk(directory: Path, job_id: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((directory / f"{job_id}.json").read_text())
    return record


def test_jobs_in_a_directory_are_taken_up_by_the_next_gateway(tmp_path: Path) -> None:
    """serve --jobs-dir: a finished job's result goes to a file (not kept in memory) and is answered again after a
    restart; a job running at the stop is failed, saying so, where it was unknown before."""

    async def first() -> tuple[str, str]:
        store = _store()
        store.keep_in(tmp_path)
        release = asyncio.Event()

        async def segmenting(progress: Progress) -> Answer:
            progress.advance()
            return Answer({"stations": 3}, b"label map")

        async def waiting(progress: Progress) -> Answer:
            progress.advance()
            await release.wait()  # still running at the stop
            return Answer({}, b"")

        finished = store.submit("lns-segment", 1, segmenting)
        assert finished.task is not None
        await finished.task
        assert isinstance(finished.result, KeptResult), "the bytes are in a file, not in memory"
        assert finished.result.payload() == b"label map" and finished.result.nbytes == 9
        assert (tmp_path / f"{finished.id}.result").read_bytes() == b"label map"
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        assert set(modes.values()) == {0o600}, f"a patient's label map is the gateway's user's alone: {modes}"
        assert _on_disk(tmp_path, finished.id)["state"] == "done"
        running = store.submit("lns-segment", 2, waiting)
        while running.progress.done < 1:
            await asyncio.sleep(0)
        assert _on_disk(tmp_path, running.id)["state"] == "running", "written as it was submitted"
        await store.stop()
        assert _on_disk(tmp_path, running.id)["error"]["status"] == 503, "and again as the stop cancelled it"
        return finished.id, running.id

    finished_id, running_id = asyncio.run(first())
    store = _store()
    store.keep_in(tmp_path)
    finished = store.get(finished_id)
    assert finished.state is JobState.DONE and (finished.progress.done, finished.progress.total) == (1, 1)
    assert isinstance(finished.result, KeptResult)
    assert finished.result.summary == {"stations": 3} and finished.result.payload() == b"label map"
    stopped = store.get(running_id)
    assert stopped.state is JobState.FAILED and stopped.error is not None and stopped.error.status == 503
    assert str(stopped.error) == "the gateway stopped while this job ran (1/2 tiles done); send it again"
    asyncio.run(store.stop())


def test_a_directory_is_one_gateways_and_a_second_is_refused(tmp_path: Path) -> None:
    store = _store()
    store.keep_in(tmp_path / "jobs")
    assert (tmp_path / "jobs").stat().st_mode & 0o777 == 0o700
    with pytest.raises(JobsDirUnusable, match=rf"--jobs-dir {tmp_path}/jobs is in use by another gateway \(pid {os.getpid()}\)"):
        _store().keep_in(tmp_path / "jobs")
    asyncio.run(store.stop())  # lets it go
    _store().keep_in(tmp_path / "jobs")
    (tmp_path / "file").write_text("")
    with pytest.raises(JobsDirUnusable, match=rf"--jobs-dir {tmp_path}/file/jobs: Not a directory"):
        _store().keep_in(tmp_path / "file" / "jobs")


def test_expired_dropped_and_unreadable_jobs_in_a_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What a bounded store forgets leaves the directory too; a file it did not write is left, with a warning."""

    async def run() -> list[str]:
        store = _store(max_kept_bytes=15)
        store.keep_in(tmp_path)

        async def segmenting(progress: Progress) -> Answer:
            return Answer({}, b"label map")  # 9 bytes: two are over 15

        ids = []
        for _ in range(2):
            job = store.submit("lns-segment", 1, segmenting)
            assert job.task is not None
            await job.task
            ids.append(job.id)
        assert not (tmp_path / f"{ids[0]}.result").exists(), "dropped for room"
        assert (tmp_path / f"{ids[1]}.result").exists()
        await store.stop()
        return ids

    ids = asyncio.run(run())
    again = _store()
    again.keep_in(tmp_path)  # the next gateway still says why the first is gone
    with pytest.raises(NotFound, match=rf"job '{ids[0]}' finished, and its result was dropped to keep finished results under"):
        again.get(ids[0])
    asyncio.run(again.stop())
    (tmp_path / f"{'0' * 32}.json").write_text("{not json")
    (tmp_path / f".{ids[1]}.result.tmp").write_bytes(b"label")  # a write a killed gateway left half done
    store = _store(ttl_s=1e-9)  # everything finished is past its time
    with caplog.at_level("WARNING"):
        store.keep_in(tmp_path)
    with pytest.raises(NotFound):
        store.get(ids[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", f"{'0' * 32}.json"]
    assert f"{'0' * 32}.json is not a job this gateway wrote (JSONDecodeError" in caplog.text
    asyncio.run(store.stop())


def test_a_deleted_job_is_cancelled_forgotten_and_its_url_says_so(tmp_path: Path) -> None:
    """DELETE /v1/jobs/ID: a running job is cancelled (a synchronous request waiting for it gets 410) and gives its
    memory back; a finished one's result goes, in memory or in --jobs-dir; either URL then says it was deleted."""

    async def scenario() -> None:
        store = JobStore(max_running=4, ttl_s=60, max_kept_bytes=1 << 20, max_bytes=100 << 20)
        store.keep_in(tmp_path)
        release = asyncio.Event()

        async def waiting(progress: Progress) -> Answer:
            await release.wait()
            return Answer({}, b"")

        async def segmenting(progress: Progress) -> Answer:
            return Answer({"stations": 3}, b"label map")

        running = store.submit("lns-segment", 10, waiting, 60 << 20)
        waiter = asyncio.create_task(store.wait(running))
        await asyncio.sleep(0)
        await store.delete(running.id)
        with pytest.raises(Gone, match=rf"cancelled: deleted \(DELETE /v1/jobs/{running.id}\)"):
            await waiter
        assert store.reserved() == 0 and store.running() == 0
        finished = store.submit("lns-segment", 1, segmenting)
        assert finished.task is not None
        await finished.task
        assert (tmp_path / f"{finished.id}.result").exists()
        await store.delete(finished.id)
        for job in (running, finished):
            with pytest.raises(NotFound, match=rf"job '{job.id}' was deleted \(DELETE /v1/jobs/{job.id}\)"):
                store.get(job.id)
            with pytest.raises(NotFound):
                await store.delete(job.id)
        assert not list(tmp_path.glob("*.result")), "the label map is gone"
        await store.stop()
        again = _store(ttl_s=60)
        again.keep_in(tmp_path)  # a gateway started again says so too, until ttl_s has passed
        for job in (running, finished):
            with pytest.raises(NotFound, match=rf"job '{job.id}' was deleted"):
                again.get(job.id)
        await again.stop()
        later = _store(ttl_s=1e-9)
        later.keep_in(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"], "then nothing is left of either"
        await later.stop()

    asyncio.run(scenario())


def test_a_job_whose_files_cannot_be_written_is_still_answered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk (here: the file size limit, RLIMIT_FSIZE, at 4 bytes; EFBIG as ENOSPC would be): the result stays in
    memory and the job is answered as without --jobs-dir; the log says what could not be written."""

    async def scenario() -> Job[Any]:
        store = _store()
        store.keep_in(tmp_path)

        async def segmenting(progress: Progress) -> Answer:
            return Answer({"stations": 3}, b"label map")

        job = await store.submit_kept("lns-segment", 1, segmenting, 0, b"a CT volume's bytes")
        assert job.task is not None
        await job.task
        await store.stop()
        return job

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing the process
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4, limits[1]))
        with caplog.at_level("ERROR"):
            job = asyncio.run(scenario())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert job.state is JobState.DONE and isinstance(job.result, Answer) and job.result.payload() == b"label map"
    assert f"job {job.id}: cannot write its result to --jobs-dir, kept in memory: [Errno 27] File too large" in caplog.text
    assert f"job {job.id}: cannot write its state to --jobs-dir" in caplog.text
    assert f"job {job.id}: cannot keep its upload in --jobs-dir ([Errno 27] File too large)" in caplog.text
    assert not job.resumable and not list(tmp_path.glob("*.input")) and not list(tmp_path.glob(".*.tmp")), "nothing half written left"


def _blocked(release: asyncio.Event) -> Any:
    """Work that is still running when its gateway stops or is killed."""

    async def work(progress: Progress) -> Answer:
        progress.advance()
        await release.wait()
        return Answer({}, b"")

    return work


def _resumer(seen: list[bytes], release: asyncio.Event | None = None) -> Any:
    """A kind's resumer: records the upload it is given and plans three tiles (waiting on `release` after the first)."""

    async def resume(read: Callable[[], bytes], progress: Progress) -> Plan[Answer]:
        upload = await asyncio.to_thread(read)
        seen.append(upload)

        async def work(progress: Progress) -> Answer:
            progress.advance()
            if release is not None:
                await release.wait()
            progress.advance()
            progress.advance()
            return Answer({"stations": len(upload)}, b"labels of " + upload)

        return Plan(3, work, nbytes=10)

    return resume


def test_a_job_kept_with_its_upload_is_run_again_by_the_next_gateway(tmp_path: Path) -> None:
    """serve --jobs-dir: a job submitted with its upload keeps it in the directory (0600) while it runs; a gateway that
    stops leaves the job running on disk, not failed, and the next runs it again from the upload under the same id,
    to the end; the upload then goes."""
    ended: list[tuple[str, str]] = []

    async def first() -> str:
        store = _store()
        store._on_end = lambda j, how: ended.append((j.id, how))
        store.keep_in(tmp_path)
        job = await store.submit_kept("lns-segment", 2, _blocked(asyncio.Event()), 10, b"volume")
        while job.progress.done < 1:
            await asyncio.sleep(0)
        assert (tmp_path / f"{job.id}.input").read_bytes() == b"volume"
        assert (tmp_path / f"{job.id}.input").stat().st_mode & 0o777 == 0o600, "a patient's CT: the gateway's user's alone"
        assert _on_disk(tmp_path, job.id)["resumable"] is True
        synchronous = store.submit("lns-segment", 2, _blocked(asyncio.Event()))  # no upload: its client waits on
        store.stopping()  # as the stop begins, before the requests in flight are answered
        assert job.task is not None
        await asyncio.wait({job.task}, timeout=5)
        view = job.view()
        assert (view["state"], view["stage"], view["error"], view["finished"]) == ("running", "paused", None, None), view
        assert (await store.ended(job.id, 30)) is job, "a poll is answered at once"
        assert synchronous.task is not None and not synchronous.task.done(), "a request in flight is answered as before"
        await store.stop()
        assert synchronous.state is JobState.FAILED
        return job.id

    job_id = asyncio.run(first())
    assert ended[0] == (job_id, "paused") and ended[1][1] == "cancelled"
    record = _on_disk(tmp_path, job_id)
    assert (record["state"], record["paused"], record["error"], record["interrupted"]) == ("running", True, None, 0), record

    async def second() -> Job[Any]:
        store = _store()
        store.keep_in(tmp_path)
        job = store.get(job_id)
        assert job.state is JobState.RUNNING and job.progress.stage == "resuming" and job.task is None
        seen: list[bytes] = []
        store.resumer("lns-segment", _resumer(seen))
        store.resume_pending()
        assert job.task is not None
        await job.task
        assert seen == [b"volume"]
        await store.stop()
        return job

    job = asyncio.run(second())
    assert job.state is JobState.DONE, job.error
    assert (job.progress.done, job.progress.total, job.resumes, job.view()["resumes"]) == (3, 3, 1, 1)
    assert isinstance(job.result, KeptResult) and job.result.payload() == b"labels of volume"
    assert not (tmp_path / f"{job_id}.input").exists(), "the upload goes when the job ends"
    assert _on_disk(tmp_path, job_id)["state"] == "done"


def test_a_job_is_run_again_after_one_kill_and_not_after_two(tmp_path: Path) -> None:
    """A gateway killed (no stop: its file still says running, not paused) counts against the job; after a second, the
    next gateway fails it, saying so, instead of running an upload that may be what kills them. A clean stop in
    between does not count."""

    def killed(store: JobStore) -> None:  # what a SIGKILL leaves: the files as they are, the lock let go
        assert store._files is not None
        store._files.close()
        store._files = None  # nothing more written

    async def gateway(resume: bool, stop: bool) -> Job[Any] | None:
        store = _store()
        store.keep_in(tmp_path)
        if not resume:
            job = await store.submit_kept("lns-segment", 2, _blocked(asyncio.Event()), 10, b"volume")
        else:
            (job,) = store._pending
            if job.state is not JobState.RUNNING:
                return job
            store.resumer("lns-segment", _resumer([], asyncio.Event()))
            store.resume_pending()
        while job.progress.done < 1:
            await asyncio.sleep(0)
        if stop:
            await store.stop()
        else:
            killed(store)
            assert job.task is not None
            job.task.cancel()  # gone with the process
            with pytest.raises(asyncio.CancelledError):
                await job.task
        return None

    async def taken_up() -> Job[Any]:
        store = _store()
        store.keep_in(tmp_path)
        (job_id,) = [p.stem for p in tmp_path.glob("*.json")]
        return store.get(job_id)

    assert asyncio.run(gateway(resume=False, stop=False)) is None  # killed while it ran
    assert _on_disk(tmp_path, next(p.stem for p in tmp_path.glob("*.json")))["state"] == "running"
    asyncio.run(gateway(resume=True, stop=True))  # run again, then stopped cleanly
    record = _on_disk(tmp_path, next(p.stem for p in tmp_path.glob("*.json")))
    assert (record["interrupted"], record["paused"], record["resumes"]) == (1, True, 1), record
    asyncio.run(gateway(resume=True, stop=False))  # run again, and killed: the second kill
    record = _on_disk(tmp_path, next(p.stem for p in tmp_path.glob("*.json")))
    assert (record["interrupted"], record["paused"], record["resumes"]) == (1, False, 2), "written as it was run again"
    job = asyncio.run(taken_up())
    assert job.state is JobState.FAILED and job.error is not None and job.error.status == 500
    assert str(job.error).startswith("the gateway was killed 2 times while this job ran, so it is not run again: send it again")
    assert not list(tmp_path.glob("*.input")), "a job not to be run again keeps no upload"


def test_a_job_that_cannot_be_run_again_fails_saying_why(tmp_path: Path) -> None:
    """The next gateway does not serve the job's models (its resumer refuses), runs no such jobs, or finds its upload
    gone: each job fails 503 with the reason and "send it again", and its upload is removed. Without a directory,
    submit_kept keeps nothing."""

    async def first() -> list[str]:
        store = _store()
        store.keep_in(tmp_path)
        kinds = ("lns-segment", "other", "lns-segment")
        jobs = [await store.submit_kept(kind, 2, _blocked(asyncio.Event()), 10, b"volume") for kind in kinds]
        await asyncio.sleep(0)
        await store.stop()
        return [job.id for job in jobs]

    refused, unknown, lost = asyncio.run(first())
    (tmp_path / f"{lost}.input").unlink()

    async def second() -> list[Job[Any]]:
        store = _store()
        store.keep_in(tmp_path)

        async def not_served(read: Callable[[], bytes], progress: Progress) -> Plan[Answer]:
            raise NotFound("lymph node station parsing needs both lns-organs and lns-stations served by this gateway")

        store.resumer("lns-segment", not_served)
        store.resume_pending()
        jobs = [store.get(i) for i in (refused, unknown, lost)]
        await asyncio.gather(*(j.task for j in jobs if j.task is not None))
        await store.stop()
        return jobs

    why = "the gateway stopped while this job ran, and the one started since cannot run it again: "
    failed = asyncio.run(second())
    assert [(j.state, j.error.status if j.error else None) for j in failed] == [(JobState.FAILED, 503)] * 3
    assert [str(j.error) for j in failed] == [
        why + "lymph node station parsing needs both lns-organs and lns-stations served by this gateway; send it again",
        why + "it runs no other jobs; send it again",
        "the gateway stopped while this job ran (1/2 tiles done); send it again",  # its file says it has no upload now
    ]
    assert not list(tmp_path.glob("*.input"))

    async def in_memory() -> None:
        store = _store()
        job = await store.submit_kept("lns-segment", 1, _resumer([]), 10, b"volume")
        assert not job.resumable and job.progress.parts is None
        await store.stop()

    asyncio.run(in_memory())


def test_jobs_run_again_are_bound_by_the_memory_they_hold_not_by_their_count(tmp_path: Path) -> None:
    """Three jobs left running, and a next gateway with --max-jobs 1: all three run again (the last gateway took them;
    refusing two would lose them), each planned in turn, until their memory would pass the bound: the third fails 503
    saying so, and a new job is refused while they run."""

    async def first() -> None:
        store = _store()
        store.keep_in(tmp_path)
        for _ in range(3):
            await store.submit_kept("lns-segment", 2, _blocked(asyncio.Event()), 10, b"volume")
        await asyncio.sleep(0)
        await store.stop()

    asyncio.run(first())

    async def second() -> tuple[list[Job[Any]], str]:
        store = JobStore(max_running=1, ttl_s=60, max_kept_bytes=1 << 20, max_bytes=25)
        store.keep_in(tmp_path)
        release = asyncio.Event()
        store.resumer("lns-segment", _resumer([], release))
        store.resume_pending()
        jobs = list(store._jobs.values())

        async def two_running() -> None:
            while sum(j.progress.done for j in jobs) < 2 or any(j.task is not None and not j.task.done() and not j.reserved for j in jobs):
                await asyncio.sleep(0)

        await asyncio.wait_for(two_running(), 10)
        with pytest.raises(Unavailable) as refused:
            store.submit("lns-segment", 1, _blocked(release), 1)
        release.set()
        await asyncio.gather(*(j.task for j in jobs if j.task is not None))
        await store.stop()
        return jobs, str(refused.value)

    jobs, refused = asyncio.run(second())
    assert [j.state for j in jobs] == [JobState.DONE, JobState.DONE, JobState.FAILED]
    assert str(jobs[2].error).startswith("the gateway stopped while this job ran, and the one started since cannot run it again: the ")
    assert "would pass --max-job-mb" in str(jobs[2].error) and str(jobs[2].error).endswith("; send it again")
    assert refused == "1 jobs are already running; try again later"


def test_the_parts_a_job_kept_are_taken_when_it_is_run_again_and_go_when_it_ends(tmp_path: Path) -> None:
    """A job kept with its upload keeps a part of its work (a CT job: its organ labels) in the directory (0600); run
    again after a stop, its work finds the part; once it ends, the part goes, and so does one whose job file is gone."""
    organs = np.arange(6, dtype=np.uint8).reshape(2, 3)

    async def first() -> str:
        store = _store()
        store.keep_in(tmp_path)

        async def work(progress: Progress) -> Answer:
            assert progress.parts is not None
            await asyncio.to_thread(progress.parts.save, "organs", organs)
            progress.advance()
            await asyncio.Event().wait()  # still running at the stop
            return Answer({}, b"")

        job = await store.submit_kept("lns-segment", 2, work, 10, b"volume")
        await asyncio.wait_for(_until(lambda: job.progress.done == 1), 10)
        await store.stop()
        return job.id

    job_id = asyncio.run(first())
    part = tmp_path / f"{job_id}.organs.npy"
    assert part.stat().st_mode & 0o777 == 0o600, "a patient's labels: the gateway's user's alone"
    orphan = tmp_path / f"{'0' * 32}.organs.npy"
    np.save(orphan, organs)

    async def second() -> list[Any]:
        store = _store()
        store.keep_in(tmp_path)
        seen: list[Any] = []

        async def resume(read: Callable[[], bytes], progress: Progress) -> Plan[Answer]:
            async def work(progress: Progress) -> Answer:
                assert progress.parts is not None
                seen.append(await asyncio.to_thread(progress.parts.load, "organs"))
                seen.append(await asyncio.to_thread(progress.parts.load, "stations"))
                return Answer({}, b"labels")

            return Plan(1, work, 10)

        store.resumer("lns-segment", resume)
        store.resume_pending()
        job = store.get(job_id)
        assert job.task is not None
        await job.task
        await store.stop()
        return seen

    seen = asyncio.run(second())
    assert seen[0].tolist() == organs.tolist() and seen[1] is None
    assert not part.exists() and not orphan.exists()


async def _until(done: Any) -> None:
    while not done():
        await asyncio.sleep(0.01)
