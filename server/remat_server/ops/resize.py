"""Resizing and padding of tensors: nearest and bilinear upsampling, pad.

Each op is a linear map that acts on one axis at a time through a small table of
source indices (and, for bilinear, weights): the forward gathers rows along each axis
in turn (`np.take`: O(output) work, no dense (out x in) matrix), and the VJP scatters
the gradient back through the same table with `scatter_add`, whose own VJP is `take`,
so every backward pass differentiates again. The tables become `constant` nodes of the
backward graph; they hold out-size entries per axis, never out x in.

Indices and weights follow ATen's CPU kernels (UpSample.h, UpSampleKernel.cpp) number
for number; see `_nearest_index` and `_linear_taps`.
"""

from __future__ import annotations

import numpy as np

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .conv_taps import ufunc_buffers, virtual
from .registry import Attr, free, register

FLOAT, NUMERIC = dtypes.FLOATS, rules.NUMERIC

SIZE = Attr(
    "ints",
    check=lambda v: len(v) == 2 and rules.all_positive(v),
    requirement="must be 2 ints (H, W), each > 0",
    doc="Output spatial size (H_out, W_out).",
)


# --- index tables ------------------------------------------------------------------------
def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """torch's "nearest" source index min(floor(dst * (in / out)), in - 1), evaluated in
    float32 as ATen's `nearest_idx` does (5 -> 7 reads 0 0 1 2 2 3 4; 7 -> 3 reads 0 2 4).
    The float32 rounding matters where dst * in / out is an integer: 2 -> 82 reads
    index 0 at dst 41, not 1. This is the rule of torch's backward for every dtype and of
    its forward for float32 (a float64 forward of a large output computes the product in
    double and can read one row further at such points)."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.floor(np.arange(n_out).astype(np.float32) * scale)
    return np.minimum(src.astype(np.int64), n_in - 1)


def _linear_taps(n_in: int, n_out: int, align_corners: bool, dtype) -> tuple:
    """Source indices and weights, each (n_out, 2), of 1-D linear interpolation in the
    input's precision, as ATen's area_pixel_compute_source_index and
    guard_index_and_lambda: half-pixel centers, scale * (dst + 0.5) - 0.5 clamped at 0
    (torch's compiled kernel fuses it into one multiply-add: computed exactly in float64,
    rounded once), or with align_corners, dst * (in - 1) / (out - 1). The second tap
    repeats the last row at the far edge; a kept size reads each row twice, weights 1
    and 0 (ATen's compute_source_index_and_lambda). Both taps are read even at weight 0,
    so 0 * inf makes NaN exactly where torch's kernel does."""
    f = np.dtype(dtype).type
    if n_out == n_in:
        rows = np.arange(n_in, dtype=np.int64)
        return np.stack([rows, rows], axis=1), np.array([[1, 0]] * n_in, dtype=dtype)
    dst = np.arange(n_out, dtype=np.float64)
    if align_corners:
        scale = f(n_in - 1) / f(n_out - 1) if n_out > 1 else f(0)
        src = (np.float64(scale) * dst).astype(dtype)
    else:
        scale = f(n_in) / f(n_out)
        src = np.maximum((np.float64(scale) * (dst + 0.5) - 0.5).astype(dtype), f(0))
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - lo.astype(dtype), f(0), f(1))
    index = np.stack([lo, lo + (lo < n_in - 1)], axis=1)
    return index, np.stack([f(1) - lam, lam], axis=1).astype(dtype)


# --- shared geometry -----------------------------------------------------------------------
def _image_infer(x: TensorType, size, allowed) -> TensorType:
    rules.require_dtype(x, allowed)
    if len(x.shape) != 4:
        raise ShapeError(f"input must be 4-D (N, C, H, W), got shape {x.shape}")
    if min(x.shape[2:]) < 1:
        raise ShapeError(f"input {x.shape} has an empty spatial dimension")
    return TensorType(x.shape[:2] + tuple(size), x.dtype)


def _axis_order(shape, size) -> tuple[int, int]:
    """Resample H first or W first, whichever leaves the smaller intermediate."""
    (h, w), (ho, wo) = shape[2:], size
    return (2, 3) if ho * w <= h * wo else (3, 2)


def _intermediate(x, size, **attrs) -> tuple[int, ...]:
    """Workspace: the result of the first axis pass (at most max(input, output) elements)."""
    first = _axis_order(x.shape, size)[0]
    shape = list(x.shape)
    shape[first] = size[first - 2]
    return tuple(shape)


def _along(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """Broadcast shape for a per-row table along `axis` of a tensor of `shape`."""
    return (-1,) + (1,) * (len(shape) - 1 - axis)


# --- upsample_nearest2d ------------------------------------------------------------------
def _nearest_axes(shape, size) -> list[int]:
    # An axis whose size is kept reads every row in place: skip it.
    return [a for a in _axis_order(shape, size) if shape[a] != size[a - 2]]


def _upsample_nearest2d(x, size):
    axes = _nearest_axes(x.shape, size)
    for axis in axes:
        x = np.take(x, _nearest_index(x.shape[axis], size[axis - 2]), axis=axis)
    return x if axes else x.copy()


def _nearest_scratch(out, x, size) -> int:
    """The first axis pass's result, when both axes are resampled (at most the larger of
    the input and the output: `_axis_order`)."""
    if len(_nearest_axes(x.shape, size)) < 2:
        return 0
    return _size(_intermediate(x, size)) * dtypes.itemsize(x.dtype)


def _upsample_nearest2d_vjp(e, g, out, x, size):
    for axis in reversed(_nearest_axes(x.shape, size)):
        index = e.constant(value=_nearest_index(x.shape[axis], size[axis - 2]))
        g = e.scatter_add(g, index, axis=axis, size=x.shape[axis])
    return [g]


register(
    "upsample_nearest2d",
    family="resize",
    infer=lambda x, size: _image_infer(x, size, NUMERIC),
    forward=_upsample_nearest2d,
    vjp=_upsample_nearest2d_vjp,
    residuals="none",
    cost=free,
    workspace=_intermediate,
    scratch=_nearest_scratch,
    attrs={"size": SIZE},
    doc="Nearest resize of x (N, C, H, W) to `size`, source row floor(dst * in / out) "
    '(F.interpolate(mode="nearest")).',
)


# --- upsample_bilinear2d -----------------------------------------------------------------
# Elements of a chunk of the far taps' rows: `_lerp` holds one chunk of them, not a
# second pass-sized array.
_CHUNK_ELEMENTS = 1 << 18


def _lerp_chunks(shape) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(_size(shape[1:]), 1))
    return [slice(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]


def _lerp(x, axis, index, weight):
    """Linear interpolation along one axis: w0 * x[lo] + w1 * x[hi], row by row; the
    far rows are taken a chunk of images at a time."""
    shape = _along(x.shape, axis)
    out = np.take(x, index[:, 0], axis=axis)
    out *= weight[:, 0].reshape(shape)
    chunks, near = _lerp_chunks(out.shape), weight[:, 1].reshape(shape)
    far = np.empty((chunks[0].stop,) + out.shape[1:], dtype=out.dtype) if chunks else None
    for images in chunks:
        part = far[: images.stop - images.start]
        np.take(x[images], index[:, 1], axis=axis, out=part, mode="clip")  # in range
        part *= near
        out[images] += part
    return out


def _lerp_bytes(shape, axis, dtype) -> int:
    """Scratch of one `_lerp` pass whose result has `shape`: its chunk of far rows, and
    NumPy's buffers of a row weight broadcast over it."""
    chunks = _lerp_chunks(shape)
    if not chunks:
        return 0
    part = virtual((chunks[0].stop,) + tuple(shape[1:]), dtype)
    row = virtual((shape[axis],) + (1,) * (len(shape) - 1 - axis), dtype)
    near = virtual(shape, dtype)
    return part.nbytes + max(ufunc_buffers(part, row, part), ufunc_buffers(near, row, near))


def _lerp_adjoint(e, g, axis, index, weight, n_in):
    """The transposed interpolation: each row's gradient times a tap's weight, added onto
    that tap's source row; one scatter per tap keeps every temporary the size of g."""
    shape = _along(g.shape, axis)
    near, far = (
        e.scatter_add(
            g * e.constant(value=np.ascontiguousarray(weight[:, tap]).reshape(shape)),
            e.constant(value=np.ascontiguousarray(index[:, tap])),
            axis=axis,
            size=n_in,
        )
        for tap in (0, 1)
    )
    return near + far


def _upsample_bilinear2d(x, size, align_corners):
    for axis in _axis_order(x.shape, size):
        x = _lerp(x, axis, *_linear_taps(x.shape[axis], size[axis - 2], align_corners, x.dtype))
    return x


def _bilinear_scratch(out, x, size, align_corners) -> int:
    """The first pass's result (the second pass's input) and either pass's own scratch
    (`_lerp_bytes`); the first pass runs before the result exists, so what it holds
    counts only past the result's bytes."""
    first, _ = _axis_order(x.shape, size)
    middle = _size(_intermediate(x, size)) * dtypes.itemsize(x.dtype)
    before = middle + _lerp_bytes(_intermediate(x, size), first, x.dtype) - out.nbytes
    return max(before, middle + _lerp_bytes(out.shape, 5 - first, x.dtype))


def _upsample_bilinear2d_vjp(e, g, out, x, size, align_corners):
    dtype = dtypes.NUMPY[x.dtype]
    for axis in reversed(_axis_order(x.shape, size)):
        n_in = x.shape[axis]
        index, weight = _linear_taps(n_in, size[axis - 2], align_corners, dtype)
        g = _lerp_adjoint(e, g, axis, index, weight, n_in)
    return [g]


register(
    "upsample_bilinear2d",
    family="resize",
    infer=lambda x, size, align_corners: _image_infer(x, size, FLOAT),
    forward=_upsample_bilinear2d,
    vjp=_upsample_bilinear2d_vjp,
    residuals="none",
    # Per axis pass: two products and a sum per element of that pass's result.
    cost=lambda out, x, size, align_corners: 3 * (out.size + _size(_intermediate(x, size))),
    workspace=_intermediate,
    scratch=_bilinear_scratch,
    attrs={
        "size": SIZE,
        "align_corners": Attr(
            "bool",
            default=False,
            doc="True: corner samples map onto corners; False: half-pixel centers.",
        ),
    },
    doc="Bilinear resize of x (N, C, H, W) to `size` "
    '(F.interpolate(mode="bilinear", align_corners=...)), up or down.',
)


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


# --- pad -----------------------------------------------------------------------------------
PAD_MODES = ("constant", "reflect", "edge")


def _widths(pads, rank: int) -> list[tuple[int, int]]:
    """ONNX order (begin_0 .. begin_{r-1}, end_0 .. end_{r-1}) as (begin, end) per axis."""
    return list(zip(pads[:rank], pads[rank:]))


def _pad_infer(x, pads, mode, value):
    rules.require_dtype(x, NUMERIC)
    rank = len(x.shape)
    if len(pads) != 2 * rank:
        raise ShapeError(
            f"pads has {len(pads)} entries; a rank-{rank} input needs {2 * rank} "
            "(all begins, then all ends)"
        )
    for axis, ((begin, end), n) in enumerate(zip(_widths(pads, rank), x.shape)):
        # torch's rules: a reflection needs pad < size; the edge needs a row to repeat.
        if mode == "reflect" and max(begin, end) >= n and (begin or end):
            raise ShapeError(
                f"reflect padding ({begin}, {end}) of axis {axis} must be smaller than its size {n}"
            )
        if mode == "edge" and n == 0 and (begin or end):
            raise ShapeError(f"edge padding ({begin}, {end}) of axis {axis}, which is empty")
    if x.dtype in dtypes.INTS and mode == "constant" and not float(value).is_integer():
        raise ShapeError(f"value {value} is not an integer, the input is {x.dtype}")
    shape = tuple(n + b + e for n, (b, e) in zip(x.shape, _widths(pads, rank)))
    return TensorType(shape, x.dtype)


def _pad(x, pads, mode, value):
    widths = _widths(pads, x.ndim)
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=value)
    return np.pad(x, widths, mode=mode)


def _pad_scratch(out, x, pads, mode, value) -> int:
    """np.pad fills a constant border in place; a reflected or repeated one is assigned
    from the padded array itself, which NumPy's overlap check copies first: the largest
    border slab (axis k's width, the padded extent of the axes before k and the
    original extent of those after, as np.pad's `_view_roi`)."""
    if mode == "constant":
        return 0
    widths, largest = _widths(pads, len(x.shape)), 0
    for k, (begin, end) in enumerate(widths):
        rest = _size(out.shape[:k]) * _size(x.shape[k + 1 :])
        largest = max(largest, max(begin, end) * rest)
    return largest * dtypes.itemsize(x.dtype)


def _unpad_axis(e, g, axis, n, begin, end, mode):
    """Adjoint of reflect/edge padding along one axis: the interior slice of g plus the
    border rows added back onto the rows they copy. The copies' sources come from
    np.pad on an index vector, the forward's own rule."""
    source = np.pad(np.arange(n, dtype=np.int64), (begin, end), mode=mode)
    border = np.concatenate([np.arange(begin), np.arange(begin + n, begin + n + end)])
    starts, stops = [0] * g.ndim, list(g.shape)
    starts[axis], stops[axis] = begin, begin + n
    interior = e.slice(g, starts=tuple(starts), stops=tuple(stops), steps=(1,) * g.ndim)
    rows = e.take(g, e.constant(value=border.astype(np.int64)), axis=axis)
    return interior + e.scatter_add(rows, e.constant(value=source[border]), axis=axis, size=n)


def _pad_vjp(e, g, out, x, pads, mode, value):
    widths = _widths(pads, x.ndim)
    if mode == "constant":
        starts = tuple(b for b, _ in widths)
        stops = tuple(b + n for (b, _), n in zip(widths, x.shape))
        return [e.slice(g, starts=starts, stops=stops, steps=(1,) * x.ndim)]
    for axis, ((begin, end), n) in enumerate(zip(widths, x.shape)):
        if begin or end:
            g = _unpad_axis(e, g, axis, n, begin, end, mode)
    return [g]


register(
    "pad",
    family="resize",
    infer=_pad_infer,
    forward=_pad,
    vjp=_pad_vjp,
    residuals="none",
    cost=free,
    scratch=_pad_scratch,
    attrs={
        "pads": Attr(
            "ints",
            check=rules.non_negative,
            requirement="must be >= 0 (2 * rank entries: all begins, then all ends)",
            doc="ONNX order: begin_0 .. begin_{r-1}, end_0 .. end_{r-1}.",
        ),
        "mode": Attr(
            "string",
            default="constant",
            check=lambda m: m in PAD_MODES,
            requirement='must be "constant", "reflect" or "edge"',
            doc='"reflect" mirrors without repeating the edge (torch "reflect"); '
            '"edge" repeats it (torch "replicate").',
        ),
        "value": Attr("float", default=0.0, doc="The fill of constant mode."),
    },
    doc="Pads every axis by (begin, end) rows: a constant, a reflection, or the edge "
    "(F.pad / numpy.pad).",
)
