"""Which request heads the gateway's own connection serves, and which it hands to uvicorn."""

from __future__ import annotations

import pytest

from service.api.connection import parse_head
from service.api.uvicorn_protocol import without_upgrade

INFER = "POST /v2/models/face-pros/infer HTTP/1.1"


def test_an_inference_head_is_served_with_the_headers_it_reads() -> None:
    request = parse_head(
        f"{INFER}\r\nHost: x\r\ncontent-LENGTH:  600\r\nInference-Header-Content-Length: 120\r\nX-Timeout-Ms: 50\r\nAccept: */*".encode()
    )
    assert request is not None
    assert (request.name, request.length, request.close) == ("face-pros", 600, False)
    assert request.fields == {b"content-length": b"600", b"inference-header-content-length": b"120", b"x-timeout-ms": b"50"}


def test_a_versioned_path_and_connection_close() -> None:
    request = parse_head(b"POST /v2/models/m/versions/1/infer HTTP/1.1\r\nContent-Length: 2\r\nConnection: Close")
    assert request is not None and request.name == "m" and request.close


def test_an_upgrade_is_ignored_and_taken_out_of_a_head_uvicorn_reads() -> None:
    # the gateway serves no websockets and no h2c (curl --http2 asks for it): such a request is served as HTTP/1.1
    request = parse_head(f"{INFER}\r\nContent-Length: 2\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings".encode())
    assert request is not None and request.length == 2 and not request.close
    # httptools would end the request at its head and drop the body as the new protocol's: the field goes first
    data = b"POST /v1/crowd/count HTTP/1.1\r\nConnection: Upgrade\r\nupgrade :  websocket\r\nContent-Length: 2\r\n\r\nhi"
    assert without_upgrade(data) == b"POST /v1/crowd/count HTTP/1.1\r\nConnection: Upgrade\r\nContent-Length: 2\r\n\r\nhi"
    other = b"GET / HTTP/1.1\r\nX-Upgrade: 1\r\n\r\nUpgrade: in the body"
    assert without_upgrade(other) == other, "another field, and the body, are left"
    assert without_upgrade(b"GET / HTTP/1.1\r\nUpgrade: h2c") == b"GET / HTTP/1.1\r\nUpgrade: h2c", "a head not yet whole is left"


@pytest.mark.parametrize(
    "head",
    [
        "GET /v2/models/face-pros/infer HTTP/1.1\r\nContent-Length: 2",  # another method
        "POST /v2/models/face-pros HTTP/1.1\r\nContent-Length: 2",  # another path
        "POST /v2/models/face-pros/infer?x=1 HTTP/1.1\r\nContent-Length: 2",  # a query string
        "POST /v2/models/face%2Dpros/infer HTTP/1.1\r\nContent-Length: 2",  # an escape
        "POST /v2/models/face-pros/infer HTTP/1.0\r\nContent-Length: 2",  # HTTP/1.0
        "POST  /v2/models/face-pros/infer HTTP/1.1\r\nContent-Length: 2",  # a malformed request line
        f"{INFER}\r\nTransfer-Encoding: chunked",
        f"{INFER}\r\nContent-Length: 2\r\nExpect: 100-continue",
        f"{INFER}",  # no length
        f"{INFER}\r\nContent-Length: -2",
        f"{INFER}\r\nContent-Length: 2\r\nContent-Length: 2",  # repeated
        f"{INFER}\r\nContent-Length: 2\r\n folded continuation",
        f"{INFER}\r\nContent-Length : 2",  # space before the colon
        f"{INFER}\r\nno colon",
        f"{INFER}\r\nContent Length: 2\r\nContent-Length: 2",  # a space inside a name (httptools: not a token)
        f"{INFER}\r\nContent-Length: 2\r\nX-Trace(1): on",  # another character no token has
        f"{INFER}\r\nContent-Length: 2\r\nX-\xe9t\xe9: 1",  # nor a byte over 127
        f"{INFER}\r\nContent-Length: 2\r\nX-Note: a\x01b",  # a control character in a value
        f"{INFER}\r\nContent-Length: 2\r\nX-Note: a\x7fb",  # DEL
        f"{INFER}\r\nContent-Length: 2\r\nX-Note: a\rb",  # a CR alone
        f"{INFER}\r\n: 2\r\nContent-Length: 2",  # no name
    ],
)
def test_heads_it_hands_to_uvicorn(head: str) -> None:
    assert parse_head(head.encode("latin-1")) is None


def test_a_tab_and_bytes_over_127_in_a_value_are_taken() -> None:
    # RFC 9110's field-value: tabs and obs-text are allowed (httptools takes them too), and an empty value
    request = parse_head(f"{INFER}\r\nContent-Length: 2\r\nX-Note: a\tb\xe9\r\nX-Empty:\r\nUser_Agent: x".encode("latin-1"))
    assert request is not None and request.length == 2
