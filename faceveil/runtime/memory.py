"""Process-wide settings for the compute-heavy commands, applied once by the CLI.

glibc's allocator returns large freed blocks to the system (mmap'd tensors above a threshold that it adapts, and
heap tops above a trim threshold) and every attack iteration then allocates them again: each fresh page is a page
fault on first touch. A surrogate's forward+backward allocates and frees the same activation tensors every
iteration (up to 26 MB each on a batch of 16 faces), so measured on this project's machine the networks ran 1.3-1.7x
slower than with the memory kept (mobileface 50 -> 32 ms, mfn512 425 -> 260 ms per 16-face forward+backward).
Keeping freed memory for reuse costs resident memory the process already used at its peak, nothing more.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for the threshold; blocks above it stay mmap'd
TRIM_THRESHOLD = 1 << 30  # freed heap tops below this stay with the process
TOP_PAD = 64 << 20  # grow the heap in 64 MB steps


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory for reuse; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in
               ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
