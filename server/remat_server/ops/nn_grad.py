"""Native gradient ops of softmax, log_softmax and cross_entropy (emitted by their VJPs).

The composite VJPs emitted three or four graph values of the input's size each
(softmax: g * y, g - sum, the product; cross_entropy: softmax, one_hot, the
difference, the scaled one), and the planner accounts every graph value. Each op here
computes the same gradient in its result buffer with no temporary of that size. Their
own VJPs are composite graph ops: they serve second order only.

    softmax_grad(y, g)        = y * (g - sum(g * y))          y = softmax(x)
    log_softmax_grad(y, g)    = g - exp(y) * sum(g)           y = log_softmax(x)
    cross_entropy_grad(z, labels, g) = (softmax(z) - one_hot(labels)) * g / count
"""

from __future__ import annotations

import math

import numpy as np

from remat_proto import dtypes

from ..errors import ShapeError
from . import rules
from .nn import _check_labels, _cross_entropy_infer, _picked_scratch, _shifted, row_scratch
from .registry import Attr, elementwise_cost, register

FLOAT = dtypes.FLOATS


def _pair_infer(y, g, axis):
    rules.require_dtype(y, FLOAT, "y")
    rules.same_dtype(y, g)
    if g.shape != y.shape:
        raise ShapeError(f"g {g.shape} must have y's shape {y.shape}")
    return y


def _axis_normalize(y, g, axis) -> dict:
    return {"axis": rules.normalize_axis(axis, len(y.shape))}


def _softmax_grad(y, g, axis):
    out = np.multiply(g, y)
    total = np.sum(out, axis=axis, keepdims=True)
    np.subtract(g, total, out=out)
    out *= y
    return out


def _log_softmax_grad(y, g, axis):
    out = np.exp(y)
    out *= np.sum(g, axis=axis, keepdims=True)
    return np.subtract(g, out, out=out)


def _softmax_grad_vjp(e, c, out, y, g, axis):
    def total(v):
        return e.sum(v, axes=(axis,), keepdims=True)

    # out_i = y_i g_i - y_i sum(g y): linear and self-adjoint in g.
    dy = c * (g - total(g * y)) - g * total(c * y)
    return [dy, e.softmax_grad(y, c, axis=axis)]


def _log_softmax_grad_vjp(e, c, out, y, g, axis):
    p = e.exp(y)
    # out_i = g_i - p_i sum(g): its transpose in g is c - sum(c p).
    dg = c - e.sum(c * p, axes=(axis,), keepdims=True)
    return [-(c * p) * e.sum(g, axes=(axis,), keepdims=True), dg]


AXIS = {"axis": Attr("int", default=-1, doc="The axis the forward normalized over.")}
register(
    "softmax_grad",
    family="nn",
    inputs=2,
    infer=_pair_infer,
    normalize=_axis_normalize,
    forward=_softmax_grad,
    scratch=lambda out, y, g, axis: row_scratch(y, axis, 1),
    vjp=_softmax_grad_vjp,
    residuals="inputs",
    cost=elementwise_cost(4),
    attrs=AXIS,
    doc="softmax's VJP: y * (g - sum(g * y, axis)) for y = softmax(x) and the cotangent g.",
)
register(
    "log_softmax_grad",
    family="nn",
    inputs=2,
    infer=_pair_infer,
    normalize=_axis_normalize,
    forward=_log_softmax_grad,
    scratch=lambda out, y, g, axis: row_scratch(y, axis, 1),
    vjp=_log_softmax_grad_vjp,
    residuals="inputs",
    cost=elementwise_cost(12),
    attrs=AXIS,
    doc="log_softmax's VJP: g - exp(y) * sum(g, axis) for y = log_softmax(x), cotangent g.",
)


# --- cross_entropy_grad ----------------------------------------------------------------
def _count(labels) -> int:
    return max(math.prod(labels.shape), 1)


def _cross_entropy_grad_infer(logits, labels, g):
    _cross_entropy_infer(logits, labels)
    rules.same_dtype(logits, g)
    if g.shape != ():
        raise ShapeError(f"g {g.shape} must be a scalar (the cotangent of the mean loss)")
    return logits


def _cross_entropy_grad(logits, labels, g):
    _check_labels(labels, logits.shape[-1])
    out = _shifted(logits, -1)  # the softmax, in place in the result
    np.exp(out, out=out)
    out /= np.sum(out, axis=-1, keepdims=True)
    picked = labels[..., None]
    at_labels = np.take_along_axis(out, picked, axis=-1)
    at_labels -= 1
    np.put_along_axis(out, picked, at_labels, axis=-1)
    out *= g / float(_count(labels))
    return out


def _cross_entropy_grad_scratch(out, logits, labels, g) -> int:
    # The row max (then the row sum) and their buffers; or the values at the labels
    # while they are gathered and put back.
    last = len(logits.shape) - 1
    one = logits.nbytes // max(logits.shape[-1], 1)
    return max(row_scratch(logits, last, 1), one + _picked_scratch(logits, labels))


def _cross_entropy_grad_vjp(e, c, out, logits, labels, g):
    # out = (p - t) g / count with p = softmax(logits): softmax's VJP, scaled; and
    # linear in g, so d/dg = sum(c * out at g = 1).
    dlogits = e.softmax_grad(e.softmax(logits, axis=-1), c, axis=-1) * (g / float(_count(labels)))
    unit = e.cross_entropy_grad(logits, labels, e.const(1.0, logits.dtype))
    return [dlogits, None, e.sum(c * unit)]


register(
    "cross_entropy_grad",
    family="nn",
    inputs=3,
    infer=_cross_entropy_grad_infer,
    forward=_cross_entropy_grad,
    scratch=_cross_entropy_grad_scratch,
    vjp=_cross_entropy_grad_vjp,
    residuals="inputs",
    cost=lambda out, logits, labels, g: 16 * logits.size,
    no_grad=(1,),
    doc="cross_entropy's VJP: (softmax(logits) - one_hot(labels)) * g / count for the "
    "scalar cotangent g of the mean loss.",
)
