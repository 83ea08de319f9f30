"""Jobs: a synchronous request's job is cancelled when its client leaves, and says why; finished results are bounded; the
running jobs' memory is bounded by their estimates."""

from __future__ import annotations

import asyncio

import pytest

from service.errors import NotFound, TooLarge, Unavailable
from service.jobs import Job, JobState, JobStore, Progress


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
    failed, cancelled while it runs, or cancelled before it began."""

    async def scenario() -> None:
        store = JobStore(max_running=4, ttl_s=60, max_kept_bytes=1 << 20, max_bytes=100 << 20)
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
        third = store.submit("lns-segment", 1, waiting, 100 << 20)  # all of it, now that nothing else runs
        store.cancel(third, "cancelled: the server is shutting down")
        await asyncio.wait({third.task} if third.task else set())
        assert store.reserved() == 0

    asyncio.run(scenario())
