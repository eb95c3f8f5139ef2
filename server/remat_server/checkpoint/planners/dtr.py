"""Dynamic Tensor Rematerialization (Kirisame et al., ICLR 2021), replayed at plan time.

DTR is an online policy for an eager runtime: run the program op by op and, whenever
an allocation would exceed the budget, evict the resident tensor with the smallest

    h(t) = cost(t) / (memory(t) * staleness(t))

then rematerialize evicted tensors (recursively, from whatever is still live) when a
later op reads them. Here the terms are:

* cost(t): h_DTR's evicted neighbourhood e*(t): t's own cost plus the costs of the
  evicted values adjacent to it: ancestors recomputing t would need, and descendants
  whose recomputation would now need t as well. As in the paper's h_DTR^eq, evicted
  values form union-find components carrying their summed cost; rematerializing a
  value subtracts its cost from its component without splitting it (the paper's
  approximation: cheap, slightly pessimistic).
* memory(t): the bytes evicting t actually frees: 0 for a view whose buffer another
  live value shares, so those are tried last; a buffer's owner is not evicted while
  views of it are live (recomputing it would allocate a second buffer; see
  `releasable`).
* staleness(t): compute steps since t was last computed or read.

Past `SAMPLE` resident values, an eviction ranks a seeded random sample of them (and
every dead one), as the paper's implementation samples its candidates: ranking all is
O(live) per eviction (7 s of replay on an 11,000-node ReLU MLP; 0.7 s sampled, its
recomputation within 4%).

Because a planner sees the whole graph, we do not need the runtime: we replay DTR in
store-all's order (graph order) with the same byte accounting as the simulator and
write every computation and rematerialization down as a Compute and every eviction or
free as a Free. The executor then runs a static schedule whose peak is what the online
policy would have reached, with no heap bookkeeping at run time.

Evictable: live forward values (they recompute from graph inputs alone, never from
gradients) that are not results, not inputs of a computation under way ("locked",
as DTR locks an op's arguments), and whose buffer eviction can release (not a view of
an input or a result). Values no later step reads are freed when their step ends
(store-all's frees; the paper's banishing, except that they stay recomputable, so no
child has to be pinned); until then, mid-rematerialization, they are the first to go.
"""

from __future__ import annotations

import random
import time
from collections import Counter

from remat_proto.policies import DTR, label

from ...errors import ResourceExhausted
from .. import control
from ..memory import LiveBytes
from ..problem import Problem
from ..recompute import hoisted
from ..schedule import Compute, Free, PlannerReport, Schedule, Step
from ..simulate import InvalidSchedule
from . import bounds, least_memory

CHECK_EVERY = 1024
# Each eviction ranks at most this many resident values (a seeded random sample, as the
# DTR paper's implementation does) plus every dead one: O(live) per eviction made a
# 11,000-node ReLU MLP's replay take 7 s.
SAMPLE = 128  # computations between checks that the request is still alive


class NothingToEvict(ResourceExhausted):
    """DTR's replay cannot go on within its budget. Budget, for which DTR is one
    candidate among many, moves on; policy DTR names the floor instead (a search of
    seconds on small graphs, which Budget made once per backward order it tried)."""


def plan_dtr(problem: Problem, policy: DTR, hoist: bool = False) -> Schedule:
    """DTR's replay under `policy`'s budget; when nothing fits, the error names the
    least memory a schedule needs (`least_memory.over_budget`)."""
    name = label(policy)
    budget = bounds.budget_bytes(problem, policy.bytes, policy.fraction)
    try:
        return dtr_schedule(problem, budget, name, hoist)
    except NothingToEvict as why:
        raise least_memory.over_budget(problem, name, budget, str(why)) from None


def dtr_schedule(problem: Problem, budget: int, name: str, hoist: bool = False) -> Schedule:
    """DTR's replay within `budget` bytes, labelled `name`; with `hoist`, in store-all's
    order with the ReLU masks moved into the forward pass (`recompute.hoisted`), which
    Budget tries besides. Raises NothingToEvict when it cannot fit."""
    start = time.perf_counter()
    if problem.input_bytes > budget:  # the replay only checks when something is computed
        raise NothingToEvict("the graph inputs alone exceed it")
    replay = _Replay(problem, budget, name, hoist)
    replay.run()
    report = PlannerReport(
        budget_bytes=budget,
        status="feasible",
        solve_seconds=time.perf_counter() - start,
        detail=f"{replay.evictions} evictions, {replay.remats} rematerializations",
    )
    schedule = Schedule(tuple(replay.steps), problem.results, name, report=report)
    peak = bounds.simulated(problem, schedule).peak_bytes
    if peak > budget:  # the replay accounts exactly like the simulator: a bug if reached
        raise InvalidSchedule(
            f"policy {name}: planned peak {peak:,} exceeds the budget {budget:,} bytes"
        )
    return schedule


class _Replay:
    def __init__(self, problem: Problem, budget: int, name: str, hoist: bool = False):
        graph, model = problem.graph, problem.model
        self.problem, self.graph, self.model = problem, graph, model
        self.budget, self.name = budget, name
        # Store-all's order: every needed non-input node once, like an eager program.
        self.order = [node.name for node in problem.eager_order]
        if hoist:
            self.order = hoisted(problem, self.order)
        self.uses = Counter(s for n in self.order for s in graph[n].inputs)  # reads to come
        self.live = {n.name for n in graph.inputs}
        self.bytes = LiveBytes(model, self.live)
        self.steps: list[Step] = []
        self.locks: dict[str, int] = {}
        self.clock, self.last = 0, {}  # last access, for staleness
        self.computed: set[str] = set()  # computed at least once: absent now means evicted
        self.dead: set[str] = set()  # live values no later step reads: freed at step end
        # Dead values to try freeing at this step's end: the newly dead, and buffer
        # owners whose view was just dropped (only that can make an owner releasable).
        self.recheck: set[str] = set()
        # Live and evictable: the candidates (a dict: its order, and so a sample of it,
        # does not depend on string hashing).
        self.resident: dict[str, None] = {}
        self.sampler = random.Random(0)
        self.evictions = self.remats = 0
        forward = [n for n in self.order if problem.is_forward(n)]
        self.cost = {n: problem.cost(n) for n in forward}
        fixed = problem.results | {n.name for n in graph.inputs}
        # Evicting a view of an input or a result never releases its buffer.
        self.evictable = {
            n
            for n in forward
            if n not in fixed and model.owner[n] not in fixed and model.nbytes[model.owner[n]] > 0
        }
        is_fwd = self.cost.__contains__
        self.neighbours = {
            n: tuple(
                dict.fromkeys(
                    (*filter(is_fwd, graph[n].inputs), *filter(is_fwd, graph.consumers(n)))
                )
            )
            for n in forward
        }  # ordered, so float sums are reproducible
        self.parent = {n: n for n in forward}  # union-find over evicted forward values
        self.weight = dict.fromkeys(forward, 0.0)  # a root's component cost

    # --- the eager program -------------------------------------------------------------
    def run(self) -> None:
        for target in self.order:
            self.materialize(target)
            for source in self.graph[target].inputs:
                self.uses[source] -= 1
                if self.uses[source] == 0 and self.droppable(source):
                    self.dead.add(source)
                    self.recheck.add(source)
            self.release_dead()

    def release_dead(self) -> None:
        """Free the dead values that can be: latest first, so views go before the buffer
        owner they share with (an owner freed by that is tried again after)."""
        position = self.problem.position.__getitem__
        while self.recheck:
            batch = sorted(self.recheck & self.dead, key=position, reverse=True)
            self.recheck = set()
            for name in batch:
                if name in self.dead and self.releasable(name):
                    self.drop(name)

    def droppable(self, name: str) -> bool:
        return name not in self.problem.results and not self.graph[name].is_input

    def releasable(self, name: str) -> bool:
        """Not a buffer owner that live views still share: dropping it would free no
        bytes, and recomputing it later would allocate a second buffer while NumPy
        still holds the first (the views keep it), which the byte model cannot see.
        Such an owner waits (dead, or a poor candidate) until its views are gone."""
        return self.model.owner[name] != name or self.bytes.count(name) == 1

    def materialize(self, target: str) -> None:
        """Compute `target`, first rematerializing the evicted inputs it needs (and
        theirs), depth first with an explicit stack. Each input is locked from the
        moment it is needed until its consumer has run, as DTR locks arguments."""
        stack = [(target, 0)]
        while stack:
            name, index = stack[-1]
            inputs = self.graph[name].inputs
            if index < len(inputs):
                stack[-1] = (name, index + 1)
                source = inputs[index]
                self.locks[source] = self.locks.get(source, 0) + 1
                if source not in self.live:
                    if not self.problem.is_forward(source):  # a planner bug, not the user's
                        raise InvalidSchedule(f"dtr: '{source}' is needed after it was freed")
                    stack.append((source, 0))
                continue
            stack.pop()
            self.compute(name)
            for source in inputs:
                self.locks[source] -= 1
                self.last[source] = self.clock

    def compute(self, name: str) -> None:
        while self.bytes.total + self.bytes.needs(name) > self.budget:
            victim = self.choose()
            if victim is None:
                raise NothingToEvict(f"DTR found nothing left to evict before '{name}'")
            self.evictions += victim not in self.dead  # dead ones are only freed early
            self.drop(victim)
        if name in self.computed:  # a rematerialization: its component loses its cost
            self.remats += 1
            self.weight[self.find(name)] -= self.cost[name]
        self.computed.add(name)
        self.steps.append(Compute(name))
        self.live.add(name)
        self.bytes.add(name)
        self.clock += 1
        if self.clock % CHECK_EVERY == 0:  # a huge replay stops when its request ends
            control.check(self.name)
        self.last[name] = self.clock
        if name in self.evictable:
            self.resident[name] = None
        if self.uses[name] == 0 and self.droppable(name):
            self.dead.add(name)  # a rematerialized intermediate: only this step needs it
            self.recheck.add(name)

    def drop(self, name: str) -> None:
        self.steps.append(Free(name))
        self.live.discard(name)
        self.bytes.remove(name)
        owner = self.model.owner[name]
        if owner != name and owner in self.dead:  # the owner may be releasable now
            self.recheck.add(owner)
        self.resident.pop(name, None)
        self.dead.discard(name)
        if name in self.cost:  # joins the evicted components around it
            self.weight[self.find(name)] += self.cost[name]
            for other in self.neighbours[name]:
                if other in self.computed and other not in self.live:
                    self.union(name, other)

    # --- the heuristic -----------------------------------------------------------------
    def choose(self) -> str | None:
        """The unlocked candidate with the smallest h; dead values first, and views
        whose eviction frees no bytes only when nothing else is left (then ranked by
        cost / staleness)."""
        best, best_key = None, (2,)
        count, nbytes, owner = self.bytes.count, self.model.nbytes, self.model.owner
        locks, dead, live, computed = self.locks, self.dead, self.live, self.computed
        costs, weight, last, clock = self.cost, self.weight, self.last, self.clock
        candidates = self.resident
        if len(candidates) > SAMPLE:  # the dead always, a seeded sample of the rest
            pool = list(candidates)
            candidates = [t for t in pool if t in dead] + self.sampler.sample(pool, SAMPLE)
        for t in candidates:  # O(sample) per eviction: the hot loop, kept flat
            buffer = owner[t]
            shared = count(t)
            if locks.get(t) or (buffer == t and shared > 1):  # see releasable
                continue
            freed = nbytes[buffer] if shared == 1 else 0
            if t in dead:
                key = (0, freed == 0, -freed, t)
            else:
                cost, roots = costs[t], ()
                for other in self.neighbours[t]:
                    if other not in live and other in computed:
                        root = self.find(other)
                        if root not in roots:  # each component counts once
                            roots += (root,)
                            cost += weight[root]
                key = (1, freed == 0, cost / (max(freed, 1) * (clock - last[t] + 1)), t)
            if key < best_key:
                best, best_key = t, key
        return best

    def find(self, x: str) -> str:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.weight[ra] += self.weight[rb]
