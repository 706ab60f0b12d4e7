"""Keep freed memory in the process instead of handing it back to the kernel after every batch (glibc only).

PyTorch's CPU allocator is plain ``malloc``. glibc serves blocks above its mmap threshold (128 KiB at start,
raised only after such a block is freed) with fresh ``mmap`` pages and returns them on ``free``, so every batch
of a CNN pays page faults for each activation tensor again. Measured on the 2-core machine (EfficientNet-Lite0,
224², bf16, batch 32, with the mirror): the bare forward pass went from 84 to 146 images/s, ``strnet predict``
from 68 to 115, once the thresholds are fixed high (the same speed-up appeared by accident after any pass large
enough to raise glibc's dynamic threshold, such as a Grad-CAM backward). The cost is that up to
:data:`TRIM_THRESHOLD` bytes of freed memory stay with the process.

Set ``STRNET_MALLOC=default`` to leave glibc's behaviour alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); blocks above it still use mmap
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds once per process; True when they are set (False: not glibc, or opted
    out with ``STRNET_MALLOC=default``)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("STRNET_MALLOC", "").lower() == "default":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
