"""may_hold_booleans: whether a JSON request's `data` lists may hold true or false among their numbers, read from
the text without looking at each value. It may say yes for nothing (the lists are then looked at); it must never
say no when a list holds a boolean, however the rest of the request is spelt."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.api.kserve import letters_past_f, may_hold_booleans

IMAGE = {"name": "image", "datatype": "FP32", "shape": [1, 3]}
ELSEWHERE: list[dict[str, Any]] = [
    {},
    {"id": "true or false"},
    {"id": "{braces} | ~ and tildes"},
    {"id": "trüe 中文 😀", "parameters": {"a": [{"b": [True, None, False]}]}},
    {"outputs": [{"name": "density", "parameters": {"binary_data": True}}], "parameters": None},
    {"id": "tr\u00fce " + "中" * 40},  # escaped: forty \u4e2d, one letter past 'f' each, spelt as six bytes
]


def _texts(request: dict[str, Any]) -> list[bytes]:
    """The request as clients write it: escaped to ASCII, UTF-8, compact, indented."""
    return [
        json.dumps(request).encode(),
        json.dumps(request, ensure_ascii=False).encode(),
        json.dumps(request, separators=(",", ":")).encode(),
        json.dumps(request, indent=2, ensure_ascii=False).encode(),
    ]


@pytest.mark.parametrize("elsewhere", ELSEWHERE)
@pytest.mark.parametrize("data", [[1.0, True, 2.5], [[0, 1], [False, 2]], [[[True]]], [1, 2, 3, False]])
def test_a_boolean_in_the_data_is_never_missed(elsewhere: dict[str, Any], data: list[Any]) -> None:
    request = elsewhere | {"inputs": [IMAGE | {"data": [1.5, 2.5]}, IMAGE | {"name": "mask", "data": data}]}
    for text in _texts(request):
        assert may_hold_booleans(request, letters_past_f(text)), text


@pytest.mark.parametrize("data", [[1.0, 2.5e-5, -3e7], [[0, 1], [1, 0]], [], [1e300, -0.0]])
def test_numbers_alone_with_plain_strings_need_no_second_look(data: list[Any]) -> None:
    for elsewhere in [ELSEWHERE[k] for k in (0, 1, 2, 4)]:  # ASCII strings with nothing to escape
        request = elsewhere | {"inputs": [IMAGE | {"data": data}]}
        for text in _texts(request):
            assert not may_hold_booleans(request, letters_past_f(text)), text


@pytest.mark.parametrize("name", ["line\nbreak", "caf\u00e9", "中文"])
def test_escapes_and_characters_past_ascii_cost_a_second_look(name: str) -> None:
    """Reckoned at their fewest letters: a newline as none (\\n has one), é as one (two bytes of UTF-8)."""
    request = {"id": name, "inputs": [IMAGE | {"data": [1.0, 2.0]}]}
    assert may_hold_booleans(request, letters_past_f(json.dumps(request, ensure_ascii=False).encode()))


def test_letters_are_counted_across_pieces() -> None:
    text = b"".join(bytes([i % 256]) * 1000 for i in range(300))  # 300,000 bytes: five pieces of 65,536 and a rest
    assert letters_past_f(text) == sum(1000 for i in range(300) if i % 256 > ord("f"))
    assert letters_past_f(b"") == 0
    assert letters_past_f(b'{"name": "x"}') == 5  # short: counted another way, the same
