"""Exhaustive searches over every schedule of a tiny joint graph: the references the
exact planners and the proven bounds are held to.

A schedule is a walk over sets of live values: compute a node whose inputs are live
(graph inputs always are), or free a live value. The accounting is the simulator's:
the inputs are live throughout, a buffer counts while any value using it (its owner
or a view of it) is live, and a compute's temporaries sit on top of everything live.

One kind of step is left out: computing a buffer's owner again while a view of its old
copy lives (NumPy would hold two copies). The searches check that every view costs
nothing to make, so that leaves out nothing cheaper: freeing the view first, computing
the owner and the view again costs the same and holds less.

    >>> # least_peak(problem) -> the lowest peak of any schedule, in bytes
    >>> # least_recompute(problem, limit) -> (the least recomputation within `limit`,
    >>> #                                     a schedule with it), or None
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator

from remat_server.checkpoint.problem import Problem
from remat_server.checkpoint.schedule import Compute, Free, Schedule, Step

# A search visits at most this many states: a graph too big for it fails loudly
# instead of running for hours.
MAX_STATES = 2_000_000


class _Walk:
    """The steps out of each set of live values, with the bytes they hold."""

    def __init__(self, p: Problem):
        graph, model = p.graph, p.model
        self.p = p
        inputs = {n.name for n in graph.inputs}
        self.nodes = sorted(p.needed - inputs)
        self.needs = {n: frozenset(graph[n].inputs) - inputs for n in self.nodes}
        self.owner = {n: model.owner[n] for n in self.nodes}
        self.inputs = inputs
        for n in self.nodes:
            if self.owner[n] != n and p.cost(n) != 0:
                raise AssertionError(f"view '{n}' costs {p.cost(n)}: the search assumes 0")

    def held(self, live: frozenset[str]) -> int:
        model = self.p.model
        owners = {self.owner[v] for v in live} - self.inputs
        return self.p.input_bytes + sum(model.nbytes[o] for o in owners)

    def steps(self, live: frozenset[str]) -> Iterator[tuple[Step, frozenset[str], int]]:
        """(the step, the live set after it, the bytes in use during it)."""
        for v in live:
            after = live - {v}
            yield Free(v), after, self.held(after)
        scratch = self.p.model.scratch
        for n in self.nodes:
            fresh = self.owner[n] != n or all(self.owner[v] != n for v in live)
            if n not in live and self.needs[n] <= live and fresh:
                after = live | {n}
                yield Compute(n), after, self.held(after) + scratch.get(n, 0)

    def done(self, live: frozenset[str]) -> bool:
        return self.p.results - self.inputs <= live


def least_peak(p: Problem) -> int:
    """The lowest peak over every schedule: a bottleneck shortest path over live sets."""
    walk = _Walk(p)
    start: frozenset[str] = frozenset()
    best = {start: p.input_bytes}
    queue = [(p.input_bytes, 0, start)]
    pushes = itertools.count(1)  # ties broken in push order (live sets do not compare)
    for _ in _pops():
        if not queue:
            raise AssertionError("no schedule reaches the results")
        peak, _, live = heapq.heappop(queue)
        if peak > best.get(live, math.inf):
            continue
        if walk.done(live):
            return peak
        for _, after, used in walk.steps(live):
            cost = max(peak, used)
            if cost < best.get(after, math.inf):
                best[after] = cost
                heapq.heappush(queue, (cost, next(pushes), after))
    raise AssertionError("unreachable")


def least_recompute(p: Problem, limit: int) -> tuple[float, Schedule] | None:
    """The least recomputation (`p.cost` of every computation of a node after its first)
    over every schedule whose bytes in use never exceed `limit`, and a schedule with it;
    None when no schedule fits. A shortest path over (live set, nodes computed so far)."""
    if p.input_bytes > limit:
        return None
    walk = _Walk(p)
    start = (frozenset(), frozenset())
    best = {start: 0.0}
    came_from: dict = {start: None}  # state -> (previous state, the step to it)
    queue = [(0.0, 0, start)]
    pushes = itertools.count(1)
    for _ in _pops():
        if not queue:
            return None
        cost, _, state = heapq.heappop(queue)
        if cost > best.get(state, math.inf):
            continue
        live, computed = state
        if walk.done(live):
            return cost, Schedule(_path(came_from, state), p.results, "brute_force")
        for step, after, used in walk.steps(live):
            if used > limit:
                continue
            price, done = cost, computed
            if type(step) is Compute:
                if step.node in computed:
                    price += p.cost(step.node)
                else:
                    done = computed | {step.node}
            following = (after, done)
            if price < best.get(following, math.inf):
                best[following] = price
                came_from[following] = (state, step)
                heapq.heappush(queue, (price, next(pushes), following))
    raise AssertionError("unreachable")


def _path(came_from: dict, state) -> tuple[Step, ...]:
    steps = []
    while came_from[state] is not None:
        state, step = came_from[state]
        steps.append(step)
    return tuple(reversed(steps))


def _pops() -> Iterator[int]:
    """One per state taken off the heap, failing past MAX_STATES."""
    yield from range(MAX_STATES)
    raise AssertionError(f"the search visited {MAX_STATES} states: the graph is too big")
