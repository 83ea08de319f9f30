"""The small interface the dispatcher depends on."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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

    async def infer(self, model: str, parts: Mapping[str, list[Array]]) -> dict[str, Array]:
        """Run one batch: each input's parts are concatenated along axis 0. Raises WorkerDied."""
        ...


class Backend(Protocol):
    def replicas(self, model: str) -> list[Replica]: ...

    def models(self) -> list[str]: ...

    def add_listener(self, callback: Callable[[], None]) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
