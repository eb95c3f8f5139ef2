"""ONNX's shape arithmetic, shared by constant folding and conversion: what Reshape,
Unsqueeze, Squeeze, Flatten, Slice, Split and the reductions do to a shape.

    >>> reshape_target((2, 3, 4), (0, -1), allowzero=False)
    (2, 12)
    >>> slice_params((10,), starts=(-3,), ends=(2**63 - 1,), axes=None, steps=None)
    [(7, 10, 1)]
"""

from __future__ import annotations

from collections.abc import Sequence

from .emit import ShapeProblem, norm_axis


def prod(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def reshape_target(shape: Sequence[int], target: Sequence[int], allowzero: bool) -> tuple:
    """Reshape's output shape: 0 copies the input's dimension (unless allowzero), one -1
    is inferred."""
    out = []
    for k, d in enumerate(target):
        if d == 0 and not allowzero:
            if k >= len(shape):
                raise ShapeProblem(f"reshape target {tuple(target)}: 0 at axis {k} of a {shape}")
            d = shape[k]
        out.append(int(d))
    unknown = [k for k, d in enumerate(out) if d == -1]
    if len(unknown) > 1 or any(d < -1 for d in out):
        raise ShapeProblem(f"reshape target {tuple(target)}: at most one -1, no other negatives")
    total = prod(shape)
    if unknown:
        known = prod(d for d in out if d != -1)
        if known == 0 or total % known:
            raise ShapeProblem(f"cannot reshape {tuple(shape)} to {tuple(target)}")
        out[unknown[0]] = total // known
    if prod(out) != total:
        raise ShapeProblem(f"cannot reshape {tuple(shape)} to {tuple(target)}")
    return tuple(out)


def unsqueeze_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple:
    rank = len(shape) + len(axes)
    axes = sorted(norm_axis(a, rank) for a in axes)
    if len(set(axes)) != len(axes):
        raise ShapeProblem(f"unsqueeze axes {tuple(axes)} repeat an axis")
    out, rest = [], iter(shape)
    for k in range(rank):
        out.append(1 if k in axes else next(rest))
    return tuple(out)


def squeeze_shape(shape: Sequence[int], axes: Sequence[int] | None) -> tuple:
    if not axes:  # absent (or empty, as ONNX Runtime reads it): every 1 goes
        return tuple(d for d in shape if d != 1)
    axes = {norm_axis(a, len(shape)) for a in axes}
    if any(shape[a] != 1 for a in axes):
        raise ShapeProblem(f"cannot squeeze axes {sorted(axes)} of {tuple(shape)}")
    return tuple(d for k, d in enumerate(shape) if k not in axes)


def flatten_shape(shape: Sequence[int], axis: int) -> tuple:
    rank = len(shape)
    if not -rank <= axis <= rank:
        raise ShapeProblem(f"flatten axis {axis} is out of range for rank {rank}")
    axis = axis + rank if axis < 0 else axis
    return (prod(shape[:axis]), prod(shape[axis:]))


def slice_params(shape, starts, ends, axes, steps) -> list[tuple[int, int, int]]:
    """(start, stop, step) per axis, resolved and clamped as ONNX (and Python) do."""
    rank = len(shape)
    axes = tuple(range(len(starts))) if axes is None else tuple(axes)
    steps = (1,) * len(starts) if steps is None else tuple(steps)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ShapeProblem("slice starts, ends, axes and steps differ in length")
    params = [(0, d, 1) for d in shape]
    seen = set()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = norm_axis(axis, rank)
        if axis in seen or step == 0:
            raise ShapeProblem(f"slice axis {axis} repeated, or a zero step")
        seen.add(axis)
        params[axis] = slice(int(start), int(end), int(step)).indices(shape[axis])
    return params


def split_sizes(length: int, split: Sequence[int] | None, outputs: int, opset: int) -> list:
    """Sizes of Split's pieces: given, or equal (the last smaller, opset 18's rule)."""
    if split is not None:
        if sum(split) != length or any(s < 0 for s in split) or len(split) != outputs:
            raise ShapeProblem(f"split {tuple(split)} does not cut a length of {length}")
        return list(split)
    if opset < 18 and length % outputs:
        raise ShapeProblem(f"length {length} does not split into {outputs} equal parts")
    size = -(-length // outputs)
    sizes = [min(size, max(length - k * size, 0)) for k in range(outputs)]
    return sizes


def reduce_axes(ndim: int, axes: Sequence[int] | None, noop_with_empty_axes: bool):
    """The axes a Reduce* node reduces: all when none are given (unless noop)."""
    if not axes:
        return () if noop_with_empty_axes else tuple(range(ndim))
    normalized = sorted(norm_axis(a, ndim) for a in axes)
    if len(set(normalized)) != len(normalized):
        raise ShapeProblem(f"reduce axes {tuple(axes)} repeat an axis")
    return tuple(normalized)


def reduced_shape(shape: Sequence[int], axes: Sequence[int], keepdims: bool) -> tuple:
    if keepdims:
        return tuple(1 if k in axes else d for k, d in enumerate(shape))
    return tuple(d for k, d in enumerate(shape) if k not in axes)
