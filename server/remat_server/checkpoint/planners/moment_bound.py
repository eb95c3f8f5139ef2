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
schedule's recomputation. This module solves that integer program (HiGHS, through
scipy) for the backward nodes where the limit binds, in backward order, and keeps the
highest: the first backward nodes, which find the most forward values still to be
read, give the highest bounds (on the zoo's GPT-2 at 50%, its 26th of 279). Where a
solve stops at its time limit, HiGHS's proven dual bound stands in for its optimum (a
lower bound still). It holds for every schedule, not only a planner's class (the
MILP's bound does not), so a schedule at that cost is optimal, and an anchor whose
program has no solution proves that no schedule fits at all.

Its LP relaxation, solved instead until this bound was made integer, was 5-60x under
the best known schedules: a fractional `live` keeps part of a buffer. The integer
program equals Budget's recomputation on the small transformer block (which proves
those schedules optimal) and is within 1.10x of it on the zoo's BERT at 50% and 30%
(bench/README.md). It still sees one moment at a time, so it is weaker where memory
binds at many, and the gap it gives is an upper bound on the true one.

    >>> # bound = recompute_lower_bound(problem, limit, seconds=10.0)
    >>> # bound.cost: FLOPs (or profiled seconds); math.inf: no schedule fits
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from .. import control
from ..problem import Problem
from .zero_one import ZeroOneProgram

# Seconds for all of a bound's solves together (each anchor's is one small integer
# program: 20-80 ms on the zoo's transformers, whose 300-450 anchors take 16-35 s).
DEFAULT_SECONDS = 10.0


@dataclass(frozen=True)
class MomentBound:
    cost: float  # every schedule within the limit recomputes at least this much
    anchor: str | None  # the node whose first computation gave it (None: no bound above 0)
    solved: int = 0  # anchors solved (in `seconds`)
    seconds: float = 0.0  # spent finding it
    # The anchors of the chain of moments that gave `cost` (`moment_chain`); empty: one.
    chain: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """What gave it, in words: "the moment bound" or "the bound over 3 moments"."""
        return f"the bound over {len(self.chain)} moments" if self.chain else "the moment bound"

    @property
    def at(self) -> str:
        """Where: the anchor, or the chain's first and last anchors."""
        return f"{self.chain[0]} to {self.chain[-1]}" if self.chain else str(self.anchor)


@dataclass(frozen=True)
class _Moment:
    """What one anchor's program needs to know about its moment."""

    anchor: str
    before: frozenset[str]  # ancestors of the anchor: computed once already
    later: frozenset[str]  # the anchor and its (needed) descendants: not computed yet
    room: int  # bytes the limit leaves for live values then (< 0: nothing fits)


def recompute_lower_bound(
    problem: Problem,
    limit: int,
    anchors: int | None = None,
    seconds: float = DEFAULT_SECONDS,
    scores: list[tuple[str, float]] | None = None,
) -> MomentBound:
    """The highest moment bound (see the module doc) over the backward nodes at which
    `limit` binds, in backward order: at most `anchors` of them (None: all), within
    `seconds` (and the request's deadline); each anchor's own bound is appended to
    `scores` when given. Finding the binding nodes is linear in the graph for each, so
    that search keeps to the time limit too. Its solves are like the MILP's: they hold a
    solve slot (`control.expensive`, taken only if the caller holds none), and stop
    between anchors once the request ends."""
    start = time.monotonic()
    deadline = start + control.seconds_left(seconds)
    for name in problem.backward:  # the inputs, its result and temporaries alone exceed it
        if _room(problem, limit, name) < 0:
            return MomentBound(math.inf, name, 0, time.monotonic() - start)
    cost, anchor, solved = 0.0, None, 0
    with control.expensive():
        for at, found in moment_costs(problem, limit, deadline, anchors):
            solved += 1
            if scores is not None:
                scores.append((at, found))
            if found > cost:
                cost, anchor = found, at
                if math.isinf(found):  # no schedule fits: nothing can be higher
                    break
    return MomentBound(cost, anchor, solved, time.monotonic() - start)


def moment_costs(
    problem: Problem, limit: int, deadline: float, anchors: int | None = None
) -> Iterator[tuple[str, float]]:
    """(anchor, its moment's bound) for the backward nodes at which `limit` binds, in
    backward order, until `deadline` (`time.monotonic()`), at most `anchors` of them.
    The caller holds a solve slot; this stops between anchors once the request ends."""
    solved = 0
    for moment in _moments(problem, limit):
        control.check()
        if time.monotonic() >= deadline or (anchors is not None and solved >= anchors):
            return
        if moment is None:  # the limit does not bind there
            continue
        yield moment.anchor, _solve(problem, moment, deadline - time.monotonic())
        solved += 1


def _room(problem: Problem, limit: int, anchor: str) -> int:
    """Bytes the limit leaves for live values while `anchor` is computed."""
    model = problem.model
    own = model.nbytes[anchor] if model.owner[anchor] == anchor else 0
    return limit - problem.input_bytes - own - model.scratch.get(anchor, 0)


def _moments(problem: Problem, limit: int) -> Iterator[_Moment | None]:
    """Each backward node's moment, in backward order; None where the limit does not
    bind: where the values computed before it that a node not computed yet reads (and
    the results) fit, the bound is 0 (keep them live, and compute every node that is not
    an ancestor afterwards)."""
    graph, model = problem.graph, problem.model
    inputs = {n.name for n in graph.inputs}
    results = set(problem.results)
    needed = problem.needed
    for anchor in problem.backward:
        before = frozenset(graph.ancestors({anchor}) - {anchor})
        room = _room(problem, limit, anchor)
        read_on = {
            model.owner[v]
            for v in before & needed
            if v in results or any(c in needed and c not in before for c in graph.consumers(v))
        } - inputs
        if sum(model.nbytes[o] for o in read_on) <= room:
            yield None
            continue
        later = frozenset((graph.descendants({anchor}) | {anchor}) & needed)
        yield _Moment(anchor, before, later, room)


class _Values(NamedTuple):
    """What a bound's program has variables for, the same at every anchor."""

    inputs: frozenset[str]  # the graph inputs: live throughout, in `input_bytes`
    values: list[str]  # the needed values a schedule computes, in graph order
    index: dict[str, int]  # value -> its position in `values`
    owners: list[str]  # the buffers those values live in (a view's is its owner's)


def _values(problem: Problem) -> _Values:
    """The problem's `_Values`, built once per problem (hundreds of anchors use them)."""
    found = problem.memo.get("bound_values")
    if found is None:
        inputs = frozenset(n.name for n in problem.graph.inputs)
        values = [n for n in problem.graph.nodes if n in problem.needed and n not in inputs]
        owners = sorted({problem.model.owner[v] for v in values} - inputs)
        found = problem.memo["bound_values"] = _Values(
            inputs, values, {v: k for k, v in enumerate(values)}, owners
        )
    return found


def _solve(problem: Problem, moment: _Moment, seconds: float) -> float:
    """The least recomputation at `moment` (a proven lower bound on it when the solve
    stops at `seconds`); math.inf when nothing fits then."""
    graph, model = problem.graph, problem.model
    inputs, values, index, owners = _values(problem)
    n = len(values)  # variables: live[0:n], after[n:2n], then one per buffer owner
    buffer = {o: 2 * n + k for k, o in enumerate(owners)}
    program = ZeroOneProgram(2 * n + len(owners))
    low, high, row = program.low, program.high, program.row
    for v in values:
        if v in moment.later:  # computed after the moment, and not live at it
            low[n + index[v]], high[index[v]] = 1, 0
        for i in graph[v].inputs:  # computed after: each input live then, or after too
            if i in index:
                row({index[i]: 1, n + index[i]: 1, n + index[v]: -1}, 0)
        owner = model.owner[v]
        if owner not in inputs:  # a live value keeps its buffer
            row({buffer[owner]: 1, index[v]: -1}, 0)
    for v in problem.results:
        if v in index and v not in moment.later:
            row({index[v]: 1, n + index[v]: 1}, 1)
    for i in graph[moment.anchor].inputs:
        if i in index:
            low[index[i]] = 1
    row({buffer[o]: model.nbytes[o] for o in owners}, -math.inf, moment.room)
    for v in moment.before:
        if v in index:
            program.cost[n + index[v]] = problem.cost(v)
    return program.dual_bound(seconds)
