"""bench/fuzz.py counts each traceback in the gateway's log as a failure: an exception after an answer shows in no status."""

from __future__ import annotations

from bench.fuzz import tracebacks

# as uvicorn logged it during `bench.fuzz --seed 12` at 1a6634b, between the fuzzer's progress lines
LOG = """  200 of each kind, 0 failures
ERROR:    Exception in ASGI application
Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/uvicorn/protocols/http/httptools_impl.py", line 422, in run_asgi
    result = await app(  # type: ignore[func-returns-value]
             ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/service/api/fastpath.py", line 221, in read_body
    message = await receive()
              ^^^^^^^^^^^^^^^
  File "uvloop/handles/stream.pyx", line 680, in uvloop.loop.UVStream.write
RuntimeError: Cannot call write() after write_eof()
  300 of each kind, 0 failures
2026-12-02 17:57:14,461 INFO service.api.app: the models on the CPU slices take 66 of the 23019 MB they share
"""


def test_each_traceback_is_found_with_its_message_and_exception() -> None:
    assert tracebacks(LOG) == ["ERROR:    Exception in ASGI application ... RuntimeError: Cannot call write() after write_eof()"]
    assert tracebacks(LOG + LOG) == tracebacks(LOG) * 2


def test_a_log_without_one_has_none() -> None:
    assert tracebacks(LOG.replace("Traceback (most recent call last):", "")) == []
    assert tracebacks("") == []
