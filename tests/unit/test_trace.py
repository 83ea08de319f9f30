"""Trace settings and sampling (service/trace.py), without a gateway: what the HTTP and gRPC tests cannot reach."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import BadRequest
from service.trace import Tracer


def test_a_model_s_settings_override_key_by_key_and_null_clears_them(tmp_path: Path) -> None:
    tracer = Tracer(tmp_path / "trace.json")
    tracer.update(None, {"trace_level": ["TIMESTAMPS"], "trace_rate": "3"})
    assert tracer.update("m", {"trace_rate": "1", "trace_count": "2"})["trace_level"] == ["TIMESTAMPS"]
    assert [tracer.sample("m") is not None for _ in range(3)] == [True, True, False], "two traces, then its count is spent"
    assert [tracer.sample("other") is not None for _ in range(6)] == [False, False, True, False, False, True], "every 3rd"
    cleared = tracer.update("m", {"trace_rate": None, "trace_count": None})
    assert (cleared["trace_rate"], cleared["trace_count"]) == ("3", "-1") and "m" not in tracer.models
    assert tracer.update(None, {"trace_rate": None})["trace_rate"] == "1000", "a global setting cleared is its default"


def test_a_refused_update_changes_nothing_and_levels_are_read_as_triton_lists_them(tmp_path: Path) -> None:
    tracer = Tracer(tmp_path / "trace.json")
    with pytest.raises(BadRequest, match="trace_count must be an integer"):
        tracer.update(None, {"trace_level": ["TIMESTAMPS"], "trace_count": "many"})
    assert tracer.settings()["trace_level"] == ["OFF"]
    assert tracer.update(None, {"trace_level": ["timestamps", "OFF"]})["trace_level"] == ["TIMESTAMPS"]
    assert tracer.update(None, {"trace_rate": ["7"]})["trace_rate"] == "7", "gRPC sends each value as a list of strings"
    untraced = Tracer(None)
    with pytest.raises(BadRequest, match="start the gateway with --trace-file"):
        untraced.update("m", {"trace_level": ["TIMESTAMPS"]})
    assert untraced.models == {} and untraced.sample("m") is None


def test_a_front_end_traces_by_the_first_process_s_settings_and_the_first_counts_and_numbers_its_traces(tmp_path: Path) -> None:
    first, front = Tracer(tmp_path / "trace.json"), Tracer(tmp_path / "trace.json", collected=True)
    first.update(None, {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
    first.update("m", {"trace_count": "3"})
    assert front.sample("m") is None, "off until the first process's settings arrive"
    front.adopt(first.state())
    mine = first.sample("m")  # the first process's own trace counts at once: 2 left
    assert mine is not None and mine.id == 1
    for _ in range(3):  # the front-end's copy still says 3
        trace = front.sample("m")
        assert trace is not None
        front.done(trace)
    assert front.sample("m") is None, "its own copy of the count is spent"
    first.accept(front.take())
    assert front.take() == [], "taken once"
    assert [r["id"] for r in first.take()] == [2, 3], "two of its three: the count across both processes is 3"
    assert first.settings("m")["trace_count"] == "0"
    front.adopt(first.state())
    assert front.sample("m") is None
    front.close()
    assert not list(tmp_path.iterdir()), "a front-end's tracer writes nothing itself"
