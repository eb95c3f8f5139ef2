"""Keep the memory a request freed for the next one, and give it back to the OS when
the next one needs much less, or when the server is idle.

NumPy frees a request's buffers, but glibc keeps freed chunks in the allocating
thread's arena, so a checkpointed request that follows a store-all one on the same
worker thread can show store-all's RSS (bench/checkpoint.py measured this: sqrt at
0.69x of store-all's RSS instead of 0.38x); `malloc_trim(0)` returns them. Trimming
after every request, though, makes the next one fault its memory in afresh: a training
loop of 100 MB steps paid 40% of a step for it (bench/engine.py, MLP: 134 against 84 ms
in the engine). `Trimmer` trims before a request whose predicted peak is under 90% of
what is kept (so its RSS follows its own plan), and after a second with no request;
a loop of similar requests reuses its memory. Elsewhere (macOS, musl) this is a no-op.

Within a request memory is reused too. Earlier `tune_for_serving` fixed glibc's
thresholds at 4 MiB, so every tensor-sized buffer was its own mapping, returned to the
OS when freed. But a fresh mapping costs a page fault per page on first write, on every
allocation: a transformer block's 4 MiB activations and attention scores were mapped
and faulted anew each step, and its training step ran 1.3x slower wherever the server
ran it (issue 12 measured this as "the handler-thread slowdown"; it was the tuning, on
any thread). Now the thresholds are fixed high: buffers up to 32 MiB (glibc's largest
mmap threshold) come from the arenas and freed ones are reused, and the heap is
trimmed by glibc only above 64 MiB of free top. The peak RSS of a request still
follows its plan: on a 64-layer MLP (batch 2048, width 128) store_all, sqrt and
recompute_all peaked at +68, +21.5 and +17.4 MiB over the idle RSS, as with the 4 MiB
thresholds (+69, +21.6, +17.7), while the transformer step went from 87 to 55 ms.
Fixed rather than glibc's dynamic thresholds, which drift with the load: under a
mixed load (bench/load.py, 32 clients) idle RSS wandered by +-10% between readings
with glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

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
# Less than this kept is not worth a trim.
TRIM_AFTER_BYTES = 1 << 20
IDLE_SECONDS = 1.0
# A request predicted to peak under this share of what is kept trims first, so its RSS
# follows its own plan; one about as big as the last reuses the memory it left.
SHRINK = 0.9


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


class Trimmer:
    """When to give freed memory back (see the module's doc). `before(nbytes)` as a
    request is admitted with its predicted peak; a daemon thread trims after
    `idle_seconds` without one.

        >>> trimmer = Trimmer(idle_seconds=0)
        >>> trimmer.before(100 << 20), trimmer.before(95 << 20), trimmer.before(10 << 20)
        (False, False, True)
    """

    def __init__(self, idle_seconds: float = IDLE_SECONDS, trim=release_free_memory):
        self.kept = 0  # about what the last requests left in the heap
        self._trim = trim
        self._lock = threading.Lock()
        self._last = time.monotonic()
        if idle_seconds > 0:
            threading.Thread(
                target=self._idle, args=(idle_seconds,), daemon=True, name="remat-trimmer"
            ).start()

    def before(self, nbytes: int) -> bool:
        """A request that will peak at `nbytes` starts; True if it trimmed first."""
        with self._lock:
            self._last = time.monotonic()
            trim = self.kept >= TRIM_AFTER_BYTES and nbytes < SHRINK * self.kept
            self.kept = nbytes if trim else max(self.kept, nbytes)
        if trim:
            self._trim()
        return trim

    def trim_if_idle(self, seconds: float) -> bool:
        """Trim if memory is kept and no request started in the last `seconds`."""
        with self._lock:
            due = self.kept >= TRIM_AFTER_BYTES and time.monotonic() - self._last >= seconds
            if due:
                self.kept = 0
        if due:
            self._trim()
        return due

    def _idle(self, seconds: float) -> None:
        while True:
            time.sleep(seconds)
            self.trim_if_idle(seconds)
