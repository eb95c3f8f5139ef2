"""Store-all: compute every needed node once, in topological order, and free each
value right after its last use. The fastest schedule and the most memory.

Graph inputs are never freed, by any planner: they live in the request message for
the whole call, so dropping the executor's reference would not release them.
"""
from __future__ import annotations

from ..problem import Problem
from ..schedule import Compute, Free, Schedule, Step


def plan_store_all(problem: Problem, policy=None) -> Schedule:
    graph, results = problem.graph, problem.results
    order = [node for node in graph if node.name in problem.needed and not node.is_input]
    last_use: dict[str, int] = {}
    for position, node in enumerate(order):
        for source in node.inputs:
            if not graph[source].is_input:
                last_use[source] = position
    frees_after: dict[int, list[str]] = {}
    for name, position in last_use.items():
        if name not in results:
            frees_after.setdefault(position, []).append(name)
    steps: list[Step] = []
    for position, node in enumerate(order):
        steps.append(Compute(node.name))
        steps.extend(Free(name) for name in frees_after.get(position, ()))
    return Schedule(tuple(steps), results, "store_all")
