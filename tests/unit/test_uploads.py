"""Reading a /v1 request (service/api/uploads.py): what it holds beside the body is counted in --max-pending-mb.

A multipart file part is read back into bytes of its own (starlette spools the part; the body stays held for the
request), and a JSON body's values become Python objects up to 24 times its size; both are added to the request's
Hold, so that the gateway's budget sees them, and refused (503) past it."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from service.api.budget import BodyBudget, Hold
from service.api.limits import HOLD
from service.api.uploads import JSON_OBJECT_BYTES, read_upload
from service.errors import TooLarge, Unavailable

BOUNDARY = "migserve-test"


def _request(body: bytes, content_type: str, hold: Hold) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/v1/crowd/count", "query_string": b"", HOLD: hold}
    scope["headers"] = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def _multipart(data: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def test_a_multipart_file_part_is_counted_beside_its_body() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    budget = BodyBudget(3 << 20)
    with Hold(budget) as hold:
        upload = asyncio.run(read_upload(_request(_multipart(data), f"multipart/form-data; boundary={BOUNDARY}", hold), "image", 1 << 20))
        assert upload.data == data and budget.held == len(data)
    assert budget.held == 0
    small = BodyBudget(len(data) - 1)
    with Hold(small) as hold, pytest.raises(Unavailable, match=r"more would pass --max-pending-mb"):
        asyncio.run(read_upload(_request(_multipart(data), f"multipart/form-data; boundary={BOUNDARY}", hold), "image", 1 << 20))
    assert small.held == 0


def test_a_json_body_is_bounded_and_counted_at_what_its_values_may_take() -> None:
    body = json.dumps({"features": [[0.5] * 64] * 4, "sentence": "a person sits"}).encode()
    budget = BodyBudget(1 << 20)
    with Hold(budget) as hold:
        upload = asyncio.run(read_upload(_request(body, "application/json", hold), "features", 1 << 20))
        assert upload.inline == [[0.5] * 64] * 4 and upload.fields == {"sentence": "a person sits"}
        assert budget.held == JSON_OBJECT_BYTES * len(body)
    with (
        Hold(budget) as hold,
        pytest.raises(TooLarge, match=r"a JSON body of \d+ bytes is over --max-json-mb 0.000976562: send the features as a multipart part"),
    ):
        asyncio.run(read_upload(_request(body, "application/json", hold), "features", 1024))
    assert budget.held == 0
