"""uvicorn's WARNING for each request it cannot parse, counted and logged once a minute (service/logsettings.py)."""

from __future__ import annotations

import logging

import pytest

from service.logsettings import INVALID_HTTP, InvalidRequests, watch_invalid_requests


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, message, None, None)


def test_each_invalid_request_is_counted_and_the_first_of_each_minute_logged() -> None:
    counted: list[int] = []
    now = [100.0]
    invalid = InvalidRequests(lambda: counted.append(1), clock=lambda: now[0])
    first = _record(INVALID_HTTP)
    assert invalid.filter(first) and "more within 60 s are counted in migserve_http_invalid_requests_total" in first.getMessage()
    now[0] += 59.0
    assert not invalid.filter(_record(INVALID_HTTP)), "a second one within the minute is not logged"
    now[0] += 1.0
    assert invalid.filter(_record(INVALID_HTTP)), "one a minute later is"
    assert len(counted) == 3, "each is counted"
    assert invalid.filter(_record("Finished server process [1]")) and len(counted) == 3, "other messages pass, uncounted"


def test_the_filter_is_on_uvicorn_s_error_logger_until_it_is_taken_off(caplog: pytest.LogCaptureFixture) -> None:
    counted: list[int] = []
    logger = logging.getLogger("uvicorn.error")
    with caplog.at_level(logging.WARNING, logger="uvicorn.error"):
        unwatch = watch_invalid_requests(lambda: counted.append(1))
        for _ in range(3):
            logger.warning(INVALID_HTTP)
        unwatch()
        logger.warning(INVALID_HTTP)
    assert len(counted) == 3, "counted while watched, not after"
    said = [r.getMessage() == INVALID_HTTP for r in caplog.records]
    assert said == [False, True], "the first logged with its note, the others not; then as uvicorn has it"
