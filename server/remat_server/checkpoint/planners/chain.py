"""The chain of segments and the emitter that reverses it, shared by revolve and the
budget planner's dynamic program.

Steps are the segments between boundaries; state i is step i's last value (state 0 is
the graph inputs). A reversal is a list of actions over steps:

* ("advance", i, j): forward from state i to state j, keeping only state j;
* ("snapshot", j, 0): state j stays live (it already is after an advance);
* ("record", i, 0): evaluate step i keeping what its backward nodes read;
* ("backward", i, 0): run step i's backward nodes, then drop step i's values;
* ("reverse", i, 0): record then backward;
* ("release", j, 0): drop snapshot j.

Backward steps always run from the last step down to the first.
"""

from __future__ import annotations

from ..problem import Problem
from ..schedule import Compute, Free, PlannerReport, Schedule, Step


def segments(problem: Problem, cuts: frozenset[str] | None = None) -> list[list[str]]:
    """Forward nodes split after each boundary (or after each of `cuts`, a subset of
    the boundaries); the last segment ends the order."""
    boundaries = set(problem.boundaries) if cuts is None else set(cuts)
    result, current = [], []
    for name in problem.forward_order:
        current.append(name)
        if name in boundaries:
            result.append(current)
            current = []
    if current:
        result[-1].extend(current) if result else result.append(current)
    return result


class ChainEmitter:
    """Turns reversal actions into Compute/Free steps."""

    def __init__(self, problem: Problem, segments: list[list[str]]):
        self.problem, self.segments = problem, segments
        self.graph = problem.graph
        self.steps: list[Step] = []
        self.live = {n.name for n in self.graph.inputs}
        self.segment_of = {n: i + 1 for i, seg in enumerate(segments) for n in seg}
        self.state = {i + 1: seg[-1] for i, seg in enumerate(segments)}  # step -> its output
        # The same for every schedule over these segments (Budget emits several levels
        # of the DP's): worked out once per problem and chain.
        key = ("chain_backward", tuple(seg[-1] for seg in segments))
        if key not in problem.memo:
            problem.memo[key] = self._assign_backward()
        self.backward_of = problem.memo[key]
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
                # A constant pins nothing: it is free to hold or recompute anywhere.
                if source in self.segment_of and self.graph[source].op != "constant":
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

    def free(self, name: str) -> None:
        # Inputs stay (the request message holds them), and so do constants: they own
        # no bytes, and backward nodes outside their step may still read them.
        if (
            name in self.live
            and name not in self.problem.results
            and not self.graph[name].is_input
            and self.graph[name].op != "constant"
        ):
            self.steps.append(Free(name))
            self.live.discard(name)

    def advance(self, start: int, end: int) -> None:
        """Forward from state `start` to state `end`, keeping only state `end`."""
        for step in range(start + 1, end + 1):
            segment = self.segments[step - 1]
            last = self._last_reader(step)
            for name in segment:
                self.compute(name)
                for source in self.graph[name].inputs:
                    if last.get(source) == name:  # the state stays: it has no entry
                        self.free(source)
            if step > start + 1:
                self.free(self.state[step - 1])

    def _last_reader(self, step: int) -> dict[str, str]:
        """The values of a step other than its state -> the last of its nodes that
        reads each (worked out once per problem and step)."""
        key = ("chain_last_reader", tuple(self.segments[step - 1]))
        memo = self.problem.memo
        if key not in memo:
            segment = self.segments[step - 1]
            members = set(segment)
            last = {s: n for n in segment for s in self.graph[n].inputs if s in members}
            last.pop(segment[-1], None)
            memo[key] = last
        return memo[key]

    def reverse(self, step: int) -> None:
        """Record a step and run its backward nodes at once. Its state is recorded only
        when they read it: no later action starts from it (every step after it is
        reversed already), and recording it anyway would recompute it for nothing
        (a tanh chain's state, read by the next step's backward, not this one's)."""
        self.record(step, with_state=False)
        self.backward(step)

    def record(self, step: int, with_state: bool = True) -> None:
        """The recorded evaluation of a step: what its backward nodes read (and, unless
        `with_state` is False, its state: a later advance may start from it),
        computing only what is not live already (a snapshot of the state may be);
        intermediates go as soon as the recording is done with them."""
        for name in self.recording(step, self.live, with_state):
            self.compute(name)
            for source in self.graph[name].inputs:
                if self._last_local.get(source) == name:
                    self.free(source)

    def recorded(self, step: int, with_state: bool = True) -> set[str]:
        """What a step's backward nodes read from it, plus (`with_state`) its state, or
        else its results."""
        segment = self.segments[step - 1]
        members = set(segment)
        read = {
            s for b in self.backward_of.get(step, ()) for s in self.graph[b].inputs if s in members
        }
        if with_state:
            return read | {segment[-1]}
        # A result (the loss) is made while its step is at hand, not regrown at the end.
        return read | (members & self.problem.results)

    def recording(self, step: int, live, with_state: bool = True) -> list[str]:
        """The nodes `record(step)` computes given `live` values, in order; sets
        `_last_local` (intermediate -> the node after which it can go)."""
        graph, segment = self.graph, self.segments[step - 1]
        members, keep = set(segment), self.recorded(step, with_state)
        required, stack = set(), [n for n in keep if n not in live]
        while stack:
            name = stack.pop()
            if name not in required and name not in live:
                required.add(name)
                stack.extend(i for i in graph[name].inputs if i in members and i not in live)
        order = [n for n in segment if n in required]
        self._last_local = {}
        for name in order:
            for source in graph[name].inputs:
                if source in required and source not in keep:
                    self._last_local[source] = name
        return order

    def backward(self, step: int) -> None:
        """Step `step`'s backward nodes; each of the step's forward values goes right
        after the last of them that reads it (tanh's backward needs t only until it has
        t*t), and the rest of the step's values at the end."""
        mine = self.backward_of.get(step, ())
        members = set(self.segments[step - 1])
        last_reader = {
            source: b for b in mine for source in self.graph[b].inputs if source in members
        }
        for b in mine:
            for source in self.graph[b].inputs:  # a constant pins no step: made on demand
                if self.graph[source].op == "constant":
                    self.compute(source)
            self.compute(b)
            for source in self.graph[b].inputs:
                if (
                    not self.problem.is_forward(source)
                    and self.last_read.get(source) == self.position
                ):
                    self.free(source)
                elif last_reader.get(source) == b:
                    self.free(source)
            self.position += 1
        for name in self.segments[step - 1]:
            self.free(name)

    def run(self, actions, policy: str, report: PlannerReport | None = None) -> Schedule:
        for action, i, j in actions:
            if action == "advance":
                self.advance(i, j)
            elif action == "reverse":
                self.reverse(i)
            elif action == "record":
                self.record(i)
            elif action == "backward":
                self.backward(i)
            elif action == "release":
                self.free(self.state[i])
        self._compute_results()
        return Schedule(tuple(self.steps), self.problem.results, policy, report)

    def _compute_results(self) -> None:
        """Forward results not live by now (values only the graph outputs need, none in
        a pure chain) are computed last, recomputing whatever forward values they read
        that the reversal has dropped; those go again after their last use here."""
        results = self.problem.results
        needed, stack = (
            set(),
            [n for n in self.problem.forward_order if n in results and n not in self.live],
        )
        while stack:
            name = stack.pop()
            if name not in needed and name not in self.live:
                needed.add(name)
                stack.extend(self.graph[name].inputs)
        order = [n for n in self.problem.forward_order if n in needed]
        last_use = {source: name for name in order for source in self.graph[name].inputs}
        for name in order:
            self.compute(name)
            for source in self.graph[name].inputs:
                if source in needed and last_use[source] == name and source not in results:
                    self.free(source)
