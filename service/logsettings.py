"""Triton's logging extension: read and change the gateway's log level while it runs.

`GET /v2/logging` and gRPC's LogSettings (no settings) answer Triton's six settings;
`POST /v2/logging` (or LogSettings with settings) changes some of them. They map onto
the gateway's Python logging level: verbose > 0 is DEBUG, else INFO while log_info is
on, else WARNING while log_warning is on, else ERROR while log_error is on, else
nothing. The gateway logs to stderr in one format, so log_file must stay "" and
log_format "default". With `serve --frontends`, every front-end process takes the same changes
(service/api/frontends.py). Workers log only warnings and errors (service/workers/process.py), whatever the level.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .errors import BadRequest

SWITCHES = ("log_info", "log_warning", "log_error")
OFF = logging.CRITICAL + 10
UINT32_MAX = 2**32 - 1
LOGGERS = ("", "uvicorn", "uvicorn.error")  # the root (migserve's modules log through it) and uvicorn's own


class LogSettings:
    def __init__(self, level: int) -> None:
        self.values: dict[str, Any] = {
            "log_file": "",
            "log_info": level <= logging.INFO,
            "log_warning": level <= logging.WARNING,
            "log_error": level <= logging.ERROR,
            "log_verbose_level": 1 if level <= logging.DEBUG else 0,
            "log_format": "default",
        }

    @classmethod
    def current(cls) -> LogSettings:
        return cls(logging.getLogger().getEffectiveLevel())

    def update(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Check every change first, then apply them all; the settings after."""
        for key, value in changes.items():
            if key not in self.values:
                raise BadRequest(f"unknown log setting {key!r}; the settings are {sorted(self.values)}")
            if key in SWITCHES and type(value) is not bool:
                raise BadRequest(f"{key} must be true or false, not {value!r}")
            if key == "log_verbose_level" and (type(value) is not int or not 0 <= value <= UINT32_MAX):
                # Triton's is a uint32: a larger one was taken here, and every gRPC LogSettings call then failed
                raise BadRequest(f"log_verbose_level must be an integer from 0 to {UINT32_MAX}, not {value!r}")
            if key == "log_file" and value != "":
                raise BadRequest("log_file cannot be set: the gateway logs to stderr (redirect it, or use your supervisor's log)")
            if key == "log_format" and value != "default":
                raise BadRequest(f"log_format {value!r}: the gateway has one format, 'default'")
        self.values.update(changes)
        level = self.level()
        for name in LOGGERS:
            logging.getLogger(name).setLevel(level)
        return dict(self.values)

    def level(self) -> int:
        if self.values["log_verbose_level"] > 0:
            return logging.DEBUG
        for key, level in zip(SWITCHES, (logging.INFO, logging.WARNING, logging.ERROR), strict=True):
            if self.values[key]:
                return level
        return OFF


INVALID_HTTP = "Invalid HTTP request received."  # what uvicorn's HTTP protocols log (WARNING) as they answer 400
INVALID_HTTP_EVERY_S = 60.0
# uvicorn's WARNINGs when a client asks to upgrade the connection (a websocket; `curl --http2`'s h2c): the gateway
# serves no websockets and answers such a request as plain HTTP/1.1, as HTTP allows, so neither says anything of use,
# and the second tells the operator to install a websocket library the gateway has no use for
UPGRADE_LINES = ("Unsupported upgrade request.", "No supported WebSocket library detected.")


class OncePer:
    """Whether to log now: the first time, then once `every_s` has passed since the last time said yes (a line a
    minute for a flood of the same event)."""

    __slots__ = ("_clock", "_next", "every_s")

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self._clock = every_s, clock
        self._next: float | None = None

    def due(self) -> bool:
        now = self._clock()
        if self._next is not None and now < self._next:
            return False
        self._next = now + self.every_s
        return True


class InvalidRequests(logging.Filter):
    """On uvicorn's error logger: a request whose HTTP cannot be parsed is the client's mistake, answered 400, yet
    uvicorn logs a WARNING for each, so a scanner or a broken client fills the operator's log. Each is counted
    (`count`: migserve_http_invalid_requests_total) and the first of each minute logged, saying so. uvicorn's lines
    for a request that asks for an upgrade (UPGRADE_LINES) are not logged at all."""

    def __init__(self, count: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.count = count
        self._logging = OncePer(INVALID_HTTP_EVERY_S, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(UPGRADE_LINES):
            return False
        if record.msg != INVALID_HTTP:
            return True
        self.count()
        if not self._logging.due():
            return False
        record.msg = (
            f"{INVALID_HTTP} Answered 400 (the client's HTTP could not be parsed); more within {INVALID_HTTP_EVERY_S:g} s "
            "are counted in migserve_http_invalid_requests_total, not logged"
        )
        return True


def watch_invalid_requests(count: Callable[[], None]) -> Callable[[], None]:
    """InvalidRequests on uvicorn's error logger, from now until the function returned is called (a gateway's life)."""
    invalid = InvalidRequests(count)
    logging.getLogger("uvicorn.error").addFilter(invalid)
    return lambda: logging.getLogger("uvicorn.error").removeFilter(invalid)
