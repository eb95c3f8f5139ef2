"""A byte-bounded LRU of compiled requests, where concurrent first requests for one
key compile once.

`get_or_build(key, build)` returns (value, hit). On a miss the first caller runs
`build()` outside the lock while later callers for the same key wait for its result
(or its exception, which they all receive; a failure is not cached). Entries report
their own size (`nbytes`), which may grow after insertion (a compiled request gains a
plan per policy): `resize(key)` re-reads it and evicts from the cold end, never the
entry being touched. Hits, misses and evictions are counted for the metrics.

    >>> cache = LRUCache(max_bytes=100)
    >>> class Item:
    ...     nbytes = 60
    >>> first, hit = cache.get_or_build("a", Item)
    >>> cache.get_or_build("a", Item) == (first, True)
    True
    >>> _ = cache.get_or_build("b", Item)   # 120 bytes > 100: "a" is evicted
    >>> len(cache), cache.stats.evictions
    (1, 1)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class LRUCache:
    """`max_bytes` 0 keeps nothing: every request builds (single-flight still holds)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._building: dict[Hashable, Future] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str, int, int], None]] = []

    def on_change(self, listener: Callable[[str, int, int], None]) -> None:
        """Call `listener(event, entries, nbytes)` after every hit, miss, eviction and
        resize ("hit", "miss", "evict", "resize"); under the cache's lock, so keep it
        cheap (a counter, a gauge) and never call back into the cache."""
        with self._lock:
            self._listeners.append(listener)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> Any | None:
        """The value under `key` (a hit), or None without counting a miss: a probe
        before `get_or_build`."""
        with self._lock:
            return self._hit(key)

    def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> tuple[Any, bool]:
        with self._lock:
            value = self._hit(key)
            if value is not None:
                return value, True
            pending = self._building.get(key)
            if pending is None:
                self._building[key] = future = Future()
                self.stats.misses += 1
                self._notify("miss")
        if pending is not None:  # another request is building it: share its result
            return pending.result(), True
        try:
            value = build()
        except BaseException as error:
            with self._lock:
                del self._building[key]
            future.set_exception(error)
            raise
        with self._lock:
            del self._building[key]
            self._entries[key] = value
            self._sizes[key] = 0
            self._resize(key, value)
        future.set_result(value)
        return value, False

    def _hit(self, key: Hashable) -> Any | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            self._notify("hit")
        return value

    def resize(self, key: Hashable) -> None:
        """Re-read the size of the entry under `key` (it grew); evict colder ones."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._resize(key, value)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sizes.clear()
            self._bytes = 0
            self._notify("resize")

    def _resize(self, key: Hashable, value: Any) -> None:
        size = int(value.nbytes)
        self._bytes += size - self._sizes[key]
        self._sizes[key] = size
        while self._bytes > self.max_bytes and self._entries:
            # An entry bigger than the whole cache goes too: its request holds it
            # while it runs, and the bound holds.
            coldest = next(iter(self._entries))
            self._entries.pop(coldest)
            self._bytes -= self._sizes.pop(coldest)
            self.stats.evictions += 1
            self._notify("evict")
        self._notify("resize")

    def _notify(self, event: str) -> None:
        for listener in self._listeners:
            listener(event, len(self._entries), self._bytes)
