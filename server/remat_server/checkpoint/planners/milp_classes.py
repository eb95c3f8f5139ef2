"""Checkmate's MILP (`milp`) over two classes of schedules: its default order, and the
same with the results nothing reads (the loss) computed last
(`milp_order.results_last`).

Stage t of the MILP computes node t first, so its order decides what it can express.
In the default order the loss is computed with the forward pass and held through the
backward pass; computing it last instead means keeping or computing again its inputs,
which wins where memory is tightest. Neither class contains the other, and on tiny
graphs each has the optimum over every schedule (`tests/brute_force.py`) where the
other misses it: a chain of four tanh at 80% of store_all's peak recomputes 84 FLOPs
in the first, 80 in the second, and at 65% has a schedule in the second only.

The default order is solved first (the results-last one, when asked: Budget with no
schedule found yet), within the whole time limit; the other with what it leaves, but
no longer than the first took (or SECOND_MIN_SECONDS): a plan takes at most about
twice as long as before, and where the first runs to its limit the answer is the
first's. The union's answer is the cheaper schedule, proven optimal over both classes
when neither can hold a cheaper one; a first optimum the second did not match or rule
out in its time is reported optimal over the first class alone.

    >>> # solution = solve(problem, limit, time_limit, "optimal(0.5)", start)
"""

from __future__ import annotations

import math
from dataclasses import replace

from .. import control
from ..problem import Problem
from ..schedule import Schedule
from . import milp, milp_order
from .bounds import recompute_cost

MIN_SECONDS = 0.05  # less left than this is not worth starting HiGHS again
SECOND_MIN_SECONDS = 1.0  # the second class gets at least this long, when left
_ORDERS = ("default order", "results-last order")  # by results_last


def solve(
    problem: Problem,
    limit: int,
    time_limit: float,
    name: str,
    start: Schedule | None = None,
    results_last_first: bool = False,
) -> milp.Solution:
    """`milp.solve` over both classes (see the module doc); raises as it does. With
    `results_last_first`, the results-last class is solved first: where no schedule is
    known the budget is near the least peak, where that class is the one that fits (a
    residual block at its least peak: the default class takes 1.5 s to prove empty)."""
    default = milp_order.default(problem)
    if milp_order.results_last(problem, default) == default:  # one class: the same
        return milp.solve(problem, limit, time_limit, name, start)
    first = milp.solve(problem, limit, time_limit, name, start, results_last_first)
    left = control.seconds_left(time_limit - first.seconds)
    left = min(left, max(first.seconds, SECOND_MIN_SECONDS))
    if left <= MIN_SECONDS:
        return first
    known = first.schedule if first.schedule is not None else start
    second = milp.solve(problem, limit, left, name, known, not results_last_first)
    return _union(problem, first, second, results_last_first)


def _union(
    problem: Problem, first: milp.Solution, second: milp.Solution, results_last_first: bool
) -> milp.Solution:
    """The cheaper schedule of the two classes and what is proven of it: optimal over
    both when neither class holds a cheaper schedule (each solved, or proven empty, or
    bounded above it); else, for the first's optimum, over its class alone (as before the
    second ran); else its gap over the lower of the two classes' bounds."""
    solutions = (first, second)
    seconds = first.seconds + second.seconds
    costs = [
        recompute_cost(problem, s.schedule) if s.schedule is not None else math.inf
        for s in solutions
    ]
    best, cost = min(zip(solutions, costs), key=lambda pair: pair[1])
    if best.schedule is None:
        infeasible = first.infeasible and second.infeasible
        why = f"{first.why}; in the {_ORDERS[not results_last_first]}, {second.why}"
        return replace(first, infeasible=infeasible, seconds=seconds, why=why, orders=2)
    bound = min(_class_bound(s, c) for s, c in zip(solutions, costs))
    if bound < cost and best is first and first.optimal:
        return replace(first, seconds=seconds)
    optimal = bound >= cost
    gap = 0.0 if optimal or cost <= 0 else max(0.0, (cost - bound) / cost)
    order = _ORDERS[(best is second) != results_last_first]
    return replace(
        best,
        optimal=optimal,
        gap=gap,
        bound=min(bound, cost),
        seconds=seconds,
        size=f"{best.size} (the {order}; the other order solved too)",
        orders=2,
    )


def _class_bound(solution: milp.Solution, cost: float) -> float:
    """The least recomputation of any schedule in the solution's class."""
    if solution.infeasible:
        return math.inf
    if solution.optimal:
        return cost
    return solution.bound
