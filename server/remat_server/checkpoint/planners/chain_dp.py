"""Optimal persistent checkpointing of a heterogeneous chain (Rotor: Beaumont, Eyraud-
Dubois, Herrmann, Joly, Shilova 2019), as a dynamic program over memory levels.

The chain is the forward graph's segments (`chain.segments`), merged to at most
`MAX_STEPS` steps. Each step i has a forward cost f_i, a state size (its last value,
what a snapshot holds), a recorded size (what its backward nodes read) and transient
overheads. C(s, t, m) is the least forward cost of reversing steps s..t with state s-1
live and m bytes to spare. Either

* record step s (keep what its backward reads) and reverse s+1..t with less memory,
  then run step s's backward:  f_s + C(s+1, t, m - recorded_s); or
* advance from state s-1 to state s'-1 without recording, keep that snapshot, reverse
  s'..t, drop it, then reverse s..s'-1:  f_s + ... + f_{s'-1} + C(s', t, m - state_{s'-1})
  + C(s, s'-1, m).

Record-everything is store-all; snapshots alone give revolve's binomial schedules, with
heterogeneous costs and sizes. The table is vectorised over memory levels, so one solve
gives the optimum for every level; the budget planner then emits schedules for a few
levels and keeps the best one whose exact simulated peak fits. What one step's backward
or reversal needs is measured by replaying the emitter's own actions on it (views,
temporaries, values that die before others are born: `_working_bytes`); the rest is
rounded to levels, so the simulator stays the judge.

    >>> # solution = solve(problem, budget_bytes); schedule = solution.schedule(level)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..memory import LiveBytes
from ..problem import Problem
from ..schedule import Compute, Schedule
from .chain import ChainEmitter, segments

MAX_STEPS = 64  # keeps the O(L^3 M) table to about 0.2 s
LEVELS = 200  # memory resolution: about 0.5% of the budget
# The table spans 1.3x the budget: its sizes are estimates (gradients and views are
# the simulator's business), so the level that fits exactly may lie above "100%".
HEADROOM = 1.3


@dataclass
class ChainSolution:
    problem: Problem
    steps: list[list[str]]
    cost: np.ndarray  # cost[m]: least forward cost of the whole reversal at level m
    choice: dict[str, np.ndarray]  # table -> [s, t, m] decision (see `actions`)
    recorded: np.ndarray  # in levels, per step (index 1..L)
    state: np.ndarray  # in levels, per state (index 0..L)
    results: np.ndarray  # in levels, results[i]: of steps 1..i's backward, cumulative
    unit: float = 1.0  # bytes per level
    # The highest level sure to fit the budget: its schedules peak within level x unit
    # bytes over the graph inputs (the DP never underestimates a level), and this one's
    # does within the budget. -1: none is.
    sure: int = -1

    def feasible_levels(self) -> np.ndarray:
        return np.flatnonzero(np.isfinite(self.cost))

    def actions(self, level: int) -> list[tuple[str, int, int]]:
        """The reversal at memory `level`, iteratively (no recursion). Tables: "C"
        reverses s..t; "D" the same with state t live already (a kept snapshot);
        "E" picks between releasing a snapshot first (C) and keeping it (D)."""
        out: list[tuple[str, int, int]] = []
        stack: list[tuple] = [("C", 1, len(self.steps), level)]
        while stack:
            task = stack.pop()
            kind = task[0]
            if kind not in ("C", "D", "E"):
                out.append(task)
                continue
            _, s, t, m = task
            if kind == "E":
                if self.choice["E"][s, t, m]:
                    stack.append(("D", s, t, m - int(self.state[t])))
                else:
                    stack.append(("C", s, t, m))
                    stack.append(("release", t, 0))
                continue
            if s == t:
                out.append(("reverse", s, 0))
                continue
            split = int(self.choice[kind][s, t, m])
            if split == 0:
                out.append(("record", s, 0))
                stack.append(("backward", s, 0))
                stack.append((kind, s + 1, t, m - int(self.recorded[s])))
            else:
                out.append(("advance", s - 1, split - 1))
                produced = int(self.results[t] - self.results[split - 1])
                stack.append(("E", s, split - 1, m - produced))
                stack.append((kind, split, t, m - int(self.state[split - 1])))
        return out

    def schedule(self, level: int, policy: str) -> Schedule:
        return ChainEmitter(self.problem, self.steps).run(self.actions(level), policy)


def solve(problem: Problem, budget: int) -> ChainSolution | None:
    """The DP over the (merged) chain with memory levels up to `budget` bytes, or None
    when the graph has no chain structure."""
    steps = _merged_steps(problem)
    if len(steps) < 2:
        return None
    spare = budget - problem.input_bytes
    z = sizes(_step_figures(problem, steps), max(1, spare))
    table, choice = tables(z)
    cost, sure = table["C"][1, z.steps], math.floor(spare / z.unit) if spare >= 0 else -1
    return ChainSolution(problem, steps, cost, choice, z.rec, z.st, z.res_prefix, z.unit, sure)


@dataclass(frozen=True)
class Sizes:
    """What the DP reads, per step i = 1..steps (index 0: the inputs' state): sizes in
    levels of `unit` bytes, `levels` of them in all; costs as they are."""

    steps: int
    levels: int
    unit: float
    rec: np.ndarray  # what recording step i keeps (what its backward reads)
    st: np.ndarray  # state i: the step's last value, what a snapshot holds
    need_f: np.ndarray  # working bytes of advancing through step i
    inc: np.ndarray  # the gradients coming into step i
    through: np.ndarray  # need_f with state i-1 live too
    need_c: np.ndarray  # the backward of a recorded step
    need_r: np.ndarray  # step i reversed at once
    need_rd: np.ndarray  # the same, its own state kept
    res_prefix: np.ndarray  # results of steps 1..i's backward, cumulative
    prefix: np.ndarray  # forward cost of advancing through steps 1..i, cumulative
    record: np.ndarray  # forward cost of recording step i
    reverse: np.ndarray  # of reversing step i at once
    reverse_kept: np.ndarray  # the same, its own state kept


def sizes(fig: dict[str, np.ndarray], spare: int) -> Sizes:
    """`_step_figures`' figures in levels, for a table spanning HEADROOM x `spare` bytes
    (the budget over the graph inputs)."""
    unit = _unit(fig["state"][1:], HEADROOM * spare / LEVELS)
    level = lambda b: np.ceil(np.asarray(b, dtype=float) / unit).astype(np.int64)  # noqa: E731
    st, need_f = level(fig["state"]), level(fig["work_advance"])
    return Sizes(
        steps=len(st) - 1,
        levels=int(HEADROOM * spare / unit) + 1,
        unit=unit,
        rec=level(fig["recorded"]),
        st=st,
        need_f=need_f,
        inc=level(fig["incoming"]),
        through=need_f + np.concatenate([[0], st[:-1]]),
        # The backward of a recorded step, and a single step reversed at once
        # (`ChainEmitter.reverse`: only what its backward reads is recorded, not its
        # state; the state, if kept, is counted outside), as the emitter runs them.
        need_c=np.maximum(level(fig["work_backward"]), need_f),
        need_r=np.maximum(level(fig["work_reverse"]), need_f),
        need_rd=np.maximum(level(fig["work_reverse_kept"]), need_f),
        # Results (weight gradients) stay live to the end: once steps s'..t are
        # reversed, what remains has their results' bytes less to work with.
        res_prefix=level(np.concatenate([[0.0], np.cumsum(fig["results"][1:])])),  # round once
        prefix=np.concatenate([[0.0], np.cumsum(fig["advance"][1:])]),
        record=fig["record"],
        reverse=fig["reverse"],
        reverse_kept=fig["reverse_kept"],
    )


def tables(z: Sizes) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The tables C, D and E over [s, t, level], and their choices (see
    `ChainSolution.actions`), by name."""
    L, M = z.steps, z.levels
    rec, st, need_f, inc, through = z.rec, z.st, z.need_f, z.inc, z.through
    need_c, need_r, need_rd = z.need_c, z.need_r, z.need_rd
    res_prefix, prefix, f_rec = z.res_prefix, z.prefix, z.record
    levels = np.arange(M)
    inf = np.inf
    shape = (L + 2, L + 2, M)
    C, D, E = np.full(shape, inf), np.full(shape, inf), np.full(shape, inf)
    C_sh, D_sh = np.full(shape, inf), np.full(shape, inf)  # X_sh[s', t] = X[s', t][m - st[s'-1]]
    choice = {
        "C": np.zeros(shape, np.int16),
        "D": np.zeros(shape, np.int16),
        "E": np.zeros(shape, np.bool_),
    }

    def finish(s: np.ndarray, t: np.ndarray) -> None:
        keep = _shifted(D[s, t], st[t])
        choice["E"][s, t] = keep < C[s, t]
        E[s, t] = np.minimum(C[s, t], keep)
        C_sh[s, t], D_sh[s, t] = _shifted(C[s, t], st[s - 1]), _shifted(D[s, t], st[s - 1])

    first = np.arange(1, L + 1)
    C[first, first] = np.where(levels >= need_r[first, None], z.reverse[first, None], inf)
    D[first, first] = np.where(levels >= need_rd[first, None], z.reverse_kept[first, None], inf)
    finish(first, first)
    # Every (s, t = s + d) of one diagonal d at once: each reads only shorter spans.
    # Axes: [s, k, m], k indexing the split s' = s + 1 + k (k < d), m the level.
    for d in range(1, L):
        s = np.arange(1, L - d + 1)
        t = s + d
        k = np.arange(d)
        split = s[:, None] + 1 + k  # s'
        advance = (prefix[split - 1] - prefix[s - 1, None])[:, :, None]
        # Advancing (and recording) happens with the gradient into step t live.
        # (state i-1 stays live through step i after the first step of an advance).
        advancing = np.where(k == 0, need_f[s, None], through[split - 1])
        reach = np.maximum.accumulate(advancing, axis=1) + inc[t, None]
        too_small = levels < reach[:, :, None]
        # Left part s..s'-1 runs after the right part s'..t left its results live.
        produced = res_prefix[t, None] - res_prefix[split - 1]
        index = levels - produced[:, :, None]
        lefts = E[s[:, None], split - 1]
        left = np.where(index >= 0, np.take_along_axis(lefts, index.clip(0), 2), inf)
        after = res_prefix[t] - res_prefix[s]
        refused = (levels < (need_c[s] + after)[:, None]) | (levels < (need_f[s] + inc[t])[:, None])
        for table, right_sh, out in (("C", C_sh, C), ("D", D_sh, D)):
            record = f_rec[s, None] + _shifted(out[s + 1, t], rec[s])
            record[refused] = inf
            options = advance + right_sh[split, t[:, None]] + left
            options[too_small] = inf
            best = np.argmin(options, axis=1)
            snapshot = np.take_along_axis(options, best[:, None, :], 1)[:, 0, :]
            use = snapshot < record
            out[s, t] = np.where(use, snapshot, record)
            choice[table][s, t] = np.where(use, best + s[:, None] + 1, 0)
        finish(s, t)
    return {"C": C, "D": D, "E": E}, choice


def _shifted(rows: np.ndarray, by: np.ndarray) -> np.ndarray:
    """Each row moved `by` of its levels up (rows[i][m - by[i]] at m; inf below): the
    same table entry with that many levels fewer to spare."""
    index = np.arange(rows.shape[-1]) - np.asarray(by)[:, None]
    return np.where(index >= 0, np.take_along_axis(rows, index.clip(0), 1), np.inf)


def _unit(states: np.ndarray, rough: float) -> float:
    """A level's size in bytes: about `rough`, adjusted so the typical state size is a
    whole number of levels (rounding every activation up by a fraction of a level
    would waste that fraction of the budget on each)."""
    typical = float(np.median(states[states > 0])) if np.any(states > 0) else 0.0
    if typical <= rough:
        return max(1.0, rough)
    return typical / max(1, round(typical / rough))


def _merged_steps(problem: Problem) -> list[list[str]]:
    """The chain's segments, cut only at boundaries the backward reads (a layer's
    activation: keeping one costs nothing the step would not hold anyway) and, when
    there are more than MAX_STEPS, at the cut points nearest equal shares of cost."""
    cuts = list(problem.candidates)
    if len(cuts) > MAX_STEPS:
        order = {name: i for i, name in enumerate(problem.forward_order)}
        weight = np.cumsum([problem.cost(n) + 1.0 for n in problem.forward_order])
        at = weight[[order[c] for c in cuts]]
        targets = weight[-1] * np.arange(1, MAX_STEPS) / MAX_STEPS
        picked = sorted(set(np.searchsorted(at, targets).clip(0, len(cuts) - 1).tolist()))
        cuts = [cuts[i] for i in picked]
    return segments(problem, frozenset(cuts))


def _step_figures(problem: Problem, steps: list[list[str]]) -> dict[str, np.ndarray]:
    """Per step (1-indexed; state 0 is the inputs): the cost of advancing through it,
    of recording it (keeping its state, for what follows), and of reversing it at once
    (recording only what its backward reads), from state i-1 and, "_kept", with its
    own state live too; its recorded and state bytes, its results' bytes, and the
    working bytes of advancing through it, of its backward and of its reversals
    (`_working_bytes`)."""
    graph, model = problem.graph, problem.model
    own = lambda names: sum(model.nbytes[o] for o in {model.owner[n] for n in names})  # noqa: E731
    emitter = ChainEmitter(problem, steps)
    inputs = {n.name for n in graph.inputs}
    fig = {
        key: np.zeros(len(steps) + 1)
        for key in (
            "advance",
            "record",
            "reverse",
            "reverse_kept",
            "recorded",
            "state",
            "results",
        )
    }
    for i, segment in enumerate(steps, start=1):
        before = inputs | ({steps[i - 2][-1]} if i > 1 else set())
        fig["advance"][i] = sum(problem.cost(n) for n in segment)
        fig["record"][i] = sum(problem.cost(n) for n in emitter.recording(i, before))
        fig["reverse"][i] = sum(problem.cost(n) for n in emitter.recording(i, before, False))
        fig["reverse_kept"][i] = sum(
            problem.cost(n) for n in emitter.recording(i, before | {segment[-1]}, False)
        )
        fig["recorded"][i] = own(emitter.recorded(i))
        fig["state"][i] = own([segment[-1]])
        # What stays live to the end once this step is reversed: its backward's results
        # (a weight's gradient) and its forward ones (the loss).
        mine = emitter.backward_of.get(i, ())
        fig["results"][i] = own([n for n in (*mine, *segment) if n in problem.results])
    fig.update(_working_bytes(problem, steps, emitter))
    return fig


def _working_bytes(
    problem: Problem, steps: list[list[str]], emitter: ChainEmitter
) -> dict[str, np.ndarray]:
    """Per step, the peak bytes the emitter's own actions on it reach, over what lies
    outside it (the inputs and the earlier steps' states, which the program counts as
    snapshots): advancing through it from its input state ("work_advance"), its
    backward after it was recorded ("work_backward", the recorded values included),
    and its reversal at once from its input state, without and with its own state kept
    ("work_reverse", "work_reverse_kept"); and the bytes of the gradients coming into
    it ("incoming", live while the steps before it advance). Each replays the step
    alone through `LiveBytes`, with the gradients coming into it live for a backward:
    a value goes at its last read, a view owns nothing and an op's temporaries count
    while it runs, where a sum of sizes would count values that never meet."""
    graph, model = problem.graph, problem.model
    inputs = {n.name for n in graph.inputs}
    figures = {key: np.zeros(len(steps) + 1) for key in (*_WORK, "incoming")}
    later = 0  # backward nodes of the steps after this one: the emitter's position
    for i in range(len(steps), 0, -1):
        mine = emitter.backward_of.get(i, ())
        members = set(steps[i - 1])
        # The graph inputs this step reads (always live; a view of one uses its bytes),
        # not all of them: a wide graph has thousands, and each replay counts its own.
        read = {s for n in (*steps[i - 1], *mine) for s in graph[n].inputs}
        outside = (inputs & read) | {
            s for b in mine for s in graph[b].inputs if problem.is_forward(s) and s not in members
        }
        incoming = {
            s
            for b in mine
            for s in graph[b].inputs
            if s not in mine and not problem.is_forward(s) and s not in inputs
        }
        figures["incoming"][i] = LiveBytes(model, incoming).total
        state = steps[i - 1][-1]
        before = (inputs & read) | ({steps[i - 2][-1]} if i > 1 else set())  # state i-1
        # key: (what is live at the start, what of it the program counts elsewhere)
        replays = {
            "work_advance": (before, before),
            "work_backward": (outside | incoming | emitter.recorded(i), outside),
            "work_reverse": (outside | incoming, outside),
            "work_reverse_kept": (outside | incoming | {state}, outside | {state}),
        }
        for key, (initial, counted) in replays.items():
            emitter.steps, emitter.live, emitter.position = [], set(initial), later
            if key == "work_advance":
                emitter.advance(i - 1, i)
            elif key == "work_backward":
                emitter.backward(i)
            else:
                emitter.reverse(i)
            figures[key][i] = _replayed_peak(model, initial, emitter.steps, counted)
        later += len(mine)
    return figures


_WORK = ("work_advance", "work_backward", "work_reverse", "work_reverse_kept")


def _replayed_peak(model, initial: set[str], steps: list, counted: set[str]) -> int:
    """The peak live bytes of `steps` from `initial`, less the bytes of `counted`."""
    live = LiveBytes(model, initial)
    for step in steps:
        if type(step) is Compute:
            live.add(step.node)
        else:
            live.remove(step.node)
    return max(0, live.peak - LiveBytes(model, counted).total)


def level_search(solution: ChainSolution, fits, probes: int = 10) -> int | None:
    """The highest feasible level whose schedule `fits` (bisection: higher levels keep
    more and simulate higher), or None. Levels up to `solution.sure` fit by
    construction, so the bisection runs above them; only when none there fits is the
    highest sure level tried (and, should it not fit after all, the ones below it)."""
    feasible = solution.feasible_levels()
    if feasible.size == 0:
        return None
    sure = int(np.searchsorted(feasible, solution.sure, side="right")) - 1  # its index
    best, probes = _bisect(feasible, sure + 1, feasible.size - 1, fits, probes)
    if best is None and sure >= 0:
        if fits(int(feasible[sure])):
            return int(feasible[sure])
        best, _ = _bisect(feasible, 0, sure - 1, fits, probes - 1)
    return best


def _bisect(feasible: np.ndarray, lo: int, hi: int, fits, probes: int) -> tuple[int | None, int]:
    """The highest of feasible[lo..hi] that fits, by bisection in at most `probes`
    tries; and the tries left."""
    best = None
    while probes > 0 and lo <= hi:
        probes -= 1
        mid = (lo + hi) // 2
        if fits(int(feasible[mid])):
            best, lo = int(feasible[mid]), mid + 1
        else:
            hi = mid - 1
    return best, probes
