"""remat nodes as the importer emits them, each with the shape and dtype it will have.

ONNX ops read shapes (Reshape's 0, Expand, Flatten, Shape), so the importer tracks
every value's shape: each remat op it emits has its shape rule here, a mirror of the
server's (which checks them all again at validation).

    >>> b = Builder(reserved=())
    >>> x = b.add_input("x", (2, 3), "float32")
    >>> b.binary("add", x, b.scalar(1.0, "float32")).shape
    (2, 3)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dtypes import FLOATS, NUMPY, name_of
from ..spec import InputSpec, NodeSpec


class ShapeProblem(Exception):
    """Shapes or dtypes that do not fit an op; the converter names the node."""


@dataclass(frozen=True, slots=True)
class Sym:
    """A remat value: the name of an input or node, its static shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def ndim(self) -> int:
        return len(self.shape)


def broadcast(*shapes: Sequence[int]) -> tuple[int, ...]:
    """NumPy's (and ONNX's multidirectional) broadcasting of shapes."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for k in range(rank):
        dims = {s[len(s) - rank + k] for s in shapes if len(s) - rank + k >= 0}
        dims.discard(1)
        if len(dims) > 1:
            raise ShapeProblem(
                "shapes " + ", ".join(str(tuple(s)) for s in shapes) + " do not broadcast"
            )
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ShapeProblem(f"axis {axis} is out of range for rank {ndim}")
    return axis % ndim


_BOOL_RESULT = frozenset({"gt", "ge", "lt", "le", "eq", "logical_and", "logical_or", "logical_xor"})
_FLOAT_ONLY = frozenset({"div"})


class Builder:
    """The growing remat graph: inputs, nodes (NodeSpec) and the names they take."""

    def __init__(self, reserved: Iterable[str]):
        self.inputs: list[InputSpec] = []
        self.nodes: list[NodeSpec] = []
        self.shapes: dict[str, tuple[int, ...]] = {}  # every input's and node's shape
        self.reserved = set(reserved)  # ONNX value names: fresh names avoid them
        self.taken: set[str] = set()
        self.hint = "onnx"  # prefix of fresh names: the ONNX value being converted
        self.source = ""  # NodeSpec.source of the nodes emitted now (the ONNX node)

    # --- names ---------------------------------------------------------------------------
    def fresh(self, op: str) -> str:
        base = f"{self.hint}/{op}"
        name, k = base, 0
        while name in self.taken or name in self.reserved:
            k += 1
            name = f"{base}.{k}"
        self.taken.add(name)
        return name

    def claim(self, name: str) -> bool:
        """Take `name` if it is still free (ONNX value names are reserved for their own
        value, so the caller claims them)."""
        if not name or name in self.taken:
            return False
        self.taken.add(name)
        return True

    # --- inputs, nodes, constants ------------------------------------------------------------
    def add_input(self, name: str, shape: tuple[int, ...], dtype: str) -> Sym:
        self.taken.add(name)
        self.inputs.append(InputSpec(name, tuple(shape), dtype, self.source))
        self.shapes[name] = tuple(shape)
        return Sym(name, tuple(shape), dtype)

    def emit(
        self,
        op: str,
        inputs: Sequence[Sym],
        attrs: dict[str, Any],
        shape: Sequence[int],
        dtype: str,
        name: str | None = None,
    ) -> Sym:
        name = name if name is not None and self.claim(name) else self.fresh(op)
        self.nodes.append(NodeSpec(name, op, tuple(i.name for i in inputs), attrs, self.source))
        shape = self.shapes[name] = tuple(int(d) for d in shape)
        return Sym(name, shape, dtype)

    def constant(self, array: np.ndarray, name: str | None = None) -> Sym:
        dtype = name_of(array.dtype)
        if dtype is None:
            raise ShapeProblem(f"a constant of dtype {array.dtype} (remat has {', '.join(NUMPY)})")
        value = np.asarray(array, dtype=NUMPY[dtype], order="C")  # keeps 0-d arrays 0-d
        return self.emit("constant", (), {"value": value}, value.shape, dtype, name)

    def scalar(self, value: float | int | bool, dtype: str) -> Sym:
        return self.constant(np.array(value, dtype=NUMPY[dtype]))

    # --- elementwise ------------------------------------------------------------------------
    def unary(self, op: str, x: Sym, dtype: str | None = None, **attrs) -> Sym:
        if op in ("isnan", "isinf"):
            dtype = "bool"
        elif op == "logical_not":
            if x.dtype != "bool":
                raise ShapeProblem(f"logical_not of a {x.dtype} tensor")
        elif op != "cast" and x.dtype == "bool":
            raise ShapeProblem(f"{op} of a bool tensor")
        return self.emit(op, (x,), attrs, x.shape, dtype or x.dtype)

    def binary(self, op: str, a: Sym, b: Sym) -> Sym:
        if a.dtype != b.dtype:
            raise ShapeProblem(f"{op} of {a.dtype} and {b.dtype}")
        if op in _FLOAT_ONLY and a.dtype not in FLOATS:
            raise ShapeProblem(f"{op} of {a.dtype} tensors (remat divides floats only)")
        dtype = "bool" if op in _BOOL_RESULT else a.dtype
        return self.emit(op, (a, b), {}, broadcast(a.shape, b.shape), dtype)

    def where(self, cond: Sym, a: Sym, b: Sym) -> Sym:
        if cond.dtype != "bool" or a.dtype != b.dtype:
            raise ShapeProblem(f"where({cond.dtype}, {a.dtype}, {b.dtype})")
        return self.emit(
            "where", (cond, a, b), {}, broadcast(cond.shape, a.shape, b.shape), a.dtype
        )

    def cast(self, x: Sym, dtype: str) -> Sym:
        return x if x.dtype == dtype else self.emit("cast", (x,), {"dtype": dtype}, x.shape, dtype)

    # --- linear algebra, shapes -------------------------------------------------------------------
    def matmul(self, a: Sym, b: Sym) -> Sym:
        if a.dtype != b.dtype or not a.shape or not b.shape:
            raise ShapeProblem(f"matmul of {a.dtype} {a.shape} and {b.dtype} {b.shape}")
        a2 = a.shape if a.ndim > 1 else (1,) + a.shape
        b2 = b.shape if b.ndim > 1 else b.shape + (1,)
        if a2[-1] != b2[-2]:
            raise ShapeProblem(f"matmul of {a.shape} and {b.shape}: inner dimensions differ")
        shape = broadcast(a2[:-2], b2[:-2])
        shape += ((a2[-2],) if a.ndim > 1 else ()) + ((b2[-1],) if b.ndim > 1 else ())
        return self.emit("matmul", (a, b), {}, shape, a.dtype)

    def reshape(self, x: Sym, shape: Sequence[int]) -> Sym:
        shape = tuple(int(d) for d in shape)
        if shape == x.shape:
            return x
        if any(d < 0 for d in shape) or _prod(shape) != _prod(x.shape):
            raise ShapeProblem(f"cannot reshape {x.shape} to {shape}")
        return self.emit("reshape", (x,), {"shape": shape}, shape, x.dtype)

    def transpose(self, x: Sym, perm: Sequence[int]) -> Sym:
        perm = tuple(norm_axis(a, x.ndim) for a in perm)
        if sorted(perm) != list(range(x.ndim)):
            raise ShapeProblem(f"perm {perm} is not a permutation of {x.ndim} axes")
        if perm == tuple(range(x.ndim)):
            return x
        shape = tuple(x.shape[a] for a in perm)
        return self.emit("transpose", (x,), {"axes": perm}, shape, x.dtype)

    def broadcast_to(self, x: Sym, shape: Sequence[int]) -> Sym:
        shape = tuple(int(d) for d in shape)
        if shape == x.shape:
            return x
        if broadcast(x.shape, shape) != shape:
            raise ShapeProblem(f"cannot broadcast {x.shape} to {shape}")
        return self.emit("broadcast_to", (x,), {"shape": shape}, shape, x.dtype)

    def concat(self, xs: Sequence[Sym], axis: int) -> Sym:
        if len(xs) == 1:
            return xs[0]
        first = xs[0]
        axis = norm_axis(axis, first.ndim)
        for x in xs:
            rest = x.shape[:axis] + x.shape[axis + 1 :]
            if x.dtype != first.dtype or rest != first.shape[:axis] + first.shape[axis + 1 :]:
                raise ShapeProblem(f"concat along axis {axis} of {[t.shape for t in xs]}")
        shape = list(first.shape)
        shape[axis] = sum(x.shape[axis] for x in xs)
        return self.emit("concat", tuple(xs), {"axis": axis}, shape, first.dtype)

    def slice(self, x: Sym, starts, stops, steps) -> Sym:
        """Resolved, non-negative starts/stops and positive steps for every axis."""
        shape = tuple(len(range(b, e, s)) for b, e, s in zip(starts, stops, steps))
        if shape == x.shape and all(s == 1 for s in steps):
            return x
        attrs = {"starts": tuple(starts), "stops": tuple(stops), "steps": tuple(steps)}
        return self.emit("slice", (x,), attrs, shape, x.dtype)

    def take(self, x: Sym, indices: Sym, axis: int) -> Sym:
        axis = norm_axis(axis, x.ndim)
        shape = x.shape[:axis] + indices.shape + x.shape[axis + 1 :]
        return self.emit("take", (x, indices), {"axis": axis}, shape, x.dtype)

    def take_along_axis(self, x: Sym, indices: Sym, axis: int) -> Sym:
        axis = norm_axis(axis, x.ndim)
        return self.emit("take_along_axis", (x, indices), {"axis": axis}, indices.shape, x.dtype)

    # --- reductions ------------------------------------------------------------------------------
    def reduce(self, op: str, x: Sym, axes: Sequence[int], keepdims: bool) -> Sym:
        axes = tuple(sorted({norm_axis(a, x.ndim) for a in axes}))
        if not axes:
            return x
        if keepdims:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return self.emit(op, (x,), {"axes": axes, "keepdims": bool(keepdims)}, shape, x.dtype)

    def arg(self, op: str, x: Sym, axis: int, keepdims: bool) -> Sym:
        axis = norm_axis(axis, x.ndim)
        shape = list(x.shape)
        if keepdims:
            shape[axis] = 1
        else:
            del shape[axis]
        return self.emit(op, (x,), {"axis": axis, "keepdims": bool(keepdims)}, shape, "int64")


def _prod(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def window_out(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    """Output length of a sliding window (floor mode) over `size` with `pad_total` padding."""
    out = (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise ShapeProblem(
            f"input size {size} with padding {pad_total} is smaller than the kernel {kernel} "
            f"(dilation {dilation})"
        )
    return out
