"""The graph store's size estimate: what keeping a registered graph holds (its decoded
spec, constants and defaults), not the size of the message it came in, which is 8-10x
smaller; and the store, bounded by that estimate, keeps within its bytes."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from remat import Graph, models
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto
from remat_server.service.graph_store import GraphStore, Registered


def chain(nodes: int) -> Graph:
    g = Graph("chain")
    x = g.input("x", (1,), "float32")
    y = x
    for _ in range(nodes):
        y = y + x
    g.output("y", y)
    return g


GRAPHS = {
    "chain": lambda: chain(5_000),
    "mlp": lambda: models.mlp(batch=4, widths=(16,) * 32 + (3,)).graph,
    "transformer_block": lambda: (
        models.transformer_block(batch=2, seq=8, d_model=16, heads=2, d_ff=32).graph
    ),
}


@pytest.mark.parametrize("name", GRAPHS)
def test_the_estimate_is_within_a_factor_of_two_of_what_a_spec_holds(name):
    message = GRAPHS[name]().to_proto()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        entry = Registered("id", graph_from_proto(message, Limits()))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held / 2 <= entry.nbytes <= held * 2, (held, entry.nbytes)
    assert entry.nbytes > 4 * message.ByteSize()  # what the message's size missed


def test_the_defaults_and_constants_count_in_full():
    g = Graph("g")
    x = g.input("x", (1000,), "float64")
    g.output("y", x + g.constant(np.ones(1000)))
    spec = graph_from_proto(g.to_proto(), Limits())
    plain = Registered("id", spec).nbytes
    with_defaults = Registered("id", spec, {"x": np.zeros(1000)}).nbytes
    assert with_defaults - plain == 8000
    assert plain >= 8000  # the constant's array


def test_the_store_keeps_within_its_bytes_by_the_estimate():
    entries = [
        Registered(f"g{k}", graph_from_proto(chain(1_000).to_proto(), Limits())) for k in range(5)
    ]
    size = entries[0].nbytes
    store = GraphStore(max_bytes=2 * size + size // 2)
    for entry in entries:
        store.put(entry.graph_id, entry, entry.nbytes)
    assert store.nbytes <= store.max_bytes and len(store) == 2
    assert store.find("g4") is not None and store.find("g0") is None
