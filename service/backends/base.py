"""The small interface the dispatcher depends on: a Replica, one place a model runs.

Local worker processes (backends/worker.py) and Triton servers (backends/triton.py) implement it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from migserve.types import Array


class Replica(Protocol):
    """One place a model runs: a worker on a partition, or a Triton server."""

    @property
    def id(self) -> str: ...

    @property
    def outstanding(self) -> int: ...

    @property
    def ready(self) -> bool: ...

    @property
    def recovering(self) -> bool:
        """Not ready, but restarting after a crash and expected back in seconds: requests wait for it
        (within their deadlines) instead of getting 503. False once a restart attempt fails."""
        ...

    @property
    def depth(self) -> int:
        """Batches it takes at once: 1 for a local worker (the next batch forms while it runs)."""
        ...

    @property
    def max_rows(self) -> int | None:
        """Rows per batch it wants from the gateway; 1 leaves batching to the replica (Triton's batcher)."""
        ...

    def submit(self, model: str, parts: Mapping[str, list[Array]]) -> asyncio.Future[dict[str, Array]]:
        """Send one batch now (each input's parts concatenated along axis 0); the replica counts as
        busy from this call on. Raises, or fails the future with, WorkerDied if the replica is gone."""
        ...
