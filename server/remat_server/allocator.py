"""Give freed memory back to the operating system after a request.

NumPy frees a request's buffers, but glibc keeps freed chunks in the allocating
thread's arena, so a checkpointed request that follows a store-all one on the same
worker thread can show store-all's RSS (bench/checkpoint.py measured this: sqrt at
0.69x of store-all's RSS instead of 0.38x). `malloc_trim(0)` after each request
returns them (no measurable cost there); elsewhere (macOS, musl) this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_TRIM = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _TRIM = getattr(_libc, "malloc_trim", None)
except OSError:  # no C library to load: nothing to trim
    pass


def release_free_memory() -> None:
    if _TRIM is not None:
        _TRIM(0)
