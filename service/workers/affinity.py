"""Pinning a process to a CPU slice's cores."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path


def pin_threads(cores: Iterable[int]) -> None:
    """Every thread of this process onto a CPU slice's cores (a worker, a bench child). os.sched_setaffinity(0, ...)
    moves the calling thread alone, and numpy's OpenBLAS starts its pool (a thread per core of the machine) when numpy
    is imported, before the process knows its slice. Threads started later (onnxruntime's, torch's) inherit the mask."""
    for thread in Path("/proc/self/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(thread.name), cores)
