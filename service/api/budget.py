"""How many bytes of request bodies the gateway holds at once (`serve --max-pending-mb`).

`--max-body-mb` bounds one body; without a bound on all of them, many clients
sending large bodies at once (CT volumes are tens of MB, the limit 256 MB) would
take the gateway's memory before the queue-full check could refuse them. A body
is counted from its head (its Content-Length; a chunked body as it arrives) until
its request is answered, and one that would take the total over the budget is
answered 503 with Retry-After before it is read. A gRPC message is counted once
gRPC has received it (gRPC reads a whole message, up to `--max-body-mb`, before the
gateway sees it) and refused with UNAVAILABLE, so queued messages stay bounded too. What a body unpacks
to is counted with it: a compressed KServe body's inflated bytes (encoding.py), a gzipped or zipped CT
volume's as it is unpacked (families/volume.py).
An answer that its client is slow to take is counted while it waits in the connection's buffer
(unsent.py), so that clients sending small requests for large answers and reading none cannot grow the
gateway unseen (a gRPC answer from when it is made until gRPC has sent it, grpc_service.py); and a batch's
copy in shared memory where it is over `--arena-keep-mb`, until its arena is released (service/backends/worker.py).

With `serve --frontends N` the budget is the gateway's, not each process's: every process
publishes what it holds and adds up what all hold before it takes more (service/shared.py), so the
bound can be exceeded by at most one body per other process admitted at the same instant.
"""

from __future__ import annotations

import threading
from types import TracebackType

from ..errors import Unavailable
from ..shared import BODIES, SharedCounts
from ..workers.shm import MB


class BodyBudget:
    def __init__(self, limit: int, shared: SharedCounts | None = None, slot: int = 0) -> None:
        self.limit = limit
        self.held = 0  # by this process
        self.shared = None if shared is None else shared.published(slot, BODIES)
        self._lock = threading.Lock()  # a volume is unpacked on a thread, counted as it grows

    def take(self, nbytes: int) -> None:
        """Count `nbytes` more, or refuse them (503) if they would pass the limit."""
        with self._lock:
            held = self.held if self.shared is None else self.shared.total()
            if held + nbytes > self.limit:
                raise Unavailable(
                    f"the gateway holds {held / MB:.1f} MB for requests (their bodies, what they unpack to, large batches' copies, "
                    f"unsent answers); {nbytes / MB:.1f} MB more would pass "
                    f"--max-pending-mb {self.limit / MB:g}",
                    retry_after_s=1.0,
                )
            self._set(self.held + nbytes)

    def count(self, nbytes: int) -> None:
        """Count `nbytes` more (or fewer, if negative) that are held already, past the limit or not: bytes of answers
        a client has not taken (unsent.py), large batches' arenas. Bodies that come meanwhile are refused."""
        with self._lock:
            self._set(self.held + nbytes)

    def give(self, nbytes: int) -> None:
        with self._lock:
            self._set(self.held - nbytes)

    def _set(self, held: int) -> None:
        self.held = held
        if self.shared is not None:
            self.shared.set(held)


class Hold:
    """What one request holds of the budget; all of it is given back when the `with` block ends. A thread still
    working for a request that ended (its client hung up) can take no more: `add` raises."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.nbytes = 0
        self._ended = False
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            if self._ended:
                raise Unavailable("the request has ended", retry_after_s=0.0)
            self.budget.take(nbytes)
            self.nbytes += nbytes

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with self._lock:
            self._ended = True
            self.budget.give(self.nbytes)
            self.nbytes = 0
