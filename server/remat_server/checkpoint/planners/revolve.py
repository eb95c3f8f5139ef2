"""Revolve: Griewank-Walther binomial checkpointing on the chain of segments.

Steps are the segments between boundaries; state i is boundary i's value (state 0 is
the graph inputs). With `slots` snapshots (the initial state counts as one) the
reversal of l steps advances t(l, c) = r*l - C(c+r, c+1) steps, r = min{r : C(c+r, c)
>= l}, plus one recorded evaluation per step: the optimum (Griewank & Walther 2000).

Reversing step i recomputes segment i from state i-1 (recording its values), runs the
backward nodes that belong to it, and frees what it recorded.
"""
from __future__ import annotations

from math import comb

from ...errors import InvalidArgument
from ..policies import Revolve
from ..problem import Problem
from ..schedule import Compute, Free, Schedule, Step


def binomial_advances(steps: int, slots: int) -> int:
    """t(l, c): forward step evaluations (not counting the l recorded ones)."""
    if steps <= 1:
        return 0
    r = _repetitions(steps, slots)
    return r * steps - comb(slots + r, slots + 1)


def _repetitions(steps: int, slots: int) -> int:
    r = 0
    while comb(slots + r, slots) < steps:
        r += 1
    return r


def _split(steps: int, slots: int) -> int:
    """An optimal first snapshot position m: t(l,c) = m + t(l-m, c-1) + t(m, c)."""
    r = _repetitions(steps, slots)
    beta = lambda c, q: comb(c + q, c) if q >= 0 else 0  # noqa: E731
    low = max(1, steps - beta(slots - 1, r), beta(slots, r - 2))
    return min(low, steps - 1)


def reversal_plan(steps: int, slots: int) -> list[tuple[str, int, int]]:
    """The binomial schedule as actions, iteratively (no recursion):
    ("advance", i, j) from state i to j without recording, ("snapshot", j, 0),
    ("reverse", i, 0) the recorded evaluation and backward of step i,
    ("release", j, 0) drop snapshot j."""
    actions: list[tuple[str, int, int]] = []
    stack: list[tuple] = [("reverse_range", 0, steps, slots)]
    while stack:
        task = stack.pop()
        if task[0] == "release":
            actions.append(("release", task[1], 0))
            continue
        _, start, end, c = task
        length = end - start
        if length == 1:
            actions.append(("reverse", end, 0))
        elif c == 1:
            for step in range(end, start, -1):
                if step - 1 > start:
                    actions.append(("advance", start, step - 1))
                actions.append(("reverse", step, 0))
                if step - 1 > start:
                    actions.append(("release", step - 1, 0))
        else:
            m = _split(length, c)
            actions.append(("advance", start, start + m))
            actions.append(("snapshot", start + m, 0))
            # Popped in reverse: right part first, then release, then the left part.
            stack.append(("reverse_range", start, start + m, c))
            stack.append(("release", start + m))
            stack.append(("reverse_range", start + m, end, c - 1))
    return actions


def plan_revolve(problem: Problem, policy: Revolve) -> Schedule:
    if policy.slots < 1:
        raise InvalidArgument(f"policy revolve: slots must be >= 1, got {policy.slots}")
    segments = _segments(problem)
    if len(segments) < 2:
        raise InvalidArgument("policy revolve: the forward graph has no chain structure "
                              "(no node separates it into segments); use another policy")
    return _Emitter(problem, segments).run(reversal_plan(len(segments), policy.slots),
                                           f"revolve({policy.slots})")


def _segments(problem: Problem) -> list[list[str]]:
    """Forward nodes split after each boundary; the last segment ends the order."""
    boundaries, segments, current = set(problem.boundaries), [], []
    for name in problem.forward_order:
        current.append(name)
        if name in boundaries:
            segments.append(current)
            current = []
    if current:
        segments[-1].extend(current) if segments else segments.append(current)
    return segments


class _Emitter:
    """Turns revolve actions into Compute/Free steps."""

    def __init__(self, problem: Problem, segments: list[list[str]]):
        self.problem, self.segments = problem, segments
        self.graph = problem.graph
        self.steps: list[Step] = []
        self.live = {n.name for n in self.graph.inputs}
        self.segment_of = {n: i + 1 for i, seg in enumerate(segments) for n in seg}
        self.state = {i + 1: seg[-1] for i, seg in enumerate(segments)}  # step -> its output
        self.backward_of = self._assign_backward()
        self.last_read = {}
        order = [b for i in range(len(segments), 0, -1) for b in self.backward_of.get(i, ())]
        for position, b in enumerate(order):
            for source in self.graph[b].inputs:
                self.last_read[source] = position
        self.position = 0

    def _assign_backward(self) -> dict[int, list[str]]:
        """Which reversal runs each backward node.

        A node that reads a segment's forward values runs in that segment's reversal
        (a state counts for the step after it: that reversal starts from it), and so
        does, as early as its inputs allow, every node downstream of such a node. A node
        that depends on no segment at all (say, the gradient of a weight penalty, a
        function of the inputs and the seed alone) runs as late as its consumers allow,
        so it is not held from the first reversal to the last.
        """
        top = len(self.segments)
        pinned: dict[str, int] = {}
        for b in self.problem.backward:
            for source in self.graph[b].inputs:
                if source in self.segment_of:
                    s = self.segment_of[source]
                    here = s + 1 if self.state[s] == source and s < top else s
                    pinned[b] = min(pinned.get(b, top), here)
        backward = set(self.problem.backward)
        earliest: dict[str, int] = {}
        anchored: set[str] = set()  # pinned, or downstream of a pinned node
        for b in self.problem.backward:  # topological: inputs first
            inputs = [i for i in self.graph[b].inputs if i in earliest]
            earliest[b] = min([pinned.get(b, top), *(earliest[i] for i in inputs)])
            if b in pinned or any(i in anchored for i in inputs):
                anchored.add(b)
        assigned: dict[str, int] = {}
        for b in reversed(self.problem.backward):  # consumers first
            if b in anchored:
                assigned[b] = pinned.get(b, earliest[b])
            else:
                consumers = [assigned[c] for c in self.graph.consumers(b) if c in backward]
                assigned[b] = min(earliest[b], max(consumers, default=earliest[b]))
        result: dict[int, list[str]] = {}
        for b in self.problem.backward:
            result.setdefault(assigned[b], []).append(b)
        return result

    def compute(self, name: str) -> None:
        if name not in self.live:
            self.steps.append(Compute(name))
            self.live.add(name)

    def free(self, name: str) -> None:  # inputs stay: the request message holds them
        if name in self.live and name not in self.problem.results \
                and not self.graph[name].is_input:
            self.steps.append(Free(name))
            self.live.discard(name)

    def advance(self, start: int, end: int) -> None:
        """Forward from state `start` to state `end`, keeping only state `end`."""
        for step in range(start + 1, end + 1):
            segment = self.segments[step - 1]
            for name in segment:
                self.compute(name)
                for source in self.graph[name].inputs:
                    if self.segment_of.get(source) == step and not self._read_later(source, segment, name):
                        self.free(source)
            if step > start + 1:
                self.free(self.state[step - 1])

    def _read_later(self, source: str, segment: list[str], current: str) -> bool:
        after = segment[segment.index(current) + 1:]
        return any(source in self.graph[n].inputs for n in after) or source == segment[-1]

    def reverse(self, step: int) -> None:
        """The recorded evaluation of a step, then its backward nodes. Only values the
        backward reads are recorded; the rest go as soon as the segment is done with them."""
        segment = self.segments[step - 1]
        read = {s for b in self.backward_of.get(step, ()) for s in self.graph[b].inputs}
        for name in segment:
            self.compute(name)
            for source in self.graph[name].inputs:
                if self.segment_of.get(source) == step and source not in read \
                        and not self._read_later(source, segment, name):
                    self.free(source)
        for b in self.backward_of.get(step, ()):
            self.compute(b)
            for source in self.graph[b].inputs:
                if not self.problem.is_forward(source) and self.last_read.get(source) == self.position:
                    self.free(source)
            self.position += 1
        for name in self.segments[step - 1]:
            self.free(name)

    def run(self, actions, policy: str) -> Schedule:
        for action, i, j in actions:
            if action == "advance":
                self.advance(i, j)
            elif action == "reverse":
                self.reverse(i)
            elif action == "release":
                self.free(self.state[i])
        # Values only the graph outputs need (none in a pure chain) are computed last.
        for name in self.problem.forward_order:
            if name in self.problem.results:
                self.compute(name)
        return Schedule(tuple(self.steps), self.problem.results, policy)
