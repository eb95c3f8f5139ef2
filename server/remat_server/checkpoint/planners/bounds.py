"""Bounds the budgeted planners (budget, optimal, dtr, auto) share: the byte limit a
policy asks for, store_all's peak (the 100% a fraction refers to), the lowest peak
known to be reachable, and the error when a budget cannot be met.

    >>> # limit = budget_bytes(problem, 0, 0.5)  # half of store_all's peak
"""

from __future__ import annotations

from ...errors import ResourceExhausted
from ..problem import Problem
from ..schedule import Schedule
from ..simulate import Simulation, simulate
from .heuristics import plan_recompute_all
from .store_all import plan_store_all


def simulated(problem: Problem, schedule: Schedule) -> Simulation:
    return simulate(problem.graph, schedule, problem.model, problem.flops)


def store_all_peak(problem: Problem) -> int:
    if "store_all_peak" not in problem.memo:
        problem.memo["store_all_peak"] = simulated(problem, plan_store_all(problem)).peak_bytes
    return problem.memo["store_all_peak"]


def budget_bytes(problem: Problem, bytes_: int, fraction: float) -> int:
    """The limit in bytes: `bytes_`, or `fraction` of store_all's peak (the policy's
    constructor checked that exactly one is set)."""
    return bytes_ or int(fraction * store_all_peak(problem))


def lowest_peak(problem: Problem) -> tuple[int, str]:
    """The lowest peak of the minimal-memory schedules the server knows, and which."""
    if "lowest_peak" not in problem.memo:
        problem.memo["lowest_peak"] = (
            simulated(problem, plan_recompute_all(problem, None)).peak_bytes,
            "recompute_all",
        )
    return problem.memo["lowest_peak"]


def over_budget(problem: Problem, label: str, budget: int, why: str = "") -> ResourceExhausted:
    """The error for a budget no schedule meets, with the predicted minimum."""
    minimum, by = lowest_peak(problem)
    reason = f" ({why})" if why else ""
    return ResourceExhausted(
        f"policy {label}: no schedule fits {budget:,} bytes{reason}; the lowest predicted "
        f"peak is {minimum:,} bytes ({by}, inputs included: {problem.input_bytes:,}); "
        "raise the budget or send a smaller batch"
    )
