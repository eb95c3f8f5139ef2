"""2-D convolution and pooling on NCHW tensors, built on unfold (im2col) and fold.

unfold and fold are each other's adjoints, so every VJP here is a few graph ops
around them and differentiates again to the same family. Forwards view the padded
input through `sliding_window_view` (no Python loop over pixels) and let BLAS do
the contraction.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .registry import Attr, free, register

FLOAT = dtypes.FLOATS


def _pair(check, requirement: str, default=None, required: bool = False) -> Attr:
    kwargs = {} if required else {"default": default}
    return Attr(
        "ints",
        check=lambda v: len(v) == 2 and check(v),
        requirement=f"must be 2 ints, {requirement}",
        **kwargs,
    )


POSITIVE, NON_NEGATIVE = "each > 0", "each >= 0"
KERNEL = _pair(rules.all_positive, POSITIVE, required=True)
STRIDE = _pair(rules.all_positive, POSITIVE, default=(1, 1))
PADDING = _pair(rules.non_negative, NON_NEGATIVE, default=(0, 0))
DILATION = _pair(rules.all_positive, POSITIVE, default=(1, 1))
WINDOW_ATTRS = {"kernel": KERNEL, "stride": STRIDE, "padding": PADDING, "dilation": DILATION}


# --- geometry --------------------------------------------------------------------------
def _out_hw(hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    """Output spatial size, torch's formula; ShapeError when no window fits."""
    out = tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(hw, kernel, stride, padding, dilation)
    )
    if min(out) < 1:
        raise ShapeError(
            f"input {tuple(hw)} with padding {padding} is smaller than the "
            f"kernel {kernel} with dilation {dilation}: output size would be {out}"
        )
    return out


def _image(x: TensorType, what: str = "input") -> None:
    rules.require_dtype(x, FLOAT, what)
    if len(x.shape) != 4:
        raise ShapeError(f"{what} must be 4-D (N, C, H, W), got shape {x.shape}")


def _windows(x, kernel, stride, padding, dilation, pad_value=0.0):
    """View of x (N, C, H, W) as (N, C, Ho, Wo, kh, kw) windows; copies only to pad."""
    (ph, pw), (dh, dw), (sh, sw) = padding, dilation, stride
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    return sliding_window_view(x, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]


def _reduce_taps(windows, ufunc):
    """Reduce (N, C, Ho, Wo, kh, kw) windows over the taps, one tap at a time: a
    contiguous accumulator is ~10x faster than reducing the strided view's last axes."""
    out = windows[..., 0, 0].copy()
    for i, j in np.ndindex(*windows.shape[4:]):
        if i or j:
            ufunc(out, windows[..., i, j], out=out)
    return out


def _unfold(x, kernel, stride, padding, dilation, pad_value=0.0):
    win = _windows(x, kernel, stride, padding, dilation, pad_value)
    n, c, ho, wo, kh, kw = win.shape
    # torch.nn.functional.unfold layout: rows (c, i, j), columns (oh, ow), row-major.
    return win.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def _fold(cols, output_size, kernel, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    (h, w), (ho, wo) = output_size, _out_hw(output_size, kernel, stride, padding, dilation)
    n, c = cols.shape[0], cols.shape[1] // (kh * kw)
    blocks = cols.reshape(n, c, kh, kw, ho, wo)
    out = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):  # one strided add per kernel tap, overlaps summed
        for j in range(kw):
            out[
                :,
                :,
                i * dh : i * dh + sh * (ho - 1) + 1 : sh,
                j * dw : j * dw + sw * (wo - 1) + 1 : sw,
            ] += blocks[:, :, i, j]
    # Copy out of the padded buffer so it is freed (a view would keep it alive).
    return out[:, :, ph : ph + h, pw : pw + w].copy() if ph or pw else out


def _window_cost(out, x, kernel, **attrs) -> int:
    return out.size * kernel[0] * kernel[1]


def _padded(x, *rest, padding, **attrs) -> tuple[int, ...]:
    """Workspace: the zero-padded copy of x (N, C, H, W) that `_windows` makes."""
    n, c, h, w = x.shape
    return (n, c, h + 2 * padding[0], w + 2 * padding[1])


def _fold_padded(cols, output_size, kernel, padding, **attrs) -> tuple[int, ...]:
    """Workspace: fold's padded accumulator."""
    n, ck, _ = cols.shape
    return (
        n,
        ck // (kernel[0] * kernel[1]),
        output_size[0] + 2 * padding[0],
        output_size[1] + 2 * padding[1],
    )


# --- unfold, fold ----------------------------------------------------------------------
def _unfold_infer(x, kernel, stride, padding, dilation, pad_value):
    _image(x)
    n, c, h, w = x.shape
    ho, wo = _out_hw((h, w), kernel, stride, padding, dilation)
    return TensorType((n, c * kernel[0] * kernel[1], ho * wo), x.dtype)


register(
    "unfold",
    family="conv",
    infer=_unfold_infer,
    forward=_unfold,
    vjp=lambda e, g, out, x, kernel, stride, padding, dilation, pad_value: [
        e.fold(
            g,
            output_size=x.shape[2:],
            kernel=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
        )
    ],
    residuals="none",
    cost=free,
    workspace=_padded,
    attrs={
        **WINDOW_ATTRS,
        "pad_value": Attr("float", default=0.0, doc="Value of the padding (-inf for max)"),
    },
    doc="im2col: (N, C, H, W) -> (N, C*kh*kw, Ho*Wo), torch.nn.functional.unfold's layout.",
)


def _fold_infer(cols, output_size, kernel, stride, padding, dilation):
    rules.require_dtype(cols, FLOAT)
    if len(cols.shape) != 3:
        raise ShapeError(f"input must be 3-D (N, C*kh*kw, L), got shape {cols.shape}")
    n, ck, length = cols.shape
    taps = kernel[0] * kernel[1]
    ho, wo = _out_hw(output_size, kernel, stride, padding, dilation)
    if ck % taps:
        raise ShapeError(f"dimension 1 ({ck}) is not a multiple of the kernel size {taps}")
    if length != ho * wo:
        raise ShapeError(
            f"dimension 2 ({length}) must be the number of windows {ho}*{wo} "
            f"for output size {tuple(output_size)}"
        )
    return TensorType((n, ck // taps) + tuple(output_size), cols.dtype)


register(
    "fold",
    family="conv",
    infer=_fold_infer,
    forward=_fold,
    vjp=lambda e, g, out, cols, output_size, kernel, stride, padding, dilation: [
        e.unfold(g, kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    ],
    residuals="none",
    cost=lambda out, cols, **attrs: cols.size,
    workspace=_fold_padded,
    attrs={"output_size": _pair(rules.non_negative, NON_NEGATIVE, required=True), **WINDOW_ATTRS},
    doc="col2im, unfold's adjoint: sums each column back onto its window (overlaps add).",
)


# --- conv2d ----------------------------------------------------------------------------
def _conv2d_infer(x, w, stride, padding, dilation):
    _image(x)
    rules.same_dtype(x, w)
    if len(w.shape) != 4:
        raise ShapeError(f"weight must be 4-D (O, C, kh, kw), got shape {w.shape}")
    if w.shape[1] != x.shape[1]:
        raise ShapeError(
            f"weight {w.shape} expects {w.shape[1]} input channels, "
            f"the input {x.shape} has {x.shape[1]}"
        )
    if min(w.shape[2:]) < 1:
        raise ShapeError(f"weight {w.shape} has an empty kernel")
    ho, wo = _out_hw(x.shape[2:], w.shape[2:], stride, padding, dilation)
    return TensorType((x.shape[0], w.shape[0], ho, wo), x.dtype)


def _conv2d(x, w, stride, padding, dilation):
    cols = _unfold(x, w.shape[2:], stride, padding, dilation)  # (N, CK, L)
    out = w.reshape(w.shape[0], math.prod(w.shape[1:])) @ cols  # (N, O, L), one GEMM per image
    return out.reshape(out.shape[:2] + _out_hw(x.shape[2:], w.shape[2:], stride, padding, dilation))


def _conv2d_vjp(e, g, out, x, w, stride, padding, dilation):
    (n, c, h, wd), (o, _, kh, kw) = x.shape, w.shape
    geometry = {"kernel": (kh, kw), "stride": stride, "padding": padding, "dilation": dilation}
    g3 = e.reshape(g, shape=(n, o, g.shape[2] * g.shape[3]))
    cols = e.unfold(x, **geometry)
    dw = e.sum(g3 @ e.transpose(cols, axes=(0, 2, 1)), axes=(0,))
    dcols = e.transpose(e.reshape(w, shape=(o, c * kh * kw)), axes=(1, 0)) @ g3
    return [e.fold(dcols, output_size=(h, wd), **geometry), e.reshape(dw, shape=w.shape)]


register(
    "conv2d",
    family="conv",
    inputs=2,
    infer=_conv2d_infer,
    forward=_conv2d,
    vjp=_conv2d_vjp,
    residuals="inputs",
    workspace=_padded,
    cost=lambda out, x, w, **attrs: 2 * out.size * math.prod(w.shape[1:]),
    attrs={"stride": STRIDE, "padding": PADDING, "dilation": DILATION},
    doc="Cross-correlation, x (N, C, H, W) with w (O, C, kh, kw); no groups, no bias "
    "(add one by broadcasting).",
)


# --- pooling -------------------------------------------------------------------------
def _pool_normalize(x, kernel, stride, padding, **attrs) -> dict:
    return {
        "kernel": kernel,
        "stride": kernel if stride is None else stride,
        "padding": padding,
        **attrs,
    }


def _pool_infer(x, kernel, stride, padding, dilation=(1, 1), **attrs):
    _image(x)
    if any(p > k // 2 for p, k in zip(padding, kernel)):
        raise ShapeError(f"padding {padding} must be at most half the kernel {kernel}")
    ho, wo = _out_hw(x.shape[2:], kernel, stride, padding, dilation)
    return TensorType(x.shape[:2] + (ho, wo), x.dtype)


def _max_pool2d(x, kernel, stride, padding, dilation):
    return _reduce_taps(_windows(x, kernel, stride, padding, dilation, -np.inf), np.maximum)


def _max_pool2d_vjp(e, g, out, x, kernel, stride, padding, dilation):
    n, c, h, w = x.shape
    geometry = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation}
    taps, length = kernel[0] * kernel[1], out.shape[2] * out.shape[3]
    windows = e.reshape(e.unfold(x, pad_value=-math.inf, **geometry), shape=(n, c, taps, length))
    # Tied maxima share the gradient equally (torch gives it all to the first one).
    mask = e.cast(e.eq(windows, e.reshape(out, shape=(n, c, 1, length))), dtype=x.dtype)
    share = mask * (e.reshape(g, shape=(n, c, 1, length)) / e.sum(mask, axes=(2,), keepdims=True))
    return [e.fold(e.reshape(share, shape=(n, c * taps, length)), output_size=(h, w), **geometry)]


POOL_ATTRS = {
    "kernel": KERNEL,
    "stride": _pair(rules.all_positive, POSITIVE, default=None),
    "padding": PADDING,
}
register(
    "max_pool2d",
    family="conv",
    infer=_pool_infer,
    normalize=_pool_normalize,
    forward=_max_pool2d,
    vjp=_max_pool2d_vjp,
    residuals="inputs+output",
    workspace=_padded,
    cost=_window_cost,
    attrs={**POOL_ATTRS, "dilation": DILATION},
    doc="Max over each window of x (N, C, H, W), padded with -inf; stride defaults to "
    "the kernel; padding at most half the kernel (torch's rule).",
)


def _pool_divisor(hw, kernel, stride, padding, count_include_pad, dtype):
    """Per-window divisor: the kernel size, or the number of non-padding elements."""
    if count_include_pad:
        return kernel[0] * kernel[1]
    ones = np.ones((1, 1) + tuple(hw), dtype=dtypes.NUMPY[dtype])
    return _reduce_taps(_windows(ones, kernel, stride, padding, (1, 1)), np.add)


def _avg_pool2d(x, kernel, stride, padding, count_include_pad):
    divisor = _pool_divisor(
        x.shape[2:], kernel, stride, padding, count_include_pad, dtypes.of_array(x)
    )
    total = _reduce_taps(_windows(x, kernel, stride, padding, (1, 1)), np.add)
    total /= divisor
    return total


def _avg_pool2d_vjp(e, g, out, x, kernel, stride, padding, count_include_pad):
    n, c, h, w = x.shape
    taps, length = kernel[0] * kernel[1], out.shape[2] * out.shape[3]
    divisor = _pool_divisor((h, w), kernel, stride, padding, count_include_pad, x.dtype)
    scaled = g / (float(divisor) if count_include_pad else e.constant(value=divisor))
    spread = e.broadcast_to(e.reshape(scaled, shape=(n, c, 1, length)), shape=(n, c, taps, length))
    return [
        e.fold(
            e.reshape(spread, shape=(n, c * taps, length)),
            output_size=(h, w),
            kernel=kernel,
            stride=stride,
            padding=padding,
        )
    ]


register(
    "avg_pool2d",
    family="conv",
    infer=_pool_infer,
    normalize=_pool_normalize,
    forward=_avg_pool2d,
    vjp=_avg_pool2d_vjp,
    residuals="none",
    cost=_window_cost,
    workspace=_padded,
    attrs={**POOL_ATTRS, "count_include_pad": Attr("bool", default=True)},
    doc="Mean over each window of x (N, C, H, W), zero-padded; stride defaults to the "
    "kernel; count_include_pad=False divides by the non-padding count (as torch).",
)
