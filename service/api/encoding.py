"""Compressed inference request bodies: `Content-Encoding: gzip` or `deflate`, as tritonclient sends them
with `request_compression_algorithm=` (and Triton accepts).

The body is inflated before it is decoded, up to `--max-body-mb` of inflated bytes (413 past it, so a small
body cannot inflate without bound), and the inflated bytes are counted in `--max-pending-mb` with the
compressed ones. Large bodies are inflated on a thread (zlib lets go of the GIL), so the event loop answers
other requests meanwhile. Answers are not compressed: a client that asks for it (`Accept-Encoding`) gets
them as they are, which HTTP allows.
"""

from __future__ import annotations

import asyncio
import zlib

from ..errors import BadRequest, TooLarge, UnsupportedMedia
from .budget import Hold
from .kserve import Body

WINDOW_BITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
IDENTITY = frozenset({"", "identity"})
ON_THREAD = 1 << 20  # compressed bodies larger than this are inflated off the event loop


def is_identity(encoding: str | None) -> bool:
    return encoding is None or encoding.strip().lower() in IDENTITY


async def inflated(body: Body, encoding: str, limit: int, hold: Hold) -> Body:
    """The body as it was before `encoding`, within `limit` bytes; its size is added to `hold`."""
    if len(body) > ON_THREAD:
        plain = await asyncio.to_thread(inflate, body, encoding, limit)
    else:
        plain = inflate(body, encoding, limit)
    hold.add(len(plain))
    return plain


def inflate(body: Body, encoding: str, limit: int) -> bytes:
    name = encoding.strip().lower()
    bits = WINDOW_BITS.get(name)
    if bits is None:
        raise UnsupportedMedia(f"Content-Encoding {encoding!r} is not supported: send the body as it is, or as gzip or deflate")
    try:
        return _inflate(body, bits, name, limit)
    except zlib.error as exc:
        if name != "deflate":
            raise BadRequest(f"request body is not valid {name} data: {exc}") from None
    try:  # some clients send deflate without zlib's header and checksum
        return _inflate(body, -zlib.MAX_WBITS, name, limit)
    except zlib.error as exc:
        raise BadRequest(f"request body is not valid {name} data: {exc}") from None


def _inflate(body: Body, bits: int, name: str, limit: int) -> bytes:
    inflater = zlib.decompressobj(bits)
    plain = inflater.decompress(body, limit + 1)
    if len(plain) > limit:
        raise TooLarge(f"request body inflates past the limit of {limit} bytes (--max-body-mb)")
    if not inflater.eof:
        raise BadRequest(f"request body is truncated {name} data")
    if inflater.unused_data:
        raise BadRequest(f"request body has {len(inflater.unused_data)} bytes after the end of its {name} data")
    return plain
