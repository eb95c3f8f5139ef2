"""Pause Python's cyclic garbage collector while a request compiles.

Compiling allocates a few objects per graph node (IR nodes, tuples, schedule steps)
and frees almost none, which is the worst case for CPython's generational collector:
every 700 allocations it scans the young objects, and ever larger full collections
follow. On a 100,000-node chain that was 30% of a first request's time. Nothing a
compile builds forms a reference cycle that must be reclaimed promptly, so the
collector is switched off for its duration and back on after (the collections it
skipped then happen once, on the survivors).

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

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def paused():
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
