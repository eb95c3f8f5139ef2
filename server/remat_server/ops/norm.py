"""Normalization ops: batch_norm (training and inference forms) and rms_norm.

Both are native ops rather than composites: one node, one result buffer. The forwards
reduce with `np.einsum`, which sums (and sums products) without materializing x * x,
and finish the affine map in place in the result, so neither allocates a temporary of
x's size. The VJPs emit native gradient ops (norm_grad.py: one value of x's size
each), which recompute the per-channel (per-row) statistics from x and whose own VJPs
are graph ops, so the backward pass differentiates again.

Running-statistic updates are not part of batch_norm (one op, one output): the SDK's
`batch_norm_running_stats` composite (and the ONNX importer) builds them from
`batch_norm_stats`, the batch's per-channel mean and variance in one (2, C) value.
"""

from __future__ import annotations

import math

import numpy as np

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .elementwise import ufunc_buffers
from .registry import Attr, elementwise_cost, register

FLOAT = dtypes.FLOATS


def eps_attr(default: float) -> Attr:
    return Attr(
        "float",
        default=default,
        check=lambda v: 0 <= v < math.inf,
        requirement="must be finite and >= 0",
        doc="Added to the variance (mean square) before the square root.",
    )


def sum_except(keep: list[int], *operands: np.ndarray, out=None) -> np.ndarray:
    """The sum of the operands' product over every axis not in `keep`, with no temporary
    of their size (one einsum loop; equal ranks, size-1 axes broadcast). An array, 0-d
    too (einsum's 0-d result is a scalar), so in-place ops can follow."""
    axes = list(range(operands[0].ndim))
    return np.asarray(np.einsum(*[item for a in operands for item in (a, axes)], keep, out=out))


_PARTS = 8  # products of two x-sized arrays are formed in 8 chunks of the leading axis


def _blocks(n: int) -> list[slice]:
    step = max(1, -(-n // _PARTS))
    return [slice(i, i + step) for i in range(0, n, step)]


def _block_shape(shape) -> tuple[int, ...]:
    return (max(1, -(-shape[0] // _PARTS)), *shape[1:])


# --- scratch: the temporaries of the forwards below and of norm_grad.py's -------------------
def nonempty(scratch):
    """A `scratch` rule for a forward that returns at once when x (its first input) is
    empty."""

    def rule(out, x, *rest, **attrs) -> int:
        return scratch(out, x, *rest, **attrs) if x.size else 0

    return rule


def block_type(x: TensorType) -> TensorType:
    """One chunk of the leading axis (_block_shape) of x."""
    return TensorType(_block_shape(x.shape), x.dtype)


def block_bytes(x: TensorType) -> int:
    return block_type(x).nbytes


def group_scratch(x: TensorType, vectors: int, group_shape, *, block: bool = False) -> int:
    """`vectors` per-group values (per channel or per row: `group_shape`, broadcasting
    against x) alive at once, and the buffers of a ufunc broadcasting one against x (or
    against one chunk of its leading axis)."""
    group = TensorType(tuple(group_shape), x.dtype)
    shape = _block_shape(x.shape) if block else x.shape
    return vectors * group.nbytes + ufunc_buffers(shape, group)


def channel_shape(x: TensorType) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (len(x.shape) - 2)


# --- batch_norm --------------------------------------------------------------------------
# x (N, C, *) is normalized per channel (axis 1) over every other axis.
def bn_axes(ndim: int) -> tuple[int, ...]:
    return (0, *range(2, ndim))


def per_channel(v, ndim: int):
    """A (C,) vector as (1, C, 1, ...), broadcasting against x (NumPy array or Sym)."""
    shape = (1, v.shape[0]) + (1,) * (ndim - 2)
    return v.reshape(shape) if isinstance(v, np.ndarray) else v.e.reshape(v, shape=shape)


def _batch_norm_infer(x, weight, bias, running_mean, running_var, training, eps):
    rules.require_dtype(x, FLOAT)
    rules.same_dtype(x, weight, bias, running_mean, running_var)
    if len(x.shape) < 2:
        raise ShapeError(f"x {x.shape} must have rank >= 2, laid out (N, C, *)")
    channels = (x.shape[1],)
    for what, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean)):
        if t.shape != channels:
            raise ShapeError(f"{what} {t.shape} must be (C,) = {channels} for x {x.shape}")
    if running_var.shape != channels:
        raise ShapeError(f"running_var {running_var.shape} must be (C,) = {channels}")
    # torch.nn.functional.batch_norm refuses both: a batch variance can be 0.
    if training and x.shape[1] and x.size == x.shape[1]:
        raise ShapeError(f"expected more than 1 value per channel when training, got x {x.shape}")
    if training and eps <= 0:
        raise ShapeError(f"eps must be positive when training, got {eps}")
    return x


def _batch_norm(x, weight, bias, running_mean, running_var, training, eps):
    if x.size == 0:
        return np.empty(x.shape, dtype=x.dtype)
    if not training:
        # torch's transform: x * alpha + beta with per-channel alpha, beta.
        alpha = weight / np.sqrt(running_var + eps)
        out = np.multiply(x, per_channel(alpha, x.ndim))
        out += per_channel(bias - running_mean * alpha, x.ndim)  # alpha, beta
        return out
    # Two passes, like torch's CPU kernel (one-pass sum/sum-of-squares cancels badly in
    # float32 when var << mean^2): the mean reads x; the variance reads the centered
    # values, which live in the result buffer and are then scaled and shifted in place.
    n = x.size // x.shape[1]
    out = np.subtract(x, per_channel(sum_except([1], x) / n, x.ndim))
    var = sum_except([1], out, out) / n
    out *= per_channel(weight / np.sqrt(var + eps), x.ndim)  # var, the scale
    out += per_channel(bias, x.ndim)
    return out


def _batch_norm_scratch(out, x, *vectors, training, eps) -> int:
    # Two (C,) values (see the comments) while a (1, C, 1, ...) one meets x; the
    # transient third of the eval form's beta (a (C,) product) is smaller than the buffer.
    return group_scratch(x, 2, channel_shape(x))


def _batch_norm_vjp(e, g, out, x, weight, bias, running_mean, running_var, training, eps):
    # Native gradient ops (norm_grad.py): one value of x's size (dx), the (C,) ones
    # reduce without any. The (C,) gradients reduce explicitly: C is axis 1, not a
    # trailing axis, so autodiff's un-broadcasting could not find it.
    dweight = e.batch_norm_weight_grad(x, running_mean, running_var, g, training=training, eps=eps)
    dbias = e.sum(g, axes=bn_axes(x.ndim))
    if training:  # the batch statistics depend on x
        dx = e.batch_norm_grad(x, weight, g, eps=eps)
    else:
        dx = g * per_channel(weight / e.sqrt(running_var + eps), x.ndim)
    return [dx, dweight, dbias, None, None]


def _batch_norm_cost(out, *inputs, training, eps) -> int:
    return (8 if training else 2) * out.size


register(
    "batch_norm",
    family="norm",
    inputs=5,
    infer=_batch_norm_infer,
    forward=_batch_norm,
    scratch=nonempty(_batch_norm_scratch),
    vjp=_batch_norm_vjp,
    # The per-channel mean and invstd are tiny, but they are not the op's result and
    # the normalized x cannot be recovered from the output (it divides by weight, and
    # zero-initialized weights are common), so the VJP recomputes them from x.
    residuals="inputs",
    cost=_batch_norm_cost,
    no_grad=(3, 4),
    attrs={
        "training": Attr(
            "bool",
            default=False,
            doc="Normalize with the batch's statistics (True) or the running ones (False).",
        ),
        "eps": eps_attr(1e-5),
    },
    doc="(x - mean) / sqrt(var + eps) * weight + bias per channel of x (N, C, *): the "
    "batch's mean and biased variance when training, else running_mean/running_var.",
)


# --- batch_norm_stats: what the running statistics are updated with ----------------------
def _stats_infer(x, unbiased):
    rules.require_dtype(x, FLOAT)
    if len(x.shape) < 2:
        raise ShapeError(f"x {x.shape} must have rank >= 2, laid out (N, C, *)")
    if unbiased and x.shape[1] and x.size == x.shape[1]:
        raise ShapeError(f"an unbiased variance needs more than 1 value per channel, got {x.shape}")
    return TensorType((2, x.shape[1]), x.dtype)


def _stats(x, unbiased):
    """Two passes, as batch_norm's forward, the centered x formed a chunk at a time."""
    channels = x.shape[1]
    n = x.size // channels if channels else 0
    out = np.zeros((2, channels), dtype=x.dtype)
    if n == 0:
        return out
    out[0] = sum_except([1], x) / n
    center = per_channel(out[0], x.ndim)
    chunk = np.empty(_block_shape(x.shape), x.dtype)
    for s in _blocks(x.shape[0]):
        xc = np.subtract(x[s], center, out=chunk[: s.stop - s.start])
        out[1] += sum_except([1], xc, xc)
    out[1] /= n - 1 if unbiased else n
    return out


def _stats_scratch(out, x, unbiased) -> int:
    # The chunk, and the buffers of its centering (the einsum's (C,) sums are smaller).
    return block_bytes(x) + group_scratch(x, 0, channel_shape(x), block=True)


def _stats_vjp(e, g, out, x, unbiased):
    # d mean / dx = 1/n; d var / dx = 2 (x - mean) / (n - 1 or n), per channel.
    n, channels = math.prod(x.shape) // x.shape[1], x.shape[1]

    def row(v, i: int):  # row i of a (2, C) value as (1, C, 1, ...)
        picked = e.slice(v, starts=(i, 0), stops=(i + 1, channels), steps=(1, 1))
        return e.reshape(picked, shape=(1, channels) + (1,) * (x.ndim - 2))

    scale = 2.0 / (n - 1 if unbiased else n)
    return [row(g, 0) / float(n) + (x - row(out, 0)) * (row(g, 1) * scale)]


register(
    "batch_norm_stats",
    family="norm",
    inputs=1,
    infer=_stats_infer,
    forward=_stats,
    vjp=_stats_vjp,
    residuals="inputs+output",
    workspace=lambda x, **attrs: _block_shape(x.shape),
    scratch=nonempty(_stats_scratch),
    cost=lambda out, x, **attrs: 4 * x.size,
    attrs={
        "unbiased": Attr(
            "bool",
            default=False,
            doc="Divide the squares by n - 1 (PyTorch's running_var) instead of n (ONNX's).",
        )
    },
    doc="The per-channel mean (row 0) and variance (row 1) of x (N, C, *) over every axis "
    "but 1: what batch_norm's running statistics are updated with.",
)


# --- rms_norm ----------------------------------------------------------------------------
def _rms_norm_infer(x, weight, eps):
    rules.require_dtype(x, FLOAT)
    rules.same_dtype(x, weight)
    k = len(weight.shape)
    if k == 0 or k > len(x.shape) or x.shape[-k:] != weight.shape:
        raise ShapeError(
            f"weight {weight.shape} must be the trailing shape of x {x.shape} (rank >= 1)"
        )
    return x


def inverse_rms(total: np.ndarray, count: int, eps: float) -> np.ndarray:
    """1 / sqrt(total / count + eps), in place in the per-row sums `total`."""
    total /= count
    total += eps
    np.sqrt(total, out=total)
    return np.divide(1.0, total, out=total)


def _rms_norm(x, weight, eps):
    keep = list(range(x.ndim - weight.ndim))
    rstd = inverse_rms(sum_except(keep, x, x), max(weight.size, 1), eps)
    out = np.multiply(x, rstd.reshape(rstd.shape + (1,) * weight.ndim))
    out *= weight
    return out


def row_shape(x: TensorType, k: int) -> tuple[int, ...]:
    """Per-row values over the trailing k axes, as (..., 1, ..., 1)."""
    return tuple(x.shape[: len(x.shape) - k]) + (1,) * k


def _rms_norm_scratch(out, x, weight, eps) -> int:
    rows = TensorType(row_shape(x, len(weight.shape)), x.dtype)  # rstd, as x meets it
    return rows.nbytes + max(ufunc_buffers(x.shape, rows), ufunc_buffers(x.shape, weight))


def _rms_norm_vjp(e, g, out, x, weight, eps):
    k = weight.ndim  # native gradient ops (norm_grad.py): no composite x-sized values
    return [
        e.rms_norm_grad(x, weight, g, eps=eps),
        e.rms_norm_weight_grad(x, g, normalized_ndim=k, eps=eps),
    ]


register(
    "rms_norm",
    family="norm",
    inputs=2,
    infer=_rms_norm_infer,
    forward=_rms_norm,
    scratch=_rms_norm_scratch,
    vjp=_rms_norm_vjp,
    residuals="inputs",  # as layer_norm: the VJP recomputes the mean square from x
    cost=elementwise_cost(5),
    attrs={"eps": eps_attr(1e-6)},
    doc="x / sqrt(mean(x^2) + eps) * weight over the trailing weight.ndim axes "
    "(torch.nn.functional.rms_norm with normalized_shape = weight.shape).",
)
