"""Keep the memory a request freed for the next one, and give it back to the OS when
the next one needs much less, or when the server is idle.

NumPy frees a request's buffers, but glibc keeps freed chunks in the allocating
thread's arena, so a checkpointed request that follows a store-all one on the same
worker thread can show store-all's RSS (bench/checkpoint.py measured this: sqrt at
0.69x of store-all's RSS instead of 0.38x); `malloc_trim(0)` returns them. Trimming
after every request, though, makes the next one fault its memory in afresh: a training
loop of 100 MB steps paid 40% of a step for it (bench/engine.py, MLP: 134 against 84 ms
in the engine). `Trimmer` trims before a request whose predicted peak is under 90% of
what is kept (so its RSS follows its own plan), and half a second after the last
request; a loop of similar requests reuses its memory. Elsewhere (macOS, musl) this is
a no-op.

`tune_for_serving` fixes glibc's mmap and trim thresholds (instead of its dynamic ones,
which drift with the load: under bench/load.py's mixed load idle RSS wandered by +-10%
between readings with glibc's defaults). Where to fix them trades speed against RSS,
so both are server flags:

- 4 MiB for both, the default: every tensor-sized buffer is its own mapping, returned
  to the OS when freed. Under bench/load.py's mixed load of 32 clients the idle RSS
  stayed within -4%..+7% of the warm-up's (180 s: 148-157 MiB throughout). But a fresh
  mapping costs a page fault per page on first write, every time: a transformer
  block's 4 MiB activations are mapped and faulted anew each step, and more so on a
  handler thread, whose arena heap glibc shrinks eagerly: its training step ran 1.4x
  slower through the server (bench/engine.py: 94 against 55 ms). Issue 12 measured
  this as "the handler-thread slowdown".
- 32 MiB (glibc's largest mmap threshold) and a 64 MiB trim threshold: buffers come
  from the arenas and freed ones are reused, on any thread, and a request's peak RSS
  still follows its plan (64-layer MLP: store_all, sqrt, recompute_all +68, +21.5,
  +17.4 MiB over idle, as at 4 MiB). But the arenas fragment under mixed concurrent
  sizes: the same load's idle RSS grew +10% to +18.5% in a minute (a 180 s run settled
  at +10%; a 60 s run was still rising at its end). For a server that runs one kind of
  training loop.

`arena_max` caps glibc's arenas (default ARENA_MAX = 1, server flag
--malloc-arena-max). glibc gives each thread that allocates an arena of its own, up to
8 per core, and each arena keeps the fragments its thread's requests left: live small
objects pin the pages around them, and `malloc_trim` can only return whole free pages.
The server's thread pool has a thread per admitted call (`service.work_slots`), about
50 under bench/load.py's 32 clients with exact solves, so the idle RSS ratcheted up as
requests landed on ever other arenas: +12% over 180 s after a 120 s warm-up (and 160
MiB idle). With one arena the same soak's idle RSS was 99 MiB and grew 2.2%, at the
same throughput (136 against 129 requests/s): the handler threads run under the GIL
anyway, so they hardly contend for the one arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable

_TRIM = _MALLOPT = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _TRIM = getattr(_libc, "malloc_trim", None)
    _MALLOPT = getattr(_libc, "mallopt", None)
except OSError:  # no C library to load: nothing to trim
    pass

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MAX_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: it refuses more
MMAP_THRESHOLD_BYTES = TRIM_THRESHOLD_BYTES = 4 << 20  # bounded RSS; see the module's doc
ARENA_MAX = 1  # see the module's doc
# Less than this kept is not worth a trim.
TRIM_AFTER_BYTES = 1 << 20
# Quiet this long, the server trims (checked every IDLE_CHECK_SECONDS): long enough for
# a loop's back-to-back requests to reuse their memory, short enough that an idle
# server's RSS reads as its working set within a second.
IDLE_SECONDS = 0.5
IDLE_CHECK_SECONDS = 0.1
# A request predicted to peak under this share of what is kept trims first, so its RSS
# follows its own plan; one about as big as the last reuses the memory it left.
SHRINK = 0.9


def tune_for_serving(
    mmap_bytes: int = MMAP_THRESHOLD_BYTES,
    trim_bytes: int = TRIM_THRESHOLD_BYTES,
    arena_max: int = ARENA_MAX,
) -> bool:
    """Make glibc map allocations over `mmap_bytes` separately, trim a heap whose free
    top exceeds `trim_bytes` (fixed, instead of the dynamic thresholds that drift with
    the load) and give threads at most `arena_max` arenas (0: glibc's 8 per core).
    Process-wide, and for arenas made from now on; returns False where there is no
    glibc.

    Raises ValueError for an mmap threshold glibc would refuse (not in 1..32 MiB), a
    negative trim threshold or a negative arena count."""
    if not 0 < mmap_bytes <= MAX_MMAP_THRESHOLD_BYTES or trim_bytes < 0 or arena_max < 0:
        raise ValueError(
            f"malloc settings: mmap must be 1..{MAX_MMAP_THRESHOLD_BYTES} bytes, trim and "
            f"arenas >= 0, got mmap {mmap_bytes}, trim {trim_bytes}, arenas {arena_max}"
        )
    if _MALLOPT is None:
        return False
    arenas = arena_max == 0 or bool(_MALLOPT(_M_ARENA_MAX, arena_max))
    return (
        bool(_MALLOPT(_M_MMAP_THRESHOLD, mmap_bytes))
        and bool(_MALLOPT(_M_TRIM_THRESHOLD, trim_bytes))
        and arenas
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

    def __init__(
        self,
        idle_seconds: float = IDLE_SECONDS,
        trim=release_free_memory,
        on_idle: Callable[[], None] | None = None,
    ):
        self.kept = 0  # about what the last requests left in the heap
        self._ran = False  # a request started since the last trim
        self._trim = trim
        self._on_idle = on_idle  # also run when the server goes idle (e.g. shrink a pool)
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
            self._ran = True
            trim = self.kept >= TRIM_AFTER_BYTES and nbytes < SHRINK * self.kept
            self.kept = nbytes if trim else max(self.kept, nbytes)
        if trim:
            self._trim()
        return trim

    def planned(self) -> None:
        """A request planned without running (Plan): an exact solve or a search leaves
        its model's memory in the heap, to give back once the server is idle."""
        with self._lock:
            self._last = time.monotonic()
            self._ran = True

    def trim_if_idle(self, seconds: float) -> bool:
        """Trim if a request ran since the last trim and none started in the last
        `seconds` (whatever it left: concurrent requests of mixed sizes leave more than
        the last one's peak)."""
        with self._lock:
            due = self._ran and time.monotonic() - self._last >= seconds
            if due:
                self.kept, self._ran = 0, False
        if due:
            if self._on_idle is not None:  # first: what it frees, the trim gives back
                self._on_idle()
            self._trim()
        return due

    def _idle(self, seconds: float) -> None:
        while True:
            time.sleep(min(seconds, IDLE_CHECK_SECONDS))
            self.trim_if_idle(seconds)
