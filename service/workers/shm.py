"""Tensors in shared memory.

Each replica keeps two long-lived segments (arenas): the gateway writes a batch's
inputs into its input arena, the worker writes outputs into its output arena. One
batch is in flight per replica, so neither is overwritten while the other side
reads it. An arena that is too small is replaced by one twice the size; the old
name is unlinked and each side re-attaches when it sees a new name. One over
SHRINK_ABOVE that stays more than SHRINK_FACTOR times larger than every batch written
to it over SHRINK_AFTER writes is replaced by a smaller one the same way: a single large
request (a CT volume) would otherwise hold its size of shared memory (allocated up
front, so counted against a container's memory limit) for as long as the worker lives,
in each replica's arenas. Smaller arenas are kept: with face-pros' batches of 1 to 32
rows (0.6-19 MB) shrinking and growing again cost 7% of the throughput (bench/gateway_ab.py).
SHRINK_ABOVE is the default of `serve --arena-keep-mb`. Larger arenas are also released
once no batch has used them for IDLE_RELEASE_S (`trim`, service/backends/worker.py), on
both sides: after a burst of large batches nothing comes to make them shrink.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from migserve.types import Array

from .pinned import HostPinning, Unpin, address
from .protocol import TensorRef

ALIGN = 64
MB = 1 << 20
MIN_ARENA = MB
SHRINK_AFTER = 64  # writes an arena is watched over before it may shrink
SHRINK_ABOVE = 64 * MB  # arenas up to this size are kept
SHRINK_FACTOR = 4  # ... to twice the largest of them, where it is more than this many times that
IDLE_RELEASE_S = 2.0  # arenas over the size kept are released after this long without a batch
SHM_DIR = Path("/dev/shm")  # where POSIX shared memory objects live on Linux
ARENA_PREFIX = "migserve-arena-"  # clients cannot register these as shared memory regions (service/regions.py)


class SharedMemoryFull(Exception):
    """/dev/shm has no room for an arena; the message says how to give it more."""


def _create(size: int) -> shared_memory.SharedMemory:
    """A new arena with all its pages allocated now. On a /dev/shm too small for it (a container's default is
    64 MB) the first write past the free space would kill the process with SIGBUS; allocating up front turns
    that into SharedMemoryFull, which answers the batch and leaves the process serving."""
    name = f"{ARENA_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    segment = shared_memory.SharedMemory(name=name, create=True, size=size)
    fd = os.open(SHM_DIR / name, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        release(segment, unlink=True)
        free = shutil.disk_usage(SHM_DIR).free
        raise SharedMemoryFull(
            f"shared memory ({SHM_DIR}) has no room for a {size / MB:.0f} MB batch arena ({free / MB:.0f} MB free, {exc.strerror}): "
            "give the gateway more (docker run --shm-size, compose shm_size, a Kubernetes emptyDir with medium: Memory at /dev/shm)"
        ) from None
    finally:
        os.close(fd)
    return segment


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Arena:
    """A growable segment this process owns (creates, writes and unlinks)."""

    segment: shared_memory.SharedMemory | None = None
    keep: int = SHRINK_ABOVE  # arenas up to this size are kept (serve --arena-keep-mb)
    _writes: int = 0  # since the last look at shrinking
    _largest: int = 0  # the largest of those writes

    @property
    def size(self) -> int:
        return 0 if self.segment is None else self.segment.size

    def ensure(self, size: int) -> shared_memory.SharedMemory:
        """An arena of at least `size` bytes: twice the old one if /dev/shm has room, else just enough; the old one
        stays in use if neither fits (SharedMemoryFull). Every SHRINK_AFTER calls, one far larger than all of them
        needed is made smaller (where /dev/shm has no room for the smaller one, the old one stays)."""
        self._writes, self._largest = self._writes + 1, max(self._largest, size)
        if self._writes >= SHRINK_AFTER:
            wanted = max(2 * self._largest, MIN_ARENA)
            oversized = self.segment
            if oversized is not None and oversized.size > max(self.keep, SHRINK_FACTOR * self._largest, wanted):
                with contextlib.suppress(SharedMemoryFull):
                    self.segment = _create(wanted)
                    release(oversized, unlink=True)
            self._writes = self._largest = 0
        if self.segment is None or self.segment.size < size:
            old = self.segment
            wanted = max(size, MIN_ARENA)
            try:
                self.segment = _create(max(wanted, 2 * (old.size if old else 0)))
            except SharedMemoryFull:
                self.segment = _create(wanted)
            if old is not None:
                release(old, unlink=True)
        return self.segment

    def write(self, arrays: Mapping[str, list[Array]]) -> dict[str, TensorRef]:
        """Each name's parts concatenated along axis 0 straight into the arena: one copy."""
        shapes = {name: (sum(p.shape[0] for p in parts), *parts[0].shape[1:]) for name, parts in arrays.items()}
        offsets, size = {}, 0
        for name, parts in arrays.items():
            offsets[name] = size
            size += _aligned(int(np.prod(shapes[name])) * parts[0].dtype.itemsize)
        segment = self.ensure(size)
        refs = {}
        for name, parts in arrays.items():
            target: Array = np.ndarray(shapes[name], dtype=parts[0].dtype, buffer=segment.buf, offset=offsets[name])
            row = 0
            for part in parts:
                target[row : row + part.shape[0]] = part
                row += part.shape[0]
            refs[name] = TensorRef(segment=segment.name, offset=offsets[name], dtype=parts[0].dtype.str, shape=shapes[name])
        return refs

    def trim(self) -> None:
        """Release the arena if it is larger than `keep`: the next batch makes one of the size it needs."""
        if self.size > self.keep:
            self.close()
            self._writes = self._largest = 0

    def close(self) -> None:
        if self.segment is not None:
            release(self.segment, unlink=True)
            self.segment = None


@dataclass
class Attachments:
    """The other side's current arena, attached once and re-attached when its name changes. With `pinning` (a CUDA
    worker's inputs), each arena is page-locked while attached, so that the GPU copies it in by itself."""

    current: dict[str, shared_memory.SharedMemory] = field(default_factory=dict)
    pinning: HostPinning | None = None
    _unpin: list[Unpin] = field(default_factory=list)

    def get(self, name: str) -> shared_memory.SharedMemory:
        segment = self.current.get(name)
        if segment is None:
            self._release_all(unlink=False)
            segment = shared_memory.SharedMemory(name=name)  # spawned workers share the gateway's resource tracker
            self.current = {name: segment}
            if self.pinning is not None and (unpin := self.pinning.pin(address(segment.buf), segment.size)) is not None:
                self._unpin.append(unpin)
        return segment

    def _release_all(self, unlink: bool) -> None:
        while self._unpin:
            self._unpin.pop()()  # before the mapping goes
        for segment in self.current.values():
            release(segment, unlink=unlink)
        self.current = {}

    @property
    def size(self) -> int:
        return max((segment.size for segment in self.current.values()), default=0)

    def trim(self, keep: int) -> None:
        """Let go of the other side's arena if it is larger than `keep` (it releases it too: Trim, protocol.py)."""
        if self.size > keep:
            self._release_all(unlink=False)

    def view(self, ref: TensorRef) -> Array:
        return np.ndarray(ref.shape, dtype=np.dtype(ref.dtype), buffer=self.get(ref.segment).buf, offset=ref.offset)

    def close(self, unlink: bool = False) -> None:
        self._release_all(unlink)


def release(segment: shared_memory.SharedMemory, unlink: bool) -> None:
    with contextlib.suppress(BufferError):  # a view is still alive; the mapping goes with the process
        segment.close()
    if unlink:
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()
