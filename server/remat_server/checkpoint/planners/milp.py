"""Checkmate's MILP (Jain et al. 2020), solved exactly by HiGHS (highspy).

The n needed non-input nodes are numbered 0..n-1 in a topological order: the forward
values in `forward_order` with the hoistable backward nodes (ReLU masks) among them,
then the other backward nodes (the order the heuristics first compute them in).
Stage t computes node t for the first time and may recompute any earlier node.
Variables (binary except U):

* R[t,i], i <= t: node i is computed in stage t; R[t,t] = 1 (the frontier advances);
* S[t,i], i < t: value i is live entering stage t. S[0] is empty (graph inputs are
  live throughout); row S[n], the end state, is fixed: 1 for the results;
* FREE[t,(i,k)]: value i is dropped right after node k, its last user in stage t;
* U[t,k]: bytes live just after computing node k in stage t, inputs excluded (their
  bytes come off the budget instead).

    minimise   sum R[t,i] cost(i)
    such that  R[t,k] <= R[t,i] + S[t,i]       for each edge i -> k (inputs are live)
               S[t+1,i] <= S[t,i] + R[t,i]      (a value is kept only if it was there)
               R[t,i] + S[t,i] <= 1             (never compute a live value)
               U[t,0] = M_0 R[t,0] + sum_i M_i S[t,i]
               U[t,k] = U[t,k-1] + M_k R[t,k] - sum_{(i,k-1)} M_i FREE[t,(i,k-1)]
               FREE[t,(i,k)] = R[t,k] (1 - S[t+1,i]) prod_{users j of i, k<j<=t} (1 - R[t,j])
               0 <= U[t,k] <= budget - input bytes
               U[t,k] + C_k R[t,k] <= budget - input bytes   (C_k: node k's temporaries)

`least_memory` solves the same model with the peak P as a variable (U[t,k] <= P, and
with the temporaries) and P alone as the objective: the least memory of any schedule
the model expresses. That class is not every schedule: a stage computes in
topological order, so no schedule recomputes a forward result (the loss) after the
last backward node, which can hold the least peak (the floor's `_results_last` adds
that); the model's bound is therefore not reported as a bound on every schedule.

The product is linearised exactly (FREE <= each factor, FREE >= R - S - sum R): tighter
for the LP relaxation than Checkmate's big-M hazard count. FREE exists only for t > k
and M_i > 0 (a free after the frontier node changes no U). Bytes are counted in units
of their gcd, so U is integral and HiGHS's tolerances cannot push a schedule over.

Views (aliasing): a view allocates nothing but keeps its owner's buffer alive, so the
live bytes are those of buffers with any live value. The MILP charges each buffer to
its owner (M_view = 0) and stays exact by never letting a view outlive its owner:
S[t,v] <= S[t,owner], and the owner's users include its views and their users, so it
is freed no earlier than they are. That loses nothing: while a view lives its owner's
buffer is paid for anyway. Values that hold no bytes and pin none (constants, views
of inputs) are simply kept from their first computation on.

The schedule mirrors the accounting: per stage, compute the R nodes in order and drop
each value not kept into the next stage right after its last user in the stage (at
once if the stage does not use it), never later than FREE says; the simulated peak is
the MILP's. `solve` only solves: what to do when it finds nothing (policy Optimal
falls back to Budget; Budget simply has one candidate fewer) is its caller's choice.

HiGHS is driven through highspy rather than scipy.optimize.milp because a solve must
stop when its request ends, and a solve that was stopped, or outlived its request,
raises Cancelled or DeadlineExceeded (`control.check`). HiGHS polls its interrupt
callback between the steps of its branch and bound only: its presolve and the LP
solves inside the MIP poll nothing (HiGHS issue 1905), and presolve ignores the time
limit. In process, a stop lags by their length: up to 2.7 s on a 16-layer tanh chain
(2,647 variables), 8 s on a 115-node transformer block, a minute on a 242-node MLP
(HiGHS 1.16). So models over IN_PROCESS_MAX_VARIABLES are solved in a child process
(`highs_process`) that is killed within 50 ms of the stop, or at a hard wall limit
past the time limit (a killed solve has no incumbent: it reports no schedule, like a
time limit reached without one). The child also takes the solver's memory with it,
which glibc would keep in the server's heap. Smaller models, whose stretches between
polls are short (a cancel lands within 0.05 s), are solved in process with the
interrupt callback: a child costs 15-25 ms more.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from .. import control
from ..problem import Problem
from ..recompute import hoistable
from ..schedule import Compute, Free, Schedule, Step
from ..simulate import InvalidSchedule
from . import highs_process, milp_order, milp_start
from .bounds import recompute_cost, simulated
from .milp_rows import Rows, pairs, ranges


@dataclass(frozen=True)
class Solution:
    """A solve's outcome. `schedule` is None when there is none: `infeasible` (proven)
    or not found in time (`why` says which)."""

    schedule: Schedule | None
    infeasible: bool
    optimal: bool  # proven optimal (else stopped at the time limit)
    gap: float
    seconds: float
    size: str  # "MILP with V variables and C constraints"
    why: str = ""
    # HiGHS's proven lower bound on the recompute cost (problem.cost's units); 0 if none.
    bound: float = 0.0
    orders: int = 1  # the classes solved (`milp_classes`: 2 with the results last too)


def solve(
    problem: Problem,
    limit: int,
    time_limit: float,
    name: str,
    start: Schedule | None = None,
    results_last: bool = False,
) -> Solution:
    """The cheapest schedule with peak <= `limit` bytes, within `time_limit` seconds;
    `start`, a schedule known to fit, is HiGHS's first incumbent when the MILP can
    express it (`milp_start`), so the answer recomputes no more than it. With
    `results_last`, the class of schedules that compute the results nothing reads
    last (`milp_order.results_last`). Raises Cancelled or DeadlineExceeded when the
    current request ends first, and ResourceExhausted (killed, most likely out of
    memory) or RematError when a child process solving it dies."""
    control.check(name)  # building a few hundred nodes' model takes a while
    order = (start and milp_order.of_schedule(problem, start)) or milp_order.default(problem)
    if results_last:
        order = milp_order.results_last(problem, order)
    model = _Milp(problem, order, limit - problem.input_bytes)
    if start is not None:
        model.start = milp_start.columns(model, start)
    solution, res = _solved(problem, model, limit, time_limit, name)
    if solution.schedule is None or solution.optimal:
        return solution
    # Each node's first computation is in every schedule: the rest is recomputation.
    # HiGHS's gap is over all of them; the one reported is over the recomputation.
    base = sum(problem.cost(n) for n in order)
    bound = max(0.0, res.bound - base) if np.isfinite(res.bound) else 0.0
    cost = recompute_cost(problem, solution.schedule)
    gap = max(0.0, (cost - bound) / cost) if cost > 0 else 0.0
    return replace(solution, bound=bound, gap=gap)


def least_memory(
    problem: Problem, upper: int, time_limit: float, name: str, lower: int = 0
) -> Solution:
    """The schedule with the lowest peak, at most `upper` bytes (a known schedule's
    peak), within `time_limit` seconds; its `bound` is a proven lower bound, in bytes,
    on the peak of every schedule the MILP can express (0 if none). `lower`, a peak no
    schedule goes under, lets HiGHS stop as soon as it meets it. Raises as `solve`."""
    control.check(name)
    model = _Milp(
        problem, milp_order.default(problem), upper - problem.input_bytes, least_memory=True
    )
    # A schedule's P * unit is at least its true peak less the inputs: P >= that / unit.
    model.lb[model.peak] = max(0, -(-(lower - problem.input_bytes) // model.unit))
    solution, res = _solved(problem, model, upper, time_limit, name)
    if solution.infeasible or not np.isfinite(res.bound):
        return solution
    # P counts whole units and each temporary is rounded up to one: a schedule's true
    # peak can sit up to a unit under its P, so the bound gives that unit back.
    rounded = any(v % model.unit for v in problem.model.scratch.values())
    units = math.ceil(res.bound - 1e-6)
    bound = problem.input_bytes + max(0, units * model.unit - (model.unit - 1) * rounded)
    return replace(solution, bound=float(bound))


def _solved(
    problem: Problem, model: _Milp, limit: int, time_limit: float, name: str
) -> tuple[Solution, _Result]:
    """Run `model`; its schedule, checked against `limit` by the simulator."""
    start = time.perf_counter()
    res = model.solve(time_limit, name)
    seconds = time.perf_counter() - start
    control.check(name)  # interrupted, or stopped at a deadline-cut limit: moot anyway
    size = f"MILP with {model.variables} variables and {model.constraints} constraints"
    if res.status == INFEASIBLE:
        return Solution(None, True, False, 0.0, seconds, size, f"the {size} is infeasible"), res
    if res.x is None:  # time limit (or a solver failure) before any feasible schedule
        why = f"the {size} found no feasible schedule " + (
            f"within {time_limit:g} s" if res.status == LIMIT else f"({res.message})"
        )
        return Solution(None, False, False, 0.0, seconds, size, why), res
    schedule = Schedule(model.steps(res.x), problem.results, name)
    peak = simulated(problem, schedule).peak_bytes
    if peak > limit:  # the accounting above is exact or conservative: a bug, never hidden
        raise InvalidSchedule(
            f"policy {name}: the MILP schedule peaks at {peak:,} bytes, "
            f"over its budget of {limit:,}"
        )
    gap = res.gap if np.isfinite(res.gap) else 0.0
    return Solution(schedule, False, res.status == OPTIMAL, gap, seconds, size), res


def size(problem: Problem) -> int:
    """Nodes the MILP numbers: the needed non-input nodes."""
    return len(milp_order.default(problem))


class _Milp:
    """The model. With `least_memory`, a variable P (the peak, inputs excluded, in units)
    bounds every U[t,k] and U[t,k] + C_k R[t,k], and the objective is P alone: the
    lowest peak any schedule reaches, at most `free_bytes`."""

    def __init__(
        self, problem: Problem, order: list[str], free_bytes: int, least_memory: bool = False
    ):
        graph, model = problem.graph, problem.model
        self.order, n = order, len(order)
        self.start: tuple[np.ndarray, np.ndarray] | None = None  # a warm start's columns
        self.hoisted = hoistable(problem).keys()
        index = {name: i for i, name in enumerate(order)}
        # Bytes charged to each node: its buffer's if it owns one, 0 for a view.
        owner = np.array(
            [index.get(model.owner[name], -1) for name in order],  # -1: an input's
            dtype=np.int64,
        )
        raw = np.array(
            [model.nbytes[name] if owner[i] == i else 0 for i, name in enumerate(order)],
            dtype=np.int64,
        )
        unit = math.gcd(*raw[raw > 0].tolist()) if np.any(raw > 0) else 1
        mem = raw // unit  # integral coefficients: U is exact, no rounding slack
        self.unit = unit
        # deps[k]: real inputs (the schedule must have them live); users[i]: real consumers
        # plus, for an owner, its views and their consumers (it must outlive them).
        deps = [sorted({index[s] for s in graph[name].inputs if s in index}) for name in order]
        users: list[set[int]] = [set() for _ in range(n)]
        for k in range(n):
            for i in (*deps[k], *owner[deps[k]].tolist(), int(owner[k])):
                if 0 <= i != k:
                    users[i].add(k)
        self.users = [sorted(u) for u in users]
        self.uses: list[list[int]] = [[] for _ in range(n)]
        for i in range(n):
            for k in self.users[i]:
                self.uses[k].append(i)

        # Variable layout: R and U over (t, i <= t); S over (t <= n, i < t); FREE per edge
        # (i, k) with M_i > 0 over k < t < n.
        tri = n * (n + 1) // 2
        self.r0, self.s0 = 0, tri
        self.u0 = u0 = tri + (n + 1) * n // 2
        f0 = u0 + tri
        ei, ek = pairs([(i, k) for i in range(n) for k in self.users[i] if mem[i] > 0])
        fcount = n - 1 - ek
        fstart = f0 + np.cumsum(fcount) - fcount
        self.peak = f0 + int(fcount.sum())  # P's column, when least_memory
        self.variables = self.peak + int(least_memory)
        R, S = self.R, self.S
        U = lambda t, k: u0 + t * (t + 1) // 2 + k  # noqa: E731
        rows = Rows()

        # Inputs live: R[t,k] - R[t,i] - S[t,i] <= 0 for each real edge i -> k, t >= k.
        di, dk = pairs([(i, k) for k in range(n) for i in deps[k]])
        g, t = ranges(dk, np.full(len(dk), n))
        i, k = di[g], dk[g]
        rows.add(len(t), [(None, R(t, k), 1), (None, R(t, i), -1), (None, S(t, i), -1)], -np.inf, 0)
        # R[t,i] + S[t,i] <= 1; S[t+1,i] <= S[t,i] + R[t,i] (S[t,t] is 0: not a variable).
        t, i = np.tril_indices(n, -1)
        rows.add(len(t), [(None, R(t, i), 1), (None, S(t, i), 1)], -np.inf, 1)
        rows.add(
            len(t), [(None, S(t + 1, i), 1), (None, S(t, i), -1), (None, R(t, i), -1)], -np.inf, 0
        )
        t = np.arange(n)
        rows.add(n, [(None, S(t + 1, t), 1), (None, R(t, t), -1)], -np.inf, 0)
        # A view never outlives its owner: S[t,v] <= S[t,owner] for v < t <= n.
        views = np.array(
            [v for v in range(n) if 0 <= owner[v] != v and mem[owner[v]] > 0], dtype=np.int64
        )
        g, t = ranges(views + 1, np.full(len(views), n + 1))
        rows.add(len(t), [(None, S(t, views[g]), 1), (None, S(t, owner[views[g]]), -1)], -np.inf, 0)
        # Memory, one equality per U[t,k]: U[t,0] = M_0 R[t,0] + sum_i M_i S[t,i];
        # U[t,k] = U[t,k-1] + M_k R[t,k] - sum M_i FREE[t,(i,k-1)].
        t, k = np.tril_indices(n)
        first = t * (t + 1) // 2  # the row of U[t,0]
        st, si = np.tril_indices(n, -1)
        g, ft = ranges(ek + 1, np.full(len(ek), n))  # the FREE variables: (edge g, stage ft)
        fcol = fstart[g] + ft - ek[g] - 1
        later = k > 0
        rows.add(
            tri,
            [
                (None, U(t, k), 1),
                (None, R(t, k), -mem[k]),
                (first[later] + k[later], U(t, k)[later] - 1, -1),
                (st * (st + 1) // 2, S(st, si), -mem[si]),
                (ft * (ft + 1) // 2 + ek[g] + 1, fcol, mem[ei[g]]),
            ],
            0,
            0,
        )
        # Temporaries: while node k is computed its scratch sits on top of U[t,k]:
        # U[t,k] + C_k R[t,k] <= the free bytes (C_k rounded up to whole units: safe).
        scratch = np.array(
            [-(-model.scratch.get(name, 0) // unit) for name in order], dtype=np.int64
        )
        held = scratch[k] > 0
        # Under a budget: <= the free bytes; for the least memory: <= P (so P - ... >= 0).
        peak = [(None, np.full(int(held.sum()), self.peak), -1)] if least_memory else []
        rows.add(
            int(held.sum()),
            [(None, U(t, k)[held], 1), (None, R(t, k)[held], scratch[k][held]), *peak],
            -np.inf,
            0 if least_memory else free_bytes // unit,
        )
        if least_memory:  # U[t,k] <= P
            rows.add(tri, [(None, U(t, k), 1), (None, np.full(tri, self.peak), -1)], -np.inf, 0)
        # FREE[t,(i,k)] = R[t,k] (1 - S[t+1,i]) prod_j (1 - R[t,j]), users j of i, k < j <= t:
        # FREE <= each factor, FREE >= R[t,k] - S[t+1,i] - sum_j R[t,j].
        fi, fk, m = ei[g], ek[g], len(ft)
        rows.add(m, [(None, fcol, 1), (None, R(ft, fk), -1)], -np.inf, 0)
        rows.add(m, [(None, fcol, 1), (None, S(ft + 1, fi), 1)], -np.inf, 1)
        pe, pj = pairs([(e, j) for e in range(len(ek)) for j in self.users[ei[e]] if j > ek[e]])
        h, pt = ranges(pj, np.full(len(pj), n))  # (pair h, stage pt) with j <= pt
        pe, pj = pe[h], pj[h]
        pcol = fstart[pe] + pt - ek[pe] - 1
        rows.add(len(pt), [(None, pcol, 1), (None, R(pt, pj), 1)], -np.inf, 1)
        rows.add(
            m,
            [
                (None, fcol, -1),
                (None, R(ft, fk), 1),
                (None, S(ft + 1, fi), -1),
                (pcol - f0, R(pt, pj), -1),
            ],
            -np.inf,
            0,
        )  # FREE's row is its index - f0
        self.rows = rows.build(self.variables)
        self.constraints = rows.count

        # Bounds: binaries in [0, 1], R[t,t] = 1, the end state S[n] fixed, U <= budget.
        self.lb, self.ub = np.zeros(self.variables), np.ones(self.variables)
        self.lb[R(np.arange(n), np.arange(n))] = 1
        end = np.zeros(n)
        for name in problem.results & index.keys():
            end[index[name]] = 1
            if owner[index[name]] >= 0:  # a result that views a buffer keeps it
                end[owner[index[name]]] = 1
        # A value that holds no bytes and pins no buffer (a constant, a view of an input)
        # is kept from its first computation on: that costs nothing and spares the
        # solver symmetric choices.
        free = np.flatnonzero((mem == 0) & ~np.isin(np.arange(n), views))
        self.owner, self.views, self.free = owner, views, free  # for `milp_start`
        end[free] = 1
        g, t = ranges(free + 1, np.full(len(free), n))
        self.lb[S(t, free[g])] = 1
        self.ub[R(t, free[g])] = 0
        self.lb[S(n, np.arange(n))] = self.ub[S(n, np.arange(n))] = end
        self.ub[u0:f0] = free_bytes // unit
        self.cost = np.zeros(self.variables)
        self.integrality = np.ones(self.variables, dtype=np.int32)  # HighsVarType: 1 integer
        self.integrality[u0:f0] = 0
        if least_memory:  # P is integral (so is every U): its proven bound rounds up
            self.cost[self.peak] = 1
            self.ub[self.peak] = free_bytes // unit
        else:
            t, i = np.tril_indices(n)
            self.cost[R(t, i)] = np.array([problem.cost(name) for name in order], dtype=float)[i]

    def R(self, t, i):
        return self.r0 + t * (t + 1) // 2 + i

    def S(self, t, i):
        return self.s0 + t * (t - 1) // 2 + i

    def solve(self, time_limit: float, name: str = "") -> _Result:
        """Run HiGHS for at most `time_limit` seconds, or until `control.stopped()`: in
        this process if the model is small, else in a child process (`highs_process`)."""
        A, lower, upper = self.rows
        model = highs_process.Model(
            self.cost,
            self.lb,
            self.ub,
            lower,
            upper,
            A.indptr.astype(np.int32),
            A.indices.astype(np.int32),
            A.data,
            self.integrality,
            *(self.start or ()),
        )
        options = {**dict(_OPTIONS), "time_limit": float(time_limit)}
        if self.variables <= IN_PROCESS_MAX_VARIABLES or not highs_process.AVAILABLE:
            return _result(highs_process.run(model, options, control.stopped))
        wall = WALL_SLACK * float(time_limit) + WALL_GRACE_SECONDS
        return _result(highs_process.run_in_child(model, options, control.stopped, wall, name))

    def steps(self, x: np.ndarray) -> tuple[Step, ...]:
        """The schedule of a solution; frees never later than the MILP's FREE."""
        n, order = len(self.order), self.order
        t, i = np.tril_indices(n)
        R = np.zeros((n, n), dtype=bool)
        R[t, i] = x[self.R(t, i)] > 0.5
        t, i = np.tril_indices(n + 1, -1)
        S = np.zeros((n + 1, n + 1), dtype=bool)
        S[t, i] = x[self.S(t, i)] > 0.5
        steps: list[Step] = []
        for t in range(n):
            computed = np.flatnonzero(R[t, : t + 1]).tolist()
            last: dict[int, int] = {}  # value -> its last user computed in this stage
            for k in computed:
                for i in self.uses[k]:
                    last[i] = k
            drop_after: dict[int, list[int]] = {}
            for i, k in last.items():
                if not S[t + 1, i]:
                    drop_after.setdefault(k, []).append(i)
            steps += [
                Free(order[i])
                for i in np.flatnonzero(S[t, :n]).tolist()
                if i not in last and not S[t + 1, i]
            ]  # unused in this stage
            for k in computed:
                steps.append(Compute(order[k]))
                if k not in last and not S[t + 1, k]:
                    steps.append(Free(order[k]))
                steps += [Free(order[i]) for i in drop_after.get(k, ())]
        return tuple(steps)


# --- HiGHS -------------------------------------------------------------------------
# Exact (mip_rel_gap 0: never lose to a heuristic), silent, and one thread: the server
# bounds CPU use by how many solves run at once, not by HiGHS's scheduler.
_OPTIONS = (("output_flag", False), ("mip_rel_gap", 0.0))  # one thread: highs_process
# Larger models are solved in a child process. Measured on tanh chains (HiGHS 1.16):
# up to 10 layers (1,156 variables) no stretch without an interrupt poll passed 0.35 s
# (a cancel landed within 0.05 s); from 12 layers (1,585) they reach 0.7-2.7 s.
IN_PROCESS_MAX_VARIABLES = 1_200
# A child is killed at WALL_SLACK * time_limit + WALL_GRACE_SECONDS: HiGHS stops itself
# near its time limit (and keeps its incumbent), except in presolve, where it could
# not have found one anyway.
WALL_SLACK, WALL_GRACE_SECONDS = 1.25, 1.0
# A run's status, in scipy.optimize.milp's codes (the ones this module always used),
# by HighsModelStatus name (kHighsInterrupt is newer than highspy 1.7).
OPTIMAL, LIMIT, INFEASIBLE, OTHER = 0, 1, 2, 4
_STATUS = {
    "kOptimal": OPTIMAL,
    "kInfeasible": INFEASIBLE,
    # Every variable is bounded, so "unbounded or infeasible" can only be infeasible.
    "kUnboundedOrInfeasible": INFEASIBLE,
    "kTimeLimit": LIMIT,
    "kIterationLimit": LIMIT,
    "kSolutionLimit": LIMIT,
    "kInterrupt": LIMIT,
    "kHighsInterrupt": LIMIT,
}


@dataclass(frozen=True)
class _Result:
    """One HiGHS run. An interrupt reads as the time limit: `solve` then raises
    Cancelled or DeadlineExceeded (`control.check`) unless the request lives on."""

    status: int  # OPTIMAL, LIMIT, INFEASIBLE or OTHER
    x: np.ndarray | None  # the best schedule's variables, if any was found
    gap: float  # HiGHS's relative MIP gap (inf without a schedule)
    bound: float  # its proven lower bound on the objective (-inf without one)
    message: str


def _result(outcome: highs_process.Outcome) -> _Result:
    return _Result(
        _STATUS.get(outcome.status, OTHER), outcome.x, outcome.gap, outcome.bound, outcome.message
    )
