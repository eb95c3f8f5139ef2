"""Gradient ops of pooling, emitted by pool.py's VJPs (internal, but validated like any op).

Each computes its value tap by tap with at most two image-sized temporaries (a padded
copy and a padded canvas), so the backward graph holds one value the size of x where
the im2col formulation held a taps-times-the-output column matrix, an argmax, and a
one-hot mask. All three are linear in their last input and adjoint in pairs:
max_pool2d_grad(x, .) and max_pool2d_gather(x, .) are each other's transposes, and
avg_pool2d_grad is avg_pool2d's; so they differentiate to one another.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .conv import _image, _out_hw, _padded, _pair, _reduce_taps, _windows
from .pool import (
    AVG_POOL_ATTRS,
    MAX_POOL_ATTRS,
    _check_padding,
    _pool_infer,
    _pool_normalize,
    crop,
    pool_divisor,
    tap_region,
)
from .registry import register


def _first_max_taps(windows):
    """Yield (i, j, hit) per kernel tap, row-major: hit marks the windows whose FIRST
    maximum is that tap (torch's argmax rule). `hit` is reused: consume it at once.
    A window holding NaN has a NaN maximum (np.maximum propagates it) and, as in torch's
    kernel (`val > max || isnan(val)` updates the argmax), its LAST NaN takes the gradient."""
    peak = _reduce_taps(windows, np.maximum)
    taps = list(np.ndindex(*windows.shape[4:]))
    last_nan = None
    if np.isnan(peak).any():
        last_nan = np.full(peak.shape, -1)
        for t, (i, j) in enumerate(taps):
            last_nan[np.isnan(windows[..., i, j])] = t
    free = np.ones(peak.shape, dtype=bool)  # windows whose maximum is not yet found
    hit = np.empty_like(free)
    for t, (i, j) in enumerate(taps):
        np.equal(windows[..., i, j], peak, out=hit)  # never true where peak is NaN
        if last_nan is not None:
            hit |= last_nan == t
        hit &= free
        free ^= hit  # hit is a subset of free: clears exactly the windows found
        yield i, j, hit


def _same_pooled(x, y, kernel, stride, padding, dilation, what):
    rules.same_dtype(x, y)
    expected = _pool_infer(x, kernel, stride, padding, dilation).shape
    if y.shape != expected:
        raise ShapeError(f"{what} must have the pooled shape {expected}, got {y.shape}")


# --- max_pool2d_grad: the gradient of max_pool2d ---------------------------------------
def _max_grad_infer(x, g, kernel, stride, padding, dilation):
    _image(x)
    _same_pooled(x, g, kernel, stride, padding, dilation, "gradient")
    return TensorType(x.shape, x.dtype)


def _max_grad(x, g, kernel, stride, padding, dilation):
    windows = _windows(x, kernel, stride, padding, dilation, -np.inf)
    canvas = np.zeros(_padded(x, padding=padding), dtype=x.dtype)
    part = np.empty_like(g)
    for i, j, hit in _first_max_taps(windows):
        np.multiply(g, hit, out=part)
        canvas[tap_region(i, j, g.shape[2:], stride, dilation)] += part
    return crop(canvas, padding, x.shape[2:])


register(
    "max_pool2d_grad",
    family="conv",
    inputs=2,
    infer=_max_grad_infer,
    normalize=_pool_normalize,
    forward=_max_grad,
    # Linear in g; in x piecewise constant (zero almost everywhere, as in torch).
    vjp=lambda e, gbar, out, x, g, **geometry: [None, e.max_pool2d_gather(x, gbar, **geometry)],
    residuals="inputs",
    workspace=_padded,
    cost=lambda out, x, g, kernel, **attrs: 3 * g.size * kernel[0] * kernel[1] + out.size,
    attrs=MAX_POOL_ATTRS,
    doc="max_pool2d's gradient: g (the pooled shape) added onto each window's first "
    "maximum in x (N, C, H, W).",
)


# --- max_pool2d_gather: max_pool2d_grad's transpose in g --------------------------------
def _gather_infer(x, v, kernel, stride, padding, dilation):
    _image(x)
    rules.same_dtype(x, v)
    if v.shape != x.shape:
        raise ShapeError(f"values must have the input's shape {x.shape}, got {v.shape}")
    return _pool_infer(x, kernel, stride, padding, dilation)


def _gather(x, v, kernel, stride, padding, dilation):
    windows = _windows(x, kernel, stride, padding, dilation, -np.inf)
    values = _windows(v, kernel, stride, padding, dilation)
    out = np.zeros(windows.shape[:4], dtype=v.dtype)
    for i, j, hit in _first_max_taps(windows):
        np.copyto(out, values[..., i, j], where=hit)
    return out


register(
    "max_pool2d_gather",
    family="conv",
    inputs=2,
    infer=_gather_infer,
    normalize=_pool_normalize,
    forward=_gather,
    vjp=lambda e, gbar, out, x, v, **geometry: [None, e.max_pool2d_grad(x, gbar, **geometry)],
    residuals="inputs",
    workspace=_padded,
    cost=lambda out, x, v, kernel, **attrs: 3 * out.size * kernel[0] * kernel[1],
    attrs=MAX_POOL_ATTRS,
    doc="v (N, C, H, W) read at each max_pool2d window's first maximum in x: the "
    "pooled shape (max_pool2d_grad's transpose in its gradient).",
)


# --- avg_pool2d_grad: the gradient of avg_pool2d ---------------------------------------
def _avg_grad_infer(g, output_size, kernel, stride, padding, count_include_pad):
    _image(g, "gradient")
    _check_padding(kernel, padding)
    windows = _out_hw(output_size, kernel, stride, padding, (1, 1))
    if tuple(g.shape[2:]) != windows:
        raise ShapeError(
            f"gradient {g.shape} must have the {windows} windows of an input of spatial "
            f"size {tuple(output_size)}"
        )
    return TensorType(g.shape[:2] + tuple(output_size), g.dtype)


def _avg_grad(g, output_size, kernel, stride, padding, count_include_pad):
    divisor = pool_divisor(output_size, kernel, stride, padding, count_include_pad, g.dtype.name)
    share = g / divisor
    (n, c), (ph, pw) = g.shape[:2], padding
    canvas = np.zeros((n, c, output_size[0] + 2 * ph, output_size[1] + 2 * pw), dtype=g.dtype)
    for i, j in np.ndindex(*kernel):
        canvas[tap_region(i, j, g.shape[2:], stride, (1, 1))] += share
    return crop(canvas, padding, output_size)


def _avg_grad_workspace(g, output_size, padding, **attrs) -> tuple[int, ...]:
    return (
        g.shape[0],
        g.shape[1],
        output_size[0] + 2 * padding[0],
        output_size[1] + 2 * padding[1],
    )


register(
    "avg_pool2d_grad",
    family="conv",
    infer=_avg_grad_infer,
    normalize=_pool_normalize,
    forward=_avg_grad,
    vjp=lambda e, gbar, out, g, output_size, **attrs: [e.avg_pool2d(gbar, **attrs)],
    residuals="none",
    workspace=_avg_grad_workspace,
    cost=lambda out, g, kernel, **attrs: g.size * kernel[0] * kernel[1] + out.size,
    attrs={
        **AVG_POOL_ATTRS,
        "output_size": _pair(rules.all_positive, "each > 0", required=True),
    },
    doc="avg_pool2d's gradient: each window's share of g (N, C, Ho, Wo) added onto the "
    "input of spatial size output_size (avg_pool2d's transpose).",
)
