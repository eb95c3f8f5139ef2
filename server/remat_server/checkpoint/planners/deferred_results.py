"""Forward results the backward pass does not read, computed at the end instead.

A model that returns its logits beside the loss makes the logits a result: a schedule
computes them in the forward pass and holds them through the whole backward pass,
though no gradient reads them. Computing them (and the loss from them) last, from
inputs kept live until then, holds those inputs instead: on the zoo's GPT-2 the
final layer norm's output (0.75 MiB) in place of the logits (1.5 MiB). This moves
computations, never adds any, so the schedule recomputes exactly as much; Budget then
tightens it in the room it made (on GPT-2 at 70% of store_all's peak, down to the
moment bound: proven optimal). The floor's `least_memory._results_last` recomputes the
results from what is live at the end instead, for the least peak at any cost.

    >>> # moved = deferred(problem, schedule, peak)  # None: nothing moves, or no lower peak
"""

from __future__ import annotations

from dataclasses import replace

from ..problem import Problem
from ..schedule import Compute, Free, Schedule, Step
from ..simulate import InvalidSchedule
from .bounds import simulated


def deferred(problem: Problem, schedule: Schedule, peak: int) -> Schedule | None:
    """`schedule` (whose peak is `peak` bytes) with its movable results computed last
    (see the module doc), when that lowers its peak; else None."""
    moved = _movable(problem)
    if not moved:
        return None
    steps = list(schedule.steps)
    computed = [j for j, s in enumerate(steps) if type(s) is Compute and s.node in moved]
    if len(computed) != len(moved):  # one of them computed twice (or never): leave it
        return None
    graph = problem.graph
    inputs = {n.name for n in graph.inputs}
    frontier = {i for m in moved for i in graph[m].inputs if i not in moved and i not in inputs}
    # Each frontier value stays live from its last computation to the end: drop the
    # free that follows that computation.
    drop = {j for j, s in enumerate(steps) if s.node in moved}
    last_made = {
        s.node: j for j, s in enumerate(steps) if type(s) is Compute and s.node in frontier
    }
    if len(last_made) != len(frontier):
        return None
    drop |= {
        j
        for j, s in enumerate(steps)
        if type(s) is Free and s.node in frontier and j > last_made[s.node]
    }
    kept = [s for j, s in enumerate(steps) if j not in drop]
    candidate = replace(schedule, steps=tuple(kept + _tail(problem, moved, frontier)))
    try:
        lower = simulated(problem, candidate).peak_bytes < peak
    except InvalidSchedule:  # a case this move does not handle: keep what was checked
        return None
    return candidate if lower else None


def _tail(problem: Problem, moved: frozenset[str], frontier: set[str]) -> list[Step]:
    """The moved computations in topological order, each value that is not a result
    freed once its last reader there has run."""
    graph, results = problem.graph, problem.results
    order = sorted(moved, key=problem.position.__getitem__)
    last_reader = {i: m for m in order for i in graph[m].inputs if i in moved or i in frontier}
    tail: list[Step] = []
    for m in order:
        tail.append(Compute(m))
        for i in dict.fromkeys(graph[m].inputs):
            if last_reader.get(i) == m and i not in results:
                tail.append(Free(i))
    return tail


def _movable(problem: Problem) -> frozenset[str]:
    """The forward results no backward node reads, with the forward values only they
    read (the loss's product with the logits; a weight decay's squares): computed last,
    they hold nothing through the backward pass. One sweep in reverse topological order,
    so each value's readers are settled before it."""
    memo = problem.memo
    if "deferred_results" not in memo:
        graph, needed, results = problem.graph, problem.needed, problem.results
        moved: set[str] = set()
        for node in reversed(graph.nodes.values()):
            name = node.name
            if name not in needed or node.is_input or not problem.is_forward(name):
                continue
            readers = [c for c in graph.consumers(name) if c in needed]
            if (readers or name in results) and all(c in moved for c in readers):
                moved.add(name)
        memo["deferred_results"] = frozenset(moved)
    return memo["deferred_results"]
