"""2-D convolution on NCHW tensors: conv2d, and unfold (im2col) and fold (col2im).

conv2d's forward is blocked GEMMs over the kernel taps (conv_taps), or a few scaled
window passes when depthwise. Its VJP is two native ops, conv_transpose2d for x and
conv2d_weight_grad for w, each producing a value the size of x or w, not a
kh*kw-times-the-input column matrix; those differentiate again to the same family.
unfold and fold are each other's adjoints. The window helpers here (`_windows`,
`_reduce_taps`) view the padded input through `sliding_window_view` (no Python loop
over pixels); pooling (pool.py) uses them too.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import conv_taps, rules
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
    out_hw = _out_hw(x.shape[2:], w.shape[2:], stride, padding, dilation)
    if groups > 1 and w.shape[1] == 1:
        out = _depthwise(x, w, stride, padding, dilation)
    elif w.shape[2:] == (1, 1):  # one tap: im2col is a strided copy no bigger than x
        cols = _unfold(x, (1, 1), stride, padding, dilation)  # (N, C, L)
        n, c, length = cols.shape
        wg = w.reshape(groups, w.shape[0] // groups, c // groups)
        out = wg @ cols.reshape(n, groups, c // groups, length)
    else:  # blocked GEMMs over the taps: no kh*kw-times-the-input column matrix
        out = conv_taps.conv2d(x, w, stride, padding, dilation, groups, out_hw)
    out = out.reshape(x.shape[:1] + w.shape[:1] + out_hw)
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


def taps_workspace(x, kernel, stride, padding, dilation, c, o) -> tuple[int, ...]:
    """Workspace of a conv_taps kernel over x's geometry (c channels gathered, o on the
    output grid), at least the padded input: every path is held to the same limit on a
    padding out of proportion to the image."""
    out_hw = _out_hw(x.shape[2:], kernel, stride, padding, dilation)
    taps = conv_taps.Taps(x.shape[2:], kernel, stride, padding, dilation, out_hw)
    rows = kernel[0] * kernel[1] * c
    elements = taps.workspace(c, o, x.shape[0], rows)
    return max(_padded(x, padding=padding), (elements,), key=math.prod)


def _conv2d_workspace(x, w, *bias, stride, padding, dilation, groups=1) -> tuple[int, ...]:
    if groups > 1 and w.shape[1] == 1:  # depthwise: taps accumulate on the padded input
        return _padded(x, padding=padding)
    return taps_workspace(x, w.shape[2:], stride, padding, dilation, x.shape[1], w.shape[0])


def output_padding(hw, kernel, stride, padding, dilation) -> tuple[int, ...]:
    """The rows and columns past the last window that conv2d's stride skipped: the
    output_padding that makes conv_transpose2d (its adjoint in x) restore x's size."""
    return tuple(
        (size + 2 * p - d * (k - 1) - 1) % s
        for size, k, s, p, d in zip(hw, kernel, stride, padding, dilation)
    )


def _conv2d_vjp(e, g, out, x, w, *bias, stride, padding, dilation, groups=1):
    """Both gradients are native ops whose values are the size of x and of w: no
    kh*kw-times-the-input column matrix in the backward graph."""
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    skipped = output_padding(x.shape[2:], w.shape[2:], stride, padding, dilation)
    dx = e.conv_transpose2d(g, w, output_padding=skipped, **geometry)
    dw = e.conv2d_weight_grad(x, g, kernel=w.shape[2:], **geometry)
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
