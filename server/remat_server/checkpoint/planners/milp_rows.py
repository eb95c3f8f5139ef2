"""Building the MILP's sparse constraint rows block by block, from NumPy index arrays
(`milp._Milp` writes its whole model with these, no Python loop per row).

    >>> group, value = ranges(np.array([0, 5]), np.array([2, 7]))
    >>> group.tolist(), value.tolist()
    ([0, 0, 1, 1], [0, 1, 5, 6])
"""

from __future__ import annotations

import numpy as np
from scipy import sparse


def ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each group g, the integers lo[g] <= v < hi[g]: (group index, v) arrays."""
    counts = np.maximum(hi - lo, 0)
    group = np.repeat(np.arange(len(lo)), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return group, np.repeat(lo, counts) + np.arange(counts.sum()) - starts


def pairs(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    a = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return a[:, 0], a[:, 1]


class Rows:
    """Constraint rows as COO triplets, appended block by block."""

    def __init__(self):
        self.rows, self.cols, self.coefs, self.lower, self.upper = [], [], [], [], []
        self.count = 0

    def add(self, count: int, terms, lower: float, upper: float) -> None:
        """`count` rows lower <= sum coef * x[col] <= upper; terms are (row, col, coef)
        arrays, row None meaning one row per element."""
        for row, col, coef in terms:
            self.rows.append((np.arange(count) if row is None else row) + self.count)
            self.cols.append(col)
            self.coefs.append(np.broadcast_to(np.asarray(coef, dtype=float), col.shape))
        self.lower.append(np.full(count, lower, dtype=float))
        self.upper.append(np.full(count, upper, dtype=float))
        self.count += count

    def build(self, variables: int) -> tuple[sparse.csr_array, np.ndarray, np.ndarray]:
        """The matrix (rows compressed, duplicates summed) and the row bounds."""
        A = sparse.coo_array(
            (np.concatenate(self.coefs), (np.concatenate(self.rows), np.concatenate(self.cols))),
            shape=(self.count, variables),
        ).tocsr()
        A.sum_duplicates()
        A.eliminate_zeros()  # bytes-free nodes' coefficients: HiGHS would drop them
        return A, np.concatenate(self.lower), np.concatenate(self.upper)
