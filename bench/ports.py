"""A free local port, for the benches that start a gateway or a server (and the tests, through tests.helpers).

Here, not in tests/, since `migserve bench profile --mode gateway` starts a gateway with it and the installed
`migserve` command has bench/ but not tests/ to import from."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (another process may take it before the caller binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
