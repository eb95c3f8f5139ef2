"""Measured op costs for `Budget(profile=True)`: time one forward pass on the request's
own inputs, so the planner prices recomputation in seconds rather than FLOPs (a
FLOP of exp or of a strided gather costs far more than one of matmul).

Only forward values are ever recomputed, so a forward-only pass (each value freed
after its last forward use, little memory) measures every price the planner needs;
other nodes get their FLOPs at the pass's measured seconds per FLOP.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..checkpoint.schedule import Compute, Free, Schedule
from ..checkpoint.simulate import node_flops
from ..graph.ir import Graph
from .executor import execute

FLOOR_SECONDS = 1e-9  # a zero price would make recomputing a node look free


def forward_costs(
    graph: Graph, forward_nodes: frozenset[str], feeds: Mapping[str, np.ndarray]
) -> dict[str, float]:
    order = [n for n in graph.nodes if n in forward_nodes and not graph[n].is_input]
    last_use = {}
    for i, name in enumerate(order):
        for source in graph[name].inputs:
            last_use[source] = i
    steps = []
    for i, name in enumerate(order):
        steps.append(Compute(name))
        steps.extend(
            Free(s)
            for s in dict.fromkeys(graph[name].inputs)  # mul(h, h): once
            if last_use.get(s) == i and s in forward_nodes and not graph[s].is_input
        )
    if order and order[-1] not in last_use:
        steps.append(Free(order[-1]))
    available = {n.name: feeds[n.name] for n in graph.inputs if n.name in feeds}
    run = execute(
        graph, Schedule(tuple(steps), frozenset(), "profile"), available, forward_nodes, trace=True
    )
    costs = {
        name: max(seconds, FLOOR_SECONDS)
        for name, _, phase, _, seconds, _ in run.trace
        if phase != "free"
    }
    flops = sum(node_flops(graph, n) for n in costs)
    per_flop = sum(costs.values()) / flops if flops else FLOOR_SECONDS
    for name in graph.nodes:
        if name not in costs and not graph[name].is_input:
            costs[name] = max(node_flops(graph, name) * per_flop, FLOOR_SECONDS)
    return costs
