"""Keep request-sized buffers in the heap (glibc).

Every inference request allocates and frees a few buffers of its body's size (the
ASGI body chunks, the joined body): a face-pros image tensor (600 KB) is a few MB per
request. By default glibc hands such sizes back to the system when they are freed
(an mmap of their own, or a heap top over the trim threshold), so request after
request page-faults its buffers in again. Raising both thresholds keeps them in the
heap, where freed memory is reused at once (the gateway's CPU per face-pros
request fell by about a tenth, bench/RESULTS.md).
Larger allocations (CT volumes of tens of MB) still get their own mappings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20  # allocations below this come from the heap
TRIM_THRESHOLD = 64 << 20  # free heap kept before it is returned to the system


def keep_request_buffers_in_heap() -> bool:
    """True when glibc took the settings; False elsewhere (another libc), which only costs speed."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.debug("no glibc mallopt here; request buffers use the default allocator settings")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
