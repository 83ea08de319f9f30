"""Content-Encoding of inference bodies (service/api/encoding.py): which coding an Accept-Encoding picks, and round trips."""

from __future__ import annotations

import gzip
import zlib

import pytest

from service.api.encoding import answer_coding, compress, inflate
from service.errors import BadRequest, TooLarge, UnsupportedMedia


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        (None, None),
        ("", None),
        ("identity", None),
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("gzip, deflate", "gzip"),
        ("deflate, gzip;q=0.8", "deflate"),
        ("gzip;q=0, deflate;q=0.1", "deflate"),
        ("gzip;q=0", None),
        ("br;q=1.0, GZIP ; q=0.5", "gzip"),
        ("gzip;q=nonsense", None),
    ],
)
def test_the_coding_an_accept_encoding_picks(accept: str | None, coding: str | None) -> None:
    assert answer_coding(accept) == coding


def test_answers_read_back_with_the_standard_decoders_and_requests_inflate_within_the_limit() -> None:
    payload = b'{"outputs": []}' * 100
    assert gzip.decompress(compress(payload, "gzip")) == payload
    assert zlib.decompress(compress(payload, "deflate")) == payload
    assert inflate(gzip.compress(payload), "GZip", len(payload)) == payload
    with pytest.raises(TooLarge, match="inflates past the limit of 1499 bytes"):
        inflate(gzip.compress(payload), "gzip", len(payload) - 1)
    with pytest.raises(BadRequest, match="not valid deflate data"):
        inflate(b"\xff\xff\xff", "deflate", 100)  # neither zlib nor raw deflate (a reserved block type)
    with pytest.raises(UnsupportedMedia, match="'zstd' is not supported"):
        inflate(payload, "zstd", 100)
