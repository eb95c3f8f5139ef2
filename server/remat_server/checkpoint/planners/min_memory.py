"""Policy MinMemory: the lowest-peak schedule found, recomputing as little as found at
that peak.

The peak is `least_memory.floor`'s (with the policy's time limit: on graphs the MILP
takes, it proves the minimum or a bound). At that peak the floor's own schedule, or its
MILP's least recomputation, competes with Budget's whole search under that peak as a
budget, on joint graphs of up to `BUDGET_MAX_NODES` nodes: Budget's repairs and keep
sets reach schedules outside the MILP's class (a value made again from its source's
sources), so there MinMemory never recomputes more than Budget would at the same peak.

    >>> from remat_proto.policies import MinMemory
    >>> MinMemory(time_limit=5)
    MinMemory(time_limit=5)
"""

from __future__ import annotations

import time
from dataclasses import replace

from remat_proto.policies import MinMemory, label

from ...errors import ResourceExhausted
from .. import control
from ..problem import Problem
from ..schedule import PlannerReport, Schedule
from .bounds import recompute_cost, simulated
from .budget import search
from .least_memory import Floor, floor

DEFAULT_TIME_LIMIT = 60.0  # seconds; the engine passes the server's when the policy has 0
# Budget's search under a budget that low tries nearly every candidate it has: 4.5 s on
# a 2,204-node MLP, 107 s on a 9,904-node one (against 1-5 s for the floor itself); on
# the zoo's graphs (357-682 nodes) 1.4-5.7 s, where it recomputes 6-33% less than the
# floor's schedule, and GPT-2's 17x less (1,517 MFLOP against 26,191: DTR, tightened).
BUDGET_MAX_NODES = 1_000


def plan_min_memory(problem: Problem, policy: MinMemory) -> Schedule:
    name = label(policy)
    start = time.perf_counter()
    with control.expensive(name):  # Budget's search nests in it: one slot
        found = _cheapest_at_the_floor(
            problem, name, floor(problem, name, policy.time_limit or DEFAULT_TIME_LIMIT)
        )
    return replace(
        found.schedule,
        policy=name,
        report=PlannerReport(
            budget_bytes=found.peak,
            status="optimal" if found.proven else "feasible",
            solve_seconds=time.perf_counter() - start,
            chosen=found.by,
            detail=found.describe(),
        ),
    )


def _cheapest_at_the_floor(problem: Problem, name: str, found: Floor) -> Floor:
    """`found`, or Budget's schedule under its peak when that recomputes less (at a peak
    as low or lower: then the floor found is that one's)."""
    if len(problem.graph) > BUDGET_MAX_NODES:
        return found
    try:
        budgeted = search(problem, found.peak, name)
    except ResourceExhausted:  # Budget reaches nothing that low (the MILP did)
        return found
    if recompute_cost(problem, budgeted) >= recompute_cost(problem, found.schedule):
        return found
    by = budgeted.report.chosen if budgeted.report else budgeted.policy
    peak = simulated(problem, budgeted).peak_bytes
    return replace(found, schedule=budgeted, peak=peak, by=by)
