"""A 0/1 integer program built row by row and solved with HiGHS (through scipy), for
the lower bounds (`moment_bound`, `moment_chain`). What they take from a solve is
HiGHS's proven dual bound, which holds whether or not the solve finished in time.

    >>> program = ZeroOneProgram(2)
    >>> program.cost[:] = (3.0, 5.0)
    >>> program.row({0: 1, 1: 1}, 1)  # at least one of the two
    >>> program.dual_bound(seconds=5.0)  # integer costs: rounded up to the next integer
    3.0
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

# HiGHS's tolerances must not turn a bound into a claim above it.
TOLERANCE = 1e-6


def at_bound(cost: float, bound: float) -> bool:
    """Whether a schedule recomputing `cost` is at a proven `bound` (optimal): the bound
    is HiGHS's, lowered by TOLERANCE against its own, so a schedule at the true optimum
    may be that much over it. Never where no schedule fits (an infinite bound)."""
    return not math.isinf(bound) and cost * (1 - TOLERANCE) <= bound * (1 + 1e-9)


class Solved(NamedTuple):
    """A solve's proven lower bound (see `ZeroOneProgram.dual_bound`) and the best
    0/1 vector found (None: none in time)."""

    bound: float
    x: np.ndarray | None


class ZeroOneProgram:
    """Minimise `cost @ x` over 0/1 vectors `x` within `low` and `high` (the variables'
    own bounds, 0 or 1) and the rows added."""

    def __init__(self, variables: int):
        self.low = np.zeros(variables)
        self.high = np.ones(variables)
        self.cost = np.zeros(variables)
        self._rows: list[dict[int, float]] = []
        self._floors: list[float] = []
        self._ceilings: list[float] = []

    def row(self, coefs: dict[int, float], floor: float, ceiling: float = math.inf) -> None:
        """floor <= sum(coef * x[variable]) <= ceiling."""
        self._rows.append(coefs)
        self._floors.append(floor)
        self._ceilings.append(ceiling)

    def dual_bound(self, seconds: float, constant: float = 0.0) -> float:
        """A proven lower bound on the least `cost @ x + constant`: the optimum when the
        solve finishes in `seconds`, HiGHS's dual bound when it stops; math.inf when no
        `x` satisfies the rows, 0.0 when the solver gives no answer (nothing claimed).
        With a `constant`, the solve runs to a tight relative gap: HiGHS's default gap
        applies to the objective without it, which may be far larger than the bound."""
        return self.solve(seconds, constant).bound

    def solve(self, seconds: float, constant: float = 0.0) -> Solved:
        """`dual_bound`'s bound, and the best 0/1 vector HiGHS found by then (None: none)."""
        coords = [(k, j, c) for k, coefs in enumerate(self._rows) for j, c in coefs.items()]
        matrix = coo_matrix(
            ([c for *_, c in coords], ([k for k, *_ in coords], [j for _, j, _ in coords])),
            shape=(len(self._rows), len(self.cost)),
        ).tocsr()
        options: dict = {"time_limit": max(seconds, 0.01)}
        if constant:
            options["mip_rel_gap"] = 1e-9
        result = milp(
            self.cost,
            constraints=LinearConstraint(matrix, self._floors, self._ceilings),
            bounds=Bounds(self.low, self.high),
            integrality=np.ones(len(self.cost)),
            options=options,
        )
        if result.status == 2:  # infeasible
            return Solved(math.inf, None)
        found = None if result.x is None else np.round(result.x).astype(bool)
        # Optimal (to HiGHS's gap) or stopped: its dual bound is proven either way.
        proven = getattr(result, "mip_dual_bound", None)
        if result.status not in (0, 1) or proven is None or not math.isfinite(proven):
            return Solved(0.0, found)
        # The margin is relative to the bound itself (not to the objective with the
        # constant: a chain's counts every computation, ten times its recomputation).
        bound = max(0.0, (float(proven) + constant) * (1 - TOLERANCE))
        if float(constant).is_integer() and np.array_equal(self.cost, np.round(self.cost)):
            bound = float(math.ceil(bound))  # integer costs (FLOPs): so is the optimum
        return Solved(bound, found)
