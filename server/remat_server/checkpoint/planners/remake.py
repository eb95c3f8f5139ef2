"""Remake: bring a schedule under a budget by freeing values across its peak and
computing them again just before their next reader.

A greedy repair, for graphs of up to a few hundred nodes. At the schedule's peak, each
value that is live but not read there is a candidate: free it after its last reader
before the peak and compute it again right before its first reader after it (a value
not read since it was made is only made later, for nothing). Inputs of it that are no
longer live there are kept until then, so a move can trade a value for its source.
Where that fails to lower the peak, the same value is tried other ways (`WAYS`): with
the other values made from those inputs freed too and made again with it; with the
inputs made again too where what they read is live then; with every input made again,
from their own inputs kept until then.
After a move that keeps an input longer, values made from that input long before
anything reads them are made at their first reader instead (a ReLU mask of a
pre-activation that is now kept). Candidates are tried cheapest per byte first and
simulated; of the first few that lower the peak, the one that costs least per byte it
takes off is made, until the schedule fits or no move lowers the peak.

On residual blocks this finds what keep sets cannot express: keep a convolution's
output, free the ReLU of it, and remake the ReLU for the weight gradient that reads
it, with the ReLU's mask made then too instead of kept. On a three-level U-Net at 90%
of store_all's peak, remaking a ReLU with the max-pool output it reads (both cheap)
recomputes 1,024 FLOPs where DTR's 14,592 were the best before. On three residual
blocks at 80%, freeing the gradient entering the last block (made again from the loss's
seed) and each ReLU with its mask (made again from the kept pre-activation) recomputes
384 FLOPs, where the keep sets' best was 2,368 and the MILP's 640.

`lowest` makes the moves that take off most instead, for the floor a refusal names.

    >>> # fitted = repaired(problem, plan_store_all(problem), limit)  # None: no fit
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from ...errors import ResourceExhausted
from ..problem import Problem
from ..recompute import hoistable, schedule_with_checkpoints
from ..schedule import Compute, Free, Schedule, Step
from ..simulate import InvalidSchedule, OverLimit, Simulation
from .bounds import evaluations_cost, simulated
from .remake_edits import Edit, MoveEdits
from .store_all import plan_store_all
from .tighten import Events, edited, events_of, live_across_peak, spared

# Joint graphs up to this many nodes get a repair of store_all, up to the second also
# one of every value kept. Each move simulates a few schedules: on the zoo's 357-682-node
# graphs the store_all repair took Budget's plan from 0.05-0.55 s to 0.15-1.3 s, and it
# wins on the U-Net at 50% of store_all (66.7 -> 23.1 MFLOP recomputed).
MAX_NODES = 1000
BOTH_STARTS_MAX_NODES = 300
# A repair makes at most this many moves per graph node (each move simulates the
# candidates live at the peak until TRIALS of them lower it).
MOVES_PER_NODE = 2
# Of the moves that lower the peak, the best of the first few (tried cheapest per byte
# first) is made: trying every value live at the peak took Budget on the zoo's 385-node
# U-Net at 50% from 0.2 to 6.2 s; with the first four, 2.2 s for the same schedule.
TRIALS = 4
# The ways a move makes a freed value again, tried in this order for each candidate
# until one lowers the peak (see `_Repair.remade`).
WAYS = ("keep", "siblings", "free", "all")


@dataclass
class _Trial:
    """A candidate move's step list, and whether it failed to lower the peak (the
    descent says so before the candidate's next way to move is made)."""

    steps: list[Step]
    failed: bool = False


class _Repair(MoveEdits):
    def __init__(self, problem: Problem, schedule: Schedule, limit: int, ceiling: float):
        self.problem, self.schedule, self.limit = problem, schedule, limit
        self.ceiling = ceiling  # a repair that recomputes this much has lost: it stops
        graph, model = problem.graph, problem.model
        self.inputs = {node.name for node in graph.inputs}
        # Values sharing a buffer with views stay as they are: freeing one would not free
        # the buffer while a view holds it, and keeping one longer keeps the views' too.
        viewed = {model.owner[view] for view in model.source}
        # Values a move may free, remake or make later: any node's that owns its buffer
        # (a ReLU mask computed in the forward pass too).
        self.movable = {
            name
            for name in problem.needed
            if name not in problem.results
            and model.owner[name] == name
            and name not in viewed
            and not graph[name].is_input
        }

    def simulated(self, steps: list[Step], peak_limit: int | None = None) -> Simulation:
        return simulated(self.problem, replace(self.schedule, steps=tuple(steps)), peak_limit)

    def events(self, steps: list[Step]) -> dict[str, Events]:
        return events_of(self.problem.graph, steps)

    def run(self) -> Schedule | None:
        steps = list(self.schedule.steps)
        if self.simulated(steps).peak_bytes <= self.limit:
            return self.schedule
        for steps, sim, cost in self.descent(cheapest=True):
            if sim.peak_bytes <= self.limit:
                return replace(
                    self.schedule,
                    steps=tuple(spared(self.problem, self.schedule, steps, self.limit)),
                )
            if cost >= self.ceiling:
                return None
        return None

    def lowest(self) -> tuple[Schedule, int]:
        """The lowest-peak schedule the moves reach (each move the one that lowers the
        peak most, of the first few), and its peak."""
        best = None
        for steps, sim, _ in self.descent(cheapest=False):
            if best is None or sim.peak_bytes < best[1]:
                best = (steps, sim.peak_bytes)
        return replace(self.schedule, steps=tuple(best[0])), best[1]

    def descent(self, cheapest: bool):
        """(steps, simulation, recompute cost) after each move, from the schedule with
        its values made late: each move lowers the peak; with `cheapest` the one that
        costs least per byte it takes off, else the one that takes off most. Ends when
        no move lowers the peak."""
        steps = self.deferred(list(self.schedule.steps))
        sim = self.simulated(steps)
        cost = evaluations_cost(self.problem, sim.evaluations)
        yield steps, sim, cost
        for _ in range(MOVES_PER_NODE * len(self.problem.graph)):
            best, lowered = None, 0
            for trial in self.moves(steps, sim):
                moved = trial.steps
                try:  # a move that does not lower the peak is of no use
                    after = self.simulated(moved, sim.peak_bytes - 1)
                except (OverLimit, InvalidSchedule):  # (or that breaks the schedule:
                    # on a start computing a value more than once, moving one of its
                    # computations can leave a reader without it)
                    trial.failed = True  # the value's next way to move is tried
                    continue
                lowered += 1
                extra = evaluations_cost(self.problem, after.evaluations) - cost
                per_byte = extra / (sim.peak_bytes - after.peak_bytes)
                key = (per_byte, after.peak_bytes) if cheapest else (after.peak_bytes, per_byte)
                if best is None or key < best[0]:
                    best = (key, moved, after, extra)
                if lowered == TRIALS:
                    break
            if best is None:
                return
            _, steps, sim, extra = best
            cost += extra
            yield steps, sim, cost

    def moves(self, steps: list[Step], sim: Simulation):
        """Each candidate's step list after its move (and the deferrals it allows), as
        a `_Trial`: with the inputs it needs kept, then, where that fails to lower the
        peak, with those inputs made again too."""
        timeline = sim.timeline
        if not timeline:  # nothing to compute (an output that is an input)
            return
        peak, events, live = live_across_peak(self.problem.graph, steps, timeline, self.movable)
        for name in sorted(live, key=self.price):
            for way in WAYS:
                moved = self.remade(steps, events, name, peak, way)
                if moved is None:
                    continue
                moved, extended = moved
                # Only a longer-lived input lets more values be made later.
                trial = _Trial(self.deferred(moved) if extended else moved)
                yield trial
                if not trial.failed:
                    break  # the next way only where this one fails

    def price(self, name: str) -> tuple:
        """What remaking `name` likely costs per byte it frees (the order moves are
        tried in; each is then judged by simulation)."""
        problem = self.problem
        nbytes = problem.model.nbytes[name] or 1
        return (problem.cost(name) / nbytes, problem.position[name])

    def remade(
        self, steps: list[Step], events: dict[str, Events], name: str, peak: int, way: str
    ) -> tuple[list[Step], bool] | None:
        """`name` freed across `peak` and made again before its next reader (moved there
        when nothing read it since it was made), and whether any input was kept longer.
        Its inputs no longer live there are, by `way`:
        - "keep": kept live until then, and as long as values made from them need (a
          ReLU's mask made from a kept pre-activation at its reader, not kept);
        - "siblings": kept live until then only, and the values made from them that are
          live across the peak are freed too and made again with `name` (a ReLU and its
          mask, both from the kept pre-activation);
        - "free": made again too where what they read is live then (a gradient made
          again from the loss's seed and an input), the others kept;
        - "all": made again too where they can be, from their own inputs kept.
        None when the way does not apply (or would repeat an earlier way's move)."""
        found = events[name]
        made = found.last_computed_before(peak)
        next_read = found.first_read_after(peak)
        if made is None or next_read is None:
            return None
        if any(peak < i < next_read for i in (*found.computed, *found.freed)):
            return None  # freed unread and made again before that reader: left alone
        edit = Edit()
        self.freed_across(found, made, peak, name, edit)
        graph, model = self.problem.graph, self.problem.model

        def gone(source: str) -> bool:
            return source not in self.inputs and not events[source].live_at(next_read)

        def free(source: str) -> bool:  # what it reads is live then, or weighs nothing
            return not any(gone(i) and model.nbytes[model.owner[i]] for i in graph[source].inputs)

        sources = [s for s in dict.fromkeys(graph[name].inputs) if gone(s)]
        again = []  # made again before `name`
        if way in ("free", "all"):
            again = [s for s in sources if s in self.movable and events[s].computed]
            freely = [s for s in again if free(s)]
            if way == "free":
                again = freely
            if not again or (way == "all" and again == freely):
                return None  # the same move as an earlier way's
            again.sort(key=self.problem.position.__getitem__)  # in graph order
            inner = (s for source in again for s in graph[source].inputs)
            sources = [s for s in dict.fromkeys((*sources, *inner)) if gone(s) and s not in again]
        along = []  # made again with `name` (siblings)
        for source in sources:
            if way == "siblings":
                if not self.held(events, source, next_read, next_read, edit):
                    return None
                along += self.siblings(steps, events, source, name, peak, next_read, edit)
            elif not self.kept_longer(steps, events, source, name, next_read, edit):
                return None
        if way == "siblings" and not along:
            return None  # the same move as "keep"
        edit.before[next_read] = [
            *(Compute(s) for s in again),
            Compute(name),
            *(Compute(s) for s in dict.fromkeys(along)),
            *(Free(s) for s in again),  # once the reader has run
        ]
        return edited(steps, edit.drop, edit.before, edit.after), bool(sources)

    def deferred(self, steps: list[Step]) -> list[Step]:
        """Steps with each movable value made no earlier than its first reader needs it,
        where its inputs are live there anyway (fewer bytes in between, same FLOPs)."""
        events = self.events(steps)
        drop: set[int] = set()
        before: dict[int, list[Step]] = {}
        for name in self.movable:
            found = events.get(name)
            if found is None:
                continue
            for made in found.computed:
                reader = found.first_read_after(made)
                if reader is None or reader == made + 1:
                    continue
                freed = bisect.bisect_right(found.freed, made)
                if freed < len(found.freed) and found.freed[freed] < reader:
                    continue  # freed unread (a planner's choice): left alone
                inputs = self.problem.graph[name].inputs
                if all(s in self.inputs or events[s].live_at(reader) for s in inputs):
                    drop.add(made)
                    before.setdefault(reader, []).append(Compute(name))
        if not drop:
            return steps
        order = self.problem.position.__getitem__
        for waiting in before.values():  # several before one reader: in graph order
            waiting.sort(key=lambda step: order(step.node))
        return edited(steps, drop, before, {})


def repaired(
    problem: Problem, schedule: Schedule, limit: int, ceiling: float = math.inf
) -> Schedule | None:
    """`schedule` with values remade until its peak is <= `limit` (None when no move
    lowers the peak any more, or once it recomputes `ceiling` or more). The label
    stays the caller's to set."""
    return _Repair(problem, schedule, limit, ceiling).run()


def starts(problem: Problem) -> dict[str, Callable[[], Schedule]]:
    """The schedules Budget repairs, by label: store_all, and on small graphs every
    value the backward pass reads kept (masks moved into the forward pass where they
    can); none on large graphs."""
    graph = problem.graph
    if len(graph) > MAX_NODES:
        return {}
    found = {"store_all": lambda: plan_store_all(problem)}
    if len(graph) <= BOTH_STARTS_MAX_NODES:
        read = frozenset(
            s for b in problem.backward for s in graph[b].inputs if problem.is_forward(s)
        )
        found["all kept"] = lambda: schedule_with_checkpoints(
            problem, read, "", mode="hold", hoist=bool(hoistable(problem))
        )
    return found


def fitted(problem: Problem, schedule: Schedule, limit: int, ceiling: float) -> Schedule:
    """`repaired`, or ResourceExhausted (a budgeted candidate that cannot meet the
    limit, or win)."""
    found = repaired(problem, schedule, limit, ceiling)
    if found is None:
        raise ResourceExhausted("no remade schedule fits")
    return found


def lowest(problem: Problem, schedule: Schedule) -> tuple[Schedule, int]:
    """The lowest-peak schedule the repair's moves reach from `schedule`, and its peak
    (`least_memory`'s floor tries it)."""
    return _Repair(problem, schedule, -1, math.inf).lowest()
