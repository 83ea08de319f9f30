"""Jobs: a synchronous request's job is cancelled when its client leaves, and says why; finished results are bounded."""

from __future__ import annotations

import asyncio

import pytest

from service.errors import NotFound
from service.jobs import Job, JobState, JobStore, Progress


def test_a_cancelled_job_fails_with_the_reason_and_frees_its_slot() -> None:
    async def scenario() -> None:
        store = JobStore(max_running=1, ttl_s=60, max_kept_bytes=1 << 20)
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
        store = JobStore(max_running=4, ttl_s=60, max_kept_bytes=250)

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
