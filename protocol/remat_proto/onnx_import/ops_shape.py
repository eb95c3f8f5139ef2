"""ONNX shape and indexing ops on computed values -> remat ops (on constants they fold,
see fold.py). Shapes are static, so Reshape, Flatten, Squeeze and Unsqueeze all become
one `reshape`, Expand a `broadcast_to`, and Shape or Size a constant."""

from __future__ import annotations

import numpy as np

from . import fold
from .context import NodeCtx
from .emit import Sym, broadcast, norm_axis
from .errors import OnnxImportError
from .shapes import flatten_shape, reshape_target, squeeze_shape, unsqueeze_shape


def _reshape(c: NodeCtx):
    x = c.sym(0)
    if c.op == "Reshape":
        shape = reshape_target(x.shape, c.ints(1, "shape"), c.attr("allowzero", 0))
    elif c.op == "Flatten":
        shape = flatten_shape(x.shape, c.attr("axis", 1))
    elif c.op == "Squeeze":
        shape = squeeze_shape(x.shape, fold.axes_input(c, 1, 13))
    else:
        axes = fold.axes_input(c, 1, 13)
        if axes is None:
            raise OnnxImportError(f"{c.label}: Unsqueeze needs axes")
        shape = unsqueeze_shape(x.shape, axes)
    return c.b.reshape(x, shape)


def _transpose(c: NodeCtx):
    x = c.sym(0)
    return c.b.transpose(x, c.attr("perm", tuple(reversed(range(x.ndim)))))


def _concat(c: NodeCtx):
    xs = [c.sym(i) for i in range(c.n_inputs) if c.has(i)]
    xs = [x for x in xs if x.shape[norm_axis(c.attr("axis"), x.ndim)] > 0] or xs[:1]
    return c.b.concat(xs, c.attr("axis"))


def _split(c: NodeCtx):
    x = c.sym(0)
    axis, sizes = fold.split_args(c, x.shape)
    outs, offset = [], 0
    for size in sizes:
        starts = [0] * x.ndim
        stops = list(x.shape)
        starts[axis], stops[axis] = offset, offset + size
        outs.append(c.b.slice(x, starts, stops, [1] * x.ndim))
        offset += size
    return outs


def _slice(c: NodeCtx):
    x = c.sym(0)
    params = fold.slice_args(c, x.shape)
    forward = [p if p[2] > 0 else (0, d, 1) for p, d in zip(params, x.shape)]
    y = c.b.slice(x, *zip(*forward)) if x.ndim else x
    for axis, (start, stop, step) in enumerate(params):
        if step < 0:  # remat's slice steps forward: gather the reversed indices
            c.check_size((len(range(start, stop, step)),))
            indices = np.arange(start, stop, step, dtype=np.int64)
            y = c.b.take(y, c.b.constant(indices), axis)
    return y


def _indices(c: NodeCtx, i: int, size: int) -> Sym:
    """Integer indices; constant ones are bounds-checked and made non-negative here."""
    if not c.is_const(i):
        return c.sym(i)
    indices = c.const(i, "indices")
    fold.check_indices(c, indices, size)
    return c.b.constant(np.where(indices < 0, indices + size, indices).astype(np.int64))


def _gather(c: NodeCtx):
    x = c.sym(0)
    axis = norm_axis(c.attr("axis", 0), x.ndim)
    return c.b.take(x, _indices(c, 1, x.shape[axis]), axis)


def _gather_elements(c: NodeCtx):
    x = c.sym(0)
    axis = norm_axis(c.attr("axis", 0), x.ndim)
    indices = _indices(c, 1, x.shape[axis])
    if indices.ndim != x.ndim or any(
        i > d for k, (i, d) in enumerate(zip(indices.shape, x.shape)) if k != axis
    ):
        raise OnnxImportError(f"{c.label}: indices {indices.shape} do not fit data {x.shape}")
    stops = [d if k == axis else i for k, (i, d) in enumerate(zip(indices.shape, x.shape))]
    x = c.b.slice(x, [0] * x.ndim, stops, [1] * x.ndim)  # ONNX reads only that corner
    return c.b.take_along_axis(x, indices, axis)


def _expand(c: NodeCtx):
    x = c.sym(0)
    return c.b.broadcast_to(x, broadcast(x.shape, c.ints(1, "shape")))


def _tile(c: NodeCtx):
    """(d0, d1..) -> (1, d0, 1, d1..) -> broadcast (r0, d0, r1, d1..) -> (r0 d0, r1 d1..)."""
    x = c.sym(0)
    repeats = c.ints(1, "repeats")
    if len(repeats) != x.ndim or any(r < 0 for r in repeats):
        raise OnnxImportError(f"{c.label}: repeats {repeats} for a rank-{x.ndim} input")
    if all(r == 1 for r in repeats):
        return x
    interleaved = [v for d in x.shape for v in (1, d)]
    spread = [v for r, d in zip(repeats, x.shape) for v in (r, d)]
    y = c.b.broadcast_to(c.b.reshape(x, interleaved), spread)
    return c.b.reshape(y, [r * d for r, d in zip(repeats, x.shape)])


def _trilu(c: NodeCtx):
    x = c.sym(0)
    if x.ndim < 2:
        raise OnnxImportError(f"{c.label}: Trilu of a rank-{x.ndim} input")
    k = int(c.scalar(1, "k", 0))
    c.check_size(x.shape[-2:])
    ones = np.ones(x.shape[-2:], dtype=bool)
    mask = np.triu(ones, k) if c.attr("upper", 1) else np.tril(ones, k)
    return c.b.where(c.b.constant(mask), x, c.b.scalar(0, x.dtype))


def _pad(c: NodeCtx):
    x = c.sym(0)
    rank = x.ndim
    pads = c.ints(1, "pads")
    axes = [norm_axis(a, rank) for a in c.ints(3, "axes")] if c.has(3) else list(range(rank))
    if len(pads) != 2 * len(axes):
        raise OnnxImportError(f"{c.label}: {len(pads)} pads for {len(axes)} axes")
    full = [0] * (2 * rank)
    for k, axis in enumerate(axes):
        full[axis], full[rank + axis] = pads[k], pads[len(axes) + k]
    value = c.scalar(2, "constant_value", 0.0) if c.has(2) else 0.0
    mode = c.attr("mode", "constant")
    y = x
    if any(p > 0 for p in full):
        grown = [max(p, 0) for p in full]
        shape = [d + grown[i] + grown[rank + i] for i, d in enumerate(x.shape)]
        attrs = {"pads": tuple(grown), "mode": mode, "value": float(value)}
        y = c.b.emit("pad", (x,), attrs, shape, x.dtype)
    if any(p < 0 for p in full):  # negative pads crop
        starts = [-min(full[i], 0) for i in range(rank)]
        stops = [d + min(full[rank + i], 0) for i, d in enumerate(y.shape)]
        if any(b > e for b, e in zip(starts, stops)):
            raise OnnxImportError(f"{c.label}: pads {full} crop more than the input")
        y = c.b.slice(y, starts, stops, [1] * rank)
    return y


def _depth_space(c: NodeCtx):
    """DepthToSpace (DCR or CRD) and SpaceToDepth: a reshape, a transpose, a reshape."""
    x = c.sym(0)
    b = int(c.attr("blocksize"))
    if x.ndim != 4 or b < 1:
        raise OnnxImportError(f"{c.label}: input {x.shape} with blocksize {b}")
    n, ch, h, w = x.shape
    if c.op == "SpaceToDepth":
        if h % b or w % b:
            raise OnnxImportError(f"{c.label}: {h}x{w} is not divisible by the blocksize {b}")
        y = c.b.transpose(c.b.reshape(x, (n, ch, h // b, b, w // b, b)), (0, 3, 5, 1, 2, 4))
        return c.b.reshape(y, (n, ch * b * b, h // b, w // b))
    if ch % (b * b):
        raise OnnxImportError(f"{c.label}: {ch} channels are not divisible by {b * b}")
    depth = ch // (b * b)
    if c.attr("mode", "DCR") == "DCR":
        y = c.b.transpose(c.b.reshape(x, (n, b, b, depth, h, w)), (0, 3, 4, 1, 5, 2))
    else:
        y = c.b.transpose(c.b.reshape(x, (n, depth, b, b, h, w)), (0, 1, 4, 2, 5, 3))
    return c.b.reshape(y, (n, depth, h * b, w * b))


def _check_pad(attrs, opset):
    mode = attrs.get("mode", "constant")
    return [] if mode in ("constant", "reflect", "edge") else [f"mode '{mode}'"]


OPS = {op: _reshape for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze")}
OPS.update(
    {
        "Transpose": _transpose,
        "Concat": _concat,
        "Split": _split,
        "Slice": _slice,
        "Gather": _gather,
        "GatherElements": _gather_elements,
        "Expand": _expand,
        "Tile": _tile,
        "Trilu": _trilu,
        "Pad": _pad,
        "DepthToSpace": _depth_space,
        "SpaceToDepth": _depth_space,
        # Static whatever their inputs: shapes are known, and these read only constants.
        "Shape": fold.shape_of,
        "Size": fold.size_of,
        "ConstantOfShape": fold.constant_of_shape,
        "Constant": fold.constant,
        "Range": fold.range_of,
    }
)
CHECKS = {"Pad": _check_pad}
