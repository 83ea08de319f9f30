"""How much memory a model's run takes beyond its weights, estimated from its graph at export (contract.json's `memory`).

The inputs are fixed at the largest batch and the dims' default sizes; ONNX shape inference gives every tensor's size;
walking the nodes in order (an exported graph is topologically sorted), a tensor is live from the node that makes it
to the last node that reads it, and the peak of the live bytes is the estimate. onnxruntime's planner reuses buffers
the same way, so the two agree on large models: paper-size lns-organs at batch 4 is estimated at 2048 MB and grows a
process by 2125 MB when run (bench/footprint.py, bench/RESULTS.md). A tensor whose size hangs on values (a top-k,
a nonzero) cannot be sized before the run: it counts 0 bytes, and `unsized_tensors` says how many there were.

The gateway places models by it (service/placement.py): a 3D U-Net at batch 4 needs gigabytes that its 22 MB file
gives no hint of.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import onnx
from onnx import helper

from migserve.contract import DimRange, Memory


def estimate(proto: onnx.ModelProto, dims: Mapping[str, DimRange]) -> Memory:
    """Peak bytes of the tensors between the layers (weights not counted) at the largest batch, default sizes."""
    sizes = {name: (r.max if name == "batch" else r.default) for name, r in dims.items()}
    graph = _inferred(proto, sizes).graph
    nbytes: dict[str, int] = {}
    unsized = 0
    for value in (*graph.input, *graph.value_info, *graph.output):
        size = _nbytes(value)
        if size is None:
            unsized += 1
        else:
            nbytes[value.name] = size
    return Memory(activation_bytes=_peak(graph, nbytes), batch=sizes["batch"], unsized_tensors=unsized)


def _inferred(proto: onnx.ModelProto, sizes: Mapping[str, int]) -> onnx.ModelProto:
    """A copy with the inputs' named dims fixed at `sizes` and every other tensor's shape inferred from them."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    del fixed.graph.value_info[:]
    for value in fixed.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]
    for value in fixed.graph.output:  # left for inference to size
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.ClearField("dim_param")
    return onnx.shape_inference.infer_shapes(fixed, data_prop=True)  # data_prop: shapes computed in the graph


def _peak(graph: onnx.GraphProto, nbytes: Mapping[str, int]) -> int:
    """The most bytes live at once, a tensor live from the node that makes it to the last that reads it."""
    weights = {t.name for t in graph.initializer}
    last_read: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            last_read[name] = index
    for value in graph.output:
        last_read[value.name] = len(graph.node)  # outputs live to the end
    live = peak = sum(nbytes.get(value.name, 0) for value in graph.input)
    for index, node in enumerate(graph.node):
        live += sum(nbytes.get(name, 0) for name in node.output)
        peak = max(peak, live)
        live -= sum(nbytes.get(name, 0) for name in set(node.input) if name not in weights and last_read.get(name) == index)
    return peak


def _nbytes(value: onnx.ValueInfoProto) -> int | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape") or not tensor.elem_type:
        return None
    if not all(dim.HasField("dim_value") for dim in tensor.shape.dim):
        return None
    itemsize = int(helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize)
    return int(math.prod(dim.dim_value for dim in tensor.shape.dim)) * itemsize
