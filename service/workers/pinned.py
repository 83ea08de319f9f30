"""Page-locked (pinned) host memory for a CUDA worker's inputs.

onnxruntime copies each CPU input to the device with cudaMemcpy. From ordinary (pageable)
memory the driver first copies the bytes through a pinned staging buffer with the CPU;
from memory registered with cudaHostRegister the GPU reads them itself. On an H200, a
face-pros batch of 32 rows (19 MB) took 3.0 ms through onnxruntime when its input was an
array made once, 5.5 ms with a new copy of it each time and 7.4 ms from the gateway's
shared memory arena (`bench/worker_path.py`, bench/RESULTS.md): the copy in was
the worker's largest cost, and the worker is the one process every batch of a GPU passes
through.

So a CUDA worker registers the arenas it reads inputs from (once per arena: they are
long-lived) and the buffers it pads or merges batches into. The CUDA runtime is the one
onnxruntime's CUDA provider loaded (found in this process's memory map), so the
registration is in the same context its copies use. Where registration fails (no such
library, a limit on locked memory), the worker logs it once and runs unpinned as before.

A batch that is padded, or merged from several front-ends, is not first gathered in host
memory: `DeviceBuffers` copies each part from the arena it is in straight into an input
buffer on the device (service/workers/buckets.py). On an H200 that took a face-pros batch
of 32 rows merged from two arenas from 4.94 to 3.75 ms, and a crowd-csrnet batch of 6 rows
padded to 8 from 1.79 to 1.31 ms (`bench/worker_path.py`, bench/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CUDA_HOST_REGISTER_DEFAULT = 0
CUDA_MEMCPY_HOST_TO_DEVICE = 1
LEGACY_STREAM = None  # the legacy default stream: the copies below and the wait for them
PAGE_SIZE = 4096
Unpin = Callable[[], None]


@functools.cache  # one read of the memory map for both users below
def _loaded_cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library this process has loaded (onnxruntime's CUDA provider loads it), or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = sorted({line.split()[-1] for line in maps.splitlines() if "/libcudart.so" in line})
    for path in paths:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


class HostPinning:
    """cudaHostRegister and cudaHostUnregister of buffers, through the CUDA runtime already loaded."""

    def __init__(self, cudart: Any) -> None:
        self._cudart = cudart
        self._cudart.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        self._cudart.cudaHostRegister.restype = ctypes.c_int
        self._cudart.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        self._cudart.cudaHostUnregister.restype = ctypes.c_int
        self._cudart.cudaGetLastError.restype = ctypes.c_int
        self.enabled = True
        self.pinned_bytes = 0

    @classmethod
    def for_this_process(cls) -> HostPinning | None:
        cudart = _loaded_cudart()
        return cls(cudart) if cudart is not None else None

    def pin(self, address: int, size: int) -> Unpin | None:
        """Page-lock `size` bytes at `address`; how to undo it, or None where it failed (then pinning stops)."""
        if not self.enabled or size <= 0:
            return None
        code = self._cudart.cudaHostRegister(address, size, CUDA_HOST_REGISTER_DEFAULT)
        if code != 0:
            self._cudart.cudaGetLastError()  # clear it, or onnxruntime's next CUDA call reports it as its own
            self.enabled = False
            logger.warning("cudaHostRegister of %d bytes failed (CUDA error %d): inputs are copied to the GPU unpinned", size, code)
            return None
        self.pinned_bytes += size

        def unpin() -> None:
            self._cudart.cudaHostUnregister(address)
            self.pinned_bytes -= size

        return unpin


class CudaError(RuntimeError):
    pass


class DeviceBuffers:
    """Input buffers on the device (onnxruntime OrtValues) and the copies into them, through the CUDA runtime
    already loaded. Copies are queued on the legacy default stream and `wait` returns once they are done; the
    session runs after that, so it never reads a buffer being written, and never while one is being read:
    a run with outputs on the host returns only once the device is done with it."""

    device_type = "cuda"

    def __init__(self, ort: Any, cudart: Any) -> None:
        self._ort, self._cudart = ort, cudart
        cudart.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        cudart.cudaMemsetAsync.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p]
        cudart.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        for function in (cudart.cudaMemcpyAsync, cudart.cudaMemsetAsync, cudart.cudaStreamSynchronize, cudart.cudaGetLastError):
            function.restype = ctypes.c_int

    @classmethod
    def for_this_process(cls, ort: Any) -> DeviceBuffers | None:
        cudart = _loaded_cudart()
        return cls(ort, cudart) if cudart is not None else None

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """An uninitialised OrtValue of `shape` on the device (the only one CUDA_VISIBLE_DEVICES shows)."""
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device_type, 0)

    def copy_in(self, target: int, source: int, size: int) -> None:
        self._check("cudaMemcpyAsync", self._cudart.cudaMemcpyAsync(target, source, size, CUDA_MEMCPY_HOST_TO_DEVICE, LEGACY_STREAM))

    def zero(self, target: int, size: int) -> None:
        self._check("cudaMemsetAsync", self._cudart.cudaMemsetAsync(target, 0, size, LEGACY_STREAM))

    def wait(self) -> None:
        self._check("cudaStreamSynchronize", self._cudart.cudaStreamSynchronize(LEGACY_STREAM))

    def _check(self, call: str, code: int) -> None:
        if code != 0:
            self._cudart.cudaGetLastError()  # clear it, or onnxruntime's next CUDA call reports it as its own
            raise CudaError(f"{call} failed with CUDA error {code}")


def address(buffer: Any) -> int:
    """The address of a writable buffer's first byte (the temporary export is released at once)."""
    view = (ctypes.c_char * 1).from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view
