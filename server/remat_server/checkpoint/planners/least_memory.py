"""The least memory a schedule can need: the floor that RESOURCE_EXHAUSTED names when
no schedule fits a budget, and where policy MinMemory (`min_memory`) starts.

The floor is found in steps, each only as costly as it must be:

1. the low-memory schedules the server knows (store_all in both backward orders,
   recompute_all; keep nothing and drop every recomputed value after its read; on
   small graphs, where `remake`'s moves get from store_all): the lowest peak found,
   and its schedule;
2. a proven lower bound no schedule goes under (`peak_lower_bound`): while a node is
   computed its inputs, its result and its temporaries are live, and at the end all
   results are, the graph inputs always;
3. on joint graphs the exact MILP takes (`--optimal-max-nodes`), within a time limit:
   the MILP with the peak as its objective (`milp.least_memory`), whose schedule
   replaces the found one when lower. Its proven bound is not the floor's: it holds
   for the MILP's class of schedules only (on a chain of four tanh, 136 bytes where a
   schedule outside the class peaks at 128);
4. the schedule found with its forward results (the loss) computed last, when that
   peaks lower (outside the MILP's class); then, with the time left, the MILP under
   that peak for the least recomputation.

The peak is the proven minimum when it meets the bound. A floor is kept in the
problem's memo, so a request refused for its budget does not search twice.

    >>> # found = floor(problem, "budget(0.5)")  # found.peak, found.schedule, found.bound
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from ...errors import Cancelled, DeadlineExceeded, RematError, ResourceExhausted
from .. import control
from ..backward_order import SUFFIX, reordered
from ..problem import Problem
from ..recompute import hoistable, schedule_with_checkpoints
from ..schedule import Compute, Free, Schedule
from ..simulate import InvalidSchedule
from . import milp, peak_order, remake
from .bounds import recompute_cost, simulated
from .heuristics import plan_recompute_all
from .store_all import plan_store_all

# A refusal spends at most this long proving its floor, and only on joint graphs of at
# most REFUSAL_MAX_NODES nodes (where HiGHS gets far in that time).
REFUSAL_SECONDS, REFUSAL_MAX_NODES = 2.0, 80
MIN_SOLVE_SECONDS = 0.05  # less left is not worth starting HiGHS
# recompute_all is quadratic on a chain (25 million steps, about 50 s, on 5,000 tanh):
# past this many steps no other low-memory schedule is tried, nor the results-last
# pass, which copies and simulates the schedule again.
RESULTS_LAST_MAX_STEPS = 1_000_000
# A refusal under the proven bound names only that bound on joint graphs this big: the
# lowest-peak search would take seconds there (9-10 s on a 9,904-node MLP).
QUICK_REFUSAL_NODES = 2_000
PEAK_SHARE = 2 / 3
REPAIR_MAX_NODES = 300  # joint graphs up to this many nodes: the floor tries `remake` too
# recompute_all is reordered at its peak where it peaks this close to the best, and its
# schedule is this short (each try is a plan and a simulation: 60 ms at GPT-2's 14,310).
REORDER_WITHIN, REORDER_MAX_STEPS = 1.25, 100_000


@dataclass(frozen=True)
class Floor:
    """The lowest-peak schedule found (`peak` bytes, planned by `by`) and a proven lower
    bound on every schedule's peak; `proven` when they meet. `seconds` is how long the
    search was given (a longer one may do better)."""

    schedule: Schedule
    peak: int
    by: str
    bound: int
    seconds: float
    # The backward order `schedule` runs in when a search found one (`peak_order`):
    # Budget searches it too when nothing else fits.
    order: tuple[str, ...] | None = None

    @property
    def proven(self) -> bool:
        return self.peak <= self.bound

    def describe(self) -> str:
        if self.proven:
            return (
                f"the lowest peak any schedule reaches is {self.peak:,} bytes "
                f"({self.by}, proven minimum)"
            )
        return (
            f"the lowest peak found is {self.peak:,} bytes ({self.by}); none can peak "
            f"under {self.bound:,} bytes (proven bound)"
        )


def floor(problem: Problem, name: str, seconds: float = REFUSAL_SECONDS) -> Floor:
    """The least memory found within `seconds` (see the module's doc); from the memo
    when an earlier search had at least as long."""
    known = problem.memo.get("floor")
    if known is not None and (known.proven or known.seconds >= seconds):
        return known
    deadline = time.perf_counter() + seconds
    best = _heuristic_floor(problem, deadline)
    by, schedule, peak, order = best
    found = Floor(schedule, peak, by, peak_lower_bound(problem), seconds, order)
    exact_nodes = problem.milp_max_nodes if seconds > REFUSAL_SECONDS else REFUSAL_MAX_NODES
    candidates = [found]
    if not found.proven and milp.size(problem) <= exact_nodes:
        lowest = _exact_peak(problem, name, found, deadline)
        candidates = [lowest, _cheapest_at_peak(problem, name, lowest, deadline)]
    # Each with its results last where that peaks lower. The least recomputation at a
    # peak fills the room the results leave, so both are tried (on a chain of three
    # tanh: the lowest peak with results last, and the cheapest at the MILP's floor,
    # results last, reach the same peak, the second recomputing 124 FLOPs, not 164).
    if len(found.schedule.steps) <= RESULTS_LAST_MAX_STEPS:
        candidates = [_results_last(problem, c) for c in candidates]
    if len(candidates) > 1:
        found = min(candidates, key=lambda f: (f.peak, recompute_cost(problem, f.schedule)))
    else:
        found = candidates[0]
    problem.memo["floor"] = found
    return found


def over_budget(problem: Problem, name: str, budget: int, why: str = "") -> ResourceExhausted:
    """The error for a budget no schedule meets, naming the least memory one needs: the
    floor found, or, when the budget is under the proven bound on a graph whose
    low-memory schedules take seconds to build (long chains are quadratic), that bound
    alone (plan with min_memory for the schedule itself)."""
    bound = peak_lower_bound(problem)
    found = problem.memo.get("floor")
    if found is not None or budget >= bound or len(problem.graph) <= QUICK_REFUSAL_NODES:
        with control.expensive(name):  # the floor's MILP, if any, is a solve like another
            lowest = floor(problem, name).describe()
    else:
        lowest = f"no schedule can peak under {bound:,} bytes (proven bound)"
    reason = f" ({why})" if why else ""
    return ResourceExhausted(
        f"policy {name}: no schedule fits {budget:,} bytes{reason}; {lowest}, "
        f"inputs included ({problem.input_bytes:,}); raise the budget, plan with "
        "min_memory, or send a smaller batch"
    )


def _results_last(problem: Problem, found: Floor) -> Floor:
    """`found`, or better: the same schedule with its forward results (the loss, fetched
    activations) dropped after their last read and recomputed from the inputs at the
    very end, if that lowers the peak. The MILP's stages compute in topological order,
    so it cannot place them there; results otherwise sit on top of the backward pass."""
    deferred = {r for r in problem.results if problem.is_forward(r)}
    if not deferred:
        return found
    steps, graph = found.schedule.steps, problem.graph
    # The last step that reads each deferred result, or computes it again (then the
    # schedule frees it itself before).
    last_use: dict[str, int] = {}
    for j, step in enumerate(steps):
        if type(step) is Compute:
            for r in deferred.intersection(graph[step.node].inputs) | ({step.node} & deferred):
                last_use[r] = j
    out: list = []
    live = {n.name for n in graph.inputs}
    for j, step in enumerate(steps):
        out.append(step)
        if type(step) is Compute:
            live.add(step.node)
        else:
            live.discard(step.node)
        for r in sorted(deferred & live):
            if last_use.get(r, -1) <= j:
                out.append(Free(r))
                live.discard(r)
    missing = set(problem.results) - live
    tail = _recompute(problem, missing, live)
    schedule = replace(found.schedule, steps=tuple(out + tail))
    try:
        peak = simulated(problem, schedule).peak_bytes
    except InvalidSchedule:  # a planner's bug would show here: keep what was checked
        return found
    if peak >= found.peak:
        return found
    return replace(found, schedule=schedule, peak=peak, by=f"{found.by}, results last")


def _recompute(problem: Problem, wanted: set[str], live: set[str]) -> list:
    """Steps that compute `wanted` from the `live` values, in topological order, each
    value not wanted freed after its last use."""
    graph, need, stack = problem.graph, set(), list(wanted)
    while stack:
        name = stack.pop()
        if name not in need and name not in live:
            need.add(name)
            stack.extend(graph[name].inputs)
    order = [n for n in graph.nodes if n in need]
    last = {}
    for name in order:
        for source in graph[name].inputs:
            last[source] = name
    droppable = need - wanted
    steps: list = []
    for name in order:
        steps.append(Compute(name))
        inputs = dict.fromkeys(graph[name].inputs)  # an input read twice is freed once
        steps += [Free(v) for v in inputs if last.get(v) == name and v in droppable]
        if name not in wanted and name not in last:  # computed for nothing: never read
            steps.append(Free(name))
    return steps


def _heuristic_floor(
    problem: Problem, deadline: float
) -> tuple[str, Schedule, int, tuple[str, ...] | None]:
    """(planner, schedule, peak, backward order if a search found it) of the lowest-peak
    known schedule (the searches that can take long stop at `deadline`,
    time.perf_counter())."""
    # Each in the emitted backward order and, where it differs, the memory-aware one
    # (on a U-Net a schedule there can peak lower: 50% of store_all's against 52.7%).
    # Store_all first, where activations weigh little the lowest, and linear: on a tie
    # the one that recomputes nothing wins.
    orders = {"": problem}
    if reordered(problem) is not None:
        orders[SUFFIX] = reordered(problem)
    makers = {}
    for suffix, ordered in orders.items():
        makers[f"store_all{suffix}"] = lambda p=ordered: plan_store_all(p)
    for suffix, ordered in orders.items():
        makers[f"recompute_all{suffix}"] = lambda p=ordered: plan_recompute_all(p, None)
        makers[f"keep_set(drop, 0 kept){suffix}"] = lambda p=ordered: schedule_with_checkpoints(
            p, frozenset(), "", mode="drop"
        )
        if hoistable(problem):  # masks made in the forward phase: no regrowth for them
            makers[f"keep_set(drop, hoisted, 0 kept){suffix}"] = lambda p=ordered: (
                schedule_with_checkpoints(p, frozenset(), "", mode="drop", hoist=True)
            )
    best = None
    peaks = {}
    for by, make in makers.items():
        control.check()  # each is a full schedule and simulation: stop when asked
        schedule = make()
        peak = simulated(problem, schedule).peak_bytes
        peaks[by] = (peak, len(schedule.steps))
        if best is None or peak < best[2]:
            best = (by, schedule, peak, None)
        if len(schedule.steps) > RESULTS_LAST_MAX_STEPS:  # quadratic here: no more of them
            return best
    # recompute_all again with the backward node its peak serves run earlier, while
    # that lowers the peak (`peak_order`: on the zoo's U-Net 33.1% -> 27.4%), in each
    # order where it starts within REORDER_WITHIN of the best (on the zoo's transformers
    # the memory-aware order peaks 2-3x higher, and its search found nothing).
    for suffix, ordered in orders.items():
        peak, steps = peaks[f"recompute_all{suffix}"]
        if peak > REORDER_WITHIN * best[2] or steps > REORDER_MAX_STEPS:
            continue
        lowest, schedule, peak = peak_order.recompute_all_lowered(ordered, deadline)
        if peak < best[2]:
            best = (
                f"recompute_all{suffix}, reordered at its peak",
                schedule,
                peak,
                lowest.backward,
            )
    # The repair's moves, taking off the most bytes each (a CNN: 77% of store_all's
    # peak against the 2 s MILP's 85%), on small graphs: on the zoo's none went lower
    # than recompute_all, and they took the floor from 0.05-0.33 s to 0.55-0.68 s.
    if len(problem.graph) > REPAIR_MAX_NODES:
        return best
    for suffix, ordered in orders.items():
        for start, make in remake.starts(ordered).items():
            control.check()
            schedule, peak = remake.lowest(ordered, make())
            if peak < best[2]:
                best = (f"remade({start}){suffix}", schedule, peak, None)
    return best


def _exact_peak(problem: Problem, name: str, found: Floor, deadline: float) -> Floor:
    """`found`, or the MILP's least peak when lower. The MILP's proven bound holds for its
    class only (see `milp`: the results-last schedules are outside it), so it does not
    raise the floor's bound, which holds for every schedule."""
    if _left(deadline) <= MIN_SOLVE_SECONDS:
        return found
    try:
        # The lowest peak gets PEAK_SHARE of the time, so that the least recomputation
        # at that peak gets some.
        seconds = PEAK_SHARE * _left(deadline)
        low = milp.least_memory(problem, found.peak, seconds, name, lower=found.bound)
        if low.schedule is not None:
            peak = simulated(problem, low.schedule).peak_bytes
            if peak < found.peak:
                found = replace(found, schedule=low.schedule, peak=peak, by="milp", order=None)
    except (Cancelled, DeadlineExceeded):
        raise  # the request ended: no more planning
    except (RematError, ResourceExhausted):  # the solver's process died: what we have
        pass
    return found


def _cheapest_at_peak(problem: Problem, name: str, found: Floor, deadline: float) -> Floor:
    """`found`, or the MILP's least recomputation at its peak when it recomputes less:
    in both of Budget's backward orders where they differ (the MILP's class depends on
    the order), sharing the time left."""
    try:
        other = reordered(problem)
        runs = ((1, problem),) if other is None else ((2, problem), (1, other))
        cheapest = None
        for share, ordered in runs:
            if _left(deadline) <= MIN_SOLVE_SECONDS:
                break
            cheap = milp.solve(ordered, found.peak, _left(deadline) / share, name)
            if cheap.schedule is not None:
                cost = recompute_cost(problem, cheap.schedule)
                if cheapest is None or cost < cheapest[0]:
                    cheapest = (cost, cheap.schedule)
        if cheapest is not None and cheapest[0] < recompute_cost(problem, found.schedule):
            found = replace(found, schedule=cheapest[1], by="milp", order=None)
    except (Cancelled, DeadlineExceeded):
        raise
    except (RematError, ResourceExhausted):
        pass
    return found


def _left(deadline: float) -> float:
    return control.seconds_left(max(0.0, deadline - time.perf_counter()))


def peak_lower_bound(problem: Problem) -> int:
    """Bytes every schedule's peak reaches: the graph inputs plus, at the end, every
    result's buffer, and, while any needed node is computed, its inputs' buffers, its
    own and its temporaries (views count their owner's buffer). Memoised."""
    if "peak_lower_bound" not in problem.memo:
        problem.memo["peak_lower_bound"] = _peak_lower_bound(problem)
    return problem.memo["peak_lower_bound"]


def _peak_lower_bound(problem: Problem) -> int:
    model, graph = problem.model, problem.graph
    inputs = {n.name for n in graph.inputs}

    def held(values) -> int:
        return sum(model.nbytes[o] for o in {model.owner[v] for v in values} - inputs)

    best = held(problem.results)
    for name in problem.needed - inputs:
        best = max(best, held((name, *graph[name].inputs)) + model.scratch.get(name, 0))
    return problem.input_bytes + best
