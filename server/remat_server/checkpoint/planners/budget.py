"""Budget: the least recomputation whose peak fits a byte budget, on any graph.

Users think in bytes ("fit this under 2 GiB"), so the planner searches, and the
simulator (exact, views and gradients included) judges. Candidates, cheapest that fits
wins (recompute cost priced by `problem.cost`: FLOPs, or profiled seconds):

1. store_all: when it fits, nothing is recomputed.
2. The chain dynamic program (`chain_dp`, Rotor): optimal multi-level checkpointing
   of the chain of segments with heterogeneous costs, at the highest memory level
   whose schedule fits.
3. Keep-set search on the whole DAG, for graphs whose chain has few segments (skip
   connections, U-Nets): rank the values the backward pass reads by recompute cost per
   byte, drop the cheapest ones first, and bisect for the shortest dropped prefix
   that fits, holding recomputed values (Chen) or dropping them (least memory); on
   small graphs also with the kept copies that cost nothing to make (a concatenation)
   kept as their inputs and made again (`keep_sets.swap_copies`).
4. The fixed heuristics the user could have picked (every_k over a ladder of k, sqrt,
   save_ops of the expensive ops present, revolve with the most slots that fit, DTR)
   and recompute_all, so Budget never loses to one of them at the same budget.
   Then store_all (and on small graphs every value kept) repaired by freeing values
   across its peak and making them again for their next reader (`remake`): on
   residual blocks, a ReLU made again from its kept pre-activation.
5. On small joint graphs (<= EXACT_MAX_NODES), the exact MILP's best schedule within
   EXACT_SECONDS (`milp_classes`: the results computed with the forward pass, and,
   with the time the first class leaves, last).
6. On small joint graphs (<= LOWERED_ORDER_MAX_NODES), unless a schedule recomputing
   nothing fits, candidates 1-4 again with the backward pass in the order that lowers
   recompute_all's peak (`peak_order`), the order the floor's search finds: on U-Nets
   the skip connections hold less there.
7. When nothing else fits, the lowest-peak schedule known (`least_memory.floor`, which
   a refusal would name anyway), and, where the floor's search found a backward order
   that lowers recompute_all's peak, candidates 1-4 in that order if 6 did not search
   it (the zoo's U-Net at 30% of store_all's peak: 790 MFLOP recomputed, against the
   floor's own 3,153).

Where store_all peaks lower with the backward pass in its memory-aware order
(`backward_order`), candidates 1-4 are searched again in that order (on graphs of up to
BOTH_ORDERS_MAX_CANDIDATES candidates, or when nothing fitted), and the cheaper wins.
The winner and the last few it beat are then tightened (`tighten`): the recomputations
the budget leaves room to spare are undone, and the cheapest wins (its label then ends
with ", tightened").

Once store_all does not fit, the search holds one of the server's solve slots
(`control.expensive`) and stops between candidates when its request has ended.

    >>> from remat_proto.policies import Budget
    >>> Budget(fraction=0.5)
    Budget(bytes=0, fraction=0.5, profile=False)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

from remat_proto.policies import Budget, EveryK, Revolve, SaveOps, label

from ...errors import Cancelled, DeadlineExceeded, RematError, ResourceExhausted
from ...ops import registry
from .. import control
from ..backward_order import SUFFIX, reordered
from ..problem import Problem
from ..recompute import hoistable, schedule_with_checkpoints
from ..schedule import PlannerReport, Schedule
from ..simulate import OverLimit
from . import chain_dp, milp, milp_classes, peak_drops, peak_order, remake
from .bounds import budget_bytes, evaluations_cost, simulated, store_all_peak
from .deferred_results import deferred
from .dtr import dtr_schedule
from .heuristics import (
    every_k_kept,
    plan_every_k,
    plan_recompute_all,
    plan_save_ops,
    plan_sqrt,
    save_ops_kept,
    sqrt_k,
)
from .keep_sets import hold_floor, regrowth, swap_copies
from .least_memory import floor, over_budget, peak_lower_bound
from .revolve import plan_revolve
from .store_all import plan_store_all
from .tighten import MAX_NODES as TIGHTENED_MAX_NODES
from .tighten import tightened

# Each a save_ops candidate (save_ops(matmul) keeps the linear layers too).
EXPENSIVE_OPS = ("matmul", "linear", "conv2d", "conv_transpose2d", "scaled_dot_product_attention")
# Small joint graphs also get the exact MILP (policy Optimal) for a moment: there it
# often finds schedules the structured searches miss (e.g. dropping an activation as
# soon as its backward has read it), and its best incumbent is just one more candidate.
EXACT_MAX_NODES = 80
# Revolve's schedules grow with the square of the chain's length: on chains up to this
# many segments they are always candidates, on longer ones only when nothing else fits.
REVOLVE_ALWAYS_MAX = 64
REVOLVE_MAX_SLOTS = 16  # beyond, snapshots cost about what keeping activations does
EXACT_SECONDS = 2.0
# Up to this many checkpoint candidates (about one per layer), where ReLU masks can move
# into the forward pass, Budget searches keep sets and replays DTR both ways. Past it,
# the keep sets only with the masks moved (in hold mode a mask replaces its
# pre-activation among the kept values: a quarter of the bytes, the same FLOPs), and
# the moved replay only when nothing else fits: each way costs a second search.
BOTH_ORDERS_MAX_CANDIDATES = 256
# Besides the best, this many of the schedules it beat are tightened too, each with
# half of `tighten`'s work limits.
TIGHTENED_RUNNERS_UP = 3
# How a label says its schedule ran in the backward order the floor's search found.
PEAK_SUFFIX = " in the floor's order"
# `drops` starts this many values short of each bisection's near miss, on joint graphs
# of up to DROPS_MAX_NODES nodes: on the zoo's (357-682 nodes) it won no row and took
# Budget's plan from 0.3-3.6 s to 0.8-6.1 s.
DROPS_BACK = 3
DROPS_MAX_NODES = 300
# Up to this many joint nodes, candidates 1-4 are searched again in the backward order
# the floor's search finds, even when something fits already: U-Nets' skip connections
# hold less there (the sample U-Net at 50% of store_all's peak: 15.9 MFLOP recomputed,
# against 37.1 in the other orders; a 2-level one at 80%: nothing, against 45,056
# FLOPs). On the zoo's graphs (357-682 nodes) it changed no row at 70, 50 or 30% and
# took 0.1-6 s.
LOWERED_ORDER_MAX_NODES = 300


def plan_budget(problem: Problem, policy: Budget) -> Schedule:
    name = label(policy)
    limit = budget_bytes(problem, policy.bytes, policy.fraction)
    return search(problem, limit, name)


def search(problem: Problem, limit: int, name: str, why: str = "") -> Schedule:
    """The cheapest schedule found whose peak is <= `limit`, labelled `name`."""
    start = time.perf_counter()
    found = _Candidates(problem, limit, name)
    # One cheap simulation that settles most requests: it polls nothing, takes no slot.
    every = plan_store_all(problem)
    if not found.consider("store_all", lambda: every, check=False):
        moved = deferred(problem, every, store_all_peak(problem))  # unread results last
        if moved is not None:
            found.consider("store_all, results last", lambda: moved, check=False)
    if found.best is None and limit < peak_lower_bound(problem):  # no search can succeed
        raise over_budget(problem, name, limit, why)
    if found.best is None:
        with control.expensive(name):
            found.structured()
            found = found.reordered() or found
            found.exact()
            lowered = None
            small = len(problem.graph) <= LOWERED_ORDER_MAX_NODES
            if small and (found.best is None or found.best[3] > 0):
                lowered = peak_order.lowered_order(problem)
                if lowered is not None:
                    found = found.in_order(lowered, PEAK_SUFFIX)
            if found.best is None:  # the lowest-peak schedule known, if it fits
                least = floor(problem, name)
                searched = lowered is not None and least.order == lowered.backward
                if least.order is not None and not searched:  # its order, found for it
                    found = found.in_order(problem.with_backward(least.order), PEAK_SUFFIX)
                found.consider(least.by, lambda: least.schedule)
    if found.best is None:
        raise over_budget(problem, name, limit, why)
    chosen, schedule, peak, cost = found.tightened()
    unit = "seconds" if problem.costs is not None else "FLOPs"
    report = PlannerReport(
        budget_bytes=limit,
        status="store_all_fits" if chosen == "store_all" else "feasible",
        solve_seconds=time.perf_counter() - start,
        chosen=chosen,
        detail=f"{found.tried} candidate schedules simulated"
        + (f" ({found.skipped} ruled out unbuilt)" if found.skipped else "")
        + f"; {chosen} fits with peak "
        f"{peak:,} bytes, recomputing {cost:.4g} {unit}",
    )
    return replace(schedule, policy=name, report=report)


class _Candidates:
    """Simulates candidate schedules and keeps the cheapest that fits."""

    def __init__(self, problem: Problem, limit: int, name: str, suffix: str = ""):
        self.problem, self.limit, self.name = problem, limit, name
        self.suffix = suffix  # the candidates' labels end with it
        self.best: tuple[str, Schedule, int, float] | None = None
        self.tried = 0
        self.beaten: list[tuple[str, Schedule, int, float]] = []  # earlier bests, cheapest last
        self.skipped = 0  # candidates a lower bound on their cost ruled out unbuilt
        self.last_cost = 0.0  # what the last candidate that fitted recomputes
        # The bisections' longest dropped prefixes that were over the limit: (read,
        # ranking, prefix, mode, hoist), for `drops` to start from.
        self.near_misses: list[tuple] = []
        self.dropped: list[tuple[str, Schedule, int, float]] = []  # `drops`'s, to tighten

    def consider(
        self, name: str, make: Callable[[], Schedule], check: bool = True, steers: bool = False
    ) -> bool:
        """Simulate one candidate, unless the request has ended; True when it fits.
        A candidate whose answer `steers` a search is simulated until its peak is known;
        any other stops once it recomputes more FLOPs than the best so far (it cannot
        win; its False then means only that)."""
        if check:
            control.check(self.name)
        try:
            schedule = make()
        except ResourceExhausted:  # a budgeted candidate that cannot meet the limit
            return False
        self.tried += 1
        beaten = None
        if not steers and self.best is not None and self.problem.costs is None:
            beaten = self.best[3]
        try:  # a candidate over the limit is dropped at the step that shows it
            sim = simulated(self.problem, schedule, self.limit, beaten)
        except OverLimit:
            return False
        cost = self.last_cost = evaluations_cost(self.problem, sim.evaluations)
        if self.best is None or (cost, sim.peak_bytes) < (self.best[3], self.best[2]):
            if self.best is not None:
                self.beaten.append(self.best)
            self.best = (name + self.suffix, schedule, sim.peak_bytes, cost)
        return True

    def tightened(self) -> tuple[str, Schedule, int, float]:
        """The best, or the cheapest of it and the last few it beat once each is
        tightened (`tighten`): the room a schedule leaves under the limit differs, and
        a keep set that lost to DTR can beat it tightened (the zoo's GPT-2 at 30%)."""
        best = self.best
        if best[3] == 0:
            return best
        problem, limit = self.problem, self.limit
        tries = [(best, 1), *((b, 2) for b in self.beaten[::-1][:TIGHTENED_RUNNERS_UP])]
        tries += [(d, 2) for d in self.dropped if all(d[1] is not b[1] for b, _ in tries)]
        # The best with its results computed last has room the others lack (`deferred`),
        # for tightening (which leaves larger graphs as they are).
        small = len(problem.graph) <= TIGHTENED_MAX_NODES
        moved = deferred(problem, best[1], best[2]) if small else None
        if moved is not None:
            tries.insert(1, ((f"{best[0]}, results last", moved, best[2], best[3]), 1))
        for (name, schedule, _, cost), share in tries:
            control.check(self.name)
            tight = tightened(problem, schedule, limit, share)
            if tight is schedule:  # nothing to undo: its figures are known
                continue
            sim = simulated(problem, tight)
            spared = evaluations_cost(problem, sim.evaluations)
            if spared < cost and (spared, sim.peak_bytes) < (best[3], best[2]):
                best = (f"{name}, tightened", tight, sim.peak_bytes, spared)
        return best

    def structured(self) -> None:
        """Every candidate but the MILP's and the floor's."""
        self.chain()
        self.keep_sets()
        self.drops()
        self.heuristics()
        self.remakes()

    def remakes(self) -> None:
        """Schedules repaired by remaking values across their peak (`remake`)."""
        for start, make in remake.starts(self.problem).items():
            ceiling = self.best[3] if self.best is not None else math.inf  # to beat
            self.consider(
                f"remade({start})",
                lambda make=make, ceiling=ceiling: remake.fitted(
                    self.problem, make(), self.limit, ceiling
                ),
            )

    def reordered(self) -> _Candidates | None:
        """The search again with the backward pass in its memory-aware order
        (`backward_order`), when store_all peaks lower in that order, and the graph is
        small or nothing fitted so far: candidates that continue this search's best
        (None: not run)."""
        problem = self.problem
        if self.best is not None and len(problem.candidates) > BOTH_ORDERS_MAX_CANDIDATES:
            return None
        other_order = reordered(problem)
        # Where the order holds no less even keeping everything (the zoo's transformers:
        # 1-6% more), its searches did not win on any sample or zoo graph: skipped.
        if other_order is None or store_all_peak(other_order) >= store_all_peak(problem):
            return None
        return self.in_order(other_order, SUFFIX)

    def in_order(self, other_order: Problem, suffix: str) -> _Candidates:
        """The search again on `other_order` (this problem, its backward pass in another
        order), labelled with `suffix`: candidates that continue this search's best."""
        other = _Candidates(other_order, self.limit, self.name, suffix)
        other.best, other.tried, other.skipped = self.best, self.tried, self.skipped
        other.beaten, other.dropped = self.beaten, self.dropped
        other.consider("store_all", lambda: plan_store_all(other.problem))
        if other.best is None or other.best[3] > 0:  # nothing beats recomputing nothing
            other.structured()
        return other

    def chain(self) -> None:
        solution = chain_dp.solve(self.problem, self.limit)
        if solution is None:
            return
        fits = lambda level: self.consider(  # noqa: E731
            f"chain_dp(level {level}/{chain_dp.LEVELS})",
            lambda: solution.schedule(level, ""),
            steers=True,
        )
        chain_dp.level_search(solution, fits)

    def keep_sets(self) -> None:
        problem = self.problem
        if not hoistable(problem):
            self._keep_sets(False)
            return
        if len(problem.candidates) <= BOTH_ORDERS_MAX_CANDIDATES:
            self._keep_sets(False)
        self._keep_sets(True)

    def _keep_sets(self, hoist: bool) -> None:
        """Rank the values the backward pass reads (with `hoist`, the hoisted nodes' reads
        happen in the forward phase instead) and bisect each ranking for the shortest
        dropped prefix that fits."""
        problem, model = self.problem, self.problem.model
        early = hoistable(problem) if hoist else {}
        read = {
            s
            for b in problem.backward
            if b not in early
            for s in problem.graph[b].inputs
            if problem.is_forward(s)
        }
        owned = lambda n: model.nbytes[model.owner[n]]  # noqa: E731
        droppable = [n for n in read if owned(n) > 0]
        orders = {}  # two rankings, cheapest to drop first; each gets its bisection
        for price in (problem.cost, lambda n: regrowth(problem, n, read)):
            ranked = sorted(droppable, key=lambda n: (price(n) / owned(n), problem.position[n]))
            orders.setdefault(tuple(ranked), None)
        held = False
        for ranked in orders:
            held |= self._bisect_keep_set(read, ranked, "hold", hoist)
        # Dropping recomputes on every read: only when holding cannot fit, and past
        # BOTH_ORDERS_MAX_CANDIDATES values (where each such schedule takes seconds to
        # build and simulate) only when nothing else fits either.
        small = len(self.problem.candidates) <= BOTH_ORDERS_MAX_CANDIDATES
        if not held and (small or self.best is None):
            for ranked in orders:
                self._bisect_keep_set(read, ranked, "drop", hoist)
        # Copies that cost nothing to make again (a concatenation) kept as their inputs.
        if small and swap_copies(problem, frozenset(read)) != read:
            for ranked in orders:
                self._bisect_keep_set(read, ranked, "hold", hoist, swap=True)

    def drops(self) -> None:
        """Each bisection's near miss, grown again from a few values short of it by
        dropping at each peak (`peak_drops`)."""
        if len(self.problem.graph) > DROPS_MAX_NODES:
            return
        for read, ranked, over, mode, hoist in self.near_misses:
            kept = frozenset(read) - frozenset(ranked[: max(0, over + 1 - DROPS_BACK)])
            found = peak_drops.fitted_by_drops(
                self.problem, kept, mode, hoist, self.limit, self.name
            )
            if found is None:
                continue
            schedule, kept = found
            how = ", hoisted" if hoist else ""
            count = len(kept.intersection(ranked))
            label = f"keep_set({mode}{how}, dropped at peaks, {count}/{len(ranked)} kept)"
            if self.consider(label, lambda schedule=schedule: schedule, steers=True):
                self.dropped.append((label + self.suffix, schedule, 0, self.last_cost))

    def _bisect_keep_set(
        self, read: set[str], ranked: tuple[str, ...], mode: str, hoist: bool, swap: bool = False
    ) -> bool:
        """The shortest prefix of `ranked` whose dropping fits (the rest of `read` kept,
        with `swap` its free copies as their inputs: `keep_sets.swap_copies`); whether any prefix
        tried fits."""
        problem = self.problem

        def keeping(j: int) -> frozenset[str]:
            kept = frozenset(read) - frozenset(ranked[:j])
            return swap_copies(problem, kept) if swap else kept

        def make(kept: frozenset[str]) -> Callable[[], Schedule]:
            return lambda: schedule_with_checkpoints(problem, kept, "", mode=mode, hoist=hoist)

        lo, hi, fitted, over = 0, len(ranked), False, None  # over: the longest prefix over
        how = (", hoisted" if hoist else "") + (", copies remade" if swap else "")
        for _ in range(max(1, math.ceil(math.log2(len(ranked) + 1))) + 1):
            if lo > hi:
                break
            mid = (lo + hi) // 2
            label = f"keep_set({mode}{how}, {len(ranked) - mid}/{len(ranked)} kept)"
            kept = keeping(mid)
            # Dropping more costs more: a prefix that cannot win bounds the search.
            if self.cannot_win(kept, hoist):
                hi = mid - 1
            elif self.consider(label, make(kept), steers=True):
                hi, fitted = mid - 1, True
            else:
                lo, over = mid + 1, mid
        if over is not None and not swap:
            self.near_misses.append((read, ranked, over, mode, hoist))
        return fitted

    def exact(self) -> None:
        problem = self.problem
        if milp.size(problem) > EXACT_MAX_NODES:
            return
        try:
            start = self.best[1] if self.best is not None else None
            seconds = control.seconds_left(EXACT_SECONDS)
            # With nothing found, the limit is near the least peak: the results last first.
            solution = milp_classes.solve(
                problem, self.limit, seconds, self.name, start, results_last_first=start is None
            )
        except (Cancelled, DeadlineExceeded):
            raise  # the request ended: no more planning
        except RematError:  # the solver's process died (out of memory): one candidate less
            return
        if solution.schedule is not None:
            self.consider("milp", lambda: solution.schedule)

    def cannot_win(self, kept: frozenset[str], hoist: bool = False) -> bool:
        """Whether a hold-mode keep set cannot win, before its schedule is built (a
        walk of the graph, against building and simulating a schedule): every value
        the backward reads that is not kept is freed in the forward phase, so it and
        its forward ancestors up to kept values are recomputed at least once, which
        costs at least the best found so far."""
        if self.best is None or hold_floor(self.problem, kept, hoist) < self.best[3]:
            return False
        self.skipped += 1
        return True

    def heuristics(self) -> None:
        problem = self.problem
        n = len(problem.candidates)
        for k in sorted({1, 2, 3, 4, 6, 8, 12, 16, sqrt_k(problem)}):
            if 1 <= k <= n and not self.cannot_win(every_k_kept(problem, k)):
                self.consider(f"every_k({k})", lambda k=k: plan_every_k(problem, EveryK(k)))
        if not self.cannot_win(every_k_kept(problem, sqrt_k(problem))):
            self.consider("sqrt", lambda: plan_sqrt(problem, None))
        present = {problem.graph[f].op for f in problem.forward_order}
        for op in EXPENSIVE_OPS:
            if (
                op in present
                and registry.get(op) is not None
                and not self.cannot_win(save_ops_kept(problem, (op,)))
            ):
                self.consider(
                    f"save_ops({op})", lambda op=op: plan_save_ops(problem, SaveOps((op,)))
                )
        self.consider("dtr", lambda: dtr_schedule(problem, self.limit, "dtr"))
        # ReLU masks in the forward pass: sometimes DTR fits only so.
        if hoistable(problem) and (self.best is None or n <= BOTH_ORDERS_MAX_CANDIDATES):
            self.consider(
                "dtr(hoisted)", lambda: dtr_schedule(problem, self.limit, "dtr", hoist=True)
            )
        # The low-memory extremes, quadratic on long chains.
        chain = len(problem.boundaries)
        if chain >= 2 and (self.best is None or chain <= REVOLVE_ALWAYS_MAX):
            self.revolve(chain)
        if self.best is None:
            self.consider("recompute_all", lambda: plan_recompute_all(problem, None))

    def revolve(self, steps: int) -> None:
        """Revolve with the most slots that fit: more slots hold more snapshots (a
        higher peak) and recompute less, so bisect the slot count (up to
        REVOLVE_MAX_SLOTS) for the largest that fits, a few schedules in all."""
        low, high = 1, min(steps, REVOLVE_MAX_SLOTS)
        while low <= high:
            slots = (low + high) // 2
            fits = self.consider(
                f"revolve({slots})",
                lambda s=slots: plan_revolve(self.problem, Revolve(s)),
                steers=True,
            )
            low, high = (slots + 1, high) if fits else (low, slots - 1)
