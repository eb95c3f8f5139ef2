"""Registered graphs by content id: an LRU bounded in bytes."""

from __future__ import annotations

import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from remat_proto.spec import GraphSpec, array_bytes

from ..errors import NotFound

NO_DEFAULTS: Mapping[str, np.ndarray] = types.MappingProxyType({})
# Resident bytes per node (or input) of a decoded spec: its name, op, input tuple,
# attrs and source, measured with tracemalloc on a chain, an MLP and a transformer block
# (427-464; tests/unit/test_graph_store.py holds the estimate to within 2x). A spec
# weighs 8-10x its Graph message, so the message's size let a store bounded at 256 MiB
# hold gigabytes.
SPEC_NODE_BYTES = 450


class Registered(NamedTuple):
    """A graph the server knows: its content id, its spec and, for an ONNX model, the
    values its initializer inputs take when a request does not send them."""

    graph_id: str
    spec: GraphSpec
    defaults: Mapping[str, np.ndarray] = NO_DEFAULTS

    @property
    def nbytes(self) -> int:
        """About what keeping it holds: the spec, its constants and the defaults."""
        spec = self.spec
        return (
            SPEC_NODE_BYTES * (len(spec.nodes) + len(spec.inputs))
            + array_bytes(spec.nodes)
            + sum(array.nbytes for array in self.defaults.values())
        )


class GraphStore:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Registered, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[int, int], None]] = []

    def on_change(self, listener: Callable[[int, int], None]) -> None:
        """Call `listener(entries, nbytes)` now and after every change in size.

        Listeners run under the store's lock, so they see changes in order; keep them
        cheap (a gauge set) and never call back into the store."""
        with self._lock:
            self._listeners.append(listener)
            listener(len(self._entries), self._bytes)

    def put(self, graph_id: str, entry: Registered, size: int) -> None:
        with self._lock:
            if graph_id in self._entries:
                self._entries.move_to_end(graph_id)
                return
            self._entries[graph_id] = (entry, size)
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
            for listener in self._listeners:
                listener(len(self._entries), self._bytes)

    def find(self, graph_id: str) -> Registered | None:
        """The graph under `graph_id` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(graph_id)
            if entry is None:
                return None
            self._entries.move_to_end(graph_id)
            return entry[0]

    def get(self, graph_id: str) -> Registered:
        with self._lock:
            if graph_id not in self._entries:
                raise NotFound(
                    f"graph '{graph_id}' is not registered on this server (it may have been "
                    f"evicted: the cache keeps {self.max_bytes:,} bytes of graphs, server "
                    "flag --graph-cache-bytes); send the graph again"
                )
            self._entries.move_to_end(graph_id)
            return self._entries[graph_id][0]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes
