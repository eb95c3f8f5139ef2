"""Turn a set of kept forward values into a schedule that recomputes the rest.

Forward phase: compute the needed forward nodes once, in `forward_order`; drop each
value after its last forward use unless it is kept (a checkpoint) or a result.
Backward phase: before each backward node, recompute the forward values it reads
that are not live, from the nearest live ancestors; intermediates that no backward
node reads are dropped as soon as the recomputation has used them. Then, in

* "hold" mode, a recomputed value the backward pass reads stays live until its last
  backward reader (Chen et al.: a segment is recomputed once, then held);
* "drop" mode, it is freed as soon as the node it was recomputed for has run
  (the minimal-memory extreme: every read recomputes from the checkpoints).

Kept values stay live until the last backward node whose recomputation could start
from them. With every forward value kept, hold mode gives store-all's schedule.
Graph inputs are never freed (the request message holds them anyway).

With `hoist`, the backward nodes of `hoistable` (those that read only forward values
and are smaller than what they read, such as ReLU's boolean mask, a quarter of its
float input) run in the forward phase as soon as their inputs exist, so the forward
value they read need not be kept or regrown for them: what a kept mask costs is a
quarter of the activation. (Checkmate's stages cannot express this: its backward
nodes come after the forward pass.)
"""

from __future__ import annotations

from .problem import Problem
from .schedule import Compute, Free, Schedule, Step
from .simulate import InvalidSchedule


def schedule_with_checkpoints(
    problem: Problem, kept: frozenset[str], policy: str, mode: str = "hold", hoist: bool = False
) -> Schedule:
    return _Builder(problem, kept, mode == "drop", hoistable(problem) if hoist else {}).build(
        policy
    )


def hoistable(problem: Problem) -> dict[str, int]:
    """Backward nodes worth computing in the forward phase, each with the forward position
    after which its inputs all exist (-1: before the first). A node qualifies when it
    reads only forward values, graph inputs and constants, owns its buffer, and that
    buffer is smaller than the largest forward value it reads (a ReLU mask); the
    constants such nodes read come along, before the forward phase. Memoised."""
    memo = problem.memo
    if "hoistable" not in memo:
        graph, model = problem.graph, problem.model
        position = {name: i for i, name in enumerate(problem.forward_order)}
        constants = {b for b in problem.backward if not graph[b].inputs}
        early: dict[str, int] = {}
        for b in problem.backward:
            sources = graph[b].inputs
            read = [s for s in sources if s in position]
            if (
                not read
                or model.owner[b] != b
                or any(
                    s not in position and s not in constants and not graph[s].is_input
                    for s in sources
                )
                or model.nbytes[b] >= max(model.nbytes[model.owner[s]] for s in read)
            ):
                continue
            early[b] = max(position[s] for s in read)
            early.update((s, -1) for s in sources if s in constants)
        memo["hoistable"] = early
    return memo["hoistable"]


def hoisted(problem: Problem, order) -> list[str]:
    """`order` (a topological order of nodes) with the `hoistable` nodes moved up: each
    right after the last of its inputs, the constants they read first."""
    graph, early = problem.graph, hoistable(problem)
    moved = [b for b in early if early[b] < 0]
    position = {name: i for i, name in enumerate(n for n in order if n not in early)}
    after: dict[str, list[str]] = {}
    for b, i in early.items():
        if i >= 0:
            last = max((s for s in graph[b].inputs if s in position), key=position.get)
            after.setdefault(last, []).append(b)
    for name in position:
        moved += [name, *after.get(name, ())]
    return moved


class _Builder:
    def __init__(self, problem: Problem, kept: frozenset[str], drop: bool, early: dict[str, int]):
        self.problem, self.kept, self.drop, self.early = problem, kept, drop, early
        self.graph = problem.graph
        self.steps: list[Step] = []
        self.live = {node.name for node in self.graph.inputs}
        # last_read: last backward position reading a value directly (forward or backward).
        # last_need: for kept values, last position whose recomputation may start there.
        # A hoisted node reads in the forward phase: its reads are not the backward's.
        self.last_read: dict[str, int] = {}
        for p, b in enumerate(problem.backward):
            if b not in early:
                for source in self.graph[b].inputs:
                    self.last_read[source] = p
        self.last_need = _last_need(problem, kept, self.last_read)

    def free(self, name: str) -> None:
        if name in self.live and name not in self.problem.results and not self.graph[name].is_input:
            self.live.discard(name)
            self.steps.append(Free(name))

    def compute(self, name: str) -> None:
        self.steps.append(Compute(name))
        self.live.add(name)

    def held_after(self, name: str, position: int) -> bool:
        """Must `name` stay live once backward position `position` has run?"""
        if name in self.kept:
            return self.last_need.get(name, -1) > position
        if self.drop and self.problem.is_forward(name):
            return False
        return self.last_read.get(name, -1) > position

    def build(self, policy: str) -> Schedule:
        order = self.problem.forward_order
        index = {name: i for i, name in enumerate(order)}
        last_forward_use = dict(index)
        for i, name in enumerate(order):
            for source in self.graph[name].inputs:
                if source in index:
                    last_forward_use[source] = i
        drop_after: dict[int, list[str]] = {}
        hoisted_after: dict[int, list[str]] = {}
        for b, i in self.early.items():  # in backward order: constants before their users
            hoisted_after.setdefault(i, []).append(b)
            for source in self.graph[b].inputs:
                if source in index:
                    last_forward_use[source] = max(last_forward_use[source], i)
        for name in order:  # only checkpoints survive the forward phase
            if not (name in self.kept and self.last_need.get(name, -1) >= 0):
                drop_after.setdefault(last_forward_use[name], []).append(name)
        for b in hoisted_after.get(-1, ()):
            self.compute(b)
        for i, name in enumerate(order):  # forward phase
            self.compute(name)
            for b in hoisted_after.get(i, ()):
                self.compute(b)
            for done in drop_after.get(i, ()):
                self.free(done)
        for b in self.early:  # a constant only hoisted nodes read is done with
            if b not in self.last_read:
                self.free(b)
        for p, b in enumerate(self.problem.backward):  # backward phase
            if b in self.early:
                continue
            recomputed = self.recompute(self.graph[b].inputs, p)
            self.compute(b)
            for name in (*self.graph[b].inputs, *recomputed):
                if not self.held_after(name, p):
                    self.free(name)
        return Schedule(tuple(self.steps), self.problem.results, policy)

    def recompute(self, wanted, position: int) -> list[str]:
        """Compute every non-live ancestor of `wanted` in topological order, dropping
        intermediates once this recomputation and the backward pass are done with them."""
        graph, missing = self.graph, set()
        stack = [w for w in wanted if w not in self.live]
        while stack:
            name = stack.pop()
            if name in missing or name in self.live:
                continue
            if not self.problem.is_forward(name):
                raise InvalidSchedule(f"'{name}' is needed again after it was freed")
            missing.add(name)
            stack.extend(i for i in graph[name].inputs if i not in self.live)
        order = sorted(missing, key=self.problem.position.__getitem__)
        last_local = {}
        for i, name in enumerate(order):
            for source in graph[name].inputs:
                last_local[source] = i
        wanted = set(wanted)
        for i, name in enumerate(order):
            self.compute(name)
            for source in graph[name].inputs:
                if (
                    source in missing
                    and last_local[source] == i
                    and source not in wanted
                    and not self.held_after(source, position - 1)
                ):
                    self.free(source)
        return order


def _last_need(problem: Problem, kept: frozenset[str], last_read: dict[str, int]) -> dict[str, int]:
    """For each kept value, the last backward position whose recomputation may start
    from it: a backward node needs the forward values it reads and, through values
    that are not kept, what recomputing them reads, up to kept values.

    One pass over the forward nodes, consumers first: a value is needed as late as its
    last backward reader, or as late as any non-kept forward node reading it is needed
    (linear in the graph; walking each backward node's ancestors was quadratic on
    chains with few checkpoints)."""
    graph, is_forward = problem.graph, problem.is_forward
    need = {name: last_read[name] for name in last_read if is_forward(name)}
    for name in reversed(graph.nodes):
        if name in kept or not is_forward(name):
            continue
        late = need.get(name, -1)
        if late < 0:
            continue
        for source in graph[name].inputs:
            if need.get(source, -1) < late and is_forward(source):
                need[source] = late
    return {name: p for name, p in need.items() if name in kept}
