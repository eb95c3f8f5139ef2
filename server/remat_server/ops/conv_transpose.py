"""conv_transpose2d, the adjoint of conv2d: stride, padding, output_padding, dilation
and groups as torch.nn.functional.conv_transpose2d.

conv2d gathers windows (unfold) and contracts them with the weight; its adjoint in x
contracts with the weight's transpose and scatters back onto the windows (col2im). So
the forward is blocked GEMMs (conv_taps) scattered tap by tap onto one chunk of images'
canvas at a time, whose inside (the canvas cut at `padding`) is written straight into
the result; the depthwise path adds each tap straight onto the result, dropping what
falls in the padding (no whole-batch canvas, no crop copy either way). output_padding
extends the far edges with rows and columns no window reaches (zeros, plus the bias).
The VJP is conv2d for x and conv2d_weight_grad (roles swapped) for w: values the size
of x and w only.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import conv_taps, rules
from .conv import (
    GROUPS,
    _bias,
    _bias_grad,
    _chunk_bytes,
    bias_buffers,
)
from .conv_taps import ufunc_buffers, virtual
from .registry import register
from .windows import (
    DILATION,
    NON_NEGATIVE,
    PADDING,
    STRIDE,
    _batch_chunks,
    _image,
    _out_hw,
    _pair,
)


def _geometry(hw, kernel, stride, padding, output_padding, dilation):
    """(canvas, output) spatial sizes; the canvas holds every window uncropped."""
    canvas = tuple(
        (n - 1) * s + d * (k - 1) + 1 for n, k, s, d in zip(hw, kernel, stride, dilation)
    )
    out = tuple(c - 2 * p + e for c, p, e in zip(canvas, padding, output_padding))
    return canvas, out


def _infer(x, w, *bias, stride, padding, output_padding, dilation, groups):
    _image(x)
    rules.same_dtype(x, w)
    if len(w.shape) != 4:
        raise ShapeError(f"weight must be 4-D (C_in, C_out / groups, kh, kw), got shape {w.shape}")
    if w.shape[0] != x.shape[1]:
        raise ShapeError(
            f"weight {w.shape} expects {w.shape[0]} input channels, "
            f"the input {x.shape} has {x.shape[1]}"
        )
    if x.shape[1] % groups:
        raise ShapeError(f"groups={groups} must divide the input channels ({x.shape[1]})")
    if min(w.shape[2:]) < 1:
        raise ShapeError(f"weight {w.shape} has an empty kernel")
    if min(x.shape[2:]) < 1:
        raise ShapeError(f"input {x.shape} has an empty spatial dimension")
    if any(e >= max(s, d) for e, s, d in zip(output_padding, stride, dilation)):
        raise ShapeError(
            f"output padding must be smaller than either stride or dilation (per axis), "
            f"got output_padding {tuple(output_padding)}, stride {tuple(stride)}, "
            f"dilation {tuple(dilation)}"
        )
    c_out = w.shape[1] * groups
    if bias:
        _bias(bias[0], c_out, x)
    _, out = _geometry(x.shape[2:], w.shape[2:], stride, padding, output_padding, dilation)
    if min(out) < 1:
        raise ShapeError(
            f"input {x.shape} with kernel {w.shape[2:]}, stride {tuple(stride)}, dilation "
            f"{tuple(dilation)} and padding {tuple(padding)}: output size would be {out}"
        )
    return TensorType((x.shape[0], c_out) + out, x.dtype)


def _conv_transpose2d(x, w, *bias, stride, padding, output_padding, dilation, groups):
    (c, h, wd), kernel = x.shape[1:], w.shape[2:]
    canvas_hw, out_hw = _geometry((h, wd), kernel, stride, padding, output_padding, dilation)
    if c == groups:
        out = _scatter_taps(x, w, out_hw, stride, padding, dilation)
    else:  # blocked GEMMs scattered tap by tap: no C_out*kh*kw-row column matrix
        out = conv_taps.conv_transpose2d(x, w, stride, dilation, groups, canvas_hw, padding, out_hw)
    if bias:
        out += bias[0].reshape(-1, 1, 1)
    return out


def _scatter_taps(x, w, out_hw, stride, padding, dilation, replay=False):
    """One input channel per group (depthwise): add each tap's scaled copy of x onto its
    strided positions of the result; no kh*kw-times-the-output column matrix. replay:
    on virtual arrays, the bytes of the chunk of products and NumPy's largest buffers."""
    (n, groups, h, wd), (og, kh, kw) = x.shape, w.shape[1:]
    chunks = _batch_chunks(n, groups * og * h * wd)
    if replay:
        out = virtual((n, groups * og) + tuple(out_hw), x.dtype)
        tmp = virtual((chunks[0].stop, groups, og, h, wd), x.dtype) if chunks else None
        chunks = chunks[:1]  # the widest chunk
    else:
        out = np.zeros((n, groups * og) + tuple(out_hw), dtype=x.dtype)
        tmp = np.empty((chunks[0].stop, groups, og, h, wd), dtype=x.dtype) if chunks else None
    buffers = 0
    for rows in chunks:
        part, xs = tmp[: rows.stop - rows.start], x[rows, :, None]
        for i, j in np.ndindex(kh, kw):
            scale = w[:, :, i, j, None, None]
            if replay:
                buffers = max(buffers, ufunc_buffers(xs, scale, part))
            else:
                np.multiply(xs, scale, out=part)
            added = conv_taps.scatter_tap(
                out[rows], part, (0, 0), (i, j), stride, dilation, padding, groups, replay
            )
            buffers = max(buffers, added)
    return (tmp.nbytes if tmp is not None else 0) + buffers if replay else out


def _scratch(out, x, w, *bias, stride, padding, output_padding, dilation, groups) -> int:
    """The path's temporaries (depthwise: a chunk of products; else conv_taps' weight
    copy and blocks) with NumPy's buffers, or the bias add's buffers after them."""
    if x.shape[1] == groups:
        xv, wv = virtual(x.shape, x.dtype), virtual(w.shape, w.dtype)
        path = _scatter_taps(xv, wv, out.shape[2:], stride, padding, dilation, replay=True)
    else:
        canvas_hw, _ = _geometry(
            x.shape[2:], w.shape[2:], stride, padding, output_padding, dilation
        )
        path = conv_taps.conv_transpose2d_scratch(x, w, stride, dilation, groups, canvas_hw)
    return max(path, bias_buffers(out) if bias else 0)


def _workspace(x, w, *bias, stride, padding, output_padding, dilation, groups):
    """The largest temporary: one chunk of products (depthwise), else conv_taps' (a
    chunk's canvas or coefficient grid, or one block)."""
    (n, c, h, wd), (_, og, kh, kw) = x.shape, w.shape
    if c == groups:
        per_image = og * groups * h * wd
        return (_chunk_bytes(n, per_image, 1) // max(per_image, 1), og * groups, h, wd)
    canvas_hw, _ = _geometry((h, wd), (kh, kw), stride, padding, output_padding, dilation)
    taps = conv_taps.Taps(canvas_hw, (kh, kw), stride, (0, 0), dilation, (h, wd))
    return (taps.workspace(og * groups, c, n, kh * kw * og * groups),)


def _vjp(e, g, out, x, w, *bias, stride, padding, output_padding, dilation, groups):
    """dx = conv2d(g, w) over the same geometry; dw is conv2d_weight_grad with the roles
    swapped (g is the image, x the windows' values), which has w's layout (C_in,
    C_out / groups, kh, kw) as is. When output_padding >= stride (possible when dilation
    > stride), g has more windows than x has pixels: the extra ones read only the zero
    rows output_padding added; dx drops them, and x gets zeros there for dw."""
    (h, wd), kernel = x.shape[2:], w.shape[2:]
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    dx = _first_windows(e, e.conv2d(g, w, **geometry), (h, wd))
    windows = _out_hw(g.shape[2:], kernel, stride, padding, dilation)
    if windows != (h, wd):
        x = e.pad(x, pads=(0, 0, 0, 0, 0, 0, windows[0] - h, windows[1] - wd))
    dw = e.conv2d_weight_grad(g, x, kernel=kernel, **geometry)
    return [dx, dw] + [_bias_grad(e, g) for _ in bias]


def _first_windows(e, t, hw):
    """t (N, C, A, B) -> t[:, :, :hw[0], :hw[1]] when it has more."""
    if tuple(t.shape[2:]) == tuple(hw):
        return t
    return e.slice(t, starts=(0, 0, 0, 0), stops=tuple(t.shape[:2]) + tuple(hw))


def _cost(out, x, w, *bias, **attrs) -> int:
    return 2 * x.size * math.prod(w.shape[1:]) + (out.size if bias else 0)


register(
    "conv_transpose2d",
    family="conv",
    inputs=(2, 3),
    infer=_infer,
    forward=_conv_transpose2d,
    vjp=_vjp,
    residuals="inputs",
    cost=_cost,
    workspace=_workspace,
    scratch=_scratch,
    attrs={
        "stride": STRIDE,
        "padding": PADDING,
        "output_padding": _pair(rules.non_negative, NON_NEGATIVE, default=(0, 0)),
        "dilation": DILATION,
        "groups": GROUPS,
    },
    doc="Transposed convolution (conv2d's adjoint in x), x (N, C_in, H, W) with w "
    "(C_in, C_out / groups, kh, kw), plus an optional bias (C_out,); "
    "torch.nn.functional.conv_transpose2d.",
)
