"""Constant folding: a small NumPy evaluator for nodes whose inputs are all constants.

Exported models compute shapes at run time (Shape -> Gather -> Unsqueeze -> Concat ->
Reshape); remat's shapes are static, so those chains are evaluated at import. Only the
ops in `FOLD` fold, only when every input is a constant (a Constant node, a folded
value, or a Shape of any value): never an initializer's or a data input's values, and
never BatchNormalization, Dropout or random ops, which are not in the table. Every
result's size is checked against `OnnxLimits.max_folded_elements` before it is
allocated.

    >>> import numpy as np
    >>> np.asarray(_trunc_div(np.array([-7, 7]), np.array([2, 2]))).tolist()
    [-3, 3]
"""

from __future__ import annotations

import math

import numpy as np

from .context import NodeCtx
from .emit import ShapeProblem, broadcast, norm_axis
from .errors import OnnxImportError, Unsupported
from .shapes import (
    flatten_shape,
    reduce_axes,
    reduced_shape,
    reshape_target,
    slice_params,
    split_sizes,
    squeeze_shape,
    unsqueeze_shape,
)


def _ins(c: NodeCtx) -> list[np.ndarray]:
    return [c.array(i) for i in range(c.n_inputs)]


def _trunc_div(a, b):
    """ONNX's integer Div truncates toward zero (NumPy's // floors)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        quotient = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -quotient, quotient).astype(a.dtype)


def _div(a, b):
    if a.dtype.kind in "iu":
        return _trunc_div(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.divide(a, b)


def _pow(a, b):
    with np.errstate(all="ignore"):
        return np.power(a, b.astype(a.dtype) if a.dtype.kind == "f" else b).astype(a.dtype)


def _mod(c, a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.fmod(a, b) if c.attr("fmod", 0) else np.mod(a, b)


BINARY = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": _div,
    "Pow": _pow,
    "Equal": np.equal,
    "Less": np.less,
    "LessOrEqual": np.less_equal,
    "Greater": np.greater,
    "GreaterOrEqual": np.greater_equal,
    "And": np.logical_and,
    "Or": np.logical_or,
    "Xor": np.logical_xor,
}
UNARY = {
    "Neg": np.negative,
    "Abs": np.abs,
    "Sqrt": np.sqrt,
    "Exp": np.exp,
    "Log": np.log,
    "Reciprocal": np.reciprocal,
    "Floor": np.floor,
    "Ceil": np.ceil,
    "Round": np.round,  # half to even, as ONNX
    "Sign": np.sign,
    "Sin": np.sin,
    "Cos": np.cos,
    "Tanh": np.tanh,
    "Not": np.logical_not,
    "IsNaN": np.isnan,
    "Identity": lambda x: x,
    "Relu": lambda x: np.maximum(x, x.dtype.type(0)),
}
VARIADIC = {"Max": np.maximum, "Min": np.minimum, "Sum": np.add}


def _binary(c: NodeCtx):
    a, b = _ins(c)
    c.check_size(broadcast(a.shape, b.shape))
    if c.op == "Mod":
        return _mod(c, a, b)
    with np.errstate(all="ignore"):
        return BINARY[c.op](a, b)


def _unary(c: NodeCtx):
    (x,) = _ins(c)
    with np.errstate(all="ignore"):
        return np.asarray(UNARY[c.op](x))


def _variadic(c: NodeCtx):
    xs = _ins(c)
    c.check_size(broadcast(*(x.shape for x in xs)))
    if c.op == "Mean":
        return np.asarray(sum(xs[1:], xs[0]) / len(xs), dtype=xs[0].dtype)
    out = xs[0]
    for x in xs[1:]:
        out = VARIADIC[c.op](out, x)
    return out


def _is_inf(c: NodeCtx):
    (x,) = _ins(c)
    positive, negative = c.attr("detect_positive", 1), c.attr("detect_negative", 1)
    return (np.isposinf(x) & bool(positive)) | (np.isneginf(x) & bool(negative))


def constant(c: NodeCtx):
    """Constant: its one value attribute (Constant has no inputs, so it always folds)."""
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in c.attrs:
            value = c.attr(key)
            if key in ("value_int", "value_ints"):
                return np.array(value, dtype=np.int64)
            if key in ("value_float", "value_floats"):
                return c.float_const(np.array(value, dtype=np.float32))
            return c.float_const(value)
    raise Unsupported("a Constant without a tensor, float or int value (strings, sparse)")


def shape_of(c: NodeCtx):
    """Shape (of any value: shapes are static) with start/end (opset 15)."""
    shape = c.shape(0)
    start, end, _ = slice(c.attr("start", 0), c.attr("end", len(shape))).indices(len(shape))
    return np.array(shape[start : max(end, start)], dtype=np.int64)


def size_of(c: NodeCtx):
    return np.array(math.prod(c.shape(0)), dtype=np.int64)


def _cast(c: NodeCtx):
    (x,) = _ins(c)[:1]
    target = c.array(1).dtype if c.op == "CastLike" else c.numpy_dtype(c.attr("to"))
    with np.errstate(all="ignore"):
        return x.astype(target)


def _gather(c: NodeCtx):
    x, indices = _ins(c)
    axis = norm_axis(c.attr("axis", 0), x.ndim)
    c.check_size(x.shape[:axis] + indices.shape + x.shape[axis + 1 :])
    check_indices(c, indices, x.shape[axis])
    return np.take(x, indices.astype(np.int64), axis=axis)


def check_indices(c: NodeCtx, indices: np.ndarray, size: int):
    if indices.dtype.kind not in "iu":
        raise OnnxImportError(f"{c.label}: indices must be integers, got {indices.dtype}")
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise OnnxImportError(f"{c.label}: an index is out of range for an axis of {size}")


def _gather_elements(c: NodeCtx):
    x, indices = _ins(c)
    axis = norm_axis(c.attr("axis", 0), x.ndim)
    check_indices(c, indices, x.shape[axis])
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take_along_axis(x, indices, axis=axis)


def _concat(c: NodeCtx):
    xs = _ins(c)
    axis = norm_axis(c.attr("axis"), xs[0].ndim)
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    c.check_size(shape)
    try:
        return np.concatenate(xs, axis=axis)
    except ValueError as exc:
        raise ShapeProblem(str(exc)) from None


def constant_of_shape(c: NodeCtx):
    shape = c.ints(0, "shape") if c.has(0) else ()
    c.check_size(shape)
    value = c.attr("value", None)
    value = np.zeros(1, np.float32) if value is None else value
    if value.size != 1:
        raise OnnxImportError(f"{c.label}: 'value' must hold one element")
    value = c.float_const(value)
    return np.full(shape, value.reshape(-1)[0], dtype=value.dtype)


def axes_input(c: NodeCtx, i: int, attr_before: int):
    """Axes given as input i (from opset `attr_before` on) or as the 'axes' attribute."""
    if c.opset >= attr_before:
        return c.ints(i, "axes") if c.has(i) else None
    return c.attr("axes", None)


def _unsqueeze(c: NodeCtx):
    x = c.array(0)
    return x.reshape(unsqueeze_shape(x.shape, axes_input(c, 1, 13)))


def _squeeze(c: NodeCtx):
    x = c.array(0)
    return x.reshape(squeeze_shape(x.shape, axes_input(c, 1, 13)))


def _reshape(c: NodeCtx):
    x = c.array(0)
    return x.reshape(reshape_target(x.shape, c.ints(1, "shape"), c.attr("allowzero", 0)))


def _flatten(c: NodeCtx):
    x = c.array(0)
    return x.reshape(flatten_shape(x.shape, c.attr("axis", 1)))


def _expand(c: NodeCtx):
    x = c.array(0)
    shape = broadcast(x.shape, c.ints(1, "shape"))
    c.check_size(shape)
    return np.broadcast_to(x, shape).copy()


def _transpose(c: NodeCtx):
    x = c.array(0)
    perm = c.attr("perm", tuple(reversed(range(x.ndim))))
    return np.transpose(x, [norm_axis(a, x.ndim) for a in perm]).copy()


def slice_args(c: NodeCtx, shape):
    starts, ends = c.ints(1, "starts"), c.ints(2, "ends")
    axes = c.ints(3, "axes") if c.has(3) else None
    steps = c.ints(4, "steps") if c.has(4) else None
    return slice_params(shape, starts, ends, axes, steps)


def _slice(c: NodeCtx):
    x = c.array(0)
    return x[tuple(slice(*p) for p in slice_args(c, x.shape))].copy()


def split_args(c: NodeCtx, shape):
    axis = norm_axis(c.attr("axis", 0), len(shape))
    split = c.ints(1, "split") if c.has(1) else None
    outputs = c.attr("num_outputs", c.n_outputs)
    return axis, split_sizes(shape[axis], split, outputs, c.opset)


def _split(c: NodeCtx):
    x = c.array(0)
    axis, sizes = split_args(c, x.shape)
    bounds = np.cumsum([0] + sizes)
    return [np.take(x, np.arange(b, e), axis=axis) for b, e in zip(bounds[:-1], bounds[1:])]


def range_of(c: NodeCtx):
    start, limit, delta = (c.scalar(i, name) for i, name in enumerate(("start", "limit", "delta")))
    if delta == 0:
        raise OnnxImportError(f"{c.label}: delta is 0")
    count = max(math.ceil((limit - start) / delta), 0)
    c.check_size((count,))
    dtype = c.dtype_of(0)
    return (
        np.arange(count, dtype=np.float64 if dtype.kind == "f" else np.int64) * delta + start
    ).astype(dtype)


def _tile(c: NodeCtx):
    x = c.array(0)
    repeats = c.ints(1, "repeats")
    if len(repeats) != x.ndim or any(r < 0 for r in repeats):
        raise ShapeProblem(f"repeats {repeats} for a rank-{x.ndim} input")
    c.check_size([d * r for d, r in zip(x.shape, repeats)])
    return np.tile(x, repeats)


def _trilu(c: NodeCtx):
    x = c.array(0)
    k = int(c.scalar(1, "k", 0))
    return np.triu(x, k) if c.attr("upper", 1) else np.tril(x, k)


def _where(c: NodeCtx):
    cond, a, b = _ins(c)
    c.check_size(broadcast(cond.shape, a.shape, b.shape))
    return np.where(cond, a, b)


def _reduce(c: NodeCtx):
    x = c.array(0)
    axes = reduce_axes(
        x.ndim,
        axes_input(c, 1, 13 if c.op == "ReduceSum" else 18),
        c.attr("noop_with_empty_axes", 0),
    )
    if not axes:
        return x
    keep = bool(c.attr("keepdims", 1))
    fn = {"ReduceSum": np.sum, "ReduceMean": np.mean, "ReduceProd": np.prod}.get(c.op)
    fn = fn or {"ReduceMax": np.max, "ReduceMin": np.min}[c.op]
    if fn in (np.max, np.min) and any(x.shape[a] == 0 for a in axes):
        raise ShapeProblem(f"{c.op} over an empty axis of {x.shape}")
    return np.asarray(fn(x, axis=axes, keepdims=keep), dtype=x.dtype).reshape(
        reduced_shape(x.shape, axes, keep)
    )


def _cumsum(c: NodeCtx):
    x = c.array(0)
    axis = norm_axis(int(c.scalar(1, "axis")), x.ndim)
    y = np.flip(x, axis) if c.attr("reverse", 0) else x
    out = np.cumsum(y, axis=axis, dtype=x.dtype)
    if c.attr("exclusive", 0):
        out = np.concatenate(
            [np.zeros_like(np.take(out, [0], axis)), np.delete(out, -1, axis)], axis
        )
    return np.flip(out, axis) if c.attr("reverse", 0) else out


def _eye_like(c: NodeCtx):
    x = c.array(0)
    if x.ndim != 2:
        raise ShapeProblem(f"EyeLike of a rank-{x.ndim} input")
    dtype = c.numpy_dtype(c.attr("dtype")) if "dtype" in c.attrs else x.dtype
    return np.eye(*x.shape, k=c.attr("k", 0), dtype=dtype)


def _non_zero(c: NodeCtx):
    (x,) = _ins(c)
    return np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1)


FOLD = {op: _binary for op in (*BINARY, "Mod")}
FOLD.update({op: _unary for op in UNARY})
FOLD.update({op: _variadic for op in (*VARIADIC, "Mean")})
FOLD.update(
    {
        "IsInf": _is_inf,
        "Constant": constant,
        "Shape": shape_of,
        "Size": size_of,
        "Cast": _cast,
        "CastLike": _cast,
        "Gather": _gather,
        "GatherElements": _gather_elements,
        "Concat": _concat,
        "ConstantOfShape": constant_of_shape,
        "Unsqueeze": _unsqueeze,
        "Squeeze": _squeeze,
        "Reshape": _reshape,
        "Flatten": _flatten,
        "Expand": _expand,
        "Transpose": _transpose,
        "Slice": _slice,
        "Split": _split,
        "Range": range_of,
        "Tile": _tile,
        "Trilu": _trilu,
        "Where": _where,
        "CumSum": _cumsum,
        "EyeLike": _eye_like,
        "NonZero": _non_zero,
        **{
            op: _reduce
            for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd")
        },
    }
)
