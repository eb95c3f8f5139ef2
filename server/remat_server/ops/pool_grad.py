"""Gradient ops of pooling, emitted by pool.py's VJPs (internal, but validated like any op).

Each computes its value tap by tap, chunk by chunk of images: a padded copy and a
padded canvas of one chunk (max), or the result itself with each tap over the windows
it reads inside it (average), and a few pooled-shape temporaries of one chunk; each
chunk's rows are written straight into the result (no whole-batch padded copy, no crop
copy). So the backward graph holds one value the size of x where the im2col
formulation held a taps-times-the-output column matrix, an argmax, and a one-hot mask.
All three are linear in their last input and adjoint in pairs: max_pool2d_grad(x, .)
and max_pool2d_gather(x, .) are each other's transposes, and avg_pool2d_grad is
avg_pool2d's; so they differentiate to one another.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .conv_taps import ufunc_buffers, virtual
from .pool import (
    AVG_POOL_ATTRS,
    MAX_POOL_ATTRS,
    _check_padding,
    _pool_infer,
    _pool_normalize,
    divide_buffers,
    divisor_bytes,
    pool_divisor,
)
from .registry import register
from .windows import (
    _image,
    _out_hw,
    _pair,
    pad_chunks,
    padded_bytes,
    padded_chunk,
    padded_chunk_shape,
    padded_chunks,
    reduce_windows,
    tap_spans,
    windows,
)


def _first_max_taps(win):
    """Yield (i, j, hit) per kernel tap of the (N, C, Ho, Wo, kh, kw) windows, row-major:
    hit marks the windows whose FIRST maximum is that tap (torch's argmax rule). `hit` is
    reused: consume it at once. A window holding NaN has a NaN maximum (np.maximum
    propagates it) and, as in torch's kernel (`val > max || isnan(val)` updates the
    argmax), its LAST NaN takes the gradient: such windows are left over by the first
    pass, and a second pass over the taps in reverse gives each its last NaN, in the
    same two masks (no data-dependent temporary)."""
    peak = np.empty(win.shape[:4], dtype=win.dtype)
    reduce_windows(win, np.maximum, peak)
    taps = list(np.ndindex(*win.shape[4:]))
    free = np.ones(peak.shape, dtype=bool)  # windows whose maximum is not yet found
    hit = np.empty_like(free)
    for i, j in taps:
        np.equal(win[..., i, j], peak, out=hit)  # never true where peak is NaN
        hit &= free
        free ^= hit  # hit is a subset of free: clears exactly the windows found
        yield i, j, hit
    if free.any():  # NaN windows
        for i, j in reversed(taps):
            np.isnan(win[..., i, j], out=hit)
            hit &= free
            free ^= hit
            yield i, j, hit


def _first_max_bytes(x, kernel, stride, padding, dilation) -> tuple[int, int]:
    """(bytes, NumPy's largest buffers) of `_first_max_taps` on the first chunk of x: its
    maxima and two masks; a strided tap per call."""
    win = windows(padded_chunk(x, padding), kernel, stride, dilation)[..., 0, 0]
    pooled = virtual(win.shape, x.dtype)
    return pooled.nbytes + 2 * pooled.size, ufunc_buffers(pooled, win, pooled)


def tap_region(i, j, out_hw, stride, dilation) -> tuple[slice, ...]:
    """The padded-input positions tap (i, j) of every window reads: (N, C, Ho, Wo)."""
    (ho, wo), (sh, sw), (dh, dw) = out_hw, stride, dilation
    return (
        slice(None),
        slice(None),
        slice(i * dh, i * dh + sh * (ho - 1) + 1, sh),
        slice(j * dw, j * dw + sw * (wo - 1) + 1, sw),
    )


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
    """Chunk by chunk: g times each tap's first-max mask added onto a padded canvas,
    whose inside is written into the result (the result itself without padding)."""
    (ph, pw), (h, w) = padding, x.shape[2:]
    out = (np.empty if any(padding) else np.zeros)(x.shape, dtype=x.dtype)
    chunks = pad_chunks(x.shape, padding)
    k = chunks[0].stop if chunks else 0
    canvases = np.empty((k, x.shape[1], h + 2 * ph, w + 2 * pw), x.dtype) if any(padding) else None
    parts = np.empty((k,) + g.shape[1:], dtype=g.dtype)
    for images, xp in padded_chunks(x, padding, -np.inf, chunks):
        m = images.stop - images.start
        if canvases is None:
            canvas = out[images]
        else:
            canvas = canvases[:m]
            canvas[...] = 0
        win = windows(xp, kernel, stride, dilation)
        _scatter_first_max(win, g[images], parts[:m], canvas, stride, dilation)
        if canvases is not None:
            out[images] = canvas[:, :, ph : ph + h, pw : pw + w]
    return out


def _scatter_first_max(win, g, part, canvas, stride, dilation) -> None:
    """Add g onto each window's first maximum in the padded canvas; a function, so its
    masks are dropped before the next chunk's."""
    for i, j, hit in _first_max_taps(win):
        np.multiply(g, hit, out=part)
        canvas[tap_region(i, j, g.shape[2:], stride, dilation)] += part


def _max_grad_scratch(out, x, g, kernel, stride, padding, dilation) -> int:
    """A chunk's padded copy and canvas, g times a mask, the first-max arrays, and
    NumPy's buffers: of a strided tap, of the product (the bool mask is cast: always
    buffered), of the add onto the canvas's strided region."""
    masks, buffers = _first_max_bytes(x, kernel, stride, padding, dilation)
    chunk = padded_chunk(x, padding)
    part = virtual((chunk.shape[0],) + tuple(g.shape[1:]), g.dtype)
    cast = min(np.getbufsize(), part.size) * part.itemsize
    canvas = chunk if any(padding) else virtual((chunk.shape[0],) + tuple(x.shape[1:]), x.dtype)
    for i, j in np.ndindex(*kernel):
        region = canvas[tap_region(i, j, g.shape[2:], stride, dilation)]
        buffers = max(buffers, cast, ufunc_buffers(region, part, region))
    return 2 * padded_bytes(x, padding) + part.nbytes + masks + buffers


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
    workspace=padded_chunk_shape,
    scratch=_max_grad_scratch,
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
    out_hw = _out_hw(x.shape[2:], kernel, stride, padding, dilation)
    out = np.zeros(x.shape[:2] + out_hw, dtype=v.dtype)
    chunks = pad_chunks(x.shape, padding)
    values = padded_chunks(v, padding, 0.0, chunks)
    for (images, xp), (_, vp) in zip(padded_chunks(x, padding, -np.inf, chunks), values):
        win = windows(xp, kernel, stride, dilation)
        _copy_first_max(win, windows(vp, kernel, stride, dilation), out[images])
    return out


def _copy_first_max(win, values, out) -> None:
    """out = the values at each window's first maximum; a function, so its masks are
    dropped before the next chunk's."""
    for i, j, hit in _first_max_taps(win):
        np.copyto(out, values[..., i, j], where=hit)


def _gather_scratch(out, x, v, kernel, stride, padding, dilation) -> int:
    """The padded chunks of x and v, and the first-max arrays (copyto buffers nothing)."""
    masks, buffers = _first_max_bytes(x, kernel, stride, padding, dilation)
    return 2 * padded_bytes(x, padding) + masks + buffers


register(
    "max_pool2d_gather",
    family="conv",
    inputs=2,
    infer=_gather_infer,
    normalize=_pool_normalize,
    forward=_gather,
    vjp=lambda e, gbar, out, x, v, **geometry: [None, e.max_pool2d_grad(x, gbar, **geometry)],
    residuals="inputs",
    workspace=padded_chunk_shape,
    scratch=_gather_scratch,
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
    out = np.zeros(g.shape[:2] + tuple(output_size), dtype=g.dtype)
    geometry = (g.shape[2:], output_size, stride, padding, (1, 1))
    for tap in np.ndindex(*kernel):
        spans = tap_spans(tap, *geometry)
        if spans is not None:
            out[spans[1]] += share[spans[0]]
    return out


def _avg_grad_scratch(out, g, output_size, kernel, stride, padding, count_include_pad) -> int:
    """Each window's share of g, the divisor (pool.py), and NumPy's buffers of the
    division or of the largest tap's add."""
    gs, target, buffers = virtual(g.shape, g.dtype), virtual(out.shape, out.dtype), 0
    for tap in np.ndindex(*kernel):
        spans = tap_spans(tap, g.shape[2:], output_size, stride, padding, (1, 1))
        if spans is not None:
            box = target[spans[1]]
            buffers = max(buffers, ufunc_buffers(box, gs[spans[0]], box))
    buffers = max(buffers, divide_buffers(g, g, count_include_pad))
    return g.nbytes + divisor_bytes(g, count_include_pad) + buffers


register(
    "avg_pool2d_grad",
    family="conv",
    infer=_avg_grad_infer,
    normalize=_pool_normalize,
    forward=_avg_grad,
    vjp=lambda e, gbar, out, g, output_size, **attrs: [e.avg_pool2d(gbar, **attrs)],
    residuals="none",
    scratch=_avg_grad_scratch,
    cost=lambda out, g, kernel, **attrs: g.size * kernel[0] * kernel[1] + out.size,
    attrs={
        **AVG_POOL_ATTRS,
        "output_size": _pair(rules.all_positive, "each > 0", required=True),
    },
    doc="avg_pool2d's gradient: each window's share of g (N, C, Ho, Wo) added onto the "
    "input of spatial size output_size (avg_pool2d's transpose).",
)
