"""How many client connections a gateway process takes at once, from its limit on open files (service/fds.py)."""

from __future__ import annotations

import resource

import pytest

from service import fds


@pytest.fixture
def open_files(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The soft limit on open files the functions see, set by the test."""
    limits = {"soft": 1024}
    monkeypatch.setattr(resource, "getrlimit", lambda _: (limits["soft"], resource.RLIM_INFINITY))
    return limits


@pytest.mark.parametrize(("soft", "limit"), [(300, 44), (1024, 768), (4096, 3687), (20000, 18000), (1 << 20, 943719)])
def test_the_default_leaves_a_tenth_of_the_open_files_and_at_least_the_reserve(open_files: dict[str, int], soft: int, limit: int) -> None:
    open_files["soft"] = soft
    assert fds.connection_limit(None)[0] == limit == fds.default_connection_limit()
    assert soft - limit >= fds.RESERVE


def test_no_limit_on_open_files_counts_as_the_kernels_ceiling(open_files: dict[str, int]) -> None:
    open_files["soft"] = resource.RLIM_INFINITY
    assert fds.connection_limit(None) == (fds.CEILING - fds.CEILING // 10, None)


def test_a_low_limit_is_warned_of_with_the_connections_it_leaves(open_files: dict[str, int]) -> None:
    open_files["soft"] = 1024
    limit, warning = fds.connection_limit(None)
    assert warning is not None and f"takes at most {limit} client connections at once" in warning and "503" in warning
    open_files["soft"] = fds.FEW
    assert fds.connection_limit(None)[1] is None
    assert fds.connection_limit(100) == (100, None)


def test_a_limit_given_that_leaves_the_gateway_too_few_files_is_kept_and_warned_of(open_files: dict[str, int]) -> None:
    open_files["soft"] = 20000
    assert fds.connection_limit(20000 - fds.RESERVE) == (20000 - fds.RESERVE, None)
    limit, warning = fds.connection_limit(19900)
    assert limit == 19900 and warning is not None
    assert f"Give at most {20000 - fds.RESERVE}" in warning and "not started again" in warning


def test_with_grpc_served_too_the_two_protocols_share_what_the_reserve_leaves(open_files: dict[str, int]) -> None:
    open_files["soft"] = 20000
    assert fds.connection_limit(None, protocols=2) == (9000, None)
    assert fds.connection_limit((20000 - fds.RESERVE) // 2, protocols=2)[1] is None
    limit, warning = fds.connection_limit(10000, protocols=2)
    assert limit == 10000 and warning is not None and "for HTTP and gRPC each" in warning
    open_files["soft"] = 1024
    warning = fds.connection_limit(None, protocols=2)[1]
    assert warning is not None and "at most 384 client connections at once over HTTP and as many over gRPC" in warning
