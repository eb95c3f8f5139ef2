"""A schedule from the chain of moments' program (`moment_chain`): its choices (which
values each interval between the anchors makes, which are live at each anchor) made
into steps, with one more anchor wherever the steps still peak over the limit.

1. Solve the chain program over the anchors (HiGHS's best choices by the time limit).
2. Make it a schedule, interval by interval: the values the interval makes that are
   needed (the anchor that opens it, what the next moment holds, the results at the
   end, or inputs of those), in the order that holds the fewest bytes: of the values
   whose inputs are live, the one that adds the least (its bytes, less those of the
   inputs it is the last to read). A value is freed once nothing later in its interval
   reads it and the next moment does not hold it; what the moment before held and
   the interval does not read goes right after the anchor.
3. The program checks memory at its moments only. Where the schedule peaks over the
   limit, it is repaired by `remake` (a candidate), and the first value first computed
   at or after that step becomes one more anchor (in the schedule's order) for the
   next round, until a round's schedule fits or the rounds or the time run out. The
   cheapest schedule found wins.

The anchors need not form a chain (each an ancestor of the next): the program then
covers the schedules that meet them in that order only, which is all a heuristic
needs. When they do, its bound holds for every schedule, and a schedule at it is
optimal. On the zoo's ResNet at 70% of store_all's peak, from the moment bound's
anchor, a residual add and a convolution's input gradient added as anchors give a
schedule recomputing 6.55 MFLOP (Budget's search: 9.70), which the program over those
three anchors proves optimal.

    >>> # found = moment_schedule(problem, limit, ("bwd/relu_3/relu/where",), seconds=30)
    >>> # found.schedule fits `limit`; found.bound: a MomentBound, or None (not proven)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .. import control
from ..problem import Problem
from ..schedule import Compute, Free, Schedule, Step
from ..simulate import InvalidSchedule
from . import remake
from .bounds import evaluations_cost, recompute_cost, simulated
from .moment_bound import MomentBound
from .moment_chain import ChainSolution, chain_solution
from .zero_one import at_bound

# Programs solved per search (each adds one anchor where the last schedule peaked).
ROUNDS = 8
LABEL = "moments"


@dataclass(frozen=True)
class Found:
    """A schedule within the limit, what it recomputes, and the highest bound of the
    search's programs whose anchors formed a chain (proven for every schedule; None:
    none did)."""

    schedule: Schedule
    cost: float
    bound: MomentBound | None


def moment_schedule(
    problem: Problem,
    limit: int,
    anchors: Sequence[str],
    seconds: float,
    rounds: int = ROUNDS,
    ceiling: float = math.inf,
    floor: float = 0.0,
) -> Found | None:
    """The search in the module doc from `anchors`, within `seconds` (and the request's
    deadline): a schedule within `limit` recomputing less than `ceiling`, or None. It
    stops once a schedule recomputes no more than `floor` (a proven bound) or than the
    bound of one of its programs. Its solves hold a solve slot (`control.expensive`,
    taken only if the caller holds none), and it stops between them once the request
    ends."""
    with control.expensive():
        return _search(problem, limit, anchors, seconds, rounds, ceiling, floor)


def _search(
    problem: Problem,
    limit: int,
    anchors: Sequence[str],
    seconds: float,
    rounds: int,
    ceiling: float,
    floor: float,
) -> Found | None:
    start = time.monotonic()
    deadline = start + control.seconds_left(seconds)
    chain = list(anchors)
    best: tuple[Schedule, float] | None = None
    proven: MomentBound | None = None  # the highest bound of a program over a chain
    for _ in range(rounds):
        control.check()
        left = deadline - time.monotonic()
        if left <= 0:
            break
        solution = chain_solution(problem, limit, chain, left)
        schedule = None if solution is None else realised(problem, chain, solution)
        if schedule is None:
            break
        try:
            sim = simulated(problem, schedule)
        except InvalidSchedule:  # choices HiGHS's tolerances left inconsistent
            break
        if _is_chain(problem, chain) and solution.bound > (proven.cost if proven else 0.0):
            spent = time.monotonic() - start
            proven = MomentBound(solution.bound, chain[0], 0, spent, tuple(chain))
        if sim.peak_bytes <= limit:  # the program's choices fit: more anchors add nothing
            cost = evaluations_cost(problem, sim.evaluations)
            if cost < ceiling:
                best = (schedule, cost)
            break
        # Over the limit: repaired, it may still beat the best so far (each round's
        # schedule is another start for `remake`).
        fitted = _repaired(problem, schedule, limit, ceiling)
        cost = math.inf if fitted is None else recompute_cost(problem, fitted)
        if cost < ceiling:  # (a repair may end over the ceiling it was given)
            best, ceiling = (fitted, cost), cost
        if best is not None and at_bound(best[1], max(floor, proven.cost if proven else 0.0)):
            break  # no schedule recomputes less
        chain = _with_peak_anchor(problem, chain, schedule, sim.timeline)
        if chain is None:
            break
    return None if best is None else Found(*best, proven)


def _repaired(problem: Problem, schedule: Schedule, limit: int, ceiling: float) -> Schedule | None:
    """`remake.repaired`, or None where its edits break the schedule: its moves and
    deferrals were made for starts that compute each value once (store_all, a keep set)."""
    try:
        return remake.repaired(problem, schedule, limit, ceiling)
    except InvalidSchedule:
        return None


def realised(problem: Problem, anchors: Sequence[str], solution: ChainSolution) -> Schedule | None:
    """The chain program's `solution` over `anchors` as steps (see the module doc);
    None where its choices do not make an order (HiGHS's tolerances), which the caller
    treats as no schedule. Not simulated: the caller does."""
    steps = _Steps(problem)
    last = len(anchors)
    for k, made in enumerate(solution.made):
        held = solution.live[k] if k < last else problem.results
        if not steps.interval(made, held, anchors[k - 1] if k else None):
            return None
    return Schedule(tuple(steps.steps), problem.results, LABEL)


class _Steps:
    """The steps made so far, and the values live after them."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.graph, model = problem.graph, problem.model
        self.inputs = frozenset(node.name for node in self.graph.inputs)
        self.position = {node.name: k for k, node in enumerate(problem.eager_order)}
        # Bytes a value holds of its own (a view holds its owner's).
        self.bytes = lambda name: model.nbytes[name] if model.owner[name] == name else 0
        self.steps: list[Step] = []
        self.live: set[str] = set(self.inputs)  # the graph inputs: live throughout

    def interval(self, made: frozenset[str], held: frozenset[str], anchor: str | None) -> bool:
        """Append one interval's steps: the values of `made` it needs, opened by
        `anchor`, with what `held` names live at its end. False when the choices do
        not make an order (an input neither live nor made)."""
        graph, live = self.graph, self.live
        todo = self._needed(made, held, anchor)
        todo_set = set(todo)
        readers: dict[str, list[str]] = {}
        waiting: dict[str, int] = {}
        for v in todo:
            sources = [i for i in dict.fromkeys(graph[v].inputs) if i in todo_set]
            waiting[v] = len(sources)
            for i in sources:
                readers.setdefault(i, []).append(v)
        left = {i: 0 for v in todo for i in graph[v].inputs}
        for v in todo:
            for i in dict.fromkeys(graph[v].inputs):
                left[i] += 1

        def kept(name: str) -> bool:
            return name in self.inputs or left.get(name, 0) > 0 or name in held

        def compute(v: str) -> None:
            self.steps.append(Compute(v))
            live.add(v)
            for i in dict.fromkeys(graph[v].inputs):
                left[i] -= 1
            for i in dict.fromkeys((*graph[v].inputs, v)):
                if i in live and not kept(i):
                    self.steps.append(Free(i))
                    live.discard(i)

        def added(v: str) -> tuple[int, int]:
            freed = sum(
                self.bytes(i)
                for i in dict.fromkeys(graph[v].inputs)
                if i in live and left[i] == 1 and i not in held and i not in self.inputs
            )
            return self.bytes(v) - freed, self.position[v]

        ready = [v for v in todo if waiting[v] == 0]
        if anchor is not None:
            if anchor not in ready or any(i not in live for i in graph[anchor].inputs):
                return False
            ready.remove(anchor)
            compute(anchor)
            for r in readers.get(anchor, ()):
                waiting[r] -= 1
                if waiting[r] == 0:
                    ready.append(r)
        for name in sorted(live, key=self._order):  # held before, not read now: gone
            if not kept(name):
                self.steps.append(Free(name))
                live.discard(name)
        done = 1 if anchor is not None else 0
        while ready:
            v = min(ready, key=added)
            ready.remove(v)
            if any(i not in live for i in graph[v].inputs):
                return False
            compute(v)
            done += 1
            for r in readers.get(v, ()):
                waiting[r] -= 1
                if waiting[r] == 0:
                    ready.append(r)
        return done == len(todo)

    def _needed(self, made: frozenset[str], held: frozenset[str], anchor: str | None) -> list[str]:
        """The values of `made` the interval needs, in the problem's order: the anchor,
        those `held` at its end, and the inputs made in it of those (a value live
        already is not made again)."""
        graph = self.graph
        ordered = sorted(made, key=self._order)
        needed = {anchor} if anchor is not None else set()
        for v in reversed(ordered):
            if v in needed or v in held:
                needed.add(v)
                needed.update(i for i in graph[v].inputs if i in made)
        return [v for v in ordered if v in needed and (v not in self.live or v == anchor)]

    def _order(self, name: str) -> int:
        return self.position.get(name, -1)


def _is_chain(problem: Problem, anchors: Sequence[str]) -> bool:
    """Whether each anchor is an ancestor of the next (every schedule meets them so)."""
    graph = problem.graph
    return all(a in graph.ancestors({b}) for a, b in zip(anchors, anchors[1:], strict=False))


def _with_peak_anchor(
    problem: Problem, anchors: list[str], schedule: Schedule, timeline: Sequence[int]
) -> list[str] | None:
    """`anchors` with the first value first computed at or after the step where
    `timeline` peaks, all in the schedule's order; None when there is none to add."""
    first: dict[str, int] = {}
    for index, step in enumerate(schedule.steps):
        if type(step) is Compute and step.node not in first:
            first[step.node] = index
    peak = max(range(len(timeline)), key=timeline.__getitem__)
    added = next(
        (
            step.node
            for index, step in enumerate(schedule.steps[peak:], peak)
            if type(step) is Compute and first[step.node] == index and step.node not in anchors
        ),
        None,
    )
    if added is None:
        return None
    return sorted((*anchors, added), key=first.__getitem__)
