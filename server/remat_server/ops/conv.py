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
GROUPS = Attr(
    "int",
    default=1,
    check=rules.positive,
    requirement="must be >= 1",
    doc="Channel groups: each sees C_in / groups inputs and makes C_out / groups outputs.",
)
# Images per chunk of a tap-accumulating loop: the accumulator stays in cache across
# the kh*kw passes (3x faster than whole-batch passes on a MobileNet block).
_CHUNK_ELEMENTS = 1 << 18


def _batch_chunks(n: int, per_image: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(per_image, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _bias(b: TensorType, channels: int, x: TensorType) -> None:
    rules.same_dtype(x, b)
    if b.shape != (channels,):
        raise ShapeError(
            f"bias must have shape ({channels},), one per output channel, got {b.shape}"
        )


def _conv2d_infer(x, w, *bias, stride, padding, dilation, groups=1):
    _image(x)
    rules.same_dtype(x, w)
    if len(w.shape) != 4:
        raise ShapeError(f"weight must be 4-D (O, C, kh, kw), got shape {w.shape}")
    if w.shape[0] % groups:
        raise ShapeError(
            f"groups={groups} must divide the output channels: weight {w.shape} has {w.shape[0]}"
        )
    if w.shape[1] * groups != x.shape[1]:
        grouped = f" with groups={groups}" if groups > 1 else ""
        raise ShapeError(
            f"weight {w.shape}{grouped} expects {w.shape[1] * groups} input channels, "
            f"the input {x.shape} has {x.shape[1]}"
        )
    if min(w.shape[2:]) < 1:
        raise ShapeError(f"weight {w.shape} has an empty kernel")
    if bias:
        _bias(bias[0], w.shape[0], x)
    ho, wo = _out_hw(x.shape[2:], w.shape[2:], stride, padding, dilation)
    return TensorType((x.shape[0], w.shape[0], ho, wo), x.dtype)


def _conv2d(x, w, *bias, stride, padding, dilation, groups=1):
    if groups == 1:
        cols = _unfold(x, w.shape[2:], stride, padding, dilation)  # (N, CK, L)
        out = w.reshape(w.shape[0], math.prod(w.shape[1:])) @ cols  # (N, O, L), a GEMM per image
    elif w.shape[1] == 1:
        out = _depthwise(x, w, stride, padding, dilation)
    else:  # one batched GEMM over a (groups,) axis: (G, O/G, CK/G) @ (N, G, CK/G, L)
        cols = _unfold(x, w.shape[2:], stride, padding, dilation)
        n, ck, length = cols.shape
        out = w.reshape(groups, w.shape[0] // groups, ck // groups) @ cols.reshape(
            n, groups, ck // groups, length
        )
    out = out.reshape(
        (x.shape[0], w.shape[0]) + _out_hw(x.shape[2:], w.shape[2:], stride, padding, dilation)
    )
    if bias:
        out += bias[0].reshape(-1, 1, 1)
    return out


def _depthwise(x, w, stride, padding, dilation):
    """One input channel per group: accumulate kh*kw scaled windows. A few image-sized
    passes, instead of a kh*kw-times-the-input im2col copy and N*C tiny GEMMs."""
    win = _windows(x, w.shape[2:], stride, padding, dilation)  # (N, G, Ho, Wo, kh, kw)
    n, groups, ho, wo, kh, kw = win.shape
    taps = w.reshape(groups, w.shape[0] // groups, kh, kw)  # (G, O/G, kh, kw)
    out = np.empty((n, groups, taps.shape[1], ho, wo), dtype=x.dtype)
    chunks = _batch_chunks(n, out[:1].size)
    tmp = np.empty_like(out[chunks[0]]) if chunks else None
    for rows in chunks:
        acc, part = out[rows], tmp[: rows.stop - rows.start]
        for t, (i, j) in enumerate(np.ndindex(kh, kw)):
            np.multiply(
                win[rows, :, None, :, :, i, j], taps[:, :, i, j, None, None], out=part if t else acc
            )
            if t:
                acc += part
    return out


def _conv2d_workspace(x, w, *bias, stride, padding, dilation, groups=1) -> tuple[int, ...]:
    """The padded input, or the im2col matrix (N, C*kh*kw, Ho*Wo) when that is bigger."""
    padded = _padded(x, padding=padding)
    if groups > 1 and w.shape[1] == 1:  # depthwise: taps accumulate, no im2col copy
        return padded
    ho, wo = _out_hw(x.shape[2:], w.shape[2:], stride, padding, dilation)
    cols = (x.shape[0], x.shape[1] * w.shape[2] * w.shape[3], ho * wo)
    return max(padded, cols, key=math.prod)


def _dense_grads(e, g, x, w, stride, padding, dilation):
    (n, c, h, wd), (o, _, kh, kw) = x.shape, w.shape
    geometry = {"kernel": (kh, kw), "stride": stride, "padding": padding, "dilation": dilation}
    g3 = e.reshape(g, shape=(n, o, g.shape[2] * g.shape[3]))
    cols = e.unfold(x, **geometry)
    dw = e.sum(g3 @ e.transpose(cols, axes=(0, 2, 1)), axes=(0,))
    dcols = e.transpose(e.reshape(w, shape=(o, c * kh * kw)), axes=(1, 0)) @ g3
    return [e.fold(dcols, output_size=(h, wd), **geometry), e.reshape(dw, shape=w.shape)]


def _grouped_grads(e, g, x, w, stride, padding, dilation, groups):
    """dx is conv_transpose2d (conv2d's adjoint in x; output_padding restores the rows
    the stride skipped); dw is one unfold GEMM batched over a (groups,) axis."""
    (n, _, h, wd), (o, cg, kh, kw) = x.shape, w.shape
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    skipped = tuple(
        (size + 2 * p - d * (k - 1) - 1) % s
        for size, k, s, p, d in zip((h, wd), (kh, kw), stride, padding, dilation)
    )
    dx = e.conv_transpose2d(g, w, output_padding=skipped, groups=groups, **geometry)
    length, ck = g.shape[2] * g.shape[3], cg * kh * kw
    g4 = e.reshape(g, shape=(n, groups, o // groups, length))
    cols = e.reshape(e.unfold(x, kernel=(kh, kw), **geometry), shape=(n, groups, ck, length))
    dw = e.sum(g4 @ e.transpose(cols, axes=(0, 1, 3, 2)), axes=(0,))  # (G, O/G, CK/G)
    return [dx, e.reshape(dw, shape=w.shape)]


def _conv2d_vjp(e, g, out, x, w, *bias, stride, padding, dilation, groups=1):
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    if groups == 1:  # the original rule, node for node: ungrouped graphs differentiate as before
        dx, dw = _dense_grads(e, g, x, w, **geometry)
    else:
        dx, dw = _grouped_grads(e, g, x, w, groups=groups, **geometry)
    return [dx, dw] + [_bias_grad(e, g) for _ in bias]


def _bias_grad(e, g):
    return e.sum(g, axes=(0, 2, 3))


register(
    "conv2d",
    family="conv",
    inputs=(2, 3),
    infer=_conv2d_infer,
    forward=_conv2d,
    vjp=_conv2d_vjp,
    residuals="inputs",
    workspace=_conv2d_workspace,
    cost=lambda out, x, w, *bias, **attrs: (
        2 * out.size * math.prod(w.shape[1:]) + (out.size if bias else 0)
    ),
    attrs={"stride": STRIDE, "padding": PADDING, "dilation": DILATION, "groups": GROUPS},
    doc="Cross-correlation, x (N, C, H, W) with w (O, C / groups, kh, kw), plus an optional "
    "bias (O,); torch.nn.functional.conv2d.",
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
    # Each window's gradient goes to its first maximum in row-major tap order, as
    # torch's max_pool2d does (its backward follows the argmax its forward recorded).
    first = e.argmax(windows, axis=2)  # (n, c, length)
    mask = e.transpose(e.one_hot(first, depth=taps, dtype=x.dtype), axes=(0, 1, 3, 2))
    share = mask * e.reshape(g, shape=(n, c, 1, length))
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
    residuals="inputs",
    workspace=_padded,
    cost=_window_cost,
    attrs={**POOL_ATTRS, "dilation": DILATION},
    doc="Max over each window of x (N, C, H, W), padded with -inf; stride defaults to "
    "the kernel; padding at most half the kernel (torch's rule). A window's gradient "
    "goes to its first maximum (torch's rule).",
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
