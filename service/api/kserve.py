"""KServe v2 / Open Inference Protocol bodies: JSON tensors and the binary-tensor extension.

`decode_request` turns a body into named arrays checked against the model's
contract (names, datatypes, ranks, fixed and named dims, batch size: service/api/tensors.py);
`encode_response` writes outputs as JSON data or as binary after a JSON header.
Every problem raises BadRequest with a message that names the tensor.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson

from migserve.contract import Contract
from migserve.types import Array

from ..errors import BadRequest, TooLarge
from ..regions import Regions, Slice
from .classification import BYTES, class_count, json_strings, requested_classes, tensor_bytes
from .tensors import (
    V2_OF_DTYPE,
    DecodedRequest,
    InputPlan,
    Plan,
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

HEADER_LENGTH = "inference-header-content-length"
Body = bytes | memoryview  # a request body: bytes from the ASGI path, a view of the raw connection's buffer
# What GET /v2 and gRPC's ServerMetadata announce.
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "model_repository",  # the index always; load and unload with --model-control-mode explicit
    "model_repository(unload_dependents)",
    "statistics",
    "system_shared_memory",
    "logging",
    "trace",  # with serve --trace-file
]


def json_object(raw: bytes, expected: str = "a JSON object with an 'inputs' list") -> dict[str, Any]:
    """Parsed with orjson (with its numpy output for answers, 2.6x the JSON rate of the json module: bench/RESULTS.md).
    What orjson refuses is tried again with the json module, which also reads the NaN and Infinity that Python's
    json.dumps writes, and whose error messages the client gets."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(raw)
        except ValueError as exc:  # malformed JSON, bytes that are not UTF-8, an integer of over 4300 digits
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise BadRequest("request body is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise BadRequest(f"request body must be {expected}")
    return value


def parameters_of(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """The `parameters` object of the request, an input or an output ({} if absent)."""
    parameters = entry.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}: 'parameters' must be a JSON object, not {parameters!r}"[:300])
    return parameters


def _split(body: Body, header_length: str | None, max_json: int) -> tuple[dict[str, Any], int, memoryview]:
    """The JSON header, the bytes past 'f' in its text (see may_hold_booleans), and the binary data after it. JSON
    is parsed in the event loop (a face-pros request's 150k floats: 10.7 ms of gateway CPU, bench/RESULTS.md): past
    `max_json` bytes it is refused rather than stall every other request for long."""
    if header_length is None:
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
        if not 0 < n <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
    if n > max_json:
        raise TooLarge(
            f"the request's JSON is {n} bytes, over the limit of {max_json} (--max-json-mb): send tensors as binary data "
            "(the binary tensor extension, binary_data_size; tritonclient does by default) or in shared memory"
        )
    text = bytes(body[:n])
    letters = letters_past_f(text)  # while the text is in the caches
    return json_object(text), letters, memoryview(body)[n:]


def letters_past_f(text: bytes) -> int:
    """How many bytes of `text` are past 'f', counted a piece at a time: a comparison of the whole text at once
    took fresh memory (page faults) and cost a JSON face-pros row 2.9 ms, not 0.2. A short text (a binary request's
    header) is counted by deleting the rest: 0.2 us for 377 bytes against numpy's 2.3."""
    if len(text) <= _SHORT:
        return len(text.translate(None, _TO_F))
    chars, counted = np.frombuffer(text, np.uint8), 0
    past = np.empty(min(len(chars), _PIECE), bool)
    for start in range(0, len(chars), _PIECE):
        piece = chars[start : start + _PIECE]
        counted += int(np.count_nonzero(np.greater(piece, _F, out=past[: len(piece)])))
    return counted


def may_hold_booleans(header: dict[str, Any], letters: int) -> bool:
    """Whether an input's JSON `data` may hold booleans. numpy promotes [true, 1.5] to [1.0, 1.5], and looking at
    every value's type costs about a fifth of decoding a list of floats (0.4 of 2.3 ms for a face-pros row on this
    host), so it is done only when the text has more bytes past 'f', `letters` (t, r, u of true; l, s of false;
    never in a number; braces), than the header has at least outside `data`. A string written with escapes may
    count more in the text than reckoned: then the lists are looked at for nothing; never less, so booleans in
    `data` are never missed."""
    try:
        outside = 2  # the header's braces
        for key, value in header.items():
            outside += _letters(key)
            if key != "inputs":
                outside += _letters(value)
                continue
            for entry in value:  # dicts, as decode_request checked
                outside += 2 + sum(_letters(k) + (0 if k == "data" else _letters(v)) for k, v in entry.items())
    except RecursionError:  # parameters nested past Python's limit
        return True
    return letters > outside


_F = ord("f")
_PIECE = 1 << 16
_SHORT = 4096
_TO_F = bytes(range(_F + 1))  # deleted, to count the bytes past 'f'
_LITERAL_LETTERS = {True: 3, False: 2, None: 4}  # true, false, null


def _letters(value: Any) -> int:
    """The fewest bytes past 'f' that `value` can take in JSON text: a character past 'f' is one however written
    (t, or \\u0074), a character past ASCII at least one (two or more bytes of UTF-8, or the u of \\u00fc)."""
    if value is True or value is False or value is None:
        return _LITERAL_LETTERS[value]
    if type(value) is str:  # past ASCII: \xfc or \u4e2d, one letter each (\U0001f600 none: fewer is safe)
        return len(value.encode("ascii", "backslashreplace").translate(None, _TO_F))
    if type(value) is dict:
        return 2 + sum(_letters(k) + _letters(v) for k, v in value.items())  # its braces are past 'f' too
    if type(value) is list:
        return sum(_letters(v) for v in value)
    return 0  # a number: digits, '.', '-', '+', 'e' and 'E'


def _array(
    entry: dict[str, Any], plan: InputPlan, binary: memoryview, offset: int, regions: Regions, *, booleans: bool
) -> tuple[Array, int]:
    name = plan.spec.name
    check_datatype(plan, entry.get("datatype"))
    shape, count = shape_and_count(plan, entry.get("shape"))
    parameters = parameters_of(entry, f"input {name}")
    where = regions.slice_of(parameters, f"input {name}")
    if where is not None:
        if "data" in entry or "binary_data_size" in parameters:
            raise BadRequest(f"input {name}: give its data in a shared memory region or in the request, not both")
        return region_tensor(plan, shape, count, where), offset
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != count * plan.dtype.itemsize:
            raise BadRequest(
                f"input {name}: binary_data_size {size!r}, but shape {shape} of {plan.datatype} needs {count * plan.dtype.itemsize} bytes"
            )
        if offset + size > len(binary):
            raise BadRequest(f"input {name}: body truncated: needs {size} bytes at offset {offset}, {len(binary) - offset} remain")
        return binary_tensor(plan, shape, count, binary[offset : offset + size], "binary data"), offset + size
    if "data" not in entry:
        raise BadRequest(f"input {name}: no 'data' and no binary_data_size")
    return listed_tensor(plan, shape, count, entry["data"], booleans), offset


def decode_request(body: Body, header_length: str | None, contract: Contract, regions: Regions, max_json: int) -> DecodedRequest:
    """A request body as named arrays checked against the contract; inputs and outputs may name shared
    memory regions of `regions` (Triton's system shared memory extension). A JSON part over `max_json` bytes: 413."""
    plan = plan_of(contract)
    header, letters, binary = _split(body, header_length, max_json)
    entries = header.get("inputs")
    if type(entries) is not list or not all(type(e) is dict for e in entries):
        raise BadRequest("request needs 'inputs': a list of tensor objects")
    check_input_names(plan, [e.get("name") for e in entries])
    booleans = any("data" in e for e in entries) and may_hold_booleans(header, letters)
    arrays: dict[str, Array] = {}
    offset = 0
    for entry in entries:  # binary parts follow the order of the inputs in the header
        arrays[entry["name"]], offset = _array(entry, plan.inputs[entry["name"]], binary, offset, regions, booleans=booleans)
    if offset != len(binary):
        raise BadRequest(f"body has {len(binary) - offset} bytes after the last binary input")
    inputs, batch = checked_inputs(plan, arrays)
    outputs, binary_outputs, counts = _requested_outputs(header, plan)
    request_id = header.get("id")
    if request_id is not None and type(request_id) is not str:
        raise BadRequest(f"the request's 'id' must be a string, not {request_id!r}"[:300])
    output_slices = _output_slices(header.get("outputs"), regions)
    return DecodedRequest(
        id=request_id,
        inputs=inputs,
        batch=batch,
        outputs=outputs,
        binary_outputs=binary_outputs,
        timeout_s=_timeout(header),
        output_slices=output_slices,
        classes=requested_classes(counts, plan.labels, list(output_slices)),
    )


def _output_slices(requested: Any, regions: Regions) -> dict[str, Slice]:
    """Requested outputs whose parameters name a shared memory region (checked by _requested_outputs first)."""
    found = {}
    for entry in requested or ():
        where = regions.slice_of(parameters_of(entry, f"output {entry['name']}"), f"output {entry['name']}")
        if where is not None:
            found[entry["name"]] = where
    return found


def _requested_outputs(header: dict[str, Any], plan: Plan) -> tuple[tuple[str, ...], frozenset[str], dict[str, int]]:
    """The outputs asked for, in order; those asked for as binary data; and the classification counts asked for."""
    all_binary = _flag(parameters_of(header, "the request"), "binary_data_output", False, "the request")
    requested = header.get("outputs")
    if requested is None:
        names = plan.output_names
        return names, frozenset(names) if all_binary else frozenset(), {}
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested):
        raise BadRequest("'outputs' must be a list of objects with a 'name'")
    check_output_names(plan, [o["name"] for o in requested])
    binary, counts = set(), {}
    for output in requested:
        name = output["name"]
        parameters = parameters_of(output, f"output {name}")
        if _flag(parameters, "binary_data", all_binary, f"output {name}"):
            binary.add(name)
        if "classification" in parameters:
            counts[name] = class_count(parameters["classification"], name)
    return tuple(o["name"] for o in requested), frozenset(binary), counts


def _flag(parameters: dict[str, Any], key: str, default: bool, where: str) -> bool:
    """A true-or-false parameter (binary_data, binary_data_output): anything else is refused, not read as truthy."""
    value = parameters.get(key, default)
    if type(value) is not bool:
        raise BadRequest(f"{where}: '{key}' must be true or false, not {value!r}"[:300])
    return value


def _timeout(header: dict[str, Any]) -> float | None:
    value = parameters_of(header, "the request").get("timeout")  # microseconds, as Triton
    if value is None:
        return None
    if not isinstance(value, int) or value <= 0:
        raise BadRequest(f"parameters.timeout must be a positive integer of microseconds, got {value!r}")
    return value / 1e6


def response_headers(header_length: int | None) -> tuple[str, dict[str, str]]:
    """Media type and extra headers of an inference response: binary outputs announce the JSON header's length."""
    if header_length is None:
        return "application/json", {}
    return "application/octet-stream", {"Inference-Header-Content-Length": str(header_length)}


# The fewest bytes orjson writes per value, with its separator: "0.0," for a float, "0," for an integer, "true,".
MIN_JSON_BYTES = {"f": 4, "i": 2, "u": 2, "b": 5}


def check_json_outputs(request: DecodedRequest, outputs: dict[str, Array], max_json: int) -> None:
    """Outputs asked for as JSON are written in the event loop, which answers nothing else meanwhile: one that is
    certainly over `max_json` bytes as JSON (counting the fewest bytes a value takes) is refused, before it is
    written, with a 400 that says to ask for it as binary data."""
    for name in request.outputs:
        if name in request.binary_outputs or name in request.output_slices:
            continue
        array = outputs[name]
        least = array.size * MIN_JSON_BYTES.get(array.dtype.kind, 2)
        if least > max_json:
            raise BadRequest(
                f"output {name} has {array.size} values, over {least} bytes as JSON, past the limit of {max_json} "
                "(--max-json-mb): ask for it as binary data (its 'parameters': {'binary_data': true})"
            )


def encode_response(model: str, request: DecodedRequest, outputs: dict[str, Array], max_json: int) -> tuple[bytes, int | None]:
    """The body, and the JSON header's length when binary outputs follow it. Outputs over `max_json` bytes as JSON:
    400 (check_json_outputs)."""
    check_json_outputs(request, outputs, max_json)
    entries, blobs = [], []
    for name in request.outputs:
        array = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": V2_OF_DTYPE[array.dtype], "shape": list(array.shape)}
        if name in request.output_slices:
            write_to_region(name, array, request.output_slices[name])  # answered without data, as Triton does
        elif name in request.binary_outputs:
            blob = tensor_bytes(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype == BYTES:
            entry["data"] = json_strings(array)
        else:
            entry["data"] = array.reshape(-1)  # orjson writes arrays itself, each float32 in its shortest exact form
        entries.append(entry)
    header: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": entries}
    if request.id is not None:
        header["id"] = request.id
    encoded = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)  # NaN and infinities as null: JSON has neither
    if not blobs:
        return encoded, None
    return b"".join([encoded, *blobs]), len(encoded)
