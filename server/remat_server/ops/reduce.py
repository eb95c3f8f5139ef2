"""Reductions over an axis, a tuple of axes, or all axes (axes absent), with keepdims."""

from __future__ import annotations

import math

import numpy as np

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .elementwise import BUFFER
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


def _extremum_vjp(e, g, out, x, axes, keepdims):
    # max and min: ties share the gradient equally, as torch.amax and torch.amin do.
    mask = e.cast(e.eq(x, _expand(e, out, x, axes)), dtype=x.dtype)
    count = e.sum(mask, axes=axes, keepdims=True)
    return [mask * (_expand(e, g, x, axes) / count)]


def mean_buffers(out: TensorType) -> int:
    """np.mean divides the sum by an np.intp count, which NEP 50 promotes to float64:
    below float64, the division casts its input and its output through two buffers."""
    if out.dtype == "float64" or not out.shape:
        return 0
    return 2 * 8 * min(out.size, BUFFER)


def _mean_scratch(out, x, axes, keepdims) -> int:
    return mean_buffers(out)


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
    scratch=_mean_scratch,
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
    vjp=_extremum_vjp,
    residuals="inputs+output",
    cost=_cost,
    attrs=AXES_ATTRS,
    doc="Maximum; tied maxima share the gradient equally (like torch.amax).",
)
register(
    "min",
    family="reduce",
    infer=_infer(rules.NUMERIC, nonempty=True),
    normalize=_normalize,
    forward=lambda x, axes, keepdims: np.min(x, axis=axes, keepdims=keepdims),
    vjp=_extremum_vjp,
    residuals="inputs+output",
    cost=_cost,
    attrs=AXES_ATTRS,
    doc="Minimum; tied minima share the gradient equally (like torch.amin).",
)


# --- argmax, argmin: int64 indices, no gradient ---------------------------------------
# Ties give the first index, and a NaN counts as the extreme for both (the first NaN
# wins): torch.argmax/argmin and np.argmax/argmin agree on both rules.
ARG_ATTRS = {
    "axis": Attr("int", doc="The axis searched; it is removed unless keepdims."),
    "keepdims": Attr("bool", default=False),
}


def _arg_normalize(x: TensorType, axis, keepdims) -> dict:
    # A 0-d tensor takes axis 0 or -1, as in torch (its only index is 0).
    return {"axis": rules.normalize_axis(axis, max(len(x.shape), 1)), "keepdims": keepdims}


def _arg_infer(x: TensorType, axis, keepdims) -> TensorType:
    rules.require_dtype(x, rules.NUMERIC)
    if not x.shape:
        return TensorType((), "int64")
    if x.shape[axis] == 0:
        raise ShapeError(f"cannot search an empty axis {axis} of shape {x.shape}")
    return TensorType(_reduced_shape(x.shape, (axis,), keepdims), "int64")


def _arg_scratch(out, x, axis, keepdims) -> int:
    # np.argmax/argmin search the last axis of a C-contiguous array: another axis is
    # moved last and the input copied, unless that leaves it contiguous.
    if not x.shape or x.shape[axis] == 1 or math.prod(x.shape[axis + 1 :]) == 1:
        return 0
    return x.nbytes


def _arg(search):
    def forward(x, axis, keepdims):
        if x.ndim == 0:
            return np.zeros((), np.int64)
        return search(x, axis=axis, keepdims=keepdims).astype(np.int64, copy=False)

    return forward


for _name, _search, _extreme in (
    ("argmax", np.argmax, "maximum"),
    ("argmin", np.argmin, "minimum"),
):
    register(
        _name,
        family="reduce",
        infer=_arg_infer,
        normalize=_arg_normalize,
        forward=_arg(_search),
        scratch=_arg_scratch,
        vjp=None,
        residuals="none",
        cost=lambda out, x, axis, keepdims: x.size,
        attrs=ARG_ATTRS,
        doc=f"Index (int64) of the {_extreme} along `axis`; ties give the first index.",
    )
