"""Optimal: the exact optimum under a budget, from Checkmate's MILP (`milp`).

First the budget planner finds a schedule (with its own short MILP run on small
graphs). Where it recomputes no more than the moment bound (`moment_bound`: what every
schedule within the budget recomputes, proven by one small integer program per backward
node), or, with the bound's time left, the bound over a chain of those moments
(`moment_chain`), it is optimal among all schedules, and Optimal answers with it
without a MILP. Otherwise the moment search (`moment_schedule`) makes a schedule from
the bound's program, adding the moments where it peaks, with half the time limit; the
cheaper of it and Budget's is the one kept (and proven optimal where the search's
program proves it so).
Otherwise the MILP starts from it (`milp_start`: HiGHS's first incumbent), in its order,
so on a graph where HiGHS finds no schedule of its own in time Optimal still answers
with one and, where HiGHS has a bound by then, with its gap. Outcomes: store_all fits -> store_all
(optimal, no solve); proven optimum ("optimal", mip_rel_gap 0); time limit with a
schedule ("time_limit", the gap), or the budget planner's schedule when that
recomputes less, even than a proven optimum of the MILP's class ("feasible", the gap
over the moment bound: so Optimal is never worse than Budget); more than
`problem.milp_max_nodes` nodes, or no schedule in time -> the budget planner's
("fallback"). When the MILP proves that none of its schedules fits, the budget
planner's schedule, if it found one, is the answer (its floor's results-last
schedules are outside the MILP's class, see `milp`), else RESOURCE_EXHAUSTED names
the proven bound. The search and the solve hold one solve slot (`control.expensive`),
the time limit ends at the request's deadline, and a request that ends during it gets
Cancelled or DeadlineExceeded, never a fallback: nobody is waiting for the plan any
more.

    >>> from remat_proto.policies import Optimal
    >>> Optimal(fraction=0.5)
    Optimal(bytes=0, fraction=0.5, time_limit=0.0)
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

from remat_proto.policies import Optimal, label

from ...errors import ResourceExhausted
from .. import control
from ..problem import Problem
from ..schedule import PlannerReport, Schedule
from . import milp, milp_classes
from .bounds import budget_bytes, recompute_cost, store_all_peak
from .budget import search
from .least_memory import over_budget, peak_lower_bound
from .moment_bound import DEFAULT_SECONDS, MomentBound
from .moment_chain import chain_lower_bound
from .moment_schedule import LABEL as MOMENTS
from .moment_schedule import moment_schedule
from .store_all import plan_store_all
from .zero_one import at_bound

log = logging.getLogger(__name__)

DEFAULT_TIME_LIMIT = 60.0  # seconds; the engine passes the server's when the policy has 0
# The moment bound's share of the time limit (at most its own default): it proves
# Budget's schedule optimal in well under a second on graphs the MILP can hold.
BOUND_SHARE = 0.25
# The moment search's share (`moment_schedule`), where the bound does not prove Budget's
# schedule optimal: on the zoo's ResNet at 70% it finds the optimum in about 30 s.
MOMENTS_SHARE = 0.5


def plan_optimal(problem: Problem, policy: Optimal) -> Schedule:
    name = label(policy)
    limit = budget_bytes(problem, policy.bytes, policy.fraction)
    if store_all_peak(problem) <= limit:  # every node once: no schedule costs less
        return replace(
            plan_store_all(problem),
            policy=name,
            report=PlannerReport(
                budget_bytes=limit,
                status="optimal",
                chosen="store_all",
                detail="store_all fits the budget: nothing needs recomputing",
            ),
        )
    nodes = milp.size(problem)
    if nodes > problem.milp_max_nodes:
        return _fallback(
            problem,
            name,
            limit,
            f"the joint graph has {nodes} nodes, over the "
            f"MILP limit of {problem.milp_max_nodes} (server flag "
            "--optimal-max-nodes)",
            policy,
        )
    if limit < problem.input_bytes:
        raise over_budget(problem, name, limit, "the graph inputs alone exceed it")
    if limit < peak_lower_bound(problem):  # proven infeasible: no solve can change that
        raise over_budget(problem, name, limit, "under the proven bound on every schedule's peak")
    with control.expensive(name):  # Budget's search nests in it: one slot
        known = _budget_schedule(problem, name, limit)
        time_limit = control.seconds_left(policy.time_limit or DEFAULT_TIME_LIMIT)
        bound = _lower_bound(problem, limit, policy, known)
        if known is not None and _reaches(problem, known, bound):
            return _proven(problem, name, limit, known, bound)
        known, bound = _by_moments(problem, limit, policy, known, bound)
        if known is not None and _reaches(problem, known, bound):
            return _proven(problem, name, limit, known, bound)
        # (raises once the request has ended)
        solution = milp_classes.solve(problem, limit, time_limit, name, known)
        if solution.schedule is None:  # none in time, or none of the MILP's class fits
            if known is None:  # and Budget's search had found none either
                raise over_budget(problem, name, limit, solution.why + "; no fallback fits")
            return _fallback(problem, name, limit, solution.why, policy, known, bound)
        if known is not None:  # the cheaper of the two: a proof covers the MILP's class only
            better = _cheaper(problem, name, limit, solution, known, bound)
            if better is not None:
                return better
    detail = solution.size
    if known is not None:
        detail += f", started from {_planner(known)}'s schedule"
    gap = solution.gap
    if not solution.optimal:  # how far from the optimum the schedule may be
        detail += (
            f", stopped at {time_limit:g} s; every schedule of its class recomputes at "
            f"least {solution.bound:.4g} {_unit(problem)}"
        )
        if bound.cost > solution.bound:  # the bound every schedule has is higher
            gap, words = _moment_gap(problem, recompute_cost(problem, solution.schedule), bound)
            detail += f"; {words}"
    elif solution.orders == 2:  # proven for the MILP's classes, not every schedule
        detail += (
            "; optimal among the schedules of its classes (one fixed order, with the "
            "results computed with the forward pass or last)"
        )
    else:
        detail += "; optimal among the schedules of its class (one fixed order)"
    return replace(
        solution.schedule,
        report=PlannerReport(
            budget_bytes=limit,
            status="optimal" if solution.optimal else "time_limit",
            optimality_gap=gap,
            solve_seconds=solution.seconds,
            chosen="milp",
            detail=detail,
        ),
    )


def _budget_schedule(problem: Problem, name: str, limit: int) -> Schedule | None:
    """Budget's schedule: the MILP's warm start (in that schedule's order), and the
    answer when the MILP finds nothing better. None when nothing fits. Its own short
    MILP run included: on small graphs it runs in the memory-aware order, where it can
    find what this MILP, in the emitted order, does not (two small residual blocks at
    80%: 2,688 FLOPs in its 2 s, against 7,360 in 20 s without it)."""
    try:
        return search(problem, limit, name)
    except ResourceExhausted:
        return None


def _cheaper(
    problem: Problem,
    name: str,
    limit: int,
    solution: milp.Solution,
    found: Schedule,
    moment: MomentBound,
) -> Schedule | None:
    """Budget's schedule when it recomputes less than the MILP's schedule (the MILP
    prices the masks it computes twice for its order), reported with the MILP's proven
    bound (None when the MILP's is at least as cheap). That bound holds for the MILP's
    class only: where Budget's schedule, from outside it, is under it, the moment bound,
    which every schedule has, is the one reported. So even a MILP solved to optimality
    gives way: three small residual blocks at 80% of store_all's peak, the MILP's proven
    optimum in its class 640 FLOPs, Budget's remade schedule 384."""
    ours = recompute_cost(problem, found)
    if ours >= recompute_cost(problem, solution.schedule):
        return None
    unit = _unit(problem)
    if moment.cost <= solution.bound <= ours:
        gap = (ours - solution.bound) / ours if ours > 0 else 0.0
        bound = f"every schedule of its class recomputes at least {solution.bound:.4g} {unit}"
    else:  # the moment bound: higher, or the MILP's is not this schedule's
        gap, bound = _moment_gap(problem, ours, moment)
        if solution.bound > ours:
            bound = (
                f"it is under the bound of {solution.bound:.4g} {unit} the MILP proved for "
                f"its class, which does not contain it; {bound}"
            )
    return _budgets(
        found,
        name,
        limit,
        status="feasible" if solution.optimal else "time_limit",
        optimality_gap=gap,
        solve_seconds=solution.seconds,
        detail=f"{solution.size}; {_planner(found)}'s schedule recomputes less than the "
        f"MILP's {'optimum in its class' if solution.optimal else 'incumbent'}; {bound}",
    )


def _fallback(
    problem: Problem,
    name: str,
    limit: int,
    why: str,
    policy: Optimal,
    known: Schedule | None = None,
    moment: MomentBound | None = None,
) -> Schedule:
    """Budget's schedule (`known`, else a search now) as Optimal's answer, with its gap
    over the moment bound (`moment`, else solved now): proven optimal if it reaches it."""
    schedule = known
    if schedule is None:
        try:
            schedule = search(problem, limit, name)
        except ResourceExhausted:
            raise over_budget(problem, name, limit, why + "; no fallback schedule fits") from None
    if moment is None:
        moment = _lower_bound(problem, limit, policy, schedule)
        if not _reaches(problem, schedule, moment):
            schedule, moment = _by_moments(problem, limit, policy, schedule, moment)
    if _reaches(problem, schedule, moment):
        return _proven(problem, name, limit, schedule, moment)
    gap, bound = _moment_gap(problem, recompute_cost(problem, schedule), moment)
    return _budgets(
        schedule,
        name,
        limit,
        status="fallback",
        optimality_gap=gap,
        solve_seconds=schedule.report.solve_seconds if schedule.report else 0.0,
        detail=f"{why}; planned by {_planner(schedule)} instead; {bound}",
    )


def _proven(
    problem: Problem, name: str, limit: int, schedule: Schedule, moment: MomentBound
) -> Schedule:
    """`schedule` (Budget's or the moment search's), which recomputes no more than every
    schedule within the budget must (`moment`): optimal among all schedules, no MILP
    needed."""
    return _budgets(
        schedule,
        name,
        limit,
        status="optimal",
        optimality_gap=0.0,
        solve_seconds=moment.seconds,
        detail=f"{_planner(schedule)}'s schedule recomputes "
        f"{recompute_cost(problem, schedule):.4g} "
        f"{_unit(problem)}, what every schedule within the budget must ({moment.name}"
        + (f", at {moment.at}" if moment.anchor is not None else "")
        + "): optimal among all schedules",
    )


def _lower_bound(
    problem: Problem, limit: int, policy: Optimal, known: Schedule | None
) -> MomentBound:
    """The moment bound, and where it does not prove `known` (Budget's schedule)
    optimal, the bound over a chain of moments with the rest of the bound's time: on
    small residual blocks that one proves Budget's schedules optimal in about a second
    (the MILP took 123 s to prove a worse one optimal in its class)."""
    enough = 0.0 if known is None else recompute_cost(problem, known)
    return chain_lower_bound(problem, limit, seconds=_bound_seconds(policy), enough=enough)


def _by_moments(
    problem: Problem, limit: int, policy: Optimal, known: Schedule | None, bound: MomentBound
) -> tuple[Schedule | None, MomentBound]:
    """`known` (Budget's schedule), or the moment search's from the bound's anchors
    (`moment_schedule`) where that recomputes less, and the higher of `bound` and the
    bound of the program that gave it (when its anchors form a chain). On the zoo's
    ResNet at 70% of store_all's peak: 6.55 MFLOP recomputed, against Budget's 9.70."""
    anchors = bound.chain or ((bound.anchor,) if bound.anchor is not None else ())
    if not anchors or math.isinf(bound.cost):
        return known, bound
    ceiling = math.inf if known is None else recompute_cost(problem, known)
    share = MOMENTS_SHARE * (policy.time_limit or DEFAULT_TIME_LIMIT)
    found = moment_schedule(
        problem, limit, anchors, control.seconds_left(share), ceiling=ceiling, floor=bound.cost
    )
    if found is None or found.cost >= ceiling:  # never worse than Budget's
        return known, bound
    if found.bound is not None and found.bound.cost > bound.cost:
        bound = found.bound
    return found.schedule, bound


def _planner(schedule: Schedule) -> str:
    """Who planned a schedule Optimal answers with other than its MILP, in words."""
    return "the moment search" if schedule.policy == MOMENTS else "the budget planner"


def _bound_seconds(policy: Optimal) -> float:
    """The moment bound's time: its share of the policy's time limit, at most its own
    default, and never past the request's deadline."""
    share = BOUND_SHARE * (policy.time_limit or DEFAULT_TIME_LIMIT)
    return control.seconds_left(min(DEFAULT_SECONDS, share))


def _reaches(problem: Problem, schedule: Schedule, moment: MomentBound) -> bool:
    """True when `schedule` recomputes no more than the moment bound proves every
    schedule must (`zero_one.at_bound`)."""
    return at_bound(recompute_cost(problem, schedule), moment.cost)


def _moment_gap(problem: Problem, cost: float, moment: MomentBound) -> tuple[float, str]:
    """(gap, in words) of a schedule recomputing `cost` against the bound every
    schedule within the budget has (`moment`): an upper bound on its true gap."""
    unit = _unit(problem)
    if moment.cost > cost:  # cannot be, for a schedule within the limit: claim nothing
        log.error("moment bound %.6g over a schedule's cost %.6g", moment.cost, cost)
        return 1.0, "no lower bound on its recomputation is proven"
    gap = (cost - moment.cost) / cost if cost > 0 else 0.0
    return gap, (
        f"every schedule within the budget recomputes at least {moment.cost:.4g} {unit} "
        f"({moment.name}), so this one is within {gap:.1%} of the optimum"
    )


def _budgets(schedule: Schedule, name: str, limit: int, **report) -> Schedule:
    """The budget planner's `schedule` as Optimal's answer (`report`: the rest of it)."""
    chosen = schedule.report.chosen if schedule.report else schedule.policy
    return replace(
        schedule,
        policy=name,
        report=PlannerReport(budget_bytes=limit, chosen=chosen, **report),
    )


def _unit(problem: Problem) -> str:
    return "seconds" if problem.costs is not None else "FLOPs"
