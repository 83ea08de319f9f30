"""A stand-in for the CUDA runtime (these machines have no GPU): the C functions service/workers/pinned.py calls.

Each call is recorded. The copies are real: device buffers made by `HostBuffers` are onnxruntime OrtValues in host
memory, so cudaMemcpyAsync and cudaMemsetAsync are memmove and memset here, and what a session then runs on is
exactly what was copied. What the H200 made of the real calls is in bench/RESULTS.md (bench/worker_path.py).
"""

from __future__ import annotations

import ctypes
from typing import Any

from service.workers.pinned import DeviceBuffers

Calls = list[tuple[str, tuple[Any, ...]]]


class _Function:
    def __init__(self, calls: Calls, name: str, result: int = 0, effect: Any = None) -> None:
        self.calls, self.name, self.result, self.effect = calls, name, result, effect
        self.argtypes: list[Any] = []
        self.restype: Any = None

    def __call__(self, *args: Any) -> int:
        self.calls.append((self.name, args))
        if self.effect is not None and self.result == 0:
            self.effect(*args)
        return self.result


class FakeCudart:
    """cudaHostRegister, cudaHostUnregister, cudaGetLastError, cudaMemcpyAsync, cudaMemsetAsync and
    cudaStreamSynchronize, recorded; `results` makes a function fail with that CUDA error code."""

    def __init__(self, register_result: int = 0, **results: int) -> None:
        self.calls: Calls = []
        self.cudaHostRegister = _Function(self.calls, "register", register_result)
        self.cudaHostUnregister = _Function(self.calls, "unregister")
        self.cudaGetLastError = _Function(self.calls, "last_error")
        self.cudaMemcpyAsync = _Function(
            self.calls, "copy", results.get("copy", 0), lambda target, source, size, kind, stream: ctypes.memmove(target, source, size)
        )
        self.cudaMemsetAsync = _Function(
            self.calls, "memset", results.get("memset", 0), lambda target, value, size, stream: ctypes.memset(target, value, size)
        )
        self.cudaStreamSynchronize = _Function(self.calls, "synchronize", results.get("synchronize", 0))

    def named(self) -> list[str]:
        return [name for name, _ in self.calls]


class HostBuffers(DeviceBuffers):
    """DeviceBuffers whose buffers are OrtValues in host memory, for onnxruntime's CPU provider."""

    device_type = "cpu"
