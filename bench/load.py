"""An asyncio load generator: closed loop (N callers, each sending when its last answer came) or open
loop (Poisson arrivals at a rate). It records every request's latency; warm-up is run and discarded.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Call = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Result:
    latencies_s: list[float]
    errors: int
    seconds: float
    first_error: str | None

    def summary(self, batch: int) -> dict[str, float | int]:
        requests = len(self.latencies_s)
        return {
            "requests": requests,
            "errors": self.errors,
            "requests_per_s": requests / self.seconds,
            "samples_per_s": requests * batch / self.seconds,
            **milliseconds(self.latencies_s, "latency", (50, 90, 95, 99)),
        }


def milliseconds(seconds: list[float], name: str, quantiles: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """{NAME_mean_ms, NAME_pQ_ms...} of durations in seconds (NaN when there are none)."""
    values = np.asarray(seconds) * 1000 if seconds else np.asarray([np.nan])
    return {f"{name}_mean_ms": float(np.mean(values))} | {f"{name}_p{q}_ms": float(np.percentile(values, q)) for q in quantiles}


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

    def more() -> bool:
        if deadline is None:
            return len(times) < (steps or 1)
        return not times or time.perf_counter() < deadline

    while more():
        started = time.perf_counter()
        once()
        times.append(time.perf_counter() - started)
    return times


def process_usage(pid: int | None) -> tuple[float | None, float | None]:
    """(CPU seconds so far, RSS in MB) of a process, from /proc; (None, None) where unknown."""
    if pid is None:
        return None, None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None, None
    return cpu, rss / 1024
