"""Images in and out: strict decoding with errors that say what was wrong, and PNG encoding.

Pillow decodes (it refuses truncated JPEGs and PNGs with bad checksums, where
OpenCV would fill the missing rows with grey); the format is read from the
file's first bytes, never from a file name or a client's content type.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from migserve.types import Array

from ..errors import ServiceError, TooLarge, Unprocessable, UnsupportedMedia

IMAGE_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}


def image_format(data: bytes) -> str | None:
    return next((fmt for magic, fmt in IMAGE_MAGIC.items() if data.startswith(magic)), None)


def decode_image(data: bytes, *, field: str, max_pixels: int, mode: str = "RGB", charge: Callable[[int], None] = lambda n: None) -> Array:
    """JPEG or PNG bytes -> uint8 array, [H, W, 3] for RGB or [H, W] for L. `charge` is told the image's pixels from its
    header, before it is decoded (service/api/v1.py counts what its endpoint holds for them; it raises to refuse)."""
    if not data:
        raise Unprocessable(f"{field}: the upload is empty")
    fmt = image_format(data)
    if fmt is None:
        raise UnsupportedMedia(f"{field}: not a JPEG or PNG image (first bytes {data[:8].hex()})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width * height > max_pixels:
                raise TooLarge(f"{field}: {width}x{height} image is over the limit of {max_pixels} pixels")
            charge(width * height)
            image.load()
    except ServiceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge(f"{field}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise Unprocessable(f"{field}: corrupt {fmt} image: {exc}") from None
    if width < 1 or height < 1:
        raise Unprocessable(f"{field}: the image has no pixels")
    return np.asarray(image.convert(mode))


def encode_png(pixels: Array) -> bytes:
    """uint8 [H, W] or [H, W, 3] -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def from_base64(text: str, *, field: str) -> bytes:
    """`text` decoded as base64.b64decode(validate=True) does, but read where it is: b64decode copies a str to bytes
    first, which held a file's base64 twice for a moment (bench/json_memory.py)."""
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise Unprocessable(f"{field}: not valid base64 ({exc})") from None


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
