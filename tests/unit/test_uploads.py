"""Reading a /v1 request (service/api/uploads.py): what it holds beside the body is counted in --max-pending-mb.

A multipart file part is read back into bytes of its own (starlette spools the part; the body stays held for the
request), and a JSON body's values become Python objects up to 24 times its size; both are added to the request's
Hold, so that the gateway's budget sees them, and refused (503) past it."""

from __future__ import annotations

import asyncio
import base64
import json
import random

import pytest
from starlette.requests import Request

from service.api.budget import BodyBudget, Hold
from service.api.limits import HOLD
from service.api.uploads import JSON_OBJECT_BYTES, LONG_STRING, MARKS_PER_BYTE, json_held_bytes, read_upload
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


def _expected(values: list[object], ensure_ascii: bool = True) -> tuple[bytes, int]:
    """A JSON object of `values`, and what json_held_bytes should count for it, from each string's own encoding."""
    encoded = [json.dumps(value, ensure_ascii=ensure_ascii) for value in values]
    body = ("{" + ", ".join(f'"k{i}": {text}' for i, text in enumerate(encoded)) + "}").encode()
    long = sum(
        len(text.encode()) - 2
        for value, text in zip(values, encoded, strict=True)
        if isinstance(value, str) and len(text.encode()) - 2 >= LONG_STRING
    )
    per_byte = 1 if body.isascii() else 4
    if body.count(b'"') + body.count(b"\\") > MARKS_PER_BYTE * len(body):
        return body, JSON_OBJECT_BYTES * len(body)  # mostly short strings and escapes: counted as structure
    return body, JSON_OBJECT_BYTES * (len(body) - long) + (per_byte + 1) * long


def test_long_strings_in_json_are_counted_at_what_they_take_and_everything_else_at_24_bytes_a_byte() -> None:
    """A base64 file in a JSON body takes about 1.75 bytes a byte as text and decoded, not 24: the long strings are
    found between unescaped quotes, whatever runs of backslashes precede a quote, so that no body can pass its
    structure off as a string."""
    rng = random.Random(0)
    file = base64.b64encode(rng.randbytes(300_000)).decode()
    body, count = _expected([file, "crowd", 3])
    assert json_held_bytes(body) == count and 1.9 < count / len(body) < 2.1
    tricky = ['a "quoted" word ' * 8, "\\" * 40, "back\\slash\\" * 10 + '"', 'x\\"' * 30, "ends in a backslash\\" * 5]
    looked = 0  # bodies whose strings were looked for, not all counted as structure
    for _ in range(40):
        values: list[object] = [rng.choice([*tricky, file[: rng.randrange(200)], rng.random(), [1, 2], "ab"]) for _ in range(12)]
        body, count = _expected([*values, file[: rng.randrange(1000, 3000)]])
        assert json_held_bytes(body) == count, body
        looked += count < JSON_OBJECT_BYTES * len(body)
    assert looked >= 20
    body, count = _expected(["Zürich, 東京 " * 20, file[:1000]], ensure_ascii=False)
    assert json_held_bytes(body) == count and count == JSON_OBJECT_BYTES * len(body) - (JSON_OBJECT_BYTES - 5) * (len(body) - 20)
    numbers = b'["\\\\", ' + b"0.5, " * 20_000 + b'"b"]'  # a string of one backslash, then numbers: no long string
    assert json.loads(numbers)[0] == "\\" and json_held_bytes(numbers) == JSON_OBJECT_BYTES * len(numbers)
    for everything in (b'{"a": "' + b"x" * 1000, json.dumps(["ab"] * 10_000).encode(), b""):  # unpaired, short strings, empty
        assert json_held_bytes(everything) == JSON_OBJECT_BYTES * len(everything)


def test_a_base64_file_in_json_is_counted_near_its_size() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    body = json.dumps({"image": base64.b64encode(data).decode()}).encode()
    budget = BodyBudget(4 << 20)
    with Hold(budget) as hold:
        upload = asyncio.run(read_upload(_request(body, "application/json", hold), "image", 2 << 20))
        assert upload.data == data and budget.held == json_held_bytes(body) < 2.01 * len(body)
    assert budget.held == 0
