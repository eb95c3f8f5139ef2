"""Reductions over an axis, a tuple of axes, or all axes (axes absent), with keepdims."""

from __future__ import annotations

import math

import numpy as np

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .registry import Attr, register

AXES_ATTRS = {
    "axes": Attr("ints", default=None, doc="Axes to reduce; absent means all."),
    "keepdims": Attr("bool", default=False),
}


def _normalize(x: TensorType, axes, keepdims) -> dict:
    return {"axes": rules.normalize_axes(axes, len(x.shape)), "keepdims": keepdims}


def _reduced_shape(shape, axes, keepdims) -> tuple[int, ...]:
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _infer(allowed: frozenset[str], nonempty: bool = False):
    def infer(x: TensorType, axes, keepdims) -> TensorType:
        rules.require_dtype(x, allowed)
        if nonempty and any(x.shape[a] == 0 for a in axes):
            raise ShapeError(f"cannot reduce over an empty axis of shape {x.shape}")
        return TensorType(_reduced_shape(x.shape, axes, keepdims), x.dtype)

    return infer


def _cost(out, x, axes, keepdims) -> int:
    return x.size


def _expand(e, g, x, axes):
    """Reshape a reduced gradient so it broadcasts against `x` (keepdims layout)."""
    return e.reshape(g, shape=_reduced_shape(x.shape, axes, True))


def _sum_vjp(e, g, out, x, axes, keepdims):
    return [e.broadcast_to(_expand(e, g, x, axes), shape=x.shape)]


def _mean_vjp(e, g, out, x, axes, keepdims):
    count = math.prod(x.shape[a] for a in axes)
    return [e.broadcast_to(_expand(e, g, x, axes) / float(max(count, 1)), shape=x.shape)]


def _max_vjp(e, g, out, x, axes, keepdims):
    # Ties share the gradient equally, as torch.amax does.
    mask = e.cast(e.eq(x, _expand(e, out, x, axes)), dtype=x.dtype)
    count = e.sum(mask, axes=axes, keepdims=True)
    return [mask * (_expand(e, g, x, axes) / count)]


def _mean(x, axes, keepdims):
    """np.mean, except that a mean over nothing is NaN without NumPy's "Mean of empty
    slice" warning in the server log (the warnings module is process-global)."""
    reduced = axes if axes is not None else range(x.ndim)
    if any(x.shape[a] == 0 for a in reduced):
        total = np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / x.dtype.type(0)
    return np.mean(x, axis=axes, keepdims=keepdims, dtype=x.dtype)


register(
    "sum",
    family="reduce",
    infer=_infer(rules.NUMERIC),
    normalize=_normalize,
    forward=lambda x, axes, keepdims: np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype),
    vjp=_sum_vjp,
    residuals="none",
    cost=_cost,
    attrs=AXES_ATTRS,
)
register(
    "mean",
    family="reduce",
    infer=_infer(dtypes.FLOATS),
    normalize=_normalize,
    forward=_mean,
    vjp=_mean_vjp,
    residuals="none",
    cost=_cost,
    attrs=AXES_ATTRS,
)
register(
    "max",
    family="reduce",
    infer=_infer(rules.NUMERIC, nonempty=True),
    normalize=_normalize,
    forward=lambda x, axes, keepdims: np.max(x, axis=axes, keepdims=keepdims),
    vjp=_max_vjp,
    residuals="inputs+output",
    cost=_cost,
    attrs=AXES_ATTRS,
    doc="Maximum; tied maxima share the gradient equally (like torch.amax).",
)
