"""A proven lower bound on what any schedule recomputes under a byte limit, from one
moment of it: the first computation of an anchor node X.

At that moment every ancestor of X has been computed once, no descendant of X has, and
what is live fits the limit (with the graph inputs, X's inputs, X's result and its
temporaries). So, for any schedule that keeps to the limit, with `live` the values live
then and `after` those computed after:
- X's descendants are in `after`, and not live;
- a node in `after` finds each input live then or in `after` too;
- a result is live then or in `after` (it must be live at the end);
- the buffers of the live values (a view's is its owner's) fit what the limit leaves;
- an ancestor of X in `after` is computed again: its cost at least, once.
The least such cost, over 0/1 choices of `live` and `after`, is a lower bound on every
schedule's recomputation; this module solves its LP relaxation (HiGHS, through scipy),
a lower bound still, for a few anchors along the backward pass, and keeps the highest.
It holds for every schedule, not only a planner's class (the MILP's bound does not),
so a schedule at that cost is optimal, and an anchor whose LP has no solution proves
that no schedule fits at all.

It sees a single moment, so it is weak where memory binds at many (a transformer's
backward pass): the gap it reports is an upper bound on the true one.

    >>> # bound = recompute_lower_bound(problem, limit)
    >>> # bound.cost: FLOPs (or profiled seconds); math.inf: no schedule fits
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from .. import control
from ..problem import Problem

# Anchors tried, spread evenly along the backward pass (each is one LP).
DEFAULT_ANCHORS = 24


@dataclass(frozen=True)
class MomentBound:
    cost: float  # every schedule within the limit recomputes at least this much
    anchor: str | None  # the node whose first computation gave it (None: no bound above 0)


def recompute_lower_bound(
    problem: Problem, limit: int, anchors: int = DEFAULT_ANCHORS
) -> MomentBound:
    """The highest moment bound over `anchors` backward nodes (see the module doc). Its
    LPs are solves like the MILP's: they hold a solve slot (`control.expensive`, taken
    only if the caller holds none), and stop between anchors once the request ends."""
    best = MomentBound(0.0, None)
    with control.expensive():
        for anchor in _anchors(problem, anchors):
            control.check()
            cost = _moment(problem, limit, anchor)
            if cost > best.cost:
                best = MomentBound(cost, anchor)
                if math.isinf(cost):
                    break
    return best


def _anchors(problem: Problem, count: int) -> list[str]:
    backward = problem.backward
    if len(backward) <= count:
        return list(backward)
    step = (len(backward) - 1) / (count - 1)
    return list(dict.fromkeys(backward[round(k * step)] for k in range(count)))


def _moment(problem: Problem, limit: int, anchor: str) -> float:
    """The LP bound at `anchor`'s first computation; math.inf when nothing fits then."""
    graph, model = problem.graph, problem.model
    inputs = {n.name for n in graph.inputs}
    values = [n for n in graph.nodes if n in problem.needed and n not in inputs]
    index = {v: k for k, v in enumerate(values)}
    n = len(values)  # variables: live[0:n], after[n:2n], then one per buffer owner
    owners = sorted({model.owner[v] for v in values} - inputs)
    buffer = {o: 2 * n + k for k, o in enumerate(owners)}
    before = graph.ancestors({anchor}) - {anchor}
    later = (graph.descendants({anchor}) | {anchor}) & problem.needed
    low, high = np.zeros(2 * n + len(owners)), np.ones(2 * n + len(owners))
    rows: list[dict[int, float]] = []
    floors: list[float] = []
    ceilings: list[float] = []

    def row(coefs: dict[int, float], floor: float, ceiling: float = math.inf) -> None:
        rows.append(coefs)
        floors.append(floor)
        ceilings.append(ceiling)

    for v in values:
        if v in later:  # computed after the moment, and not live at it
            low[n + index[v]], high[index[v]] = 1, 0
        for i in graph[v].inputs:  # computed after: each input live then, or after too
            if i in index:
                row({index[i]: 1, n + index[i]: 1, n + index[v]: -1}, 0)
        owner = model.owner[v]
        if owner not in inputs:  # a live value keeps its buffer
            row({buffer[owner]: 1, index[v]: -1}, 0)
    for v in problem.results:
        if v in index and v not in later:
            row({index[v]: 1, n + index[v]: 1}, 1)
    for i in graph[anchor].inputs:
        if i in index:
            low[index[i]] = 1
    own = model.nbytes[anchor] if model.owner[anchor] == anchor else 0
    room = limit - problem.input_bytes - own - model.scratch.get(anchor, 0)
    if room < 0:
        return math.inf
    row({buffer[o]: model.nbytes[o] for o in owners}, -math.inf, room)
    cost = np.zeros(2 * n + len(owners))
    for v in before:
        if v in index:
            cost[n + index[v]] = problem.cost(v)
    coords = [(k, j, c) for k, coefs in enumerate(rows) for j, c in coefs.items()]
    matrix = coo_matrix(
        ([c for *_, c in coords], ([k for k, *_ in coords], [j for _, j, _ in coords])),
        shape=(len(rows), len(cost)),
    ).tocsr()
    result = milp(
        cost, constraints=LinearConstraint(matrix, floors, ceilings), bounds=Bounds(low, high)
    )
    if result.status == 2:  # infeasible: no live set fits at this moment
        return math.inf
    if result.status != 0:  # no answer from the solver: no bound claimed
        return 0.0
    # (less a hair: HiGHS's tolerances must not turn a bound into a claim above it)
    return max(0.0, float(result.fun) * (1 - 1e-6))
