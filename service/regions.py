"""Triton's system shared memory extension: same-host clients pass tensors in /dev/shm regions.

A client creates a POSIX shared memory object (`tritonclient.utils.shared_memory`
does), registers it under a region name (`POST /v2/systemsharedmemory/region/{name}/register`
or gRPC's SystemSharedMemoryRegister), and then names the region in an input's or
an output's parameters (`shared_memory_region`, `shared_memory_byte_size`, optionally
`shared_memory_offset`) instead of sending its bytes. An input is copied out of the
region as its request is decoded (so nothing reads the client's object later); an
output is written into the region and answered without data. Most of what an
inference costs the gateway on a large tensor is receiving its bytes, so a client on
the same host saves that (`bench/RESULTS.md`).

Keys are single /dev/shm names (no paths); the gateway's own arenas (`migserve-arena-*`)
cannot be registered. As in Triton, the client owns the object: unregistering unmaps it
and never unlinks it, and the client must not change a region while a request that
reads or writes it is in flight. The gateway reads and writes the object through its
descriptor (pread, pwrite), never through a mapping: reading a mapping past the end of
an object the client has shrunk kills the reader with SIGBUS, and checking the size
first left a moment in which the client could shrink it. A read that comes up short is
refused (400) instead, whenever the object shrank.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BadRequest, InferenceFailed, NotFound
from .workers.shm import ARENA_PREFIX, SHM_DIR

KEY = re.compile(r"/?(?P<name>[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254})")  # no path, no leading dot
PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


@dataclass
class Region:
    name: str
    key: str
    offset: int  # where the region starts in the shared memory object
    byte_size: int
    fd: int  # the object, read and written with pread and pwrite
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        os.close(self.fd)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def check(self, offset: int, nbytes: int, what: str) -> None:
        """BadRequest unless `nbytes` at `offset` lie in the region and it is still registered."""
        if self.closed:
            raise BadRequest(f"{what}: shared memory region '{self.name}' was unregistered while the request was in flight")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.byte_size:
            raise BadRequest(
                f"{what}: {nbytes} bytes at offset {offset} do not fit shared memory region '{self.name}' of {self.byte_size} bytes"
            )

    def read(self, offset: int, nbytes: int, what: str) -> memoryview:
        """A copy of `nbytes` at `offset` in the region, if they fit and the object behind it still holds them."""
        self.check(offset, nbytes, what)
        copy = np.empty(nbytes, np.uint8).data  # not zeroed first, as a bytearray would be
        done, start = 0, self.offset + offset
        while done < nbytes:
            got = os.preadv(self.fd, [copy[done:]], start + done)
            if got == 0:
                size = os.fstat(self.fd).st_size
                raise BadRequest(f"{what}: the object behind shared memory region '{self.name}' ({self.key!r}) shrank to {size} bytes")
            done += got
        return copy

    def write(self, offset: int, data: memoryview, what: str) -> None:
        """`data` written at `offset` in the region, its pages allocated first: the client's object may be sparse,
        and /dev/shm may have no room for them (then InferenceFailed, and nothing is written)."""
        self.check(offset, len(data), what)
        start = self.offset + offset
        try:
            os.posix_fallocate(self.fd, start, max(len(data), 1))
            done = 0
            while done < len(data):
                done += os.pwritev(self.fd, [data[done:]], start + done)
        except OSError as exc:
            room = f"no room in {SHM_DIR} for its {len(data)} bytes in region '{self.name}'"
            raise InferenceFailed(f"{what}: {room}: {exc.strerror}") from None


@dataclass(frozen=True)
class Slice:
    """Where one tensor lives in a region: what an input or output's shared-memory parameters name."""

    region: Region
    offset: int
    byte_size: int

    def read(self, what: str) -> memoryview:
        return self.region.read(self.offset, self.byte_size, what)

    def write(self, data: memoryview, what: str) -> None:
        self.region.write(self.offset, data, what)


class Regions:
    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}

    def register(self, name: Any, key: Any, offset: Any, byte_size: Any) -> None:
        if not isinstance(name, str) or not name:
            raise BadRequest("a shared memory region needs a name")
        if name in self._regions:
            raise BadRequest(f"shared memory region '{name}' is already registered; unregister it first")
        match = KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise BadRequest(f"shared memory key {key!r} is not a /dev/shm name such as '/my_input' (one component, no path)")
        if match["name"].startswith(ARENA_PREFIX):
            raise BadRequest(f"shared memory key {key!r} is one of the gateway's own arenas")
        if type(offset) is not int or type(byte_size) is not int or offset < 0 or byte_size <= 0:
            raise BadRequest(f"shared memory region '{name}': offset must be an integer >= 0 and byte_size > 0")
        path = SHM_DIR / match["name"]
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise BadRequest(f"cannot open shared memory key {key!r}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise BadRequest(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} is past the end of {key!r} ({size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        self._regions[name] = Region(name, key, offset, byte_size, fd)

    def unregister(self, name: str | None = None) -> None:
        """One region (unknown names are fine, as in Triton), or every region when `name` is None or empty."""
        for region in [self._regions.pop(name, None)] if name else [*self._regions.values()]:
            if region is not None:
                region.close()
        if not name:
            self._regions.clear()

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        if name:
            return [self.get(name).status()]
        return [region.status() for region in self._regions.values()]

    def get(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"unknown shared memory region '{name}'; registered: {sorted(self._regions) or 'none'}")
        return region

    def slice_of(self, parameters: dict[str, Any], what: str) -> Slice | None:
        """The region slice an input's or output's parameters name, or None when they name none."""
        name = parameters.get("shared_memory_region")
        if name is None:
            return None
        byte_size, offset = parameters.get("shared_memory_byte_size"), parameters.get("shared_memory_offset", 0)
        if not isinstance(name, str) or type(byte_size) is not int or type(offset) is not int:
            raise BadRequest(
                f"{what}: shared_memory_region needs a region name, shared_memory_byte_size an integer "
                "(and shared_memory_offset, if given, an integer)"
            )
        found = Slice(self.get(name), offset, byte_size)
        found.region.check(offset, byte_size, what)  # fits, or BadRequest now; the object's size is checked at use
        return found
