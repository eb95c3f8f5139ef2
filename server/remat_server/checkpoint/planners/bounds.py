"""Bounds the budgeted planners (budget, optimal, dtr, auto) share: the byte limit a
policy asks for and store_all's peak (the 100% a fraction refers to). The lowest peak
any schedule reaches, and the error naming it, are `least_memory`'s.

    >>> # limit = budget_bytes(problem, 0, 0.5)  # half of store_all's peak
"""

from __future__ import annotations

from ..problem import Problem
from ..schedule import Schedule
from ..simulate import Simulation, simulate
from .store_all import plan_store_all


def simulated(
    problem: Problem,
    schedule: Schedule,
    peak_limit: int | None = None,
    recompute_limit: float | None = None,
) -> Simulation:
    """The schedule simulated on the problem's memory model (OverLimit past the limits)."""
    return simulate(
        problem.graph, schedule, problem.model, problem.flops, peak_limit, recompute_limit
    )


def store_all_peak(problem: Problem) -> int:
    if "store_all_peak" not in problem.memo:
        problem.memo["store_all_peak"] = simulated(problem, plan_store_all(problem)).peak_bytes
    return problem.memo["store_all_peak"]


def budget_bytes(problem: Problem, bytes_: int, fraction: float) -> int:
    """The limit in bytes: `bytes_`, or `fraction` of store_all's peak (the policy's
    constructor checked that exactly one is set)."""
    return bytes_ or int(fraction * store_all_peak(problem))


def recompute_cost(problem: Problem, schedule: Schedule) -> float:
    """What `schedule` pays for recomputation, in the problem's prices (FLOPs, or
    profiled seconds)."""
    return evaluations_cost(problem, simulated(problem, schedule).evaluations)


def evaluations_cost(problem: Problem, evaluations) -> float:
    """The price of each evaluation of a node after its first (`evaluations`: node ->
    times computed, a Simulation's)."""
    return sum((count - 1) * problem.cost(node) for node, count in evaluations.items() if count > 1)
