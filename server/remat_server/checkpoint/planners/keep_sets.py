"""The building blocks of Budget's keep-set search: which forward values the backward
pass reads, what dropping one costs (its regrowth), a lower bound on what a keep set
recomputes before its schedule is built (`hold_floor`), and free copies kept as their
inputs (`swap_copies`).

    >>> # floor = hold_floor(problem, frozenset(kept), hoist=True)  # FLOPs, at least
"""

from __future__ import annotations

from ..problem import Problem
from ..recompute import hoistable


def hold_floor(problem: Problem, kept: frozenset[str], hoist: bool = False) -> float:
    """A lower bound on what keeping only `kept` recomputes (`schedule_with_checkpoints`
    in either mode, `hoist` as there): every value the backward reads that is not kept
    was freed in the forward phase, so it and its forward ancestors up to kept values
    are computed again at least once. (A hoisted node reads in the forward phase.)"""
    graph, stays = problem.graph, staying(problem)
    stack = [n for n in backward_reads(problem, hoist) if n not in kept]
    regrown: set[str] = set()
    while stack:
        name = stack.pop()
        if name in regrown or name in kept or name in stays:
            continue
        regrown.add(name)
        stack.extend(graph[name].inputs)
    return sum(problem.cost(n) for n in regrown)


def swap_copies(problem: Problem, kept: frozenset[str]) -> frozenset[str]:
    """`kept` with each kept copy that costs nothing to make again (a concatenation, a
    reshape that copies) replaced by its forward inputs, where those not kept already
    weigh less than it: the copy is then remade for its backward readers for free. On
    a U-Net the concatenation is kept as the upsampled half alone (the skip half is
    kept anyway), and the proven optimum at 80% of store_all needs exactly that."""
    model, graph = problem.model, problem.graph
    swapped = set(kept)
    for value in sorted(kept, key=problem.position.__getitem__):
        if problem.cost(value) != 0 or model.owner[value] != value:
            continue  # a view holds no bytes of its own
        sources = [s for s in dict.fromkeys(graph[value].inputs) if problem.is_forward(s)]
        if any(model.owner[s] != s for s in sources):
            continue  # keeping a view would pin its owner's whole buffer
        extra = sum(model.nbytes[s] for s in sources if s not in swapped)
        if extra < model.nbytes[value]:
            swapped.discard(value)
            swapped.update(sources)
    return frozenset(swapped)


def staying(problem: Problem) -> frozenset[str]:
    """What a hold-mode schedule never frees: inputs, results and constants."""
    memo = problem.memo
    if "staying" not in memo:
        graph = problem.graph
        memo["staying"] = frozenset(
            n.name
            for n in graph
            if n.is_input
            or n.op == "constant"
            or n.name in problem.results
            or not problem.is_forward(n.name)  # the backward's own: not regrown
        )
    return memo["staying"]


def backward_reads(problem: Problem, hoist: bool = False) -> frozenset[str]:
    """The forward values the backward pass reads (with `hoist`, leaving out the
    hoisted nodes, which read in the forward phase) that a hold-mode schedule frees
    when it does not keep them."""
    memo, key = problem.memo, ("backward_reads", hoist)
    if key not in memo:
        stays, early = staying(problem), hoistable(problem) if hoist else {}
        memo[key] = frozenset(
            s
            for b in problem.backward
            if b not in early
            for s in problem.graph[b].inputs
            if s not in stays
        )
    return memo[key]


# Walks that price a value's regrowth stop after this many nodes: a ranking needs an
# estimate, and a capped walk keeps pricing every value linear in the graph.
REGROWTH_WALK_MAX = 256


def regrowth(problem: Problem, name: str, read: set[str]) -> float:
    """What recomputing `name` costs when the values the backward pass reads are kept:
    its own cost plus that of its forward ancestors up to read ones (the region a keep
    set drops with it; a better price of dropping it than its own cost alone)."""
    total, stack, seen = 0.0, [name], set()
    while stack and len(seen) < REGROWTH_WALK_MAX:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        total += problem.cost(value)
        stack.extend(
            i for i in problem.graph[value].inputs if problem.is_forward(i) and i not in read
        )
    return total
