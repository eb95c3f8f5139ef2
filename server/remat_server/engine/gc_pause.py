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
reference cycle: tests/unit/test_compile_cache.py checks). A freeze takes every object
alive, though, not only the compile's: what later becomes cyclic garbage (an
exception's traceback, or, with an in-process client, the caller's SDK graphs, whose
nodes and graph refer to each other) would never be reclaimed. So once the frozen
objects have doubled since the last full collection, a freeze first thaws them and
collects (a full collection's cost, once per doubling: constant per object frozen).
`gc.get_freeze_count()` walks the whole frozen list (20-70 ms per call once a few
100k-node compiles are frozen), so it is asked only when the objects frozen since the
last collection (the collector's young count at each freeze, which a freeze resets: an
upper bound on the growth, since frozen objects are still freed) could have doubled it.

That full collection costs a traversal of everything alive: 0.75 s once three 100k-node
chains were frozen, a quarter of the request it landed on. So a doubling only makes it
owed, and an idle server pays it (`collect_if_owed`, which the servicer's trimmer calls
once no request has started for half a second); a request pays it only if the frozen
objects have grown fourfold meanwhile (a server never idle), or on the first freeze.

The collector is process-wide: the pause is reference-counted, so concurrent compiles
on several handler threads nest, and it is only re-enabled if it was enabled before.
That is why only graphs of `PAUSE_AFTER_NODES` nodes or more pause it: a small compile
gains nothing measurable, and under a load of small requests (bench/load.py, 32
clients) overlapping pauses kept the collector off most of the time, so the garbage
cycles of failed and cancelled requests piled up between collections and the server's
idle RSS grew 12-29% in a minute (2% with no pause).

    >>> import gc
    >>> with paused(PAUSE_AFTER_NODES):
    ...     gc.isenabled()
    False
    >>> with paused(nodes=10):  # small: the collector is left alone
    ...     gc.isenabled() == gc.isenabled()
    True
"""

from __future__ import annotations

import contextlib
import gc
import threading

# Graphs this big pause the collector while they compile (a few objects per node).
PAUSE_AFTER_NODES = 2_000
# Objects a pause must have allocated (net) for them to be frozen after it.
FREEZE_AFTER = 50_000
_lock = threading.Lock()
_depth = 0
_was_enabled = False
_collected_at = 0  # objects frozen right after the last full collection
_frozen_since = 0  # objects frozen since then (young-generation counts at each freeze)
_owed = False  # the frozen objects have doubled since the last full collection
# The growth of the frozen objects since the last full collection that makes one owed
# (an idle server pays it), and the growth at which the next freeze pays it itself.
OWED_AFTER, DUE_AFTER = 2, 4


@contextlib.contextmanager
def paused(nodes: int):
    """Pause the collector while a graph of `nodes` nodes compiles, if it is big."""
    global _depth, _was_enabled
    if nodes < PAUSE_AFTER_NODES:
        yield
        return
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
                    _freeze()
                if _was_enabled:
                    gc.enable()


def _freeze() -> None:
    """Freeze what is alive, after a full collection if the frozen objects have grown
    DUE_AFTER-fold since the last one (the cyclic garbage among them is reclaimed); a
    collection is owed from OWED_AFTER-fold on (`collect_if_owed`). Under `_lock`."""
    global _frozen_since, _owed
    _frozen_since += gc.get_count()[0]
    growth = DUE_AFTER if _owed else OWED_AFTER  # the next growth that matters
    if _frozen_since > (growth - 1) * _collected_at:  # it may have grown so: count
        frozen = gc.get_freeze_count()
        if frozen > DUE_AFTER * _collected_at:
            _collect()
            return
        _owed = _owed or frozen > OWED_AFTER * _collected_at
        _frozen_since = frozen - _collected_at
    gc.freeze()


def _collect() -> None:
    """Thaw, collect everything and freeze again (under `_lock`, no compile paused)."""
    global _collected_at, _frozen_since, _owed
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _collected_at, _frozen_since, _owed = gc.get_freeze_count(), 0, False


def collect_if_owed() -> bool:
    """Make the full collection a freeze left owed, unless a compile is paused now
    (it will freeze, and decide, when it ends); for an idle server. True if it did."""
    with _lock:
        if not _owed or _depth:
            return False
        _collect()
        return True


def call(nodes: int, build, *args):
    """`build(*args)` with the collector paused for a graph of `nodes` nodes."""
    with paused(nodes):
        return build(*args)
