"""Native gradient ops of the normalizations, so their VJPs emit one value of x's size.

The composite VJPs of batch_norm, layer_norm and rms_norm emitted 4-5 graph values of
x's size each (x - mean, xhat, g * xhat, ...), and the planner accounts every graph
value: at a recompute_all peak they were all live at once. These ops compute the same
gradients in NumPy with their result as the only buffer of x's size (the centered x
lives there until it becomes dx); where a product of two x-sized arrays must be added,
it is formed a chunk of the leading axis at a time (`workspace`: about x / 8).

Per group (a channel of batch_norm; a row of layer_norm, rms_norm), M elements, <.>
the mean over the group:
    xc = x - <x> (rms_norm: x)      r = 1 / sqrt(<xc^2> + eps)      xhat = xc * r
    P(h) = h - <h> - xhat <h xhat>  (rms_norm: h - xhat <h xhat>)
    batch_norm_grad(x, w, g) = w r P(g)      layer_norm_grad, rms_norm_grad = r P(g w)
    <norm>_weight_grad(x, ..., g) = the sum of g * xhat over the axes w does not span
P is self-adjoint (<c, P h> = <P c, h>), so each op's VJP in g is r P(c) again. The
VJPs are graph ops and may be composite (they serve second order only); their x part
is `_projection_vjp`.
"""

from __future__ import annotations

import math

import numpy as np

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .elementwise import ufunc_buffers
from .norm import (
    _block_shape,
    _blocks,
    block_bytes,
    bn_axes,
    channel_shape,
    eps_attr,
    group_scratch,
    inverse_rms,
    nonempty,
    per_channel,
    row_shape,
    sum_except,
)
from .registry import Attr, elementwise_cost, register

FLOAT = dtypes.FLOATS


def _add_product(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """out += a * b (b broadcasts to out), the product formed a chunk at a time."""
    b = np.broadcast_to(b, out.shape)
    for s in _blocks(out.shape[0]):
        out[s] += a[s] * b[s]


def _rows(v, k: int):
    """Per-row values (the leading shape) as (..., 1, ..., 1), broadcasting against x."""
    return v.reshape(np.shape(v) + (1,) * k)


def _unit(e, value: float, shape, dtype):
    return e.broadcast_to(e.const(value, dtype), shape=tuple(shape))


def _projection_vjp(e, c, h, x, axes, eps, centered):
    """For q = r P(h) per group over `axes` and its cotangent c: (q, r P(c), d<c, q>/dx).

    <c, q> = M r (<c h> - <c><h> - a b) with a = <h xhat>, b = <c xhat>; through xhat
    and r (dr/dx = -r^2 xhat / M, then minus the group mean when centered):
        d/dx = -r^2 (b (h - <h>) + a (c - <c>) + (<(c - <c>) h> - 3 a b) xhat).
    """

    def mean(v):
        return e.mean(v, axes=axes, keepdims=True)

    xc = x - mean(x) if centered else x
    r = 1.0 / e.sqrt(mean(xc * xc) + eps)
    xhat = xc * r
    hc, cc = (h - mean(h), c - mean(c)) if centered else (h, c)
    a, b = mean(h * xhat), mean(c * xhat)
    dx = (r * r) * (b * hc + a * cc + (mean(cc * h) - 3.0 * (a * b)) * xhat)
    return r * (hc - xhat * a), r * (cc - xhat * b), -dx


# --- shape rules ---------------------------------------------------------------------------
def _check_g(x, g) -> None:
    rules.require_dtype(x, FLOAT, "x")
    rules.same_dtype(x, g)
    if g.shape != x.shape:
        raise ShapeError(f"g {g.shape} must have x's shape {x.shape}")


def _check_channels(x, eps, training, **vectors) -> None:
    if len(x.shape) < 2:
        raise ShapeError(f"x {x.shape} must have rank >= 2, laid out (N, C, *)")
    for what, t in vectors.items():
        rules.same_dtype(x, t)
        if t.shape != (x.shape[1],):
            raise ShapeError(f"{what} {t.shape} must be (C,) = ({x.shape[1]},) for x {x.shape}")
    # As batch_norm's: the batch statistics (which the VJPs recompute) need both.
    if training and x.shape[1] and math.prod(x.shape) == x.shape[1]:
        raise ShapeError(f"expected more than 1 value per channel when training, got x {x.shape}")
    if training and eps <= 0:
        raise ShapeError(f"eps must be positive when training, got {eps}")


def _bn_grad_infer(x, weight, g, eps):
    _check_g(x, g)
    _check_channels(x, eps, True, weight=weight)
    return x


def _bn_weight_grad_infer(x, running_mean, running_var, g, training, eps):
    _check_g(x, g)
    _check_channels(x, eps, training, running_mean=running_mean, running_var=running_var)
    return TensorType((x.shape[1],), x.dtype)


def _row_grad_infer(x, weight, g, eps):
    _check_g(x, g)
    rules.same_dtype(x, weight)
    k = len(weight.shape)
    if k == 0 or k > len(x.shape) or x.shape[-k:] != weight.shape:
        raise ShapeError(
            f"weight {weight.shape} must be the trailing shape of x {x.shape} (rank >= 1)"
        )
    return x


def _row_weight_grad_infer(x, g, normalized_ndim, eps):
    _check_g(x, g)
    if normalized_ndim > len(x.shape):
        raise ShapeError(f"normalized_ndim {normalized_ndim} exceeds the rank of x {x.shape}")
    return TensorType(x.shape[len(x.shape) - normalized_ndim :], x.dtype)


# --- forwards ------------------------------------------------------------------------------
def _bn_grad(x, weight, g, eps):
    if x.size == 0:
        return np.zeros(x.shape, x.dtype)
    m, nd = x.size // x.shape[1], x.ndim
    out = np.subtract(x, per_channel(sum_except([1], x) / m, nd))  # xc, in the result
    r = 1.0 / np.sqrt(sum_except([1], out, out) / m + eps)
    # dx = w r (g - <g> - xc r^2 <g xc>), built in place from xc.
    out *= per_channel(-(r * r) * sum_except([1], g, out) / m, nd)
    out += g
    out -= per_channel(sum_except([1], g) / m, nd)
    out *= per_channel(weight * r, nd)
    return out


def _bn_weight_grad(x, running_mean, running_var, g, training, eps):
    channels = x.shape[1]
    sgx, sxx = np.zeros(channels, x.dtype), np.zeros(channels, x.dtype)
    if x.size == 0:
        return sgx
    m = x.size // channels
    # Two passes, as the forward: sums of g * (x - center) never cancel like g*x - center*g.
    center = per_channel(sum_except([1], x) / m if training else running_mean, x.ndim)
    chunk = np.empty(_block_shape(x.shape), x.dtype)  # the one temporary, reused
    for s in _blocks(x.shape[0]):
        xc = np.subtract(x[s], center, out=chunk[: s.stop - s.start])
        sgx += sum_except([1], g[s], xc)
        if training:
            sxx += sum_except([1], xc, xc)
    return sgx / np.sqrt((sxx / m if training else running_var) + eps)


# The per-row values of layer_norm_grad and rms_norm_grad are computed in place: with
# narrow rows they are not small (x / 8 each for 8-element rows).
def _scaled_square(r, keep, m, *operands):
    """-(r * r) * sum_except(keep, *operands) / m, in one new per-row value."""
    out = np.multiply(r, r, out=np.empty_like(r))  # an array, 0-d too
    np.negative(out, out=out)
    out *= sum_except(keep, *operands)
    out /= m
    return out


def _ln_grad(x, weight, g, eps):
    if x.size == 0:
        return np.zeros(x.shape, x.dtype)
    k, m = weight.ndim, weight.size
    keep = list(range(x.ndim - k))
    w = weight.reshape((1,) * len(keep) + weight.shape)
    mean = sum_except(keep, x)
    mean /= m
    out = np.subtract(x, _rows(mean, k))  # xc, in the result
    del mean
    r = inverse_rms(sum_except(keep, out, out), m, eps)
    # dx = r (g w - <g w> - xc r^2 <g w xc>)
    c = _scaled_square(r, keep, m, g, w, out)
    out *= _rows(c, k)
    np.divide(sum_except(keep, g, w), m, out=c)
    out -= _rows(c, k)
    del c
    _add_product(out, g, w)
    out *= _rows(r, k)
    return out


def _rms_grad(x, weight, g, eps):
    if x.size == 0:
        return np.zeros(x.shape, x.dtype)
    k, m = weight.ndim, weight.size
    keep = list(range(x.ndim - k))
    w = weight.reshape((1,) * len(keep) + weight.shape)
    r = inverse_rms(sum_except(keep, x, x), m, eps)
    # dx = r (g w - x r^2 <g w x>)
    c = _scaled_square(r, keep, m, g, w, x)
    out = np.multiply(x, _rows(c, k))
    del c
    _add_product(out, g, w)
    out *= _rows(r, k)
    return out


def _ln_weight_grad(x, g, normalized_ndim, eps):
    k = normalized_ndim
    lead = x.ndim - k
    keep, trailing = list(range(lead)), list(range(lead, x.ndim))
    total = np.zeros(x.shape[lead:], x.dtype)
    if x.size == 0:
        return total
    m = math.prod(x.shape[lead:])
    # Whole rows a chunk at a time: xc of one chunk is the only temporary.
    chunk = np.empty(_block_shape(x.shape) if lead else x.shape, x.dtype)
    for i, s in enumerate(_blocks(x.shape[0]) if lead else [slice(0, x.shape[0])]):
        xs = x[s]  # no lead: one row
        mean = sum_except(keep, xs)
        mean /= m
        xc = np.subtract(xs, _rows(mean, k), out=chunk[: len(xs)])
        del mean
        r = _rows(inverse_rms(sum_except(keep, xc, xc), m, eps), k)
        if i == 0:  # the first sum in place: 0 + s, as the zeros plus it (-0.0 included)
            sum_except(trailing, g[s], xc, r, out=total)
            total += 0.0
        else:
            total += sum_except(trailing, g[s], xc, r)
        del r  # before the next chunk's mean
    return total


def _rms_weight_grad(x, g, normalized_ndim, eps):
    k = normalized_ndim
    lead = x.ndim - k
    if x.size == 0:
        return np.zeros(x.shape[lead:], x.dtype)
    r = inverse_rms(sum_except(list(range(lead)), x, x), math.prod(x.shape[lead:]), eps)
    return sum_except(list(range(lead, x.ndim)), g, x, _rows(r, k))


# --- scratch -------------------------------------------------------------------------------
def _bn_grad_scratch(out, x, weight, g, eps) -> int:
    return group_scratch(x, 2, channel_shape(x))  # r and one (C,) term as it meets x


def _bn_weight_grad_scratch(out, x, running_mean, running_var, g, training, eps) -> int:
    # The chunk; the sums (and the batch mean); the chunk's centering, or an einsum's sum.
    vectors = 3 if training else 2
    channel = TensorType((x.shape[1],), x.dtype)
    buffers = group_scratch(x, 0, channel_shape(x), block=True)
    return block_bytes(x) + vectors * channel.nbytes + max(buffers, channel.nbytes)


def _row_grad_scratch(centered: bool):
    def scratch(out, x, weight, g, eps) -> int:
        # r, the scaled square and an einsum's sums (before the result exists in
        # rms_norm_grad); r and the scaled square as one meets x; r while a chunk's
        # g * w is formed (_add_product).
        rows = TensorType(row_shape(x, len(weight.shape)), x.dtype)
        sums = 3 * rows.nbytes - (0 if centered else out.nbytes)
        product = block_bytes(x) + ufunc_buffers(_block_shape(x.shape), weight)
        return max(sums, group_scratch(x, 2, rows.shape), rows.nbytes + product)

    return scratch


def _ln_weight_grad_scratch(out, x, g, normalized_ndim, eps) -> int:
    # The chunk (x itself when there is no leading axis) and, per chunk, its mean or r,
    # with its centering's buffers or (after the first chunk) the einsum's sums.
    lead = len(x.shape) - normalized_ndim
    chunk = TensorType(_block_shape(x.shape) if lead else x.shape, x.dtype)
    rows = TensorType(row_shape(chunk, normalized_ndim), x.dtype)
    later = out.nbytes if lead and x.shape[0] > 1 else 0
    return chunk.nbytes + rows.nbytes + max(ufunc_buffers(chunk.shape, rows), later)


def _rms_weight_grad_scratch(out, x, g, normalized_ndim, eps) -> int:
    return TensorType(row_shape(x, normalized_ndim), x.dtype).nbytes  # r


# --- VJPs (second order only: composite where it is simplest) -----------------------------
def _bn_grad_vjp(e, c, out, x, weight, g, eps):
    axes = bn_axes(x.ndim)
    # dx = w q(g): q's cotangent is c w, and w r P(c) = r P(c w) per channel.
    q, qc, dx = _projection_vjp(e, c * per_channel(weight, x.ndim), g, x, axes, eps, True)
    return [dx, e.sum(c * q, axes=axes), qc]


def _bn_weight_grad_vjp(e, c, out, x, running_mean, running_var, g, training, eps):
    channels = (x.shape[1],)
    unit, zero = _unit(e, 1.0, channels, x.dtype), _unit(e, 0.0, channels, x.dtype)
    xhat = e.batch_norm(x, unit, zero, running_mean, running_var, training=training, eps=eps)
    if training:  # d sum(g xhat) / dx = r P(g) per channel, times c
        dx = e.batch_norm_grad(x, c, g, eps=eps)
    else:
        dx = g * per_channel(c / e.sqrt(running_var + eps), x.ndim)
    return [dx, None, None, per_channel(c, x.ndim) * xhat]


def _row_grad_vjp(centered: bool):
    def vjp(e, c, out, x, weight, g, eps):
        axes = tuple(range(x.ndim - weight.ndim, x.ndim))
        _, qc, dx = _projection_vjp(e, c, g * weight, x, axes, eps, centered)
        return [dx, qc * g, qc * weight]  # autodiff sums the weight's over leading axes

    return vjp


def _ln_weight_grad_vjp(e, c, out, x, g, normalized_ndim, eps):
    unit, zero = _unit(e, 1.0, c.shape, x.dtype), _unit(e, 0.0, c.shape, x.dtype)
    # sum(c g xhat) over everything: its x gradient is r P(g c) per row.
    return [e.layer_norm_grad(x, c, g, eps=eps), c * e.layer_norm(x, unit, zero, eps=eps)]


def _rms_weight_grad_vjp(e, c, out, x, g, normalized_ndim, eps):
    xhat = e.rms_norm(x, _unit(e, 1.0, c.shape, x.dtype), eps=eps)
    return [e.rms_norm_grad(x, c, g, eps=eps), c * xhat]


# --- workspace -----------------------------------------------------------------------------
def _chunk_workspace(x, *rest, **attrs) -> tuple[int, ...]:
    """One chunk of the leading axis (the formed product, or the chunk's centered x)."""
    return _block_shape(x.shape)


def _ln_weight_workspace(x, g, normalized_ndim, eps) -> tuple[int, ...]:
    return _block_shape(x.shape) if normalized_ndim < len(x.shape) else tuple(x.shape)


# --- registrations -------------------------------------------------------------------------
_NDIM = Attr(
    "int",
    check=lambda k: k >= 1,
    requirement="must be >= 1",
    doc="How many trailing axes of x are normalized (the weight's rank).",
)
_TRAINING = Attr(
    "bool",
    default=False,
    doc="xhat from the batch's statistics (True) or from running_mean/running_var (False).",
)
_DX_DOC = " (emitted by {op}'s VJP): x, weight and the cotangent g of {op}'s output."
_DW_DOC = " (emitted by {op}'s VJP): x, g -> the sum of g * xhat over the leading axes."

register(
    "batch_norm_grad",
    family="norm",
    inputs=3,
    infer=_bn_grad_infer,
    forward=_bn_grad,
    scratch=nonempty(_bn_grad_scratch),
    vjp=_bn_grad_vjp,
    residuals="inputs",
    cost=elementwise_cost(10),
    attrs={"eps": eps_attr(1e-5)},
    doc="d/dx of training-mode batch_norm" + _DX_DOC.format(op="batch_norm"),
)
register(
    "batch_norm_weight_grad",
    family="norm",
    inputs=4,
    infer=_bn_weight_grad_infer,
    forward=_bn_weight_grad,
    scratch=nonempty(_bn_weight_grad_scratch),
    vjp=_bn_weight_grad_vjp,
    residuals="inputs",
    cost=elementwise_cost(6),
    no_grad=(1, 2),
    workspace=_chunk_workspace,
    attrs={"training": _TRAINING, "eps": eps_attr(1e-5)},
    doc="d/dweight of batch_norm (emitted by its VJP): x, running_mean, running_var, g "
    "-> (C,) sums of g * xhat per channel.",
)
register(
    "layer_norm_grad",
    family="norm",
    inputs=3,
    infer=_row_grad_infer,
    forward=_ln_grad,
    scratch=nonempty(_row_grad_scratch(centered=True)),
    vjp=_row_grad_vjp(centered=True),
    residuals="inputs",
    cost=elementwise_cost(12),
    workspace=_chunk_workspace,
    attrs={"eps": eps_attr(1e-5)},
    doc="d/dx of layer_norm" + _DX_DOC.format(op="layer_norm"),
)
register(
    "rms_norm_grad",
    family="norm",
    inputs=3,
    infer=_row_grad_infer,
    forward=_rms_grad,
    scratch=nonempty(_row_grad_scratch(centered=False)),
    vjp=_row_grad_vjp(centered=False),
    residuals="inputs",
    cost=elementwise_cost(8),
    workspace=_chunk_workspace,
    attrs={"eps": eps_attr(1e-6)},
    doc="d/dx of rms_norm" + _DX_DOC.format(op="rms_norm"),
)
register(
    "layer_norm_weight_grad",
    family="norm",
    inputs=2,
    infer=_row_weight_grad_infer,
    forward=_ln_weight_grad,
    scratch=nonempty(_ln_weight_grad_scratch),
    vjp=_ln_weight_grad_vjp,
    residuals="inputs",
    cost=elementwise_cost(8),
    workspace=_ln_weight_workspace,
    attrs={"normalized_ndim": _NDIM, "eps": eps_attr(1e-5)},
    doc="d/dweight of layer_norm" + _DW_DOC.format(op="layer_norm"),
)
register(
    "rms_norm_weight_grad",
    family="norm",
    inputs=2,
    infer=_row_weight_grad_infer,
    forward=_rms_weight_grad,
    scratch=nonempty(_rms_weight_grad_scratch),
    vjp=_rms_weight_grad_vjp,
    residuals="inputs",
    cost=elementwise_cost(4),
    attrs={"normalized_ndim": _NDIM, "eps": eps_attr(1e-6)},
    doc="d/dweight of rms_norm" + _DW_DOC.format(op="rms_norm"),
)
