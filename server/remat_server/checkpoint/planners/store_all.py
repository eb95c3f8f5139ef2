"""Store-all: compute every needed node once, in topological order, and free each
value right after its last use. The fastest schedule and the most memory."""
from __future__ import annotations

from ...ir import Graph
from ..schedule import Compute, Free, Schedule, Step


def plan_store_all(graph: Graph, results: frozenset[str]) -> Schedule:
    needed = graph.ancestors(results)
    order = [node for node in graph if node.name in needed]
    last_use: dict[str, int] = {}
    for position, node in enumerate(order):
        for source in node.inputs:
            last_use[source] = position
    frees_after: dict[int, list[str]] = {}
    steps: list[Step] = []
    for node in graph.inputs:  # inputs nobody reads are dropped at once
        if node.name not in last_use and node.name not in results:
            steps.append(Free(node.name))
    for name, position in last_use.items():
        if name not in results:
            frees_after.setdefault(position, []).append(name)
    for position, node in enumerate(order):
        if not node.is_input:
            steps.append(Compute(node.name))
        steps.extend(Free(name) for name in frees_after.get(position, ()))
    return Schedule(tuple(steps), results, "store_all")
