"""Window geometry shared by the convolution and pooling ops (conv.py,
conv_transpose.py, conv_grad.py, pool.py, pool_grad.py): the window attributes, output
sizes, the box of windows each kernel tap reads (`tap_spans`), and padded copies made
one chunk of images at a time (`padded_chunks`; a chunk is at most an eighth of the
batch, so temporaries stay a small share of the activations), with `windows` views
over them and the bytes each of these holds (for the ops' `scratch`).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import conv_taps, rules
from .conv_taps import ufunc_buffers, virtual
from .registry import Attr

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


def tap_spans(tap, out_hw, hw, stride, padding, dilation):
    """Where tap (i, j) of the windows reads x (N, C, H, W) without its padding:
    (window rows, window columns, x rows, x columns) as slices, or None when the tap
    reads only padding. Tap by tap over these boxes, no padded copy of x is needed."""
    spans = [
        conv_taps.clip(0, count, s, t * d - p, size)
        for count, size, s, p, d, t in zip(out_hw, hw, stride, padding, dilation, tap)
    ]
    if None in spans:
        return None
    (ys, yt), (xs, xt) = spans
    return (slice(None), slice(None), ys, xs), (slice(None), slice(None), yt, xt)


# --- padded chunks ---------------------------------------------------------------------
def pad_chunks(shape, padding) -> list[slice]:
    """Images per chunk of a padded copy of an (N, C, H, W) input: ~_CHUNK_ELEMENTS."""
    n, c, h, w = shape
    return _batch_chunks(n, c * (h + 2 * padding[0]) * (w + 2 * padding[1]))


def padded_chunks(x, padding, pad_value, chunks):
    """Yield (images, x[images] padded with pad_value): one chunk-sized buffer, reused
    (its border is written once), so a padded copy never holds the whole batch; x's
    own chunks when there is no padding."""
    if not any(padding):
        for images in chunks:
            yield images, x[images]
        return
    (c, h, w), (ph, pw) = x.shape[1:], padding
    k = chunks[0].stop if chunks else 0
    buffer = np.full((k, c, h + 2 * ph, w + 2 * pw), pad_value, dtype=x.dtype)
    for images in chunks:
        chunk = buffer[: images.stop - images.start]
        chunk[:, :, ph : ph + h, pw : pw + w] = x[images]
        yield images, chunk


def padded_chunk(x, padding) -> np.ndarray:
    """The first (largest) chunk `padded_chunks` yields for x (a TensorType), virtual:
    for scratch rules."""
    (n, c, h, w), (ph, pw) = x.shape, padding
    k = pad_chunks(x.shape, padding)[0].stop if n else 0
    return virtual((k, c, h + 2 * ph, w + 2 * pw), x.dtype)


def padded_chunk_shape(x, *rest, padding, **attrs) -> tuple[int, ...]:
    """Workspace: `padded_chunks`' buffer for x (a TensorType)."""
    return padded_chunk(x, padding).shape


def padded_bytes(x, padding) -> int:
    """Bytes of `padded_chunks`' buffer for x (a TensorType): none without padding."""
    return padded_chunk(x, padding).nbytes if any(padding) else 0


def windows(xp, kernel, stride, dilation):
    """View of a padded xp (N, C, Hp, Wp) as (N, C, Ho, Wo, kh, kw) windows: no copy."""
    (dh, dw), (sh, sw) = dilation, stride
    span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    return sliding_window_view(xp, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]


def reduce_windows(win, ufunc, out) -> None:
    """Reduce (N, C, Ho, Wo, kh, kw) windows over the taps into out, one tap at a time: a
    contiguous accumulator is ~10x faster than reducing the strided view's last axes."""
    np.copyto(out, win[..., 0, 0])
    for i, j in np.ndindex(*win.shape[4:]):
        if i or j:
            ufunc(out, win[..., i, j], out=out)


def reduce_taps(x, kernel, stride, padding, dilation, ufunc, identity):
    """ufunc-reduce each window of x (N, C, H, W), padded with `identity` (-inf for max,
    0 for a sum), chunk by chunk of images into the result."""
    out = np.empty(x.shape[:2] + _out_hw(x.shape[2:], kernel, stride, padding, dilation), x.dtype)
    chunks = pad_chunks(x.shape, padding)
    for images, xp in padded_chunks(x, padding, identity, chunks):
        reduce_windows(windows(xp, kernel, stride, dilation), ufunc, out[images])
    return out


def reduce_buffers(x, kernel, stride, padding, dilation) -> int:
    """NumPy's buffers in `reduce_windows`' calls on the first chunk of x (a TensorType):
    its taps are strided views."""
    if not x.shape[0]:
        return 0
    win = windows(padded_chunk(x, padding), kernel, stride, dilation)
    out = virtual(win.shape[:4], x.dtype)
    taps = list(np.ndindex(*kernel))[1:]
    return max((ufunc_buffers(out, win[..., i, j], out) for i, j in taps), default=0)


def reduce_bytes(x, kernel, stride, padding, dilation) -> int:
    """Scratch of `reduce_taps`: the padded chunk, and NumPy's buffers."""
    return padded_bytes(x, padding) + reduce_buffers(x, kernel, stride, padding, dilation)


# Images per chunk of a tap-accumulating loop: the accumulator stays in cache across
# the kh*kw passes (3x faster than whole-batch passes on a MobileNet block).
_CHUNK_ELEMENTS = 1 << 18
# A chunk is also at most an eighth of the batch, so a small batch's temporaries stay a
# small share of its activations (they count in the memory model: `scratch`), while a
# big batch's chunks stay big enough (_CHUNK_ELEMENTS) for NumPy's loops to be fast.
_CHUNK_SHARE = 8


def _batch_chunks(n: int, per_image: int) -> list[slice]:
    step = max(1, min(_CHUNK_ELEMENTS // max(per_image, 1), -(-n // _CHUNK_SHARE)))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]
