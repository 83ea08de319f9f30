"""Reading a /v1 request: a multipart form, a JSON object, or the file itself as the body.

Every endpoint takes one file (an image, a volume, features) and a few options.
The file comes as a multipart part, as base64 in a JSON field, or as the raw
body with the options in the query string; the options are then validated by
the endpoint's pydantic model, so a bad option is a 422 that names it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from migserve.types import Array

from ..errors import BadRequest, TooLarge, Unprocessable, UnsupportedMedia
from ..families.media import from_base64
from .kserve import json_object
from .limits import HOLD

Options = TypeVar("Options", bound=BaseModel)
# What a JSON body's values take as Python objects, per byte of it, at most: "{}," is a 64-byte dict and an 8-byte list
# slot (a float's "0.0," 8x). Parsing takes some 12x more for a moment, in the event loop, one body at a time.
JSON_OBJECT_BYTES = 24
# ... except in strings of this many bytes or more (a base64 file): 1 byte a byte as text (4 where the body has any
# non-ASCII text, which Python may keep at 4 bytes a character), and 3/4 more once decoded, counted as 1.
LONG_STRING = 64
# Bodies with more quotes and backslashes than this, per byte, are counted at JSON_OBJECT_BYTES throughout: their strings
# are short (and take that much anyway), and finding them would take index arrays larger than the body.
MARKS_PER_BYTE = 1 / 8
# python-multipart logs what is wrong with a client's form at WARNING, then raises; the client's 400 says it instead
logging.getLogger("python_multipart").setLevel(logging.ERROR)
RAW_TYPES = ("image/", "application/octet-stream", "application/gzip", "application/zip", "application/dicom", "application/x-npy")


@dataclass(frozen=True)
class Upload:
    data: bytes | None  # the file, if one came
    fields: dict[str, Any]  # every other field: form values are strings, JSON values keep their types
    inline: Any = None  # the file field given in JSON as a value rather than base64 (features as a nested list)


async def read_upload(request: Request, file_field: str, max_json_bytes: int) -> Upload:
    """The request's file and options. A JSON body is parsed whole in the event loop, as a KServe request's JSON is,
    and into Python objects several times its size: past `max_json_bytes` (--max-json-mb) it is refused (413), and
    what its objects take is counted with the body in --max-pending-mb (the request's Hold, api/limits.py)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = dict(request.query_params)
    if media == "multipart/form-data":
        return await _multipart(request, file_field, query)
    if media == "application/json":
        body = await request.body()
        if len(body) > max_json_bytes:
            raise TooLarge(
                f"a JSON body of {len(body)} bytes is over --max-json-mb {max_json_bytes / (1 << 20):g}: send the "
                f"{file_field} as a multipart part (curl -F '{file_field}=@FILE') or as the body itself"
            )
        request.scope[HOLD].add(json_held_bytes(body))  # counted with the body: 503 past --max-pending-mb
        fields = json_object(body, "a JSON object")
        raw = fields.pop(file_field, None)
        if raw is not None and not isinstance(raw, str):
            return Upload(None, query | fields, inline=raw)
        return Upload(from_base64(raw, field=file_field) if raw is not None else None, query | fields)
    if media.startswith(RAW_TYPES):
        return Upload(await request.body(), query)
    raise UnsupportedMedia(
        f"content type {media or 'none'!r}: send multipart/form-data with a {file_field!r} part, "
        f"application/json with {file_field!r} in base64, or the file itself as the body"
    )


def json_held_bytes(body: bytes) -> int:
    """What a JSON body's values may take as Python objects: JSON_OBJECT_BYTES a byte, but for its long strings (a
    base64 file: some 1.75 bytes a byte as text and decoded, where 24 would refuse a few large images at once). The
    strings are found between the quotes that no odd run of backslashes escapes, with numpy; a body with more of them
    than MARKS_PER_BYTE is counted at JSON_OBJECT_BYTES throughout, as is one whose quotes do not pair (the parser
    refuses it)."""
    data = np.frombuffer(body, dtype=np.uint8)
    everything = JSON_OBJECT_BYTES * len(body)
    quotes = np.flatnonzero(data == ord('"'))
    backslashes = np.flatnonzero(data == ord("\\"))
    if len(quotes) + len(backslashes) > MARKS_PER_BYTE * len(body):
        return everything
    if len(backslashes):
        quotes = quotes[~_escaped(quotes, backslashes)]
    if len(quotes) % 2:
        return everything
    lengths = quotes[1::2] - quotes[::2] - 1
    long = int(lengths[lengths >= LONG_STRING].sum())
    per_byte = 1 if body.isascii() else 4
    return JSON_OBJECT_BYTES * (len(body) - long) + (per_byte + 1) * long


def _escaped(quotes: Array, backslashes: Array) -> Array:
    """Which quotes follow an odd run of backslashes: `\\"` is a quote within a string, `\\\\"` a backslash and the end."""
    breaks = np.flatnonzero(np.diff(backslashes) != 1)
    firsts = backslashes[np.concatenate(([0], breaks + 1))]
    lasts = backslashes[np.concatenate((breaks, [len(backslashes) - 1]))]
    run = np.minimum(np.searchsorted(lasts, quotes - 1), len(lasts) - 1)
    escaped: Array = (lasts[run] == quotes - 1) & ((lasts[run] - firsts[run]) % 2 == 0)  # an odd run ends there
    return escaped


async def _multipart(request: Request, file_field: str, query: dict[str, str]) -> Upload:
    try:
        form = await request.form(max_files=4, max_fields=32)
    except HTTPException as exc:
        raise BadRequest(f"malformed multipart body: {_parser_said(exc) or exc.detail}") from None
    fields: dict[str, Any] = dict(query)
    data: bytes | None = None
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != file_field:
                    raise Unprocessable(f"unexpected file part {key!r}; this endpoint takes its file as {file_field!r}")
                data = await value.read()
                request.scope[HOLD].add(len(data))  # a copy of the part, beside the body: counted with it
            else:
                fields[key] = value
    finally:
        await form.close()
    if data is None and isinstance(fields.get(file_field), str):
        raise Unprocessable(f"{file_field!r} must be a file part (curl -F '{file_field}=@FILE'), not a text field")
    return Upload(data, fields)


def _parser_said(exc: BaseException) -> str | None:
    """What python-multipart found wrong (e.g. "Expected boundary character 45, got 120 at index 3"): Starlette
    answers "Invalid multipart data." and keeps the parser's error as the cause of its own."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain of a few exceptions; never a cycle to follow far
        if seen is None:
            return None
        if type(seen).__module__.startswith("python_multipart"):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def require_file(upload: Upload, file_field: str) -> bytes:
    if upload.data is None and upload.inline is not None:  # JSON, but not the list of values some endpoints take
        raise Unprocessable(f"{file_field!r} must be the file as base64 text, not {type(upload.inline).__name__} {upload.inline!r:.40}")
    if upload.data is None:
        raise Unprocessable(f"no {file_field!r} in the request")
    return upload.data


def options(model: type[Options], upload: Upload) -> Options:
    try:
        return model.model_validate(upload.fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise Unprocessable(f"{where}: {first['msg']}") from None
