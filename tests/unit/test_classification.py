"""Triton's classification extension in the gateway (service/api/classification.py): what a real tritonserver's
answers cannot show, as its outputs are floats without ties (test_triton_partition.py compares those)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from service.api.classification import Classes, class_count, tensor_bytes, top_classes
from service.errors import BadRequest


def test_equal_values_keep_index_order_and_integers_have_no_decimals() -> None:
    values = np.array([[3, 7, 7, 1], [0, 0, 0, 9]], dtype=np.int64)
    answer = top_classes(values, Classes(3, ("a", "b")))
    assert answer.tolist() == [[b"7:1:b", b"7:2", b"3:0:a"], [b"9:3", b"0:0:a", b"0:1:b"]]


def test_a_count_past_the_values_answers_them_all_over_the_flattened_row() -> None:
    values = np.array([[[0.25, 0.5], [1.0, -2.0]]], dtype=np.float32)
    assert top_classes(values, Classes(10)).tolist() == [[b"1.000000:2", b"0.500000:1", b"0.250000:0", b"-2.000000:3"]]


def test_bytes_go_out_length_first() -> None:
    answer = top_classes(np.array([[0.5, 0.125]], dtype=np.float32), Classes(2, ("x", "yz")))
    assert tensor_bytes(answer) == struct.pack("<I", 12) + b"0.500000:0:x" + struct.pack("<I", 13) + b"0.125000:1:yz"


@pytest.mark.parametrize("value", [-1, 2.0, "2", True, None])
def test_a_count_must_be_a_non_negative_integer(value: object) -> None:
    with pytest.raises(BadRequest, match="'classification' must be a non-negative integer"):
        class_count(value, "expression")
    assert class_count(0, "expression") == 0
