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
from .elementwise import ufunc_buffers
from .norm import _block_shape, _blocks, block_bytes, block_type, row_shape
from .reduce import mean_buffers
from .registry import Attr, elementwise_cost, register
from .shape import along_axis_scratch

FLOAT = dtypes.FLOATS


# --- softmax, log_softmax --------------------------------------------------------------
def _axis_normalize(x: TensorType, axis: int) -> dict:
    return {"axis": rules.normalize_axis(axis, len(x.shape))}


def _row_max(x: np.ndarray, axis: int) -> np.ndarray:
    # initial=-inf keeps an empty axis legal; an all -inf row gives NaN, as in torch.
    return np.max(x, axis=axis, keepdims=True, initial=-np.inf)


def _shifted(x: np.ndarray, axis: int) -> np.ndarray:
    return np.subtract(x, _row_max(x, axis))


# Both in the result buffer: the only other values are per row (`row_scratch`).
def _softmax(x, axis):
    out = _shifted(x, axis)
    np.exp(out, out=out)
    out /= np.sum(out, axis=axis, keepdims=True)
    return out


def _cuts(ndim: int, axis: int) -> bool:
    """Whether _log_sum_exp forms exp(z) a chunk of the leading axis at a time: unless
    that axis is reduced, or x is a vector (cut along another axis, each chunk's z is
    strided and the passes cost 15-25% more)."""
    return ndim >= 2 and axis != 0


def _log_softmax(x, axis):
    out = _shifted(x, axis)  # z = x - max, in the result
    out -= _log_sum_exp(out, None, axis)
    return out


def _log_sum_exp(x, peak, axis):
    """log(sum(exp(x - peak))) along `axis` (keepdims); x is already z = x - peak when
    `peak` is None. exp(z) is formed a chunk at a time (the same sums: each row's
    reduction is unchanged), so x (or z) stays."""
    lse = np.empty(tuple(1 if a == axis else d for a, d in enumerate(x.shape)), x.dtype)
    cuts = _cuts(x.ndim, axis)
    chunk = np.empty(_block_shape(x.shape) if cuts else x.shape, x.dtype)
    for s in _blocks(x.shape[0]) if cuts else [slice(None)]:
        e = chunk[: len(x[s])]
        if peak is None:
            np.exp(x[s], out=e)
        else:
            np.exp(np.subtract(x[s], peak[s], out=e), out=e)
        np.sum(e, axis=axis, keepdims=True, out=lse[s])
    return np.log(lse, out=lse)


def _reduced(x: TensorType, axis: int) -> TensorType:
    return TensorType(tuple(1 if a == axis else d for a, d in enumerate(x.shape)), x.dtype)


def row_scratch(x: TensorType, axis: int, rows: int) -> int:
    """`rows` per-row values of x along `axis` (reduced with keepdims), and the buffers
    of the ufuncs broadcasting one against x: the scratch of the softmax family."""
    reduced = _reduced(x, axis)
    return rows * reduced.nbytes + ufunc_buffers(x.shape, reduced)


def _exp_chunk_scratch(x: TensorType, axis: int, shifted: bool) -> int:
    """_log_sum_exp's chunk, with the buffers of the subtraction that forms it (unless
    it exps z = x - max already)."""
    cut = block_type(x) if _cuts(len(x.shape), axis) else x
    return cut.nbytes + (0 if shifted else ufunc_buffers(cut.shape, _reduced(cut, axis)))


def _log_softmax_scratch(out, x, axis) -> int:
    # The max, then the log-sum, as x meets it; the log-sum and the chunk of exp(z).
    rows = _reduced(x, axis).nbytes
    return max(row_scratch(x, axis, 1), rows + _exp_chunk_scratch(x, axis, True))


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
    scratch=lambda out, x, axis: row_scratch(x, axis, 1),
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
    scratch=_log_softmax_scratch,
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
    out = np.zeros(indices.shape + (depth,), dtypes.NUMPY[dtype])
    np.put_along_axis(out, indices[..., None], 1, axis=-1)
    return out


register(
    "one_hot",
    family="nn",
    infer=_one_hot_infer,
    forward=_one_hot,
    scratch=lambda out, indices, depth, dtype: along_axis_scratch(
        out.shape, TensorType(indices.shape + (1,), indices.dtype), -1
    ),
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
    # log_softmax at the labels only: (x - max) - log(sum(exp(x - max))) per row, as
    # _log_softmax computes it.
    peak = _row_max(logits, -1)
    lse = _log_sum_exp(logits, peak, logits.ndim - 1)
    picked = np.take_along_axis(logits, labels[..., None], axis=-1)
    picked -= peak
    picked -= lse
    return np.asarray(-np.mean(picked, dtype=logits.dtype), dtype=logits.dtype)


def _picked_scratch(logits: TensorType, labels: TensorType) -> int:
    """np.take_along_axis / np.put_along_axis at the labels of (..., C) logits."""
    return along_axis_scratch(logits.shape, TensorType(labels.shape + (1,), labels.dtype), -1)


def _cross_entropy_scratch(out, logits, labels) -> int:
    # The max and the log-sum with the chunk of exp(x - max); then with the logits
    # picked at the labels while they are gathered.
    if not labels.size:  # the mean of nothing, at once
        return 0
    last = len(logits.shape) - 1
    rows = _reduced(logits, last).nbytes
    exp_phase = 2 * rows + _exp_chunk_scratch(logits, last, False)
    return max(exp_phase, 3 * rows + _picked_scratch(logits, labels))


def _cross_entropy_vjp(e, g, out, logits, labels):
    # (softmax(logits) - one_hot(labels)) * g / count, as one native op (nn_grad.py).
    return [e.cross_entropy_grad(logits, labels, g), None]


register(
    "cross_entropy",
    family="nn",
    inputs=2,
    infer=_cross_entropy_infer,
    forward=_cross_entropy,
    scratch=_cross_entropy_scratch,
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
    k = weight.ndim
    axes, lead = _norm_axes(x.ndim, k), x.ndim - k
    out = np.subtract(x, np.mean(x, axis=axes, keepdims=True))  # xc, in the result
    var = _mean_square(out, axes, lead)
    var += eps  # xc / sqrt(var + eps) * weight + bias
    np.sqrt(var, out=var)
    out /= var
    out *= weight
    out += bias
    return out


def _mean_square(xc, axes, lead: int):
    """np.mean(xc * xc) per row, xc * xc formed a chunk of the leading axis at a time
    (the same sums: each row's reduction is unchanged); whole without leading axes."""
    var = np.empty(xc.shape[:lead] + (1,) * len(axes), xc.dtype)
    chunk = np.empty(_block_shape(xc.shape) if lead else xc.shape, xc.dtype)
    for s in _blocks(xc.shape[0]) if lead else [slice(None)]:
        square = chunk[: len(xc[s])]
        np.multiply(xc[s], xc[s], out=square)
        np.mean(square, axis=axes, keepdims=True, out=var[s])
    return var


def _layer_norm_scratch(out, x, weight, bias, eps) -> int:
    k = len(weight.shape)
    rows = TensorType(row_shape(x, k), x.dtype)
    chunk = block_bytes(x) if len(x.shape) > k else x.nbytes
    chunk_rows = TensorType(row_shape(TensorType(_block_shape(x.shape), x.dtype), k), x.dtype)
    return max(
        rows.nbytes + mean_buffers(rows),  # the mean; then as x meets it
        rows.nbytes + ufunc_buffers(x.shape, rows),
        chunk + rows.nbytes + mean_buffers(chunk_rows if len(x.shape) > k else rows),
        rows.nbytes + max(ufunc_buffers(x.shape, weight), ufunc_buffers(x.shape, bias)),
    )


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
    scratch=_layer_norm_scratch,
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
