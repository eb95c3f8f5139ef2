"""Shape and dtype rules shared by many ops."""

from __future__ import annotations

import numpy as np

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType

NUMERIC = dtypes.FLOATS | dtypes.INTS


def require_dtype(t: TensorType, allowed: frozenset[str], what: str = "input") -> None:
    if t.dtype not in allowed:
        raise ShapeError(
            f"{what} has dtype {t.dtype}; expected one of {', '.join(sorted(allowed))}"
        )


def same_dtype(*types: TensorType) -> str:
    kinds = {t.dtype for t in types}
    if len(kinds) > 1:
        raise ShapeError(
            "dtype mismatch: " + " vs ".join(t.dtype for t in types) + " (insert a cast)"
        )
    return types[0].dtype


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    if all(s == shapes[0] for s in shapes[1:]):  # the common case, without NumPy's overhead
        return tuple(shapes[0])
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ShapeError(
            "shapes " + ", ".join(str(tuple(s)) for s in shapes) + " cannot be broadcast together"
        ) from None


def unary(allowed: frozenset[str]):
    """Rule for a one-input op that keeps shape and dtype."""

    def infer(x: TensorType, **attrs) -> TensorType:
        require_dtype(x, allowed)
        return x

    return infer


def binary(allowed: frozenset[str], out_dtype: str | None = None):
    """Rule for a broadcasting two-input op with matching dtypes."""

    def infer(a: TensorType, b: TensorType, **attrs) -> TensorType:
        if a == b and a.dtype in allowed:  # the common case, answered without the checks
            return (
                a if out_dtype is None or out_dtype == a.dtype else TensorType(a.shape, out_dtype)
            )
        dtype = same_dtype(a, b)
        require_dtype(a, allowed)
        return TensorType(broadcast_shapes(a.shape, b.shape), out_dtype or dtype)

    return infer


def normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ShapeError(f"axis {axis} is out of range for rank {ndim}")
    return axis % ndim


def normalize_axes(axes, ndim: int) -> tuple[int, ...]:
    """None -> all axes; negatives wrapped; sorted; duplicates rejected."""
    if axes is None:
        return tuple(range(ndim))
    result = sorted(normalize_axis(a, ndim) for a in axes)
    if len(set(result)) != len(result):
        raise ShapeError(f"axes {tuple(axes)} repeat an axis")
    return tuple(result)


def positive(value) -> bool:
    return value > 0


def all_positive(values) -> bool:
    return all(v > 0 for v in values)


def non_negative(values) -> bool:
    return all(v >= 0 for v in values)
