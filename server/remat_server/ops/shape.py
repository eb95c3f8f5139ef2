"""Ops that rearrange, select or combine elements without arithmetic."""

from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .elementwise import ufunc_buffers
from .registry import Attr, elementwise_cost, free, register

INTS = rules.dtypes.INTS


# --- transpose, reshape, broadcast_to -----------------------------------------------
def _transpose_normalize(x, axes):
    ndim = len(x.shape)
    perm = (
        tuple(reversed(range(ndim)))
        if axes is None
        else tuple(rules.normalize_axis(a, ndim) for a in axes)
    )
    if sorted(perm) != list(range(ndim)):
        raise ShapeError(f"axes {axes} are not a permutation of {ndim} axes")
    return {"axes": perm}


register(
    "transpose",
    family="shape",
    normalize=_transpose_normalize,
    infer=lambda x, axes: TensorType(tuple(x.shape[a] for a in axes), x.dtype),
    forward=lambda x, axes: np.transpose(x, axes),
    vjp=lambda e, g, out, x, axes: [e.transpose(g, axes=tuple(np.argsort(axes).tolist()))],
    residuals="none",
    cost=free,
    memory="view",
    attrs={"axes": Attr("ints", default=None, doc="Permutation; absent reverses.")},
)


def _reshape_normalize(x, shape):
    shape = tuple(shape)
    unknown = [i for i, d in enumerate(shape) if d == -1]
    if len(unknown) > 1 or any(d < -1 for d in shape):
        raise ShapeError(f"shape {shape}: at most one -1 and no other negative sizes")
    known = math.prod(d for d in shape if d != -1)
    if unknown:
        if known == 0 or x.size % known:
            raise ShapeError(f"cannot reshape {x.shape} ({x.size} elements) to {shape}")
        shape = tuple(x.size // known if d == -1 else d for d in shape)
    if math.prod(shape) != x.size:
        raise ShapeError(
            f"cannot reshape {x.shape} ({x.size} elements) to {shape} ({math.prod(shape)} elements)"
        )
    return {"shape": shape}


register(
    "reshape",
    family="shape",
    normalize=_reshape_normalize,
    infer=lambda x, shape: TensorType(shape, x.dtype),
    forward=lambda x, shape: np.reshape(x, shape),
    vjp=lambda e, g, out, x, shape: [e.reshape(g, shape=x.shape)],
    residuals="none",
    cost=free,
    memory="view_if_contiguous",
    attrs={"shape": Attr("ints", doc="One entry may be -1.")},
)


def _broadcast_to_infer(x, shape):
    # Checked in Python, not with np.broadcast_shapes: NumPy fails on targets whose element
    # count overflows int64 (e.g. 2**62 x 3), which would be misreported as a broadcast
    # error; such targets must reach the size-limit check with their real reason.
    target = tuple(shape)
    if len(x.shape) > len(target) or any(
        d not in (1, t) for d, t in zip(reversed(x.shape), reversed(target))
    ):
        raise ShapeError(f"cannot broadcast {x.shape} to {target}")
    return TensorType(target, x.dtype)


register(
    "broadcast_to",
    family="shape",
    infer=_broadcast_to_infer,
    forward=lambda x, shape: np.broadcast_to(x, shape),
    # The gradient arrives in the output's shape; autodiff's sum_to reduces it.
    vjp=lambda e, g, out, x, shape: [g],
    residuals="none",
    cost=free,
    memory="view",
    attrs={"shape": Attr("ints", check=rules.non_negative, requirement="sizes must be >= 0")},
)


# --- concat, slice -----------------------------------------------------------------------
def _concat_infer(*xs, axis):
    dtype = rules.same_dtype(*xs)
    ndim = len(xs[0].shape)
    if ndim == 0 or any(len(x.shape) != ndim for x in xs):
        raise ShapeError(
            "concat inputs must share one rank >= 1, got " + ", ".join(str(x.shape) for x in xs)
        )
    ax = rules.normalize_axis(axis, ndim)
    for x in xs:
        if x.shape[:ax] + x.shape[ax + 1 :] != xs[0].shape[:ax] + xs[0].shape[ax + 1 :]:
            raise ShapeError(
                f"concat along axis {axis}: shapes {xs[0].shape} and {x.shape} differ off that axis"
            )
    shape = list(xs[0].shape)
    shape[ax] = sum(x.shape[ax] for x in xs)
    return TensorType(tuple(shape), dtype)


def _concat_vjp(e, g, out, *xs, axis):
    ax = axis % g.ndim
    grads, offset = [], 0
    for x in xs:
        starts = [0] * g.ndim
        stops = list(g.shape)
        starts[ax], stops[ax] = offset, offset + x.shape[ax]
        offset += x.shape[ax]
        grads.append(e.slice(g, starts=tuple(starts), stops=tuple(stops), steps=(1,) * g.ndim))
    return grads


register(
    "concat",
    family="shape",
    inputs=(1, -1),
    infer=_concat_infer,
    forward=lambda *xs, axis: np.concatenate(xs, axis=axis),
    vjp=_concat_vjp,
    residuals="none",
    cost=free,
    attrs={"axis": Attr("int", default=0)},
)


def _slice_normalize(x, starts, stops, steps):
    ndim = len(x.shape)
    if starts is None:
        starts = ()
    if (
        len(starts) > ndim
        or (stops is not None and len(stops) > ndim)
        or (steps is not None and len(steps) > ndim)
    ):
        raise ShapeError(f"slice has more entries than the input's rank {ndim}")
    steps = tuple(steps or ()) + (1,) * (ndim - len(steps or ()))
    if any(s <= 0 for s in steps):
        raise ShapeError(f"steps {steps} must be positive")
    full = [slice(b, None, s) for b, s in zip(tuple(starts) + (None,) * ndim, steps)]
    if stops is not None:
        full[: len(stops)] = [slice(sl.start, stop, sl.step) for sl, stop in zip(full, stops)]
    resolved = [sl.indices(d) for sl, d in zip(full, x.shape)]
    return {
        "starts": tuple(r[0] for r in resolved),
        "stops": tuple(r[1] for r in resolved),
        "steps": steps,
    }


def _slice_shape(shape, starts, stops, steps):
    return tuple(len(range(b, e, s)) for b, e, s in zip(starts, stops, steps))


def _index(starts, stops, steps):
    return tuple(slice(b, e, s) for b, e, s in zip(starts, stops, steps))


SLICE_ATTRS = {
    "starts": Attr("ints", default=None, doc="Per leading axis; Python slice semantics."),
    "stops": Attr("ints", default=None),
    "steps": Attr("ints", default=None, doc="Positive; absent means 1."),
}

register(
    "slice",
    family="shape",
    normalize=_slice_normalize,
    infer=lambda x, starts, stops, steps: TensorType(
        _slice_shape(x.shape, starts, stops, steps), x.dtype
    ),
    forward=lambda x, starts, stops, steps: x[_index(starts, stops, steps)],
    vjp=lambda e, g, out, x, starts, stops, steps: [
        e.slice_scatter(g, shape=x.shape, starts=starts, stops=stops, steps=steps)
    ],
    residuals="none",
    cost=free,
    attrs=SLICE_ATTRS,
    memory="view",
    doc="x[start:stop:step, ...] per axis.",
)


def _slice_scatter_infer(src, shape, starts, stops, steps):
    if len(shape) != len(src.shape) or not (len(starts) == len(stops) == len(steps) == len(shape)):
        raise ShapeError("slice_scatter needs starts/stops/steps and shape of the source's rank")
    if any(s <= 0 for s in steps) or any(not 0 <= b <= max(d, 0) for b, d in zip(starts, shape)):
        raise ShapeError(f"slice {starts}:{stops}:{steps} is not a valid slice of {shape}")
    region = _slice_shape(shape, starts, [min(e, d) for e, d in zip(stops, shape)], steps)
    if region != src.shape:
        raise ShapeError(f"the slice of {tuple(shape)} has shape {region}, not {src.shape}")
    return TensorType(tuple(shape), src.dtype)


def _slice_scatter(src, shape, starts, stops, steps):
    out = np.zeros(shape, dtype=src.dtype)
    out[_index(starts, stops, steps)] = src
    return out


register(
    "slice_scatter",
    family="shape",
    infer=_slice_scatter_infer,
    forward=_slice_scatter,
    vjp=lambda e, g, out, src, shape, starts, stops, steps: [
        e.slice(g, starts=starts, stops=stops, steps=steps)
    ],
    residuals="none",
    cost=elementwise_cost(1),
    attrs={
        "shape": Attr("ints", check=rules.non_negative, requirement="sizes must be >= 0"),
        "starts": Attr("ints"),
        "stops": Attr("ints"),
        "steps": Attr("ints"),
    },
    doc="Zeros of `shape` with the source written into the slice (slice's adjoint).",
)


# --- gather and scatter ------------------------------------------------------------------
def _intp_copy(indices: TensorType) -> int:
    """NumPy indexes with intp (int64): other index dtypes are converted first."""
    return 0 if indices.dtype == "int64" else indices.size * 8


def along_axis_scratch(shape, indices: TensorType, axis: int, grids_of=None) -> int:
    """What np.take_along_axis / np.put_along_axis (or np.add.at with the same open
    mesh) hold besides the result: an int64 arange per other axis (every axis for
    `grids_of="all"`), and the buffers of the iterator that broadcasts them against the
    indices (cast to int64 unless they are)."""
    ndim, axis = len(shape), axis % len(shape)
    sizes = indices.shape

    def grid(d):
        return TensorType(tuple(sizes[d] if k == d else 1 for k in range(ndim)), "int64")

    grids = [grid(d) for d in range(ndim) if d != axis]
    made = sum(g.size for g in grids) + (sizes[axis] if grids_of == "all" else 0)
    plain = indices.dtype == "int64"
    buffers = ufunc_buffers(
        sizes,
        *grids,
        *([indices] if plain else []),
        cast=() if plain else (TensorType(sizes, "int64"),),
    )
    return 8 * made + buffers


def _take_infer(x, indices, axis):
    rules.require_dtype(indices, INTS, "indices")
    ax = rules.normalize_axis(axis, len(x.shape))
    return TensorType(x.shape[:ax] + indices.shape + x.shape[ax + 1 :], x.dtype)


register(
    "take",
    family="shape",
    inputs=2,
    infer=_take_infer,
    forward=lambda x, indices, axis: np.take(x, indices, axis=axis),
    scratch=lambda out, x, indices, axis: _intp_copy(indices),
    vjp=lambda e, g, out, x, indices, axis: [
        e.scatter_add(g, indices, axis=axis % x.ndim, size=x.shape[axis]),
        None,
    ],
    residuals="inputs",
    cost=free,
    no_grad=(1,),
    attrs={"axis": Attr("int", default=0)},
    doc="Gather along an axis with integer indices (np.take); out of range is an error.",
)


def _scatter_add_infer(src, indices, axis, size):
    rules.require_dtype(indices, INTS, "indices")
    k = indices.shape
    if axis < 0 or src.shape[axis : axis + len(k)] != k:
        raise ShapeError(f"source {src.shape} does not hold indices {k} at axis {axis}")
    return TensorType(src.shape[:axis] + (size,) + src.shape[axis + len(k) :], src.dtype)


def _scatter_add(src, indices, axis, size):
    out = np.zeros(src.shape[:axis] + (size,) + src.shape[axis + indices.ndim :], dtype=src.dtype)
    np.add.at(out, (slice(None),) * axis + (indices,), src)
    return out


register(
    "scatter_add",
    family="shape",
    inputs=2,
    infer=_scatter_add_infer,
    forward=_scatter_add,
    scratch=lambda out, src, indices, axis, size: _intp_copy(indices),
    vjp=lambda e, g, out, src, indices, axis, size: [e.take(g, indices, axis=axis), None],
    residuals="inputs",
    cost=elementwise_cost(1),
    no_grad=(1,),
    attrs={
        "axis": Attr("int", check=lambda a: a >= 0, requirement="must be >= 0"),
        "size": Attr("int", check=lambda s: s >= 0, requirement="must be >= 0"),
    },
    doc="Adds the source into zeros at `indices` along `axis` (take's adjoint).",
)


def _along_infer(x, indices, axis):
    rules.require_dtype(indices, INTS, "indices")
    ax = rules.normalize_axis(axis, len(x.shape))
    if len(indices.shape) != len(x.shape) or any(
        i != d for k, (i, d) in enumerate(zip(indices.shape, x.shape)) if k != ax
    ):
        raise ShapeError(f"indices {indices.shape} must match {x.shape} except along axis {axis}")
    return TensorType(indices.shape, x.dtype)


def _along_index(indices, axis):
    """Open-mesh index tuple selecting indices[...] along `axis`."""
    grids = np.ogrid[tuple(slice(n) for n in indices.shape)]
    return tuple(indices if k == axis else grid for k, grid in enumerate(grids))


def _scatter_along(src, indices, axis, size):
    shape = src.shape[:axis] + (size,) + src.shape[axis + 1 :]
    out = np.zeros(shape, dtype=src.dtype)
    np.add.at(out, _along_index(indices, axis), src)
    return out


def _scatter_along_infer(src, indices, axis, size):
    rules.require_dtype(indices, INTS, "indices")
    if not 0 <= axis < len(src.shape) or indices.shape != src.shape:
        raise ShapeError(f"indices {indices.shape} must match source {src.shape}")
    return TensorType(src.shape[:axis] + (size,) + src.shape[axis + 1 :], src.dtype)


def _check_bounds(indices, size, axis):
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise IndexError(f"an index is out of bounds for axis {axis} with size {size}")


def _take_along(x, indices, axis):
    _check_bounds(indices, x.shape[axis], axis)
    return np.take_along_axis(x, indices, axis=axis)


register(
    "take_along_axis",
    family="shape",
    inputs=2,
    infer=_along_infer,
    forward=_take_along,
    scratch=lambda out, x, indices, axis: along_axis_scratch(x.shape, indices, axis),
    vjp=lambda e, g, out, x, indices, axis: [
        e.scatter_add_along_axis(g, indices, axis=axis % x.ndim, size=x.shape[axis]),
        None,
    ],
    residuals="inputs",
    cost=free,
    no_grad=(1,),
    attrs={"axis": Attr("int", default=-1)},
    doc="np.take_along_axis; indices match the input except along `axis`.",
)
register(
    "scatter_add_along_axis",
    family="shape",
    inputs=2,
    infer=_scatter_along_infer,
    forward=lambda src, indices, axis, size: (
        _check_bounds(indices, size, axis),
        _scatter_along(src, indices, axis, size),
    )[1],
    scratch=lambda out, src, indices, axis, size: along_axis_scratch(
        out.shape, indices, axis, grids_of="all"
    ),
    vjp=lambda e, g, out, src, indices, axis, size: [
        e.take_along_axis(g, indices, axis=axis),
        None,
    ],
    residuals="inputs",
    cost=elementwise_cost(1),
    no_grad=(1,),
    attrs={
        "axis": Attr("int", check=lambda a: a >= 0, requirement="must be >= 0"),
        "size": Attr("int", check=lambda s: s >= 0, requirement="must be >= 0"),
    },
    doc="take_along_axis's adjoint: adds the source into zeros at the indices.",
)
