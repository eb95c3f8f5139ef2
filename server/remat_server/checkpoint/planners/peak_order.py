"""A backward order that lowers one planner's peak: the backward node the peak serves,
moved earlier.

A low-memory schedule such as recompute_all makes each backward node's forward inputs
again just before it, so its peak is one of those recomputations together with the
gradients live at that moment. Which gradients are live depends on the backward order:
on the zoo's U-Net, autodiff emits a convolution's input gradient before its weight
gradient, so the input gradient (a full activation) is live while the weight gradient's
input, the up-sampled tensor, is made again. Run the weight gradient first and that
recomputation peaks lower: recompute_all's peak goes from 33.1% of store_all's to 27.4%
(GPT-2 28.5% -> 25.2%, BERT 24.1% -> 22.3%, LLaMA 23.5% -> 22.0%).

The search is a hill climb on the order: simulate, find the backward node the peak
serves (the first one computed at or after it), move it up to REACH places earlier
(past nodes it does not depend on), keep the move that lowers the peak most, repeat
until none does or MAX_EVALUATIONS schedules are simulated.

    >>> # ordered, schedule, peak = lowered(problem, lambda p: plan_recompute_all(p, None))
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .. import control
from ..problem import Problem
from ..schedule import Compute, Schedule
from .bounds import simulated
from .heuristics import plan_recompute_all

# How far earlier the peak's backward node may move in one step, and how many
# schedules one search simulates at most (each is a full plan and simulation: 5-60 ms
# on the zoo's graphs, where the searches took 11-22 of them).
REACH = 3
MAX_EVALUATIONS = 32


def lowered(
    problem: Problem,
    make: Callable[[Problem], Schedule],
    deadline: float | None = None,
) -> tuple[Problem, Schedule, int]:
    """(`problem` in the lowest-peak backward order found, `make`'s schedule in it, its
    peak), starting from `problem`'s order; stops early past `deadline`
    (time.perf_counter())."""
    best = _judged(problem, make)
    evaluations = 1
    while evaluations < MAX_EVALUATIONS:
        ordered, _, _, serving = best
        if serving is None:
            break
        improved = None
        for order in _moves(ordered, serving):
            if evaluations >= MAX_EVALUATIONS or _past(deadline):
                break
            control.check()
            trial = _judged(ordered.with_backward(order), make)
            evaluations += 1
            if trial[2] < (improved or best)[2]:
                improved = trial
        if improved is None:
            break
        best = improved
    return best[0], best[1], best[2]


def recompute_all_lowered(
    problem: Problem, deadline: float | None = None
) -> tuple[Problem, Schedule, int]:
    """`lowered` for recompute_all from `problem`'s order, memoised on `problem`: the
    floor's search and Budget's both ask for it (a search stopped by `deadline` is
    remembered as it stopped)."""
    memo = problem.memo
    if "recompute_all_lowered" not in memo:
        memo["recompute_all_lowered"] = lowered(
            problem, lambda p: plan_recompute_all(p, None), deadline
        )
    return memo["recompute_all_lowered"]


def lowered_order(problem: Problem) -> Problem | None:
    """`problem` in the backward order where recompute_all peaks lowest (the order the
    floor's search finds), None where no move lowers that peak."""
    ordered, _, _ = recompute_all_lowered(problem)
    return None if ordered.backward == problem.backward else ordered


def _judged(problem: Problem, make) -> tuple[Problem, Schedule, int, str | None]:
    """(problem, its schedule, the peak, the backward node computed at or after it)."""
    schedule = make(problem)
    simulation = simulated(problem, schedule)
    timeline = simulation.timeline
    if not timeline:  # nothing to compute: the inputs are the peak
        return problem, schedule, simulation.peak_bytes, None
    at = max(range(len(timeline)), key=timeline.__getitem__)
    backward = set(problem.backward)
    serving = next(
        (s.node for s in schedule.steps[at:] if type(s) is Compute and s.node in backward), None
    )
    return problem, schedule, simulation.peak_bytes, serving


def _moves(problem: Problem, serving: str):
    """Orders with `serving` moved 1..REACH places earlier, past nodes it does not read
    (nor depend on: in a topological order, a node between the two that it depends on
    would be read by it or by another node between them, nearer to it)."""
    order = list(problem.backward)
    at = order.index(serving)
    reads = set(problem.graph[serving].inputs)
    for back in range(1, REACH + 1):
        if at - back < 0 or order[at - back] in reads:
            return
        yield tuple(order[: at - back] + [serving] + order[at - back : at] + order[at + 1 :])


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline
