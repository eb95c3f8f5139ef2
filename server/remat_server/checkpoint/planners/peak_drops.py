"""Peak drops: a keep set grown into one that fits by dropping, one at a time, the
value that takes most off the peak per FLOP it adds, judged by simulation.

Budget's keep-set search ranks the values the backward pass reads once, by price per
byte, and bisects for the shortest dropped prefix that fits. A price per byte ignores
when a value is live: dropping one that is not live at the peak lowers nothing. So
from a few values short of that prefix (a near miss), this drops values live at the
current peak instead: the few cheapest per byte are each simulated, and the one that
adds least recomputation per byte it takes off the peak is dropped, until the schedule
fits. From each bisection's near miss it took the sample U-Net at 50% of store_all's
peak from 41.0 to 37.1 MFLOP and a two-block transformer stack at 50-60% 8-12% lower;
on the zoo (357-682 joint nodes) it won no row for twice the plan time, so Budget runs
it on small graphs only (`budget.DROPS_MAX_NODES`).

    >>> # schedule, kept = fitted_by_drops(problem, kept, "hold", False, limit) or (None, None)
"""

from __future__ import annotations

import math

from .. import control
from ..problem import Problem
from ..recompute import schedule_with_checkpoints
from ..schedule import Schedule
from .bounds import evaluations_cost, simulated
from .tighten import live_across_peak

# The values live at the peak simulated per drop (cheapest per byte first), and the
# most drops made before giving up.
TRIALS = 4
MAX_DROPS = 16


def fitted_by_drops(
    problem: Problem, kept: frozenset[str], mode: str, hoist: bool, limit: int, name: str = ""
) -> tuple[Schedule, frozenset[str]] | None:
    """`kept` less the values dropped at each peak until its schedule fits `limit`
    (`schedule_with_checkpoints` in `mode`, `hoist` as there): that schedule and keep
    set, or None when nothing at the peak is left to drop or MAX_DROPS do not make it
    fit. `name`: the policy polled for a stop between drops."""
    model, graph = problem.model, problem.graph

    def made(keep: frozenset[str]):
        schedule = schedule_with_checkpoints(problem, keep, "", mode=mode, hoist=hoist)
        sim = simulated(problem, schedule)
        return schedule, sim, evaluations_cost(problem, sim.evaluations)

    schedule, sim, cost = made(kept)
    for _ in range(MAX_DROPS):
        if sim.peak_bytes <= limit:
            return schedule, kept
        control.check(name)
        owning = (n for n in kept if model.owner[n] == n and model.nbytes[n])  # not views
        _, _, live = live_across_peak(graph, list(schedule.steps), sim.timeline, owning)
        live.sort(key=lambda n: (problem.cost(n) / model.nbytes[n], problem.position[n]))
        best = None
        for value in live[:TRIALS]:
            trial = made(kept - {value})
            lowered = sim.peak_bytes - trial[1].peak_bytes
            per_byte = (trial[2] - cost) / lowered if lowered > 0 else math.inf
            if best is None or per_byte < best[0]:
                best = (per_byte, value, trial)
        if best is None:
            return None
        # None lowering the peak (another one as high): the cheapest per byte goes, and
        # the next drop looks at that other peak.
        _, value, (schedule, sim, cost) = best
        kept = kept - {value}
    return (schedule, kept) if sim.peak_bytes <= limit else None
