"""Tighten a schedule that fits: undo the recomputations it has room to spare.

A planner's schedule often recomputes values it could have kept: a keep set drops every
value outside it, DTR evicts by a heuristic, a repair's early moves are made before the
later ones that took off more. Where the budget leaves room, keeping such a value live
until its next use instead of freeing and computing it again costs no FLOPs.
`tightened` tries that for each recomputation, dearest first, each simulated against
the limit, then drops the computations whose values nothing reads any more (the inputs
only a spared recomputation needed). Budget tightens the schedule it chose; on the
zoo's BERT block at 30% of store_all's peak that took its recomputation from 2,173 to
775 MFLOP.

Keeping a value longer only adds memory, so an undo that does not fit never fits later
in the pass: one pass, one simulation per recomputation, at most `MAX_TRIALS` (on that
BERT block 758 trials took 4.2 s, and the first 256 had taken 99% of the gain), and
fewer on long schedules, so that the steps simulated stay under `MAX_SIMULATED_STEPS`;
and only on joint graphs of up to `MAX_NODES` (the zoo's are 357-682): on a 10,036-node
MLP, whose schedules run to 30,000 steps and more, 256 trials took Budget from 1.5 to
4.5 s and 33 trials to 2.0-2.8 s, gaining nothing.

The step-list bookkeeping the repair search (`remake`) shares lives here too: where
each value is computed, read and freed (`events_of`), and a step list edited by index
(`edited`).

    >>> # schedule = tightened(problem, schedule, limit)  # fits, recomputes no more
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

from ...graph.ir import Graph
from ..problem import Problem
from ..schedule import Compute, Free, Schedule, Step
from ..simulate import OverLimit
from .bounds import simulated

# Recomputations tried per schedule, dearest first (each one simulation), and the
# steps those simulations may take in all.
MAX_TRIALS = 256
MAX_SIMULATED_STEPS = 1_000_000
MAX_NODES = 2_000  # larger joint graphs are not tightened


@dataclass
class Events:
    """Where one value is computed, read and freed in a step list (ascending indices)."""

    computed: list[int]
    read: list[int]
    freed: list[int]

    def live_at(self, index: int) -> bool:
        """Whether the value is live just before step `index`."""
        made = bisect.bisect_left(self.computed, index) - 1
        if made < 0:
            return False
        after = bisect.bisect_right(self.freed, self.computed[made])
        return after >= len(self.freed) or self.freed[after] >= index

    def last_computed_before(self, index: int) -> int | None:
        made = bisect.bisect_left(self.computed, index) - 1
        return self.computed[made] if made >= 0 else None

    def first_read_after(self, index: int) -> int | None:
        later = bisect.bisect_right(self.read, index)
        return self.read[later] if later < len(self.read) else None


def events_of(graph: Graph, steps: list[Step]) -> dict[str, Events]:
    """Each value's computations, reads and frees in `steps`."""
    events: dict[str, Events] = {}
    for index, step in enumerate(steps):
        name = step.node
        if name not in events:
            events[name] = Events([], [], [])
        if type(step) is Compute:
            events[name].computed.append(index)
            for source in dict.fromkeys(graph[name].inputs):
                if source not in events:
                    events[source] = Events([], [], [])
                events[source].read.append(index)
        else:
            events[name].freed.append(index)
    return events


def live_across_peak(
    graph: Graph, steps: list[Step], timeline, candidates
) -> tuple[int, dict[str, Events], list[str]]:
    """The step where `timeline` (a simulation of `steps`) peaks, the events of `steps`,
    and the `candidates` live there that the step neither reads nor computes: what
    freeing across the peak can take off it."""
    peak = max(range(len(timeline)), key=timeline.__getitem__)
    events, at_peak = events_of(graph, steps), steps[peak]
    reading = set(graph[at_peak.node].inputs) if type(at_peak) is Compute else set()
    live = [
        name
        for name in candidates
        if name in events
        and name not in reading
        and name != at_peak.node
        and events[name].live_at(peak)
    ]
    return peak, events, live


def edited(
    steps: list[Step],
    drop: set[int],
    before: dict[int, list[Step]],
    after: dict[int, list[Step]],
) -> list[Step]:
    """`steps` without the indices in `drop`, with `before[i]` inserted before step i
    and `after[i]` after it (in that order: frees after, computes before)."""
    result: list[Step] = []
    append = result.append
    changed = drop | before.keys() | after.keys()
    for index, step in enumerate(steps):
        if index not in changed:
            append(step)
            continue
        inserted = before.get(index, ())
        result.extend(s for s in inserted if type(s) is Compute)
        if index not in drop:
            append(step)
        result.extend(s for s in inserted if type(s) is Free)  # once its reader has run
        result.extend(after.get(index, ()))
    return result


def tightened(problem: Problem, schedule: Schedule, limit: int, share: int = 1) -> Schedule:
    """`schedule` (whose peak is <= `limit`) with the recomputations it has room to
    spare undone and the computations nothing reads dropped: it still fits, computes
    the same values and recomputes no more (`schedule` itself when nothing changes, as
    past MAX_NODES nodes). With
    `share`, a `1/share` part of the work limits (for one of several schedules)."""
    if len(problem.graph) > MAX_NODES:
        return schedule
    steps = tuple(
        unread_dropped(problem, spared(problem, schedule, list(schedule.steps), limit, share))
    )
    return schedule if steps == schedule.steps else replace(schedule, steps=steps)


def spared(
    problem: Problem, schedule: Schedule, steps: list[Step], limit: int, share: int = 1
) -> list[Step]:
    """`steps` (of `schedule`) with each recomputation that fits undone (the value kept
    live from its previous computation instead), dearest first."""
    events = events_of(problem.graph, steps)
    again = [name for name, found in events.items() if len(found.computed) > 1]
    most = min(MAX_TRIALS, MAX_SIMULATED_STEPS // max(len(steps), 1)) // share
    trials = 0
    for name in sorted(again, key=lambda n: (-problem.cost(n), problem.position[n])):
        index = 1
        while index < len(events[name].computed):
            trials += 1
            if trials > most:
                return steps
            found = events[name]
            earlier, made = found.computed[index - 1], found.computed[index]
            freed = [f for f in found.freed if earlier < f < made]
            kept = edited(steps, {*freed, made}, {}, {})
            try:
                simulated(problem, replace(schedule, steps=tuple(kept)), limit)
            except OverLimit:
                index += 1
                continue
            steps = kept
            events = events_of(problem.graph, steps)
    return steps


def unread_dropped(problem: Problem, steps: list[Step]) -> list[Step]:
    """`steps` without each computation whose value is freed before anything reads it
    (and without that free), until there is none."""
    graph, results = problem.graph, problem.results
    while True:
        unread: dict[str, int] = {}  # value -> index of its computation, while unread
        drop: set[int] = set()
        for index, step in enumerate(steps):
            if type(step) is Compute:
                for source in graph[step.node].inputs:
                    unread.pop(source, None)
                unread[step.node] = index
            else:
                made = unread.pop(step.node, None)
                if made is not None and step.node not in results:
                    drop.update((made, index))
        if not drop:
            return steps
        steps = [step for index, step in enumerate(steps) if index not in drop]
