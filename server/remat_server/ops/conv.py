"""2-D convolution on NCHW tensors: conv2d, and unfold (im2col) and fold (col2im).

conv2d's forward is blocked GEMMs over the kernel taps (conv_taps), or a few scaled
window passes when depthwise. Its VJP is two native ops, conv_transpose2d for x and
conv2d_weight_grad for w, each producing a value the size of x or w, not a
kh*kw-times-the-input column matrix; those differentiate again to the same family.
unfold and fold are each other's adjoints.

Window helpers (no Python loop over pixels), shared with pooling (pool.py,
pool_grad.py): `tap_spans` gives the box of windows each kernel tap reads inside x, so
unfold, fold and the 1x1 conv copy or add tap by tap straight into their result, with
no padded copy of x; the tap-accumulating loops (depthwise conv, pooling) reduce
`windows` views of a padded copy that `padded_chunks` makes one chunk of images at a
time, never for the whole batch (uniform strided views run those loops ~1.5x faster
than per-tap boxes). Each op's `scratch` declares, exactly, the bytes of the
temporaries its forward holds besides its inputs and its result, NumPy's ufunc buffers
included (`conv_taps.ufunc_buffers`, replayed on `virtual` arrays).
"""

from __future__ import annotations

import math

import numpy as np

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import conv_taps, rules
from .conv_taps import ufunc_buffers, virtual
from .registry import Attr, free, register
from .windows import (
    DILATION,
    NON_NEGATIVE,
    PADDING,
    STRIDE,
    WINDOW_ATTRS,
    _batch_chunks,
    _image,
    _out_hw,
    _pair,
    padded_chunks,
    tap_spans,
    windows,
)

FLOAT = dtypes.FLOATS


def _unfold(x, kernel, stride, padding, dilation, pad_value=0.0):
    """torch.nn.functional.unfold's layout: rows (c, i, j), columns (oh, ow), row-major.
    Each tap's box of x is copied straight into the result: no padded copy of x."""
    (n, c), (kh, kw) = x.shape[:2], kernel
    out_hw = _out_hw(x.shape[2:], kernel, stride, padding, dilation)
    if any(padding):
        out = np.full((n, c, kh, kw) + out_hw, pad_value, dtype=x.dtype)
    else:
        out = np.empty((n, c, kh, kw) + out_hw, dtype=x.dtype)
    for i, j in np.ndindex(kh, kw):
        spans = tap_spans((i, j), out_hw, x.shape[2:], stride, padding, dilation)
        if spans is not None:
            out[:, :, i, j][spans[0]] = x[spans[1]]
    return out.reshape(n, c * kh * kw, out_hw[0] * out_hw[1])


def _fold(cols, output_size, kernel, stride, padding, dilation):
    """Each tap's column block added onto its box of the result (overlaps add, values
    falling in the padding are dropped): no padded canvas, no crop copy."""
    (kh, kw), out_hw = kernel, _out_hw(output_size, kernel, stride, padding, dilation)
    n, c = cols.shape[0], cols.shape[1] // (kh * kw)
    blocks = cols.reshape(n, c, kh, kw, *out_hw)
    out = np.zeros((n, c) + tuple(output_size), dtype=cols.dtype)
    for i, j in np.ndindex(kh, kw):
        spans = tap_spans((i, j), out_hw, output_size, stride, padding, dilation)
        if spans is not None:
            out[spans[1]] += blocks[:, :, i, j][spans[0]]
    return out


def _fold_scratch(out, cols, output_size, kernel, stride, padding, dilation) -> int:
    """NumPy's buffers in fold's largest tap add (nothing else: it adds onto the result)."""
    out_hw = _out_hw(output_size, kernel, stride, padding, dilation)
    blocks = virtual(cols.shape, cols.dtype).reshape(out.shape[:2] + tuple(kernel) + out_hw)
    target, buffers = virtual(out.shape, out.dtype), 0
    for i, j in np.ndindex(*kernel):
        spans = tap_spans((i, j), out_hw, output_size, stride, padding, dilation)
        if spans is not None:
            box = target[spans[1]]
            buffers = max(buffers, ufunc_buffers(box, blocks[:, :, i, j][spans[0]], box))
    return buffers


def _padded(x, *rest, padding, **attrs) -> tuple[int, ...]:
    """Workspace: the zero-padded copy of x (N, C, H, W) that `_windows` makes."""
    n, c, h, w = x.shape
    return (n, c, h + 2 * padding[0], w + 2 * padding[1])


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
    scratch=None,  # each tap's box of x is copied straight into the result
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
    scratch=_fold_scratch,
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
        out = _depthwise(x, w, stride, padding, dilation, out_hw)
    elif w.shape[2:] == (1, 1):
        out = _pointwise(x, w, stride, padding, groups, out_hw)
    else:  # blocked GEMMs over the taps: no kh*kw-times-the-input column matrix
        out = conv_taps.conv2d(x, w, stride, padding, dilation, groups, out_hw)
    out = out.reshape(x.shape[:1] + w.shape[:1] + out_hw)
    if bias:  # every temporary of the paths is freed by now
        out += bias[0].reshape(-1, 1, 1)
    return out


def _pointwise(x, w, stride, padding, groups, out_hw):
    """A 1x1 kernel: one GEMM per image over the values it reads, which are x itself,
    or (strided, padded) its box copied once into zeros: `_pointwise_bytes`."""
    if tuple(stride) == (1, 1) and not any(padding):
        cols = x
    else:
        cols = (np.zeros if any(padding) else np.empty)(x.shape[:2] + out_hw, dtype=x.dtype)
        spans = tap_spans((0, 0), out_hw, x.shape[2:], stride, padding, (1, 1))
        if spans is not None:
            cols[spans[0]] = x[spans[1]]
    (n, c), length = x.shape[:2], out_hw[0] * out_hw[1]
    wg = w.reshape(groups, w.shape[0] // groups, c // groups)
    return wg @ cols.reshape(n, groups, c // groups, length)


def _pointwise_bytes(x, stride, padding, out_hw) -> int:
    if tuple(stride) == (1, 1) and not any(padding):
        return 0
    return x.shape[0] * x.shape[1] * out_hw[0] * out_hw[1] * dtypes.itemsize(x.dtype)


def _depthwise(x, w, stride, padding, dilation, out_hw):
    """One input channel per group: accumulate kh*kw scaled windows. A few image-sized
    passes, instead of a kh*kw-times-the-input im2col copy and N*C tiny GEMMs; chunk by
    chunk of images, so the padded copy and the products hold one chunk."""
    (n, groups), (kh, kw) = x.shape[:2], w.shape[2:]
    taps = w.reshape(groups, w.shape[0] // groups, kh, kw)  # (G, O/G, kh, kw)
    out = np.empty((n, groups, taps.shape[1]) + out_hw, dtype=x.dtype)
    chunks = _batch_chunks(n, out[:1].size)
    tmp = np.empty_like(out[chunks[0]]) if chunks else None
    for rows, xp in padded_chunks(x, padding, 0.0, chunks):
        win = windows(xp, (kh, kw), stride, dilation)  # (chunk, G, Ho, Wo, kh, kw)
        acc, part = out[rows], tmp[: rows.stop - rows.start]
        for t, (i, j) in enumerate(np.ndindex(kh, kw)):
            np.multiply(
                win[:, :, None, :, :, i, j], taps[:, :, i, j, None, None], out=part if t else acc
            )
            if t:
                acc += part
    return out


def _depthwise_bytes(x, w, stride, padding, dilation, out_hw) -> int:
    """A chunk's padded copy and products, and NumPy's buffers of a tap's product."""
    n, groups = x.shape[:2]
    chunks = _batch_chunks(n, w.shape[0] * out_hw[0] * out_hw[1])
    if not chunks:
        return 0
    k = chunks[0].stop
    xp = virtual((k, groups) + tuple(s + 2 * p for s, p in zip(x.shape[2:], padding)), x.dtype)
    win = windows(xp, w.shape[2:], stride, dilation)[:, :, None, :, :, 0, 0]
    part = virtual((k, groups, w.shape[0] // groups) + tuple(out_hw), x.dtype)
    scale = virtual((groups, w.shape[0] // groups, 1, 1), x.dtype)
    padded = xp.nbytes if any(padding) else 0
    return padded + part.nbytes + ufunc_buffers(win, scale, part)


def bias_buffers(out) -> int:
    """NumPy's buffers adding a (C,) bias onto out (N, C, H, W): the broadcast operand."""
    return ufunc_buffers(virtual(out.shape, out.dtype), virtual((out.shape[1], 1, 1), out.dtype))


def _chunk_bytes(n, per_image, itemsize) -> int:
    """Bytes of a tap-accumulating loop's (chunk, ...) temporary."""
    chunks = _batch_chunks(n, per_image)
    return (chunks[0].stop if chunks else 0) * per_image * itemsize


def _conv2d_scratch(out, x, w, *bias, stride, padding, dilation, groups=1) -> int:
    """The path's temporaries (depthwise: a chunk of products; 1x1: the strided box,
    unless x is read in place; else conv_taps' phases, weight copy and blocks), or the
    bias add's buffers after them."""
    out_hw = tuple(out.shape[2:])
    if groups > 1 and w.shape[1] == 1:
        path = _depthwise_bytes(x, w, stride, padding, dilation, out_hw)
    elif tuple(w.shape[2:]) == (1, 1):
        path = _pointwise_bytes(x, stride, padding, out_hw)
    else:
        path = conv_taps.conv2d_scratch(x, w, stride, padding, dilation, groups, out_hw)
    return max(path, bias_buffers(out) if bias else 0)


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
    if groups > 1 and w.shape[1] == 1:  # depthwise: a chunk's padded copy
        out_hw = _out_hw(x.shape[2:], w.shape[2:], stride, padding, dilation)
        chunks = _batch_chunks(x.shape[0], w.shape[0] * out_hw[0] * out_hw[1])
        k = chunks[0].stop if chunks else 0
        return _padded(TensorType((k,) + tuple(x.shape[1:]), x.dtype), padding=padding)
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
    scratch=_conv2d_scratch,
    cost=lambda out, x, w, *bias, **attrs: (
        2 * out.size * math.prod(w.shape[1:]) + (out.size if bias else 0)
    ),
    attrs={"stride": STRIDE, "padding": PADDING, "dilation": DILATION, "groups": GROUPS},
    doc="Cross-correlation, x (N, C, H, W) with w (O, C / groups, kh, kw), plus an optional "
    "bias (O,); torch.nn.functional.conv2d.",
)
