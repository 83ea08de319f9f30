"""Triton's classification extension: an output answered as its top classes instead of its values.

A requested output whose parameters hold `"classification": N` (tritonclient's
`InferRequestedOutput(name, class_count=N)`) comes back as BYTES of shape [batch, min(N, n)],
n being the output's values per row (all dims after the batch, flattened): per row, the N largest
values, largest first, each as "<value>:<index>" or "<value>:<index>:<label>", as Triton writes
them: the value with six decimals (C's %f) for floats, the index into the flattened row, and the
label where the output's classes have labels (face-pros's `attributes` and `expression`, from the
contract; the same labels the Triton export's label files hold). Equal values keep index order.
N = 0 asks for the plain output, as in Triton. BYTES go out as Triton sends them: JSON strings, or
as binary data (and gRPC raw contents) each element's little-endian 4-byte length and its bytes.
An output into a shared memory region cannot be classified (400).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from migserve.types import Array

from ..errors import BadRequest

BYTES = np.dtype(object)  # the dtype of a classification answer: each element a bytes object
LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Classes:
    """One output to answer as its top `count` classes; `labels` by flattened index (may be empty)."""

    count: int
    labels: Sequence[str] = ()


def class_count(value: object, output: str) -> int:
    """The classification parameter: a non-negative integer (0: the plain output)."""
    if type(value) is not int or value < 0:
        raise BadRequest(
            f"output {output}: 'classification' must be a non-negative integer, the number of classes to answer, not {value!r}"
        )
    return value


def requested_classes(counts: Mapping[str, int], labels: Mapping[str, Sequence[str]], in_regions: Sequence[str]) -> dict[str, Classes]:
    """The outputs to classify (count above 0), with their labels; none may go to a shared memory region."""
    classes = {name: Classes(count, labels.get(name, ())) for name, count in counts.items() if count > 0}
    if into := sorted(set(classes) & set(in_regions)):
        raise BadRequest(f"outputs {into}: a classification answer cannot go to a shared memory region; ask for the values there instead")
    return classes


def classified(outputs: dict[str, Array], classes: Mapping[str, Classes]) -> dict[str, Array]:
    """The outputs, those in `classes` replaced by their top classes (BYTES, [batch, count])."""
    if not classes:
        return outputs
    answered = dict(outputs)
    for name, wanted in classes.items():
        answered[name] = top_classes(outputs[name], wanted)
    return answered


def top_classes(values: Array, wanted: Classes) -> Array:
    rows = np.ascontiguousarray(values).reshape(values.shape[0], -1)
    count = min(wanted.count, rows.shape[1])
    show = _float_text if rows.dtype.kind == "f" else _int_text
    answer = np.empty((rows.shape[0], count), dtype=BYTES)
    for i, row in enumerate(rows):
        order = np.argsort(-row.astype(np.float64), kind="stable")[:count]  # largest first, ties in index order
        for j, index in enumerate(order.tolist()):
            text = f"{show(row[index].item())}:{index}"
            if index < len(wanted.labels):
                text += f":{wanted.labels[index]}"
            answer[i, j] = text.encode()
    return answer


def _float_text(value: float) -> str:
    return f"{value:f}"  # as C's %f (Triton's std::to_string)


def _int_text(value: float) -> str:
    return str(int(value))  # a bool as 1 or 0, as Triton's std::to_string


def tensor_bytes(array: Array) -> bytes:
    """An output's bytes as binary data (HTTP) or raw contents (gRPC): a numeric tensor's own, a BYTES tensor as
    Triton sends it (per element, its length in 4 bytes, little-endian, then its bytes)."""
    if array.dtype != BYTES:
        return array.tobytes()
    return b"".join(part for element in array.reshape(-1) for part in (LENGTH.pack(len(element)), element))


def json_strings(array: Array) -> list[str]:
    return [element.decode() for element in array.reshape(-1)]
