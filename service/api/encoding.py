"""Compressed inference bodies, as tritonclient sends and asks for them and Triton serves them.

Requests: `Content-Encoding: gzip` or `deflate` (tritonclient's `request_compression_algorithm=`). The body
is inflated before it is decoded, up to `--max-body-mb` of inflated bytes (413 past it, so a small body
cannot inflate without bound), and the inflated bytes are counted in `--max-pending-mb` with the compressed
ones.

Answers: with `Accept-Encoding: gzip` or `deflate` (tritonclient's `response_compression_algorithm=`) a
JSON answer of more than a few hundred bytes goes out compressed, with its `Content-Encoding`, at zlib's
fastest level (a face-pros answer: 2,781 bytes to 1,390 in 0.01 ms). An answer with binary tensor data goes
out as it is, which HTTP allows (Triton would compress it): float tensors hardly shrink, and the CPU they
would take is the models' (an lns-stations answer: 852,130 bytes to 779,941, 8%, for 18 ms of CPU;
`bench/compression.py`).
Clients such as httpx and requests ask for gzip by default.

Bodies over 256 KiB are inflated and deflated on a thread (zlib lets go of the GIL), so the event loop answers
other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import zlib

from ..errors import BadRequest, TooLarge, UnsupportedMedia
from .budget import Hold
from .kserve import Body

WINDOW_BITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
IDENTITY = frozenset({"", "identity"})
ON_THREAD = 256 << 10  # bodies larger than this are inflated or deflated off the event loop (a few ms of zlib)
WORTH_COMPRESSING = 512  # answers up to this size go out as they are: a gzip header and trailer are 18 bytes


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


def answer_coding(accept: str | None) -> str | None:
    """The coding to compress an answer with, from the client's Accept-Encoding: gzip or deflate, the one with the
    higher q-value (gzip on a tie); None for neither (or both refused with q=0)."""
    if not accept:
        return None
    weights: dict[str, float] = {}
    for item in accept.split(","):
        coding, _, rest = item.partition(";")
        quality = 1.0
        key, _, value = rest.strip().partition("=")
        if key.strip() == "q":
            try:
                quality = float(value)
            except ValueError:
                quality = 0.0
        weights[coding.strip().lower()] = quality
    best = max(("gzip", "deflate"), key=lambda c: weights.get(c, 0.0))
    return best if weights.get(best, 0.0) > 0 else None


async def compressed(payload: bytes, coding: str) -> bytes:
    if len(payload) > ON_THREAD:
        return await asyncio.to_thread(compress, payload, coding)
    return compress(payload, coding)


def compress(payload: bytes, coding: str) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, WINDOW_BITS[coding])
    return packer.compress(payload) + packer.flush()
