"""A proven lower bound on what any schedule recomputes under a byte limit, from several
moments at once: the first computations of a chain of anchors A1, ..., AK, each an
ancestor of the next (so they come in that order in every schedule).

`moment_bound` looks at one moment. Where memory binds at many (the backward pass of a
ResNet, block after block), a schedule pays at each, and one moment's program sees
only one payment. Here the moments cut every schedule into K + 1 intervals, and for
any schedule that keeps to the limit, with `made[k]` the values computed in interval k
(at least once) and `live[k]` the values live at moment k:
- every needed value is made in some interval;
- Ak and its descendants are not made before Ak's moment, and Ak is made right at it
  (the first computation of interval k + 1);
- a value made in interval k finds each input made in interval k or live at moment
  k - 1 (its most recent computation was in one of the two);
- a value live at moment k was made in interval k or was live at moment k - 1;
- Ak's inputs are live at its moment, and the buffers of what is live then fit what
  the limit leaves (with the graph inputs, Ak's result and its temporaries);
- a result is live at the last moment or made after it.
A value made in m intervals was computed m times at least, so the least sum of
`cost * (m - 1)` over 0/1 choices of `made` and `live` is a lower bound on every
schedule's recomputation. With one anchor it equals that anchor's moment bound.

The program has K + 1 copies of the graph's values, so it is solved for one chain: the
anchors where the moment bound binds, cut in backward order into K stretches, the one
with the highest moment bound from each (skipping those not comparable with the
anchors already chosen). On three small residual blocks it proves Budget's schedules
optimal in about a second, where one moment gives half their recomputation; Optimal
runs it with what its bound's share of time leaves (`optimal._lower_bound`). On the
zoo's ResNet at 50% of store_all's peak, K = 8 lifts the bound from 34.08 to 50.85
MFLOP, in minutes (`bench/bounds.py`); on most zoo rows it adds nothing.

    >>> # bound = chain_lower_bound(problem, limit, anchors=8, seconds=120.0)
    >>> # bound.cost >= recompute_lower_bound(problem, limit).cost; bound.chain: its anchors
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import NamedTuple

from .. import control
from ..problem import Problem
from .moment_bound import MomentBound, _room, _values, recompute_lower_bound
from .zero_one import ZeroOneProgram, at_bound

DEFAULT_ANCHORS = 8


def chain_lower_bound(
    problem: Problem,
    limit: int,
    anchors: int = DEFAULT_ANCHORS,
    seconds: float = 120.0,
    enough: float = math.inf,
    scores: list[tuple[str, float]] | None = None,
) -> MomentBound:
    """The higher of the moment bound and the bound of a chain of up to `anchors`
    moments (see the module doc), within `seconds` (and the request's deadline): the
    moment bounds of every binding anchor first (appended to `scores` when given), then,
    with the time left, the chain's program, unless one moment already proves a
    schedule recomputing `enough` optimal."""
    start = time.monotonic()
    deadline = start + control.seconds_left(seconds)
    scored = [] if scores is None else scores
    single = recompute_lower_bound(problem, limit, seconds=seconds, scores=scored)
    if math.isinf(single.cost) or at_bound(enough, single.cost):
        return single
    with control.expensive():
        chain = stretch_anchors(problem, scored, anchors)
        left = deadline - time.monotonic()
        if len(chain) < 2 or left <= 0:
            return single
        cost = chain_cost(problem, limit, chain, left)
    if cost <= single.cost:
        return replace(single, seconds=time.monotonic() - start)
    return MomentBound(cost, chain[0], single.solved, time.monotonic() - start, chain)


def stretch_anchors(
    problem: Problem, scored: Sequence[tuple[str, float]], count: int
) -> tuple[str, ...]:
    """Up to `count` anchors with bounds above 0, each an ancestor of the next: the
    scored anchors (in backward order) cut into `count` stretches, from each the one
    with the highest bound that is comparable with those chosen so far."""
    graph = problem.graph
    binding = [(anchor, cost) for anchor, cost in scored if cost > 0]
    size = max(1, len(binding) // max(count, 1))
    chosen: list[str] = []
    ancestors: dict[str, frozenset[str]] = {}

    def above(a: str) -> frozenset[str]:
        if a not in ancestors:
            ancestors[a] = frozenset(graph.ancestors({a}))
        return ancestors[a]

    for start in range(0, min(len(binding), size * count), size):
        stretch = sorted(binding[start : start + size], key=lambda item: -item[1])
        for anchor, _ in stretch:
            if all(anchor in above(c) or c in above(anchor) for c in chosen):
                chosen.append(anchor)
                break
    position = {name: k for k, name in enumerate(graph.nodes)}
    return tuple(sorted(chosen, key=position.__getitem__))  # ancestors first


def chain_cost(problem: Problem, limit: int, chain: Sequence[str], seconds: float) -> float:
    """The least recomputation over the chain's moments (a proven lower bound on it when
    the solve stops at `seconds`); math.inf when nothing fits at one of them. `chain`:
    anchors, each an ancestor of the next."""
    built = _program(problem, limit, chain)
    if built is None:
        return math.inf
    program, constant, _, _ = built
    return program.dual_bound(seconds, constant)


class ChainSolution(NamedTuple):
    """The chain program's bound (proven for every schedule when its anchors form a
    chain) and the best choices found: the values made in each interval (K + 1) and
    those live at each moment (K)."""

    bound: float
    made: list[frozenset[str]]
    live: list[frozenset[str]]


def chain_solution(
    problem: Problem, limit: int, anchors: Sequence[str], seconds: float
) -> ChainSolution | None:
    """The chain program over `anchors` taken in that order (`moment_schedule` makes
    its choices a schedule; anchors that are not each an ancestor of the next restrict
    it to the schedules meeting them in that order), within `seconds`. None when
    nothing fits at one of the moments or HiGHS found no choices in time."""
    built = _program(problem, limit, anchors)
    if built is None:
        return None
    program, constant, made, live = built
    solved = program.solve(seconds, constant)
    if solved.x is None:
        return None
    values = _values(problem).values
    x = solved.x
    return ChainSolution(
        solved.bound,
        [frozenset(v for v in values if x[made(k, v)]) for k in range(len(anchors) + 1)],
        [frozenset(v for v in values if x[live(k, v)]) for k in range(len(anchors))],
    )


def _program(
    problem: Problem, limit: int, chain: Sequence[str]
) -> tuple[ZeroOneProgram, float, Callable[[int, str], int], Callable[[int, str], int]] | None:
    """The chain's program, the constant of its objective and its `made` and `live`
    variables (interval or moment, value -> index); None when nothing fits at one of
    the moments (their rooms alone are negative)."""
    graph, model = problem.graph, problem.model
    rooms = [_room(problem, limit, anchor) for anchor in chain]
    if any(room < 0 for room in rooms):
        return None
    inputs, values, index, owners = _values(problem)
    n, moments = len(values), len(chain)
    owner_index = {o: k for k, o in enumerate(owners)}
    intervals = moments + 1

    def made(k: int, v: str) -> int:  # v computed in interval k (0..moments)
        return k * n + index[v]

    def live(k: int, v: str) -> int:  # v live at moment k (0..moments - 1)
        return (intervals + k) * n + index[v]

    def buffer(k: int, owner: str) -> int:
        return (intervals + moments) * n + k * len(owners) + owner_index[owner]

    program = ZeroOneProgram((intervals + moments) * n + moments * len(owners))
    low, high, row = program.low, program.high, program.row
    for k, anchor in enumerate(chain):
        for v in (graph.descendants({anchor}) | {anchor}) & problem.needed:
            for j in range(k + 1):  # not before the anchor's moment
                high[made(j, v)] = 0
        low[made(k + 1, anchor)] = 1
        high[live(k, anchor)] = 0  # its own bytes are in the room already
        for i in graph[anchor].inputs:
            if i in index:
                low[live(k, i)] = 1
        row({buffer(k, o): model.nbytes[o] for o in owners}, -math.inf, rooms[k])
    constant = 0.0
    for v in values:
        row({made(k, v): 1 for k in range(intervals)}, 1)
        cost = problem.cost(v)
        constant -= cost  # the first computation is no recomputation
        for k in range(intervals):
            program.cost[made(k, v)] = cost
            for i in graph[v].inputs:
                if i in index:
                    coefs = {made(k, i): 1, made(k, v): -1}
                    if k > 0:
                        coefs[live(k - 1, i)] = 1
                    row(coefs, 0)
        owner = model.owner[v]
        for k in range(moments):
            coefs = {made(k, v): 1, live(k, v): -1}
            if k > 0:
                coefs[live(k - 1, v)] = 1
            row(coefs, 0)
            if owner not in inputs:  # a live value keeps its buffer
                row({buffer(k, owner): 1, live(k, v): -1}, 0)
    for r in problem.results:
        if r in index:
            row({live(moments - 1, r): 1, made(moments, r): 1}, 1)
    return program, constant, made, live
