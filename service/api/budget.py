"""How many bytes of request bodies the gateway holds at once (`serve --max-pending-mb`).

`--max-body-mb` bounds one body; without a bound on all of them, many clients
sending large bodies at once (CT volumes are tens of MB, the limit 256 MB) would
take the gateway's memory before the queue-full check could refuse them. A body
is counted from its head (its Content-Length; a chunked body as it arrives) until
its request is answered, and one that would take the total over the budget is
answered 503 with Retry-After before it is read. A gRPC message is counted once
gRPC has received it (gRPC reads a whole message, up to `--max-body-mb`, before the
gateway sees it) and refused with UNAVAILABLE, so queued messages stay bounded too.

With `serve --frontends N` the budget is the gateway's, not each process's: every process
publishes what it holds in its own slot of a shared array and adds up all slots before it
takes more. No lock: a lock that a killed process held would wedge every other process,
so each slot has one writer (an aligned 8-byte store is atomic) and the others only read.
Two processes admitting a body at the same instant can both pass, so the bound can be
exceeded by at most one body per other process. The first process empties the slot of a
front-end that died (its connections died with it) before it starts it again.
"""

from __future__ import annotations

import multiprocessing as mp
from types import TracebackType
from typing import Any

from ..errors import Unavailable
from ..workers.shm import MB


class SharedHeld:
    """Bytes of request bodies each front-end process holds (slot 0: the first process), shared by all of them."""

    def __init__(self, processes: int) -> None:
        self.values: Any = mp.get_context("spawn").RawArray("q", processes)  # zeroed; passed to front-ends as they spawn

    def total(self) -> int:
        return sum(self.values)

    def clear(self, slot: int) -> None:
        """A process that is gone holds nothing (it no longer writes its slot)."""
        self.values[slot] = 0


class BodyBudget:
    def __init__(self, limit: int, shared: SharedHeld | None = None, slot: int = 0) -> None:
        self.limit = limit
        self.held = 0  # by this process
        self.shared, self.slot = shared, slot

    def take(self, nbytes: int) -> None:
        """Count `nbytes` more, or refuse them (503) if they would pass the limit."""
        held = self.held if self.shared is None else self.shared.total()
        if held + nbytes > self.limit:
            raise Unavailable(
                f"the gateway holds {held / MB:.1f} MB of request bodies; {nbytes / MB:.1f} MB more would pass "
                f"--max-pending-mb {self.limit / MB:g}",
                retry_after_s=1.0,
            )
        self._set(self.held + nbytes)

    def give(self, nbytes: int) -> None:
        self._set(self.held - nbytes)

    def _set(self, held: int) -> None:
        self.held = held
        if self.shared is not None:
            self.shared.values[self.slot] = held  # this process is its slot's one writer


class Hold:
    """What one request holds of the budget; all of it is given back when the `with` block ends."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.nbytes = 0

    def add(self, nbytes: int) -> None:
        self.budget.take(nbytes)
        self.nbytes += nbytes

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.budget.give(self.nbytes)
        self.nbytes = 0
