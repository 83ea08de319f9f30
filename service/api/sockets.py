"""Listening sockets: IPv6 ones that take IPv4 clients too, and ports that several processes bind (SO_REUSEPORT)."""

from __future__ import annotations

import socket


def tcp_socket(host: str) -> socket.socket:
    """A TCP socket for `host`; an IPv6 one takes IPv4 clients too (an address such as "::" means both, as gRPC
    takes it; asyncio's own listeners would take IPv6 alone)."""
    if ":" not in host:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return sock


def bracketed(host: str) -> str:
    """`host` as it goes before ":port" in an address: an IPv6 one in brackets ("::" is "[::]")."""
    return f"[{host}]" if ":" in host else host


def reuse_port_socket(host: str, port: int, *, listen: bool = True, shared: bool = True) -> socket.socket:
    """A listening socket that other processes of this user can bind too (SO_REUSEPORT): the kernel spreads
    new connections over all of them (listen=False: the port is only held; shared=False: no other may bind it)."""
    sock = tcp_socket(host)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(shared))
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    sock.set_inheritable(False)
    return sock
