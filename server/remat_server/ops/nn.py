"""Neural-network ops: softmax, log_softmax, cross_entropy, layer_norm, one_hot.

Forwards are numerically stable (the max is subtracted before exponentiating); the
VJPs emit native gradient ops (nn_grad.py, norm_grad.py) whose own VJPs are graph
ops, so the backward pass can be differentiated again.
"""

from __future__ import annotations

import math

import numpy as np

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .registry import Attr, elementwise_cost, register

FLOAT = dtypes.FLOATS


# --- softmax, log_softmax --------------------------------------------------------------
def _axis_normalize(x: TensorType, axis: int) -> dict:
    return {"axis": rules.normalize_axis(axis, len(x.shape))}


def _shifted(x: np.ndarray, axis: int) -> np.ndarray:
    # initial=-inf keeps an empty axis legal; an all -inf row gives NaN, as in torch.
    return x - np.max(x, axis=axis, keepdims=True, initial=-np.inf)


def _softmax(x, axis):
    ex = np.exp(_shifted(x, axis))
    return ex / np.sum(ex, axis=axis, keepdims=True)


def _log_softmax(x, axis):
    z = _shifted(x, axis)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


# The VJPs are native gradient ops (nn_grad.py): the composites emitted three values
# of x's size each (g * y, the difference, the product).
def _softmax_vjp(e, g, y, x, axis):
    return [e.softmax_grad(y, g, axis=axis)]


def _log_softmax_vjp(e, g, y, x, axis):
    return [e.log_softmax_grad(y, g, axis=axis)]


AXIS = {"axis": Attr("int", default=-1, doc="The axis normalized over.")}
register(
    "softmax",
    family="nn",
    infer=rules.unary(FLOAT),
    normalize=_axis_normalize,
    forward=_softmax,
    vjp=_softmax_vjp,
    residuals="output",
    cost=elementwise_cost(14),
    attrs=AXIS,
    doc="exp(x) / sum(exp(x)) along `axis` (max-shifted for stability).",
)
register(
    "log_softmax",
    family="nn",
    infer=rules.unary(FLOAT),
    normalize=_axis_normalize,
    forward=_log_softmax,
    vjp=_log_softmax_vjp,
    residuals="output",
    cost=elementwise_cost(14),
    attrs=AXIS,
    doc="x - logsumexp(x) along `axis` (max-shifted for stability).",
)


# --- one_hot, cross_entropy ------------------------------------------------------------
def _check_labels(labels: np.ndarray, depth: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= depth):
        bad = labels[(labels < 0) | (labels >= depth)].flat[0]
        raise IndexError(f"label {bad} is out of range for {depth} classes")


def _one_hot_infer(indices, depth, dtype):
    rules.require_dtype(indices, rules.dtypes.INTS, "indices")
    return TensorType(indices.shape + (depth,), dtype)


def _one_hot(indices, depth, dtype):
    _check_labels(indices, depth)
    return (indices[..., None] == np.arange(depth)).astype(dtypes.NUMPY[dtype])


register(
    "one_hot",
    family="nn",
    infer=_one_hot_infer,
    forward=_one_hot,
    vjp=None,
    residuals="none",
    cost=elementwise_cost(1),
    attrs={
        "depth": Attr("int", check=lambda d: d >= 0, requirement="must be >= 0"),
        "dtype": Attr(
            "string",
            default="float32",
            check=lambda d: d in dtypes.NUMPY,
            requirement=f"must be one of {', '.join(dtypes.NUMPY)}",
        ),
    },
    doc="indices (...) -> (..., depth), 1 at each index; out-of-range is an error.",
)


def _cross_entropy_infer(logits, labels):
    rules.require_dtype(logits, FLOAT, "logits")
    rules.require_dtype(labels, rules.dtypes.INTS, "labels")
    if not logits.shape or logits.shape[-1] == 0:
        raise ShapeError(f"logits {logits.shape} need a trailing class axis of size >= 1")
    if labels.shape != logits.shape[:-1]:
        raise ShapeError(
            f"labels {labels.shape} must have the logits' leading shape {logits.shape[:-1]}"
        )
    return TensorType((), logits.dtype)


def _cross_entropy(logits, labels):
    _check_labels(labels, logits.shape[-1])
    if labels.size == 0:  # the mean of nothing, as torch
        return np.array(np.nan, dtype=logits.dtype)
    picked = np.take_along_axis(_log_softmax(logits, -1), labels[..., None], axis=-1)
    return np.asarray(-np.mean(picked, dtype=logits.dtype), dtype=logits.dtype)


def _cross_entropy_vjp(e, g, out, logits, labels):
    # (softmax(logits) - one_hot(labels)) * g / count, as one native op (nn_grad.py).
    return [e.cross_entropy_grad(logits, labels, g), None]


register(
    "cross_entropy",
    family="nn",
    inputs=2,
    infer=_cross_entropy_infer,
    forward=_cross_entropy,
    vjp=_cross_entropy_vjp,
    residuals="inputs",
    cost=lambda out, logits, labels: 16 * logits.size,
    no_grad=(1,),
    doc="Mean over positions of -log_softmax(logits)[label]; logits (..., C), "
    "integer labels (...) in [0, C).",
)


# --- layer_norm ----------------------------------------------------------------------
def _layer_norm_infer(x, weight, bias, eps):
    rules.require_dtype(x, FLOAT)
    rules.same_dtype(x, weight, bias)
    k = len(weight.shape)
    if k == 0 or k > len(x.shape) or x.shape[-k:] != weight.shape:
        raise ShapeError(
            f"weight {weight.shape} must be the trailing shape of x {x.shape} (rank >= 1)"
        )
    if bias.shape != weight.shape:
        raise ShapeError(f"bias {bias.shape} must have the weight's shape {weight.shape}")
    return x


def _norm_axes(x_ndim: int, weight_ndim: int) -> tuple[int, ...]:
    return tuple(range(x_ndim - weight_ndim, x_ndim))


def _layer_norm(x, weight, bias, eps):
    axes = _norm_axes(x.ndim, weight.ndim)
    xc = x - np.mean(x, axis=axes, keepdims=True)
    var = np.mean(xc * xc, axis=axes, keepdims=True)
    return xc / np.sqrt(var + eps) * weight + bias


def _layer_norm_vjp(e, g, out, x, weight, bias, eps):
    # Native gradient ops (norm_grad.py): dx is the one value of x's size; the bias's
    # gradient is g, which autodiff sums over the leading axes.
    return [
        e.layer_norm_grad(x, weight, g, eps=eps),
        e.layer_norm_weight_grad(x, g, normalized_ndim=weight.ndim, eps=eps),
        g,
    ]


register(
    "layer_norm",
    family="nn",
    inputs=3,
    infer=_layer_norm_infer,
    forward=_layer_norm,
    vjp=_layer_norm_vjp,
    residuals="inputs",
    cost=elementwise_cost(10),
    attrs={
        "eps": Attr(
            "float",
            default=1e-5,
            check=lambda v: 0 <= v < math.inf,
            requirement="must be finite and >= 0",
        )
    },
    doc="(x - mean) / sqrt(var + eps) * weight + bias over the trailing weight.ndim "
    "axes (torch's normalized_shape = weight.shape).",
)
