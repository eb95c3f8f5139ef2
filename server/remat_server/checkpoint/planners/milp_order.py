"""The topological orders Checkmate's MILP (`milp`) numbers its nodes in: its stage t
first computes node t, so the order decides which schedules the MILP can express.

    >>> # default(problem): forward values, masks hoisted, then the backward nodes
    >>> # of_schedule(problem, schedule): a warm start's own order (`milp_start`)
    >>> # results_last(problem, order): `order` with the results nothing reads last
"""

from __future__ import annotations

from ..problem import Problem
from ..recompute import hoisted
from ..schedule import Compute, Schedule


def default(problem: Problem) -> list[str]:
    """Forward values in forward_order, each followed by the backward nodes hoisted to
    it (`recompute.hoistable`: a ReLU's mask right after the ReLU's input, so its stage
    can drop that input; a later stage may still recompute the mask), then the other
    backward nodes (graph order if that is not a topological order of the needed
    nodes)."""
    graph = problem.graph
    order = hoisted(problem, [*problem.forward_order, *problem.backward])
    wanted = [n for n in graph.nodes if n in problem.needed and not graph[n].is_input]
    index = {name: i for i, name in enumerate(order)}
    if (
        len(order) != len(wanted)
        or set(order) != set(wanted)
        or any(
            index.get(s, -1) >= index[n]
            for n in order
            for s in graph[n].inputs
            if not graph[s].is_input
        )
    ):
        return wanted
    return order


def of_schedule(problem: Problem, schedule: Schedule) -> list[str] | None:
    """The model's order for a start from `schedule`: its first computations of the
    needed non-input nodes, hoistable ones moved up; None if it misses some."""
    graph = problem.graph
    firsts = dict.fromkeys(
        s.node
        for s in schedule.steps
        if isinstance(s, Compute) and s.node in problem.needed and not graph[s.node].is_input
    )
    if len(firsts) != sum(1 for n in problem.needed if not graph[n].is_input):
        return None
    return hoisted(problem, firsts)


def results_last(problem: Problem, order: list[str]) -> list[str]:
    """`order` with the forward results that no node reads (the loss, fetched
    activations) moved to its end, after the backward pass: stage t computes node t
    first, so in `order` they sit on top of the backward pass, and their inputs are
    computed again at the end in this one (which wins where memory is tightest: on a
    chain of four tanh at 80% of store_all's peak, 80 FLOPs recomputed against 84)."""
    graph = problem.graph
    read = {s for n in order for s in graph[n].inputs}
    last = [n for n in order if n in problem.results and problem.is_forward(n) and n not in read]
    if not last:
        return order
    moved = set(last)
    return [n for n in order if n not in moved] + last
