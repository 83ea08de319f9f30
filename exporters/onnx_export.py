"""torch module -> one self-contained, checked ONNX file with named symbolic dims."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn

from migserve.contract import DimRange, TensorSpec
from migserve.types import Array

from .errors import ExportFailed
from .request import DEFAULT_OPSET

logger = logging.getLogger(__name__)

ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "int64": onnx.TensorProto.INT64}


def export_onnx(
    module: nn.Module,
    example: Mapping[str, Array],
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    dims: Mapping[str, DimRange],
    *,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Export with torch's dynamo exporter, name the dims as the contract does, check it."""
    torch_dims = {name: torch.export.Dim(name, min=r.min, max=r.max) for name, r in dims.items()}
    dynamic_shapes = {spec.name: {axis: torch_dims[d] for axis, d in enumerate(spec.shape) if isinstance(d, str)} for spec in inputs}
    kwargs = {name: torch.from_numpy(value) for name, value in example.items()}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                args=(),
                kwargs=kwargs,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=[s.name for s in inputs],
                output_names=[s.name for s in outputs],
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; all mean the same to a user
            raise ExportFailed(f"torch.onnx.export failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        if program is None:
            raise ExportFailed("torch.onnx.export returned no program")
        path = Path(tmp) / "model.onnx"
        program.save(path, external_data=False)
        proto = onnx.load(str(path))
    name_dims(proto, inputs, outputs)
    check(proto)
    return proto


def name_dims(proto: onnx.ModelProto, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    """Give graph inputs and outputs the contract's dim names; refuse a graph that disagrees."""
    for kind, specs, values in (("input", inputs, proto.graph.input), ("output", outputs, proto.graph.output)):
        got = [v.name for v in values]
        if got != [s.name for s in specs]:
            raise ExportFailed(f"graph {kind}s are {got}, the contract says {[s.name for s in specs]}")
        for spec, value in zip(specs, values, strict=True):
            tensor = value.type.tensor_type
            if tensor.elem_type != ONNX_DTYPES[spec.dtype]:
                raise ExportFailed(
                    f"{kind} {spec.name}: graph dtype {onnx.TensorProto.DataType.Name(tensor.elem_type)}, contract {spec.dtype}"
                )
            if len(tensor.shape.dim) != len(spec.shape):
                raise ExportFailed(f"{kind} {spec.name}: graph rank {len(tensor.shape.dim)}, contract shape {spec.shape}")
            for dim, want in zip(tensor.shape.dim, spec.shape, strict=True):
                if isinstance(want, int):
                    if dim.HasField("dim_value") and dim.dim_value != want:
                        raise ExportFailed(f"{kind} {spec.name}: graph dim {dim.dim_value}, contract {want}")
                    dim.dim_value = want
                else:
                    if dim.HasField("dim_value"):
                        raise ExportFailed(f"{kind} {spec.name}: dim {want!r} was fixed to {dim.dim_value} by the exporter")
                    dim.dim_param = want


def check(proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportFailed(f"ONNX check failed: {_first_line(exc)}") from exc


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, fp32 inputs and outputs (so the contract's I/O stays fp32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted: onnx.ModelProto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    sort_nodes(converted.graph)  # the converter appends its input casts after their consumers
    check(converted)
    return converted


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after the producers of its inputs (stable otherwise)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportFailed(f"graph has a cycle or a dangling input near node {pending[0].name!r}")
        for node in ready:
            available.update(node.output)
        ordered += ready
        taken = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in taken]
    graph.ClearField("node")
    graph.node.extend(ordered)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
