"""service/api/grpc_stalls.py on real TCP connections: a client that takes nothing has its socket shut down, one that
reads slowly does not, an answer that is out is no longer watched (gRPC's side of it: tests/integration/test_gateway_grpc.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from service.api.grpc_stalls import StalledCalls, _address
from tests.helpers import ipv6_loopback

TIMEOUT = 0.4


# Where the test's server listens, and how grpc 1.85 names a client there (context.peer(), captured).
FAMILIES = [
    ("127.0.0.1", "ipv4:127.0.0.1:{}"),
    pytest.param(("::1", "ipv6:%5B::1%5D:{}"), marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback address")),
]


@pytest.fixture(params=FAMILIES, ids=["ipv4", "ipv6"])
def listener(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, str]]:
    host, name = request.param
    with socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET) as server:
        yield server, name


@dataclass(frozen=True)
class _Named:
    """A call as the watch sees it (a grpc.aio ServicerContext has more): its client's name."""

    name: str

    def peer(self) -> str:
        return self.name


def _pair(listener: tuple[socket.socket, str]) -> tuple[socket.socket, socket.socket, str]:
    """A client with a small receive buffer, the server's end with its send buffer full, and gRPC's name of the client."""
    sock, name = listener
    client = socket.socket(sock.family)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(sock.getsockname())
    server, _ = sock.accept()
    server.setblocking(False)
    _fill(server)
    return client, server, name.format(client.getsockname()[1])


def _fill(server: socket.socket) -> None:
    try:
        while True:
            server.send(bytes(1 << 16))
    except BlockingIOError:
        pass


def _shut(server: socket.socket) -> bool:
    try:
        server.send(b"x")
    except BlockingIOError:
        return False
    except BrokenPipeError:
        return True
    return False


async def _watched(
    peer: str, seconds: float, reader: socket.socket | None = None, server: socket.socket | None = None, out: bool = False
) -> None:
    stalls, call = StalledCalls(TIMEOUT), _Named(peer)
    stalls.watch(call, 1 << 20)
    if out:
        stalls.done(call)
    end = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < end:
        if reader is not None and server is not None:  # a slow link: 8 KB every 50 ms, the server keeps writing
            reader.recv(8192)
            _fill(server)
        await asyncio.sleep(0.05)


def test_a_client_that_takes_nothing_is_cut_in_about_twice_the_timeout(listener: tuple[socket.socket, str]) -> None:
    client, server, peer = _pair(listener)
    with client, server:
        asyncio.run(_watched(peer, 2.5 * TIMEOUT + 0.2))
        assert _shut(server)


def test_a_client_that_reads_slowly_keeps_its_connection(listener: tuple[socket.socket, str]) -> None:
    client, server, peer = _pair(listener)
    with client, server:
        client.settimeout(1)
        asyncio.run(_watched(peer, 5 * TIMEOUT, reader=client, server=server))
        assert not _shut(server)


def test_an_answer_that_is_out_is_not_watched(listener: tuple[socket.socket, str]) -> None:
    client, server, peer = _pair(listener)
    with client, server:
        asyncio.run(_watched(peer, 2.5 * TIMEOUT + 0.2, out=True))
        assert not _shut(server)


def test_grpc_names_of_clients_are_read_as_the_socket_names_them() -> None:
    assert _address("ipv4:10.0.0.5:41234") == ("10.0.0.5", 41234)
    assert _address("ipv6:%5B::1%5D:41234") == ("::1", 41234)  # as grpc 1.85 names it
    assert _address("ipv6:[::1]:41234") == ("::1", 41234)
    assert _address("ipv6:%5B::ffff:10.0.0.5%5D:41234") == ("10.0.0.5", 41234)  # an IPv4 client of a dual-stack socket
    assert _address("ipv6:[fe80::1%eth0]:41234") == ("fe80::1", 41234)
    assert _address("unix:/tmp/migserve.sock") is None
    assert _address("ipv4:not-an-address:1") is None
