"""Inference requests' tensors checked against a model's contract, for both protocols' codecs (service/api/kserve.py
for HTTP bodies, service/api/grpc_codec.py for gRPC messages): names, datatypes, ranks, fixed and named dims, the batch
size and value ranges; and the decoded request they make. Every problem raises BadRequest naming the tensor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from migserve.contract import Contract, TensorSpec
from migserve.types import Array

from ..errors import BadRequest
from ..regions import Slice
from .classification import BYTES, Classes

V2_TYPES = {
    "FP32": "float32",
    "FP16": "float16",
    "FP64": "float64",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}
NUMPY_TO_V2 = {v: k for k, v in V2_TYPES.items()}
V2_OF_DTYPE = {np.dtype(v): k for k, v in V2_TYPES.items()}  # dtype.name is slow enough to show per request
V2_OF_DTYPE[BYTES] = "BYTES"  # outputs only: classification answers (service/api/classification.py)


@dataclass(frozen=True)
class DecodedRequest:
    id: str | None
    inputs: dict[str, Array]
    batch: int
    outputs: tuple[str, ...]  # requested, in order
    binary_outputs: frozenset[str]
    timeout_s: float | None
    output_slices: Mapping[str, Slice] = field(default_factory=dict)  # outputs to write into shared memory regions
    classes: Mapping[str, Classes] = field(default_factory=dict)  # outputs to answer as their top classes


@dataclass(frozen=True)
class InputPlan:
    """One input's checks, worked out once per contract instead of on every request."""

    spec: TensorSpec
    dtype: np.dtype[Any]
    datatype: str  # its KServe v2 name
    dims: tuple[int | tuple[str, int, int], ...]  # a fixed size, or (name, min, max) with batch capped by max_batch_size
    shown: str


@dataclass(frozen=True)
class Plan:
    contract: Contract
    inputs: dict[str, InputPlan]
    expected: list[str]  # input names, in the contract's order
    output_names: tuple[str, ...]
    labels: dict[str, tuple[str, ...]]  # outputs whose values are per class: their labels


_plans: dict[int, Plan] = {}


def plan_of(contract: Contract) -> Plan:
    """The contract's checks, worked out on first use."""
    plan = _plans.get(id(contract))
    if plan is not None and plan.contract is contract:
        return plan
    inputs = {}
    for spec in contract.inputs:
        dims: list[int | tuple[str, int, int]] = []
        for dim in spec.shape:
            if isinstance(dim, int):
                dims.append(dim)
            else:
                limits = contract.dims[dim]
                top = contract.batching.max_batch_size if dim == "batch" else limits.max
                dims.append((dim, limits.min, top))
        shown = "[" + ", ".join(str(d) for d in spec.shape) + "]"
        inputs[spec.name] = InputPlan(spec, np.dtype(spec.dtype), NUMPY_TO_V2[spec.dtype], tuple(dims), shown)
    plan = Plan(contract, inputs, [s.name for s in contract.inputs], tuple(o.name for o in contract.outputs), contract.class_labels())
    _plans[id(contract)] = plan
    return plan


def check_datatype(plan: InputPlan, datatype: object) -> None:
    if datatype != plan.datatype:
        raise BadRequest(f"input {plan.spec.name}: datatype {datatype!r}, the model expects {plan.datatype}")


def shape_and_count(plan: InputPlan, shape: object) -> tuple[list[int], int]:
    """A shape given as a list of non-negative integers, and its element count."""
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest(f"input {plan.spec.name}: 'shape' must be a list of non-negative integers, got {shape!r}")
    count = 1
    for d in shape:
        count *= d
    return shape, count


def binary_tensor(plan: InputPlan, shape: list[int], count: int, data: memoryview, where: str) -> Array:
    """A tensor read in place from its raw bytes (`where` names them in an error)."""
    size = count * plan.dtype.itemsize
    if len(data) != size:
        raise BadRequest(f"input {plan.spec.name}: {where} has {len(data)} bytes, but shape {shape} of {plan.datatype} needs {size}")
    return np.frombuffer(data, dtype=plan.dtype).reshape(shape)


# What numpy makes of a JSON list, by kind, that an input of each kind takes: numbers for a float input (as Triton
# does), integers for an integer one. Converting straight to the input's dtype took true as 1.0, "2.5" as 2.5 and
# 2.7 as 2 for an INT64 input.
_LISTED_KINDS = {"f": "fiu", "i": "i"}
_KIND_NAMES = {
    "b": "booleans",
    "U": "strings",
    "f": "numbers that are not all 64-bit integers (fractions, or past INT64's range)",
    "u": "integers past INT64's range",
    "O": "values of mixed or unsupported types",
}


def listed_tensor(plan: InputPlan, shape: list[int], count: int, values: Any, booleans: bool = False) -> Array:
    """A tensor from a list of values (JSON `data`, or a gRPC request's typed contents). `booleans`: the list may
    hold JSON booleans among its numbers, which numpy would take as 1 and 0 (see may_hold_booleans)."""
    try:
        raw = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"input {plan.spec.name}: data is not {plan.datatype}: {exc}") from None
    wanted = "integers" if plan.dtype.kind == "i" else "numbers"
    if raw.size and raw.dtype.kind not in _LISTED_KINDS.get(plan.dtype.kind, plan.dtype.kind):
        found = _KIND_NAMES.get(raw.dtype.kind, f"{raw.dtype} values")
        raise BadRequest(f"input {plan.spec.name}: data holds {found}; {plan.datatype} takes {wanted}")
    if booleans and bool in set(map(type, np.asarray(values, dtype=object).ravel())):
        raise BadRequest(f"input {plan.spec.name}: data holds booleans among its numbers; {plan.datatype} takes {wanted}")
    try:
        with np.errstate(over="raise"):  # 1e39 for FP32 would be inf, and numpy would only warn in the log
            array = raw.astype(plan.dtype, copy=False)
    except FloatingPointError:
        largest = np.finfo(plan.dtype).max
        raise BadRequest(f"input {plan.spec.name}: data holds numbers past {plan.datatype}'s range (largest {largest:.8g})") from None
    if array.size != count:
        raise BadRequest(f"input {plan.spec.name}: {array.size} values for shape {shape} ({count} expected)")
    return array.reshape(shape)


def region_tensor(plan: InputPlan, shape: list[int], count: int, where: Slice) -> Array:
    """A tensor copied out of a shared memory region as the request is decoded (service/regions.py), so that the
    client changing its bytes later cannot change the batch. The copy costs less than receiving the bytes would."""
    data = where.read(f"input {plan.spec.name}")
    return binary_tensor(plan, shape, count, data, f"shared memory region '{where.region.name}'")


def _check_shape(plan: InputPlan, shape: tuple[int, ...], bound: dict[str, int]) -> None:
    name = plan.spec.name
    if len(shape) != len(plan.dims):
        raise BadRequest(f"input {name}: shape {list(shape)} has rank {len(shape)}, the model expects {plan.shown}")
    for size, dim in zip(shape, plan.dims, strict=True):
        if type(dim) is int:
            if size != dim:
                raise BadRequest(f"input {name}: shape {list(shape)}, the model expects {plan.shown}")
            continue
        dim_name, low, high = dim  # type: ignore[misc]
        if not low <= size <= high:
            raise BadRequest(f"input {name}: {dim_name}={size} is outside [{low}, {high}]")
        if bound.setdefault(dim_name, size) != size:
            raise BadRequest(f"input {name}: {dim_name}={size}, but another input has {dim_name}={bound[dim_name]}")


def _check_values(spec: TensorSpec, array: Array) -> None:
    """An integer input with a range in its contract (token ids) holds only values in it: onnxruntime would read a
    negative id as one counted from the end of the table, and fail on one past it with a message about a node."""
    if spec.values is None or array.size == 0:
        return
    low, high = spec.values
    outside = (array < low) | (array > high)
    if outside.any():
        where = np.unravel_index(int(outside.argmax()), array.shape)
        raise BadRequest(
            f"input {spec.name}: {int(outside.sum())} values outside [{low}, {high}] ({spec.description}), "
            f"the first {int(array[where])} at index {[int(i) for i in where]}"
        )


def check_input_names(plan: Plan, given: list[Any]) -> None:
    if not all(type(n) is str for n in given):
        raise BadRequest(f"every input needs a 'name' string; got names {given!r}")
    if twice := sorted({n for n in given if given.count(n) > 1}):
        raise BadRequest(f"inputs {twice} are given more than once")
    if len(given) != len(plan.expected) or set(given) != set(plan.expected):
        missing = sorted(set(plan.expected) - set(given))
        unknown = sorted(set(given) - set(plan.expected))
        raise BadRequest(f"model {plan.contract.name} takes inputs {plan.expected}; missing {missing}, unknown {unknown}")


def checked_inputs(plan: Plan, inputs: dict[str, Array]) -> tuple[dict[str, Array], int]:
    """The inputs in the contract's order, each shape checked (named dims agreeing), and the batch size."""
    bound: dict[str, int] = {}
    for name, array in inputs.items():
        _check_shape(plan.inputs[name], array.shape, bound)
        _check_values(plan.inputs[name].spec, array)
    return {name: inputs[name] for name in plan.expected}, bound["batch"]


def write_to_region(name: str, array: Array, where: Slice) -> None:
    """An output written into its shared memory region; BadRequest if the region's slice is too small."""
    if array.nbytes > where.byte_size:
        raise BadRequest(
            f"output {name}: shared_memory_byte_size {where.byte_size} is too small for its {array.nbytes} bytes "
            f"(shape {list(array.shape)})"
        )
    where.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data, f"output {name}")


def check_output_names(plan: Plan, names: list[str]) -> None:
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise BadRequest(f"outputs {twice} are requested more than once")
    if unknown := [name for name in names if name not in plan.output_names]:
        raise BadRequest(f"unknown outputs {unknown}; model {plan.contract.name} has {sorted(plan.output_names)}")
