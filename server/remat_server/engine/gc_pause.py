"""Pause Python's cyclic garbage collector while a request compiles.

Compiling allocates a few objects per graph node (IR nodes, tuples, schedule steps)
and frees almost none, which is the worst case for CPython's generational collector:
every 700 allocations it scans the young objects, and ever larger full collections
follow. On a 100,000-node chain that was 30% of a first request's time. Nothing a
compile builds forms a reference cycle that must be reclaimed promptly, so the
collector is switched off for its duration and back on after.

What a big compile built lives on in the compile cache, and the collector would still
traverse all of it once it is back on: the first collection after a 100k-node compile
took 0.15 s, and every full collection after it as long again. So after a pause that
allocated more than `FREEZE_AFTER` objects, they are frozen (`gc.freeze`, as servers
that preload their code do): the collector no longer traverses them, while reference
counting still frees them when the cache evicts them (no compiled structure holds a
reference cycle). The cost: garbage cycles made by other threads during that pause
(an exception's traceback, say) are frozen too and never reclaimed; the collector
runs first (the young generation only) to keep that to the pause itself.

The collector is process-wide: the pause is reference-counted, so concurrent compiles
on several handler threads nest, and it is only re-enabled if it was enabled before.

    >>> import gc
    >>> with paused():
    ...     gc.isenabled()
    False
"""

from __future__ import annotations

import contextlib
import gc
import threading

# Objects a pause must have allocated (net) for them to be frozen after it.
FREEZE_AFTER = 50_000
_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def paused():
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.collect(0)  # young garbage now, so that a freeze below keeps none of it
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                if gc.get_count()[0] > FREEZE_AFTER:
                    gc.freeze()
                if _was_enabled:
                    gc.enable()
