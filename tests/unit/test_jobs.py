"""Jobs: a synchronous request's job is cancelled when its client leaves, and says why; finished results are bounded; the
running jobs' memory is bounded by their estimates; jobs kept in a directory outlive the gateway."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
from pathlib import Path
from typing import Any

import pytest

from service.errors import Gone, NotFound, TooLarge, Unavailable
from service.jobfiles import JobsDirUnusable, KeptResult
from service.jobs import Answer, Job, JobState, JobStore, Progress


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

        job = store.submit("lns-segment", 1, segmenting)
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
