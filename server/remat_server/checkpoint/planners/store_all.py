"""Store-all: compute every needed node once, in the problem's eager order (graph order
unless the backward pass is reordered), and free each value right after its last use.
The fastest schedule and the most memory.

Graph inputs are never freed, by any planner: they live in the request message for
the whole call, so dropping the executor's reference would not release them.
"""

from __future__ import annotations

from ..problem import Problem
from ..schedule import Compute, Free, Schedule, Step


def plan_store_all(problem: Problem, policy=None) -> Schedule:
    results, order = problem.results, problem.eager_order
    last_use: dict[str, int] = {}
    for position, node in enumerate(order):
        for source in node.inputs:
            last_use[source] = position
    kept = results | {node.name for node in problem.graph.inputs}  # never freed
    frees_after: dict[int, list[str]] = {}
    for name, position in last_use.items():
        if name not in kept:
            frees_after.setdefault(position, []).append(name)
    steps: list[Step] = []
    append = steps.append
    for position, node in enumerate(order):
        append(Compute(node.name))
        for name in frees_after.get(position, ()):
            append(Free(name))
    return Schedule(tuple(steps), results, "store_all")
