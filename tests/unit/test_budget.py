"""Counts shared by front-end processes: one --max-pending-mb budget over every process's bodies (service/api/budget.py),
and the columns that hold each model's queue length (service/shared.py)."""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

import pytest

from service.api.budget import BodyBudget, Hold
from service.errors import Unavailable
from service.shared import BODIES, SharedCounts

LIMIT = 1000


def _rows(held: SharedCounts) -> list[int]:
    return [held.get(slot, BODIES) for slot in range(2)]


def _take_in_another_process(held: SharedCounts, slot: int, amounts: list[int], conn: Connection) -> None:
    """A front-end process: takes each amount in turn, answering what happened, then waits to be told to give all."""
    budget = BodyBudget(LIMIT, held, slot)
    for nbytes in amounts:
        try:
            budget.take(nbytes)
            conn.send("taken")
        except Unavailable as exc:
            conn.send(str(exc))
    conn.recv()
    budget.give(budget.held)
    conn.send("given")


def _other(held: SharedCounts, slot: int, amounts: list[int]) -> tuple[mp.process.BaseProcess, Connection, list[str]]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_take_in_another_process, args=(held, slot, amounts, child))
    process.start()
    return process, parent, [parent.recv() for _ in amounts]


def test_one_process_alone_keeps_its_own_count() -> None:
    budget = BodyBudget(LIMIT)
    budget.take(600)
    with pytest.raises(Unavailable, match=r"more would pass --max-pending-mb"):
        budget.take(600)
    budget.give(600)
    budget.take(1000)


def test_every_process_takes_from_one_budget_and_gives_back_to_it() -> None:
    held = SharedCounts(2)
    here = BodyBudget(LIMIT, held, 0)
    here.take(600)
    process, conn, answers = _other(held, 1, [300, 300])
    try:
        assert answers[0] == "taken"
        assert "more would pass" in answers[1], "600 here and 300 there leave 100: the second 300 is refused"
        with pytest.raises(Unavailable):
            here.take(200)
        assert (here.held, _rows(held), held.total(BODIES)) == (600, [600, 300], 900)
        conn.send("give")
        assert conn.recv() == "given"
        here.take(400)  # what the other process gave back is free again
        assert _rows(held) == [1000, 0]
    finally:
        process.join(10)


def test_the_slot_of_a_process_that_died_is_emptied() -> None:
    held = SharedCounts(2)
    process, _, answers = _other(held, 1, [700])
    assert answers == ["taken"]
    process.kill()
    process.join(10)
    here = BodyBudget(LIMIT, held, 0)
    with pytest.raises(Unavailable):  # the dead process's 700 bytes are still counted
        here.take(400)
    held.clear(1)  # what the first process does before it starts the front-end again
    here.take(1000)


def test_each_model_counts_in_a_column_of_its_own_and_a_dead_process_s_row_is_emptied() -> None:
    counts = SharedCounts(3, ["face-pros", "crowd-csrnet"], spare=1)
    assert counts.columns == {"crowd-csrnet": 1, "face-pros": 2}
    assert counts.assign("face-pros") == 2, "a model keeps its column"
    assert counts.assign("added-later") == 3, "a model that appears later takes the spare column"
    assert counts.assign("one-too-many") is None, "no column left: that model's queues are each process's own"
    for slot, (bodies, queued) in enumerate([(100, 2), (50, 3), (7, 1)]):
        counts.set(slot, BODIES, bodies)
        counts.set(slot, counts.columns["face-pros"], queued)
    assert (counts.total(BODIES), counts.total(2), counts.total(1)) == (157, 6, 0)
    counts.clear(1)
    assert (counts.total(BODIES), counts.total(2)) == (107, 3), "only the cleared process's row is gone"
    front_end = SharedCounts(3, ["face-pros", "crowd-csrnet"], spare=1)
    front_end.learn("added-later", 3)
    front_end.learn("one-too-many", None)
    assert front_end.columns == {"crowd-csrnet": 1, "face-pros": 2, "added-later": 3}


def test_threads_counting_at_once_lose_no_count_and_nothing_is_taken_after_the_request_ends() -> None:
    """A volume is unpacked on a thread and counted as it grows, while the event loop takes and gives for others;
    a thread still unpacking for a request whose client hung up (its Hold ended) takes nothing more."""
    budget = BodyBudget(10**9)
    holds = [Hold(budget) for _ in range(8)]

    def count(hold: Hold) -> None:
        for _ in range(20_000):
            hold.add(1)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(count, holds))
    assert budget.held == 8 * 20_000
    for hold in holds:
        hold.__exit__(None, None, None)
    assert budget.held == 0
    with pytest.raises(Unavailable, match="the request has ended"):
        holds[0].add(1)
    assert budget.held == 0
