"""Tensors in shared memory: pack several arrays into one segment, read them back as views."""

from __future__ import annotations

from collections.abc import Mapping
from multiprocessing import shared_memory

import numpy as np

from migserve.types import Array

from .protocol import TensorRef

ALIGN = 64


def pack(arrays: Mapping[str, Array]) -> tuple[shared_memory.SharedMemory, dict[str, TensorRef]]:
    """One new segment holding every array (64-byte aligned); the caller unlinks it."""
    offsets, size = {}, 0
    for name, array in arrays.items():
        offsets[name] = size
        size += (array.nbytes + ALIGN - 1) // ALIGN * ALIGN
    segment = shared_memory.SharedMemory(create=True, size=max(size, 1))
    refs = {}
    for name, array in arrays.items():
        view: Array = np.ndarray(array.shape, dtype=array.dtype, buffer=segment.buf, offset=offsets[name])
        view[...] = array
        refs[name] = TensorRef(segment=segment.name, offset=offsets[name], dtype=array.dtype.str, shape=tuple(array.shape))
    return segment, refs


def pack_parts(parts: Mapping[str, list[Array]]) -> tuple[shared_memory.SharedMemory, dict[str, TensorRef]]:
    """Like pack, concatenating each name's parts along axis 0 straight into the segment (one copy)."""
    shapes = {name: (sum(p.shape[0] for p in ps), *ps[0].shape[1:]) for name, ps in parts.items()}
    offsets, size = {}, 0
    for name, ps in parts.items():
        offsets[name] = size
        nbytes = int(np.prod(shapes[name])) * ps[0].dtype.itemsize
        size += (nbytes + ALIGN - 1) // ALIGN * ALIGN
    segment = shared_memory.SharedMemory(create=True, size=max(size, 1))
    refs = {}
    for name, ps in parts.items():
        view: Array = np.ndarray(shapes[name], dtype=ps[0].dtype, buffer=segment.buf, offset=offsets[name])
        row = 0
        for part in ps:
            view[row : row + part.shape[0]] = part
            row += part.shape[0]
        refs[name] = TensorRef(segment=segment.name, offset=offsets[name], dtype=ps[0].dtype.str, shape=shapes[name])
    return segment, refs


def attach(name: str) -> shared_memory.SharedMemory:
    """Open a segment another process created. Workers are spawned by the gateway and share its
    resource tracker, so the registration Python 3.11 makes here is the same entry the creator
    made, removed once when the gateway unlinks the segment."""
    return shared_memory.SharedMemory(name=name)


def view(segment: shared_memory.SharedMemory, ref: TensorRef) -> Array:
    return np.ndarray(ref.shape, dtype=np.dtype(ref.dtype), buffer=segment.buf, offset=ref.offset)


def release(segment: shared_memory.SharedMemory, unlink: bool) -> None:
    try:
        segment.close()
    except BufferError:  # a view is still alive somewhere; the OS frees it with the process
        return
    if unlink:
        segment.unlink()
