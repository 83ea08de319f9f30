"""Triton's trace extension: timestamps of sampled inference requests, written to a JSON file.

`serve --trace-file PATH` says where traces go (as Triton's `--trace-config triton,file=PATH`; the file
cannot be changed over the network, as in Triton). Settings are changed while the gateway runs, for
every model or one (`POST /v2[/models/{name}]/trace/setting`, gRPC `TraceSetting`, tritonclient's
`update_trace_settings`), each value a string as Triton has them:

  trace_level    ["OFF"] or ["TIMESTAMPS"] (TENSORS, Triton's tensor dumps, is refused)
  trace_rate     every N-th request of a model is traced (default 1000)
  trace_count    how many more traces to take, -1 without end; counts down as traces are taken
  log_frequency  every N traces go to PATH.<k> (k = 0, 1, ...); 0: all of them to PATH when the gateway stops
  trace_mode     "triton", the only one

A model's own settings override the global ones key by key; a null value clears one (a model's falls back
to the global one, a global one to its default). A model with settings of its own counts its own rate and
trace_count. Each trace is `{"id", "model_name", "model_version", "timestamps": [{"name", "ns"}, ...]}`, the
form Triton's trace documentation gives, with the timestamps Triton's requests carry in the gateway's terms:
HTTP_RECV_START (the request's head is read) and HTTP_RECV_END (its whole body is in), REQUEST_START (decoding
begins), QUEUE_START (the request enters its model's queue), COMPUTE_START (its batch is sent),
COMPUTE_INPUT_END (the batch is in the worker's shared memory), COMPUTE_OUTPUT_START (the worker answered),
COMPUTE_END (the request's rows are cut out), REQUEST_END (its answer is encoded), HTTP_SEND_START and
HTTP_SEND_END (the answer handed to the socket); a gRPC request has no HTTP_ stamps, and one whose client
went away none of HTTP_SEND. `ns` is time.monotonic_ns(), a steady clock as Triton's (one clock for every process
of the host).

With `--frontends N` every process traces the requests it takes. The first process keeps the settings and the file:
it sends its settings to the other front-ends as they change and every TRACE_SYNC_S, and takes their finished
traces each time, numbering them in its own sequence and writing them as its own. Each process counts the rate
over its own requests (every N-th of a process's requests). trace_count is kept by the first process across all:
a front-end counts down its copy between two syncs, and traces past the count are dropped as they arrive. As the
gateway stops, a front-end finishes the requests it holds and sends what it traced since the last sync as it exits.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadRequest, NotSupported

logger = logging.getLogger(__name__)

LEVELS = ("OFF", "TIMESTAMPS")
DEFAULTS: dict[str, Any] = {"trace_level": ("OFF",), "trace_rate": 1000, "trace_count": -1, "log_frequency": 0}
LOWEST = {"trace_rate": 1, "trace_count": -1, "log_frequency": 0}
HELD_AT_MOST = 100_000  # traces kept in memory for log_frequency 0; past this, new ones are dropped (with a warning)
TRACE_SYNC_S = 1.0  # with --frontends: how often the first process sends its settings and takes the others' traces


@dataclass
class Trace:
    """One sampled request's timestamps."""

    id: int
    model: str
    stamps: list[tuple[str, int]] = field(default_factory=list)

    def stamp(self, name: str, ns: int | None = None) -> None:
        self.stamps.append((name, time.monotonic_ns() if ns is None else ns))

    def record(self) -> dict[str, Any]:
        timestamps = [{"name": name, "ns": ns} for name, ns in self.stamps]
        return {"id": self.id, "model_name": self.model, "model_version": 1, "timestamps": timestamps}


@dataclass(frozen=True)
class TraceState:
    """The settings in force: what the first process sends its front-ends."""

    base: dict[str, Any]
    models: dict[str, dict[str, Any]]


class Tracer:
    def __init__(self, file: Path | None, *, collected: bool = False) -> None:
        """`collected`: a front-end process's tracer, whose traces the first process takes (`take`) and writes."""
        self.file, self.collected = file, collected
        self.base: dict[str, Any] = dict(DEFAULTS)
        self.models: dict[str, dict[str, Any]] = {}  # model -> the settings it overrides
        self._seen: dict[str | None, int] = {}  # requests counted for the rate, per settings owner (None: global)
        self._held: list[dict[str, Any]] = []
        self._next_id = 1
        self._next_file = 0
        self._dropped = False

    def settings(self, model: str | None = None) -> dict[str, Any]:
        """The settings in force for `model` (or the global ones), as Triton answers them: strings."""
        values = self._effective(model)
        return {
            "trace_level": list(values["trace_level"]),
            "trace_rate": str(values["trace_rate"]),
            "trace_count": str(values["trace_count"]),
            "log_frequency": str(values["log_frequency"]),
            "trace_file": str(self.file or ""),
            "trace_mode": "triton",
        }

    def update(self, model: str | None, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Apply `changes` (all checked first: a bad one changes nothing) and answer the settings now in force."""
        parsed = {key: _parsed(key, value) for key, value in changes.items()}
        target = dict(self.base if model is None else self.models.get(model, {}))
        for key, value in parsed.items():
            if key == "trace_mode":
                continue  # checked by _parsed: the only mode there is
            if value is not None:
                target[key] = value
            elif model is None:
                target[key] = DEFAULTS[key]
            else:
                target.pop(key, None)
        if self.file is None and {**self.base, **target}["trace_level"] != ("OFF",):
            raise BadRequest("tracing needs a file: start the gateway with --trace-file PATH")
        if model is None:
            self.base = target
        elif target:
            self.models[model] = target
        else:
            self.models.pop(model, None)
        self._seen.pop(model if model in self.models else None, None)  # the rate counts afresh
        return self.settings(model)

    def sample(self, model: str) -> Trace | None:
        """A trace for this request of `model` if the settings say it is one to trace, else None."""
        if self.file is None:
            return None  # no tracing without a file
        owner = model if model in self.models else None
        values = self._effective(model)
        if values["trace_level"] == ("OFF",) or values["trace_count"] == 0:
            return None
        seen = self._seen[owner] = self._seen.get(owner, 0) + 1
        if seen % values["trace_rate"]:
            return None
        self._count_down(model, values["trace_count"])
        trace = Trace(self._next_id, model)
        self._next_id += 1
        return trace

    def done(self, trace: Trace) -> None:
        """A traced request is answered: keep its trace, and write a file's worth once there is one."""
        self._keep(trace.record())

    def state(self) -> TraceState:
        return TraceState(dict(self.base), {model: dict(values) for model, values in self.models.items()})

    def adopt(self, state: TraceState) -> None:
        """A front-end: the first process's settings from now on (the rate goes on counting)."""
        self.base, self.models = dict(state.base), {model: dict(values) for model, values in state.models.items()}

    def take(self) -> list[dict[str, Any]]:
        """A front-end: its finished traces, for the first process."""
        held, self._held = self._held, []
        self._dropped = False
        return held

    def accept(self, records: list[dict[str, Any]]) -> None:
        """The first process: a front-end's traces, counted against trace_count, numbered here and kept."""
        for record in records:
            model = record["model_name"]
            count = self._effective(model)["trace_count"]
            if count == 0:
                continue  # past the count: the front-end sampled it before it heard the count was reached
            self._count_down(model, count)
            self._keep(record | {"id": self._next_id})
            self._next_id += 1

    def close(self) -> None:
        """The gateway stops: what is held goes to the trace file itself (log_frequency 0) or the next numbered one."""
        if self._held and self.file is not None and not self.collected:
            if self._next_file:
                self._write(self.file.with_name(f"{self.file.name}.{self._next_file}"))
            else:
                self._write(self.file)

    def _count_down(self, model: str, count: int) -> None:
        if count > 0:
            self.models.get(model, self.base)["trace_count"] = count - 1

    def _keep(self, record: dict[str, Any]) -> None:
        if len(self._held) >= HELD_AT_MOST:
            if not self._dropped:
                logger.warning("%d traces held for --trace-file %s: set log_frequency to write them as they come", HELD_AT_MOST, self.file)
                self._dropped = True
            return
        self._held.append(record)
        frequency = self._effective(record["model_name"])["log_frequency"]
        if frequency and len(self._held) >= frequency and not self.collected:
            assert self.file is not None
            self._write(self.file.with_name(f"{self.file.name}.{self._next_file}"))
            self._next_file += 1

    def _write(self, path: Path) -> None:
        held, self._held = self._held, []
        try:
            path.write_text(json.dumps(held))
        except OSError as exc:
            logger.error("could not write %d traces to %s: %s", len(held), path, exc)

    def _effective(self, model: str | None) -> dict[str, Any]:
        return {**self.base, **self.models.get(model, {})} if model is not None else dict(self.base)


def _parsed(key: str, value: Any) -> Any:
    """A setting's value as the tracer keeps it; None clears it. BadRequest (or 501 for the file) names the problem."""
    if key == "trace_file":
        raise NotSupported("trace file location can not be updated through network protocol: start the gateway with --trace-file")
    if key == "trace_mode":
        if value not in (None, "triton", ["triton"]):
            raise BadRequest(f"trace_mode {value!r} is not supported: the gateway writes Triton's trace format ('triton')")
        return value
    if key not in DEFAULTS:  # before null's clearing: an unknown one cleared was a KeyError (500)
        raise BadRequest(f"unknown trace setting {key!r}; the settings are {sorted([*DEFAULTS, 'trace_file', 'trace_mode'])}")
    if value is None:
        return None
    if key == "trace_level":
        if type(value) is not list or not value or not all(isinstance(v, str) for v in value):
            raise BadRequest(f'trace_level must be a list of levels such as ["TIMESTAMPS"], not {value!r}')
        levels = tuple(dict.fromkeys(v.upper() for v in value))
        if unknown := [v for v in levels if v not in LEVELS]:
            raise BadRequest(f"trace_level {unknown} is not supported: the gateway traces OFF or TIMESTAMPS (no TENSORS)")
        wanted = tuple(v for v in levels if v != "OFF")
        return wanted or ("OFF",)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]  # gRPC sends every value as a list of strings
    if type(value) is str and value.lstrip("-").isdigit():
        value = int(value)
    if type(value) is not int or value < LOWEST[key]:
        raise BadRequest(f"{key} must be an integer (as a string) of at least {LOWEST[key]}, not {value!r}")
    return value
