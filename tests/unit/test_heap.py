"""The gateway's allocator setting: glibc must accept it where the gateway runs (Linux, glibc)."""

from __future__ import annotations

import platform

import pytest

from service.heap import keep_request_buffers_in_heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_mmap_and_trim_thresholds() -> None:
    assert keep_request_buffers_in_heap() is True
