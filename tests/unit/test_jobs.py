"""Jobs: a synchronous request's job is cancelled when its client leaves, and says why."""

from __future__ import annotations

import asyncio

from service.jobs import JobState, JobStore, Progress


def test_a_cancelled_job_fails_with_the_reason_and_frees_its_slot() -> None:
    async def scenario() -> None:
        store = JobStore(max_running=1, ttl_s=60)
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
