"""Counts that every front-end process publishes and any of them adds up (`serve --frontends N`).

Two bounds are the gateway's, not each process's: the bytes of request bodies held at once
(`--max-pending-mb`, service/api/budget.py) and the requests waiting in each model's queue
(`--queue-capacity`, service/dispatch/batcher.py). Each process publishes its counts in its own row
of one shared array and adds up a column before it takes more. No lock: a lock that a killed
process held would wedge every other process, so each row has one writer (an aligned 8-byte store
is atomic) and the others only read. Two processes admitting at the same instant can both pass, so
a bound can be exceeded by at most one body or request per other process. The first process
empties the row of a front-end that died (its connections, and their requests, died with it)
before it starts it again.

Column 0 counts bytes of request bodies; each model has a column of its own, given by the first
process: every model of the repository at start-up, and a model loaded later (explicit model
control) while spare columns last; front-ends learn a model's column with the model. A model left
without one, past the spare columns, bounds each process's queue on its own.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

BODIES = 0  # the column of request body bytes
SPARE_COLUMNS = 64  # for models that appear in the repository after start-up


class SharedCounts:
    """One row of counts per process (row 0: the first process), one column per kind of count."""

    def __init__(self, processes: int, models: Iterable[str] = (), spare: int = SPARE_COLUMNS) -> None:
        self.columns: dict[str, int] = {name: column for column, name in enumerate(sorted(models), start=1)}
        self.width = 1 + len(self.columns) + spare
        self.values: Any = mp.get_context("spawn").RawArray("q", processes * self.width)  # zeroed; passed as front-ends spawn

    def total(self, column: int) -> int:
        """The column's sum over every process."""
        return sum(self.values[column :: self.width])

    def get(self, slot: int, column: int) -> int:
        return int(self.values[slot * self.width + column])

    def set(self, slot: int, column: int, value: int) -> None:
        self.values[slot * self.width + column] = value  # this process is its row's one writer

    def clear(self, slot: int) -> None:
        """A process that is gone holds nothing (it no longer writes its row)."""
        start = slot * self.width
        self.values[start : start + self.width] = [0] * self.width

    def assign(self, model: str) -> int | None:
        """The model's column, a spare one if it has none yet (the first process alone assigns); None once none is spare."""
        if model not in self.columns and 1 + len(self.columns) < self.width:
            self.columns[model] = 1 + len(self.columns)
        return self.columns.get(model)

    def learn(self, model: str, column: int | None) -> None:
        """A front-end: the first process gave the model this column."""
        if column is not None:
            self.columns[model] = column

    def published(self, slot: int, column: int | None) -> Published | None:
        return None if column is None else Published(self, slot, column)


@dataclass(frozen=True, slots=True)
class Published:
    """One process's count in one column: what it sets, and the total every process's add up to."""

    counts: SharedCounts
    slot: int
    column: int

    def set(self, value: int) -> None:
        self.counts.set(self.slot, self.column, value)

    def total(self) -> int:
        return self.counts.total(self.column)
