"""The export's estimate of a run's memory beyond the weights (exporters/memory.py), on graphs whose answer is known."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.memory import estimate
from migserve.contract import DimRange

DIMS = {"batch": DimRange(min=1, max=8, default=1), "width": DimRange(min=1, max=64, default=4)}


def _graph(nodes: list[onnx.NodeProto], outputs: list[str], weights: tuple[onnx.TensorProto, ...] = ()) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])
    ys = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
    return helper.make_model(helper.make_graph(nodes, "g", [x], ys, initializer=list(weights)), opset_imports=[helper.make_opsetid("", 18)])


def test_the_peak_is_the_most_bytes_live_at_once_at_the_largest_batch_and_default_sizes() -> None:
    # every tensor is 8 x 4 float32 = 128 bytes; a is read by b and c, so a, b and c are live together at c
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["c"]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    memory = estimate(_graph(nodes, ["y"]), DIMS)
    assert (memory.activation_bytes, memory.batch, memory.unsized_tensors) == (3 * 128, 8, 0)
    chain = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    assert estimate(_graph(chain, ["y"]), DIMS).activation_bytes == 2 * 128, "a tensor is let go after its last reader"


def test_weights_are_not_counted_and_a_value_sized_tensor_counts_nothing_but_is_named() -> None:
    w = numpy_helper.from_array(np.ones((4, 1000), np.float32), "w")  # 16 KB of weights
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("NonZero", ["h"], ["y"])]
    memory = estimate(_graph(nodes, ["y"], (w,)), DIMS)
    assert memory.activation_bytes == 8 * 4 * 4 + 8 * 1000 * 4  # x and h, not w; y's size hangs on h's values
    assert memory.unsized_tensors == 1
