"""Give freed memory back to the operating system after a request.

NumPy frees a request's buffers, but glibc keeps freed chunks in the allocating
thread's arena, so a checkpointed request that follows a store-all one on the same
worker thread can show store-all's RSS (bench/checkpoint.py measured this: sqrt at
0.69x of store-all's RSS instead of 0.38x). `malloc_trim(0)` after each request
returns them (no measurable cost there); elsewhere (macOS, musl) this is a no-op.

Trimming only reaches the main heap's top, though: worker threads allocate from their
own arenas, whose freed chunks glibc keeps, and its mmap threshold drifts up to 32 MiB
after the first big free. Under a mixed load (bench/load.py, 32 clients) idle RSS
wandered by +-10% between readings with glibc's defaults. `tune_for_serving` fixes
the thresholds at 4 MiB: every tensor-sized buffer is its own mapping, returned to the
OS when freed, while RunStream's 1 MiB chunks still come from the (hot) arenas. A
128 KiB threshold held RSS flatter still (1.2 MiB over 120 s) but mapped and faulted
in every chunk: streaming ran at half the speed (bench/transfer.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util

_TRIM = _MALLOPT = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _TRIM = getattr(_libc, "malloc_trim", None)
    _MALLOPT = getattr(_libc, "mallopt", None)
except OSError:  # no C library to load: nothing to trim
    pass

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
SERVING_THRESHOLD_BYTES = 4 << 20
# Requests whose predicted peak is below this leave too little in the heap to trim.
TRIM_AFTER_BYTES = 1 << 20


def tune_for_serving(threshold_bytes: int = SERVING_THRESHOLD_BYTES) -> bool:
    """Make glibc map every allocation over `threshold_bytes` separately and trim the
    heap above it (fixed, instead of the dynamic thresholds that drift up to 32 MiB
    after the first big free). Process-wide; returns False where there is no glibc."""
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(_M_MMAP_THRESHOLD, threshold_bytes)) and \
        bool(_MALLOPT(_M_TRIM_THRESHOLD, threshold_bytes))


def release_free_memory() -> None:
    if _TRIM is not None:
        _TRIM(0)
