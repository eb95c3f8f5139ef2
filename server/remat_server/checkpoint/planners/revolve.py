"""Revolve: Griewank-Walther binomial checkpointing on the chain of segments.

Steps are the segments between boundaries; state i is boundary i's value (state 0 is
the graph inputs). With `slots` snapshots (the initial state counts as one) the
reversal of l steps advances t(l, c) = r*l - C(c+r, c+1) steps, r = min{r : C(c+r, c)
>= l}, plus one recorded evaluation per step: the optimum (Griewank & Walther 2000).

Reversing step i recomputes segment i from state i-1 (recording its values), runs the
backward nodes that belong to it, and frees what it recorded (`chain.ChainEmitter`).
"""

from __future__ import annotations

from math import comb

from remat_proto.policies import Revolve

from ...errors import InvalidArgument
from ..problem import Problem
from ..schedule import Schedule
from .chain import ChainEmitter
from .chain import segments as chain_segments


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
    segments = chain_segments(problem)
    if len(segments) < 2:
        raise InvalidArgument(
            "policy revolve: the forward graph has no chain structure "
            "(no node separates it into segments); use another policy"
        )
    return ChainEmitter(problem, segments).run(
        reversal_plan(len(segments), policy.slots), f"revolve({policy.slots})"
    )
