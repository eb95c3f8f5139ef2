"""A known schedule as the MILP's first incumbent (a warm start for HiGHS).

Checkmate's stages (`milp`) describe a schedule by R[t,i] (node i computed in stage t)
and S[t,i] (value i live entering stage t), in a fixed topological order. For a start,
that order is the schedule's own order of first computations (`milp_order`), with the
hoistable nodes (ReLU masks, `recompute.hoistable`) moved right after their inputs as
in `milp_order.default`. Then stage t is everything computed from the end of stage t-1
through node t's first computation, and S[t] is what is live when stage t starts. A
mask the schedule computes later is also computed, and dropped, at its own stage (its
input is live there: it was just computed); its real computation is a recomputation.

Only R and S are given: HiGHS completes the rest (the FREE and U columns follow from
them) and keeps the solution as its incumbent if it satisfies every row, else ignores
it. The MILP frees a value after its last user in a stage, computes a stage in order,
and charges a view's bytes to its owner, so a schedule computed in another order
within a stage may not satisfy its rows; then there is no start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..schedule import Free, Schedule

if TYPE_CHECKING:  # milp imports this module
    from .milp import _Milp


def columns(model: _Milp, schedule: Schedule) -> tuple[np.ndarray, np.ndarray] | None:
    """(column indices, values) of `schedule`'s R and S, or None when it is not in
    stage form."""
    found = stages(model, schedule)
    if found is None:
        return None
    R, S = found
    n = len(model.order)
    t, i = np.tril_indices(n)
    st, si = np.tril_indices(n, -1)  # S[t,i], i < t < n: S[0] is empty, S[n] is fixed
    st = st + 1
    keep = st < n
    st, si = st[keep], si[keep]
    index = np.concatenate([model.R(t, i), model.S(st, si)]).astype(np.int32)
    value = np.concatenate([R[t, i], S[st, si]]).astype(float)
    return index, value


def stages(model: _Milp, schedule: Schedule) -> tuple[np.ndarray, np.ndarray] | None:
    """R (n x n) and S ((n + 1) x n) as booleans, or None."""
    order = model.order
    n = len(order)
    index = {name: i for i, name in enumerate(order)}
    R = np.zeros((n, n), dtype=bool)
    S = np.zeros((n + 1, n), dtype=bool)
    read = np.zeros((n + 1, n), dtype=bool)  # read[t,i]: some node of stage t uses i
    live: set[int] = set()
    kept = set(model.free.tolist())
    firsts, entering = 0, True  # node `firsts` is the next first computation

    def compute(i: int) -> None:
        nonlocal firsts, entering
        if entering:
            S[firsts, sorted(live)] = True
            entering = False
        R[firsts, i] = True
        read[firsts, model.uses[i]] = True
        if i == firsts:
            firsts += 1
            entering = True

    for step in schedule.steps:
        i = index.get(step.node)
        if i is None:  # a graph input: always live, not in the model
            continue
        if isinstance(step, Free):
            live.discard(i)
            continue
        while i > firsts:  # a hoisted node the schedule computes later: here too, once
            if order[firsts] not in model.hoisted or any(
                j >= firsts or j not in live for j in model.uses[firsts]
            ):
                return None
            if firsts in kept:  # bytes-free (a constant): the model keeps it anyway
                live.add(firsts)
            compute(firsts)  # else dropped at once
        if firsts == n:  # computed after the last stage ended: not in stage form
            return None
        compute(i)
        live.add(i)
    if firsts != n:
        return None
    # The MILP drops a value only after a user in the stage: one live entering a stage
    # that does not read it (the schedule evicted it there) is dropped a stage earlier,
    # after its last user then, unless a later stage reads it first.
    S[n] = model.lb[model.S(n, np.arange(n))] > 0.5  # the end state: fixed, the results
    for t in range(n - 1, 0, -1):
        S[t] &= read[t] | S[t + 1]
    # The model's conventions: a view's owner is live while it is (its buffer is), and
    # values with no bytes of their own are kept from their first computation on.
    for view in model.views.tolist():  # (one at a time: owners repeat)
        S[:, model.owner[view]] |= S[:, view]
    for i in model.free.tolist():
        S[i + 1 :, i] = True
        R[i + 1 :, i] = False
    return R, S
