"""bench/trace_summary.py reads the gateway's trace files and tritonserver's (one timestamp per entry)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.trace_summary import read_traces, summary

# As tritonserver 2.51 wrote it here (--trace-config triton,file=...; its first trace, HTTP stamps left out).
TRITON = [
    {"id": 1, "model_name": "crowd-csrnet", "model_version": 1},
    {"id": 1, "timestamps": [{"name": "REQUEST_START", "ns": 55928921342713}]},
    {"id": 1, "timestamps": [{"name": "QUEUE_START", "ns": 55928921356734}]},
    {"id": 1, "timestamps": [{"name": "COMPUTE_START", "ns": 55928923552932}]},
    {"id": 1, "timestamps": [{"name": "COMPUTE_INPUT_END", "ns": 55928923598811}]},
    {"id": 1, "timestamps": [{"name": "COMPUTE_OUTPUT_START", "ns": 55928924281195}]},
    {"id": 1, "timestamps": [{"name": "COMPUTE_END", "ns": 55928924382898}]},
    {"id": 1, "timestamps": [{"name": "REQUEST_END", "ns": 55928924399663}]},
]
OURS = [
    {
        "id": 1,
        "model_name": "face-pros",
        "model_version": 1,
        "timestamps": [{"name": n, "ns": 1_000_000 * i} for i, n in enumerate(["REQUEST_START", "QUEUE_START", "COMPUTE_START"])],
    },
    {
        "id": 2,
        "model_name": "face-pros",
        "model_version": 1,
        "timestamps": [{"name": "REQUEST_START", "ns": 0}, {"name": "REQUEST_END", "ns": 4_000_000}],
    },
]


def test_both_forms_are_read_and_each_step_is_summed_where_both_its_stamps_are(tmp_path: Path) -> None:
    (tmp_path / "triton.json").write_text(json.dumps(TRITON))
    (tmp_path / "ours.json.0").write_text(json.dumps(OURS))
    traces = read_traces([tmp_path / "triton.json", tmp_path / "ours.json.0"])
    assert sorted((t["model_name"], len(t["stamps"])) for t in traces) == [("crowd-csrnet", 7), ("face-pros", 2), ("face-pros", 3)]
    table = summary(traces)
    assert "| crowd-csrnet | queue | 1 | 2.196 | 2.196 | 2.196 |" in table  # 55928923552932 - 55928921356734 ns
    assert "| face-pros | decode | 1 | 1.000 |" in table and "| face-pros | total | 2 | 3.000 |" in table  # 2 and 4 ms, first to last
    assert "| face-pros | run |" not in table, "no trace of it has both stamps"
