"""Give freed memory back to the operating system after a request.

NumPy frees a request's buffers, but glibc keeps freed chunks in the allocating
thread's arena, so a checkpointed request that follows a store-all one on the same
worker thread can show store-all's RSS (bench/checkpoint.py measured this: sqrt at
0.69x of store-all's RSS instead of 0.38x). `malloc_trim(0)` after each request
returns them (no measurable cost there); elsewhere (macOS, musl) this is a no-op.

Between requests, then, memory goes back; within one it should be reused. Earlier
`tune_for_serving` fixed glibc's thresholds at 4 MiB, so every tensor-sized buffer was
its own mapping, returned to the OS when freed. But a fresh mapping costs a page fault
per page on first write, on every allocation: a transformer block's 4 MiB activations
and attention scores were mapped and faulted anew each step, and its training step
ran 1.3x slower wherever the server ran it (issue 12 measured this as "the
handler-thread slowdown"; it was the tuning, on any thread). Now the thresholds are
fixed high: buffers up to 32 MiB (glibc's largest mmap threshold) come from the
arenas and freed ones are reused within the request, and the heap is trimmed only
above 64 MiB of free top; `malloc_trim(0)` after each request returns the rest. The
peak RSS of a request still follows its plan: on a 64-layer MLP (batch 2048, width
128) store_all, sqrt and recompute_all peaked at +68, +21.5 and +17.4 MiB over the
idle RSS, as with the 4 MiB thresholds (+69, +21.6, +17.7), while the transformer
step went from 87 to 55 ms. Fixed rather than glibc's dynamic thresholds, which drift
with the load: under a mixed load (bench/load.py, 32 clients) idle RSS wandered by
+-10% between readings with glibc's defaults.
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
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 64 << 20
# Requests whose predicted peak is below this leave too little in the heap to trim.
TRIM_AFTER_BYTES = 1 << 20


def tune_for_serving(
    mmap_bytes: int = MMAP_THRESHOLD_BYTES, trim_bytes: int = TRIM_THRESHOLD_BYTES
) -> bool:
    """Make glibc map allocations over `mmap_bytes` separately and trim a heap whose
    free top exceeds `trim_bytes` (fixed, instead of the dynamic thresholds that drift
    with the load). Process-wide; returns False where there is no glibc."""
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(
        _MALLOPT(_M_TRIM_THRESHOLD, trim_bytes)
    )


def release_free_memory() -> None:
    if _TRIM is not None:
        _TRIM(0)
