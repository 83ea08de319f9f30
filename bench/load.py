"""An asyncio load generator: closed loop (N callers, each sending when its last answer came) or open
loop (Poisson arrivals at a rate). It records every request's latency; warm-up is run and discarded.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

Call = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Result:
    latencies_s: list[float]
    errors: int
    seconds: float
    first_error: str | None

    def summary(self, batch: int) -> dict[str, float | int]:
        values = np.asarray(self.latencies_s) * 1000 if self.latencies_s else np.asarray([np.nan])
        requests = len(self.latencies_s)
        return {
            "requests": requests,
            "errors": self.errors,
            "requests_per_s": requests / self.seconds,
            "samples_per_s": requests * batch / self.seconds,
            "latency_mean_ms": float(np.mean(values)),
            **{f"latency_p{q}_ms": float(np.percentile(values, q)) for q in (50, 90, 95, 99)},
        }


async def closed_loop(call: Call, concurrency: int, seconds: float) -> Result:
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                await call()
            except Exception as exc:  # counted and reported, never raised: one bad point must not end the sweep
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return Result(latencies, len(errors), time.perf_counter() - began, errors[0] if errors else None)


async def open_loop(call: Call, rate: float, seconds: float, seed: int = 0) -> Result:
    """Poisson arrivals at `rate` per second; a request's latency counts from its arrival."""
    latencies: list[float] = []
    errors: list[str] = []
    rng = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()

    async def one(arrival: float) -> None:
        try:
            await call()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        latencies.append(time.perf_counter() - arrival)

    began = time.perf_counter()
    next_at = began
    while next_at < began + seconds:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        task = asyncio.get_running_loop().create_task(one(next_at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    return Result(latencies, len(errors), time.perf_counter() - began, errors[0] if errors else None)


def timed_runs(
    once: Callable[[], object], *, steps: int | None = None, seconds: float | None = None, start_at: float | None = None
) -> list[float]:
    """Run `once` `steps` times, or for `seconds` (at least once), starting at wall-clock time `start_at`
    (so that processes sharing a device measure the same window); the seconds each run took."""
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    times: list[float] = []
    deadline = time.perf_counter() + seconds if seconds is not None else None
    while (deadline is None and len(times) < (steps or 1)) or (deadline is not None and (not times or time.perf_counter() < deadline)):
        started = time.perf_counter()
        once()
        times.append(time.perf_counter() - started)
    return times
