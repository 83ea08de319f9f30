"""The gRPC messages of KServe v2 inference as the gateway's requests and answers: a ModelInferRequest decoded and
checked against the model's contract as an HTTP body is (service/api/tensors.py), the outputs as a ModelInferResponse,
and the parameters of the messages as plain values. service/api/grpc_service.py serves them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from tritonclient.grpc import service_pb2

from migserve.types import Array

from ..errors import BadRequest
from ..regions import PARAMETERS, Regions
from .classification import class_count, requested_classes, tensor_bytes
from .tensors import (
    V2_OF_DTYPE,
    DecodedRequest,
    binary_tensor,
    check_datatype,
    check_input_names,
    check_output_names,
    checked_inputs,
    listed_tensor,
    plan_of,
    region_tensor,
    shape_and_count,
    write_to_region,
)

if TYPE_CHECKING:
    from ..repository import ModelEntry

# The typed-contents field of each datatype (FP16 has none: raw only).
CONTENTS = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "INT8": "int_contents",
    "UINT8": "uint_contents",
    "BOOL": "bool_contents",
}


def _no_contents(tensor: Any, field: str, shape: list[int], count: int) -> str:
    """Why an input has no values: its data in another typed field than its datatype's, or none at all."""
    filled = ", ".join(f"contents.{descriptor.name}" for descriptor, _ in tensor.contents.ListFields())
    if filled:
        return f"input {tensor.name}: {tensor.datatype} values go in contents.{field}; the request filled {filled}"
    return f"input {tensor.name}: no data: give raw_input_contents or contents.{field} ({count} values for shape {shape})"


def decode_infer_request(request: Any, entry: ModelEntry, regions: Regions) -> DecodedRequest:
    """A ModelInferRequest as named arrays, checked against the contract like an HTTP body."""
    plan = plan_of(entry.contract)
    check_input_names(plan, [t.name for t in request.inputs])
    raw = request.raw_input_contents
    in_regions = {t.name: regions.slice_of(_parameters(t.parameters), f"input {t.name}") for t in request.inputs}
    sent = sum(where is None for where in in_regions.values())  # raw contents are for these, in order
    if raw and len(raw) != sent:
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {sent} inputs not in shared memory: give one per input, or none")
    arrays: dict[str, Array] = {}
    next_raw = 0
    for tensor in request.inputs:
        input_plan = plan.inputs[tensor.name]
        check_datatype(input_plan, tensor.datatype)
        shape, count = shape_and_count(input_plan, list(tensor.shape))
        where = in_regions[tensor.name]
        if (raw or where is not None) and tensor.contents.ListFields():  # Triton refuses it too
            given = "a shared memory region" if where is not None else "raw_input_contents"
            raise BadRequest(f"input {tensor.name}: its values are given both in {given} and in contents: give them once")
        if where is not None:
            arrays[tensor.name] = region_tensor(input_plan, shape, count, where)
            continue
        if raw:
            part = f"raw_input_contents[{next_raw}]"
            arrays[tensor.name] = binary_tensor(input_plan, shape, count, memoryview(raw[next_raw]), part)
            next_raw += 1
            continue
        field = CONTENTS.get(tensor.datatype)
        if field is None:
            raise BadRequest(f"input {tensor.name}: {tensor.datatype} has no typed contents in the protocol: send raw_input_contents")
        values = getattr(tensor.contents, field)
        if not values and count:
            raise BadRequest(_no_contents(tensor, field, shape, count))
        arrays[tensor.name] = listed_tensor(input_plan, shape, count, values)
    inputs, batch = checked_inputs(plan, arrays)
    outputs = tuple(o.name for o in request.outputs) or plan.output_names
    check_output_names(plan, list(outputs))
    out_regions = {o.name: regions.slice_of(_parameters(o.parameters), f"output {o.name}") for o in request.outputs}
    output_slices = {name: where for name, where in out_regions.items() if where is not None}
    counts = {o.name: _class_count(o) for o in request.outputs if "classification" in o.parameters}
    return DecodedRequest(
        id=request.id or None,
        inputs=inputs,
        batch=batch,
        outputs=outputs,
        binary_outputs=frozenset(outputs),
        timeout_s=_timeout(request),
        output_slices=output_slices,
        classes=requested_classes(counts, plan.labels, list(output_slices)),
    )


def _class_count(output: Any) -> int:
    """An output's classification parameter (tritonclient sends an int64_param)."""
    parameter = output.parameters["classification"]
    choice = parameter.WhichOneof("parameter_choice")
    return class_count(parameter.int64_param if choice == "int64_param" else plain(parameter), output.name)


def _parameters(parameters: Any) -> dict[str, Any]:
    """A tensor's shared-memory parameters (an InferParameter map) as plain values."""
    return {key: plain(parameters[key]) for key in PARAMETERS if key in parameters}


def plain(parameter: Any) -> Any:
    """An InferParameter's or a log SettingValue's value (None when none of its fields is set)."""
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def encode_infer_response(model: str, decoded: DecodedRequest, outputs: dict[str, Array]) -> Any:
    response = service_pb2.ModelInferResponse(model_name=model, model_version="1", id=decoded.id or "")
    for name in decoded.outputs:
        array = np.ascontiguousarray(outputs[name])
        response.outputs.add(name=name, datatype=V2_OF_DTYPE[array.dtype], shape=array.shape)
        if name in decoded.output_slices:
            write_to_region(name, array, decoded.output_slices[name])
            response.raw_output_contents.append(b"")  # in its region, as Triton answers it
        else:
            response.raw_output_contents.append(tensor_bytes(array))
    return response


def _timeout(request: Any) -> float | None:
    if "timeout" not in request.parameters:
        return None
    parameter = request.parameters["timeout"]
    value = parameter.int64_param if parameter.WhichOneof("parameter_choice") == "int64_param" else None
    if value is None or value <= 0:
        raise BadRequest("parameters.timeout must be a positive int64_param of microseconds")
    return float(value) / 1e6


def repository_parameters(request: Any) -> dict[str, Any]:
    """A model load or unload request's parameters as plain values (bool, int, str or bytes)."""
    return {name: getattr(value, value.WhichOneof("parameter_choice")) for name, value in request.parameters.items()}
