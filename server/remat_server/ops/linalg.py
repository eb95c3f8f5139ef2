"""Matrix multiplication, batched and broadcasting exactly as np.matmul, and the
affine map x @ w + b as one op (`linear`)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .elementwise import ufunc_buffers
from .registry import register


def _matmul_infer(a: TensorType, b: TensorType) -> TensorType:
    dtype = rules.same_dtype(a, b)
    rules.require_dtype(a, rules.NUMERIC)
    if not a.shape or not b.shape:
        raise ShapeError("matmul needs inputs of rank >= 1, got a scalar")
    a2 = a.shape if len(a.shape) > 1 else (1,) + a.shape
    b2 = b.shape if len(b.shape) > 1 else b.shape + (1,)
    if a2[-1] != b2[-2]:
        raise ShapeError(f"inner dimensions differ: {a.shape} @ {b.shape} ({a2[-1]} != {b2[-2]})")
    batch = rules.broadcast_shapes(a2[:-2], b2[:-2])
    shape = batch + (a2[-2] if len(a.shape) > 1 else None, b2[-1] if len(b.shape) > 1 else None)
    return TensorType(tuple(d for d in shape if d is not None), dtype)


def _matmul_cost(out, a, b) -> int:
    return 2 * out.size * (a.shape[-1])


def _matmul_vjp(e, g, out, a, b):
    """Promote 1-D operands to matrices, differentiate, then undo the promotion."""
    a2 = a if a.ndim > 1 else e.reshape(a, shape=(1,) + a.shape)
    b2 = b if b.ndim > 1 else e.reshape(b, shape=b.shape + (1,))
    g2 = e.reshape(g, shape=_matmul_infer(a2.node.type, b2.node.type).shape)
    da = e.sum_to(g2 @ _swap_last(e, b2), a2.shape)
    if b2.ndim == 2 and a2.ndim > 2:
        # A weight shared across a batch: one (K, M*) @ (M*, N) product instead of a
        # batched product and a sum (which would hold batch x weight-size temporaries).
        rows = math.prod(a2.shape[:-1])
        db = _swap_last(e, e.reshape(a2, shape=(rows, a2.shape[-1]))) @ e.reshape(
            g2, shape=(rows, g2.shape[-1])
        )
    else:
        db = e.sum_to(_swap_last(e, a2) @ g2, b2.shape)
    return [
        e.reshape(da, shape=a.shape) if da.shape != a.shape else da,
        e.reshape(db, shape=b.shape) if db.shape != b.shape else db,
    ]


def _swap_last(e, x):
    axes = tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)
    return e.transpose(x, axes=axes)


register(
    "matmul",
    family="linalg",
    inputs=2,
    infer=_matmul_infer,
    forward=np.matmul,
    vjp=_matmul_vjp,
    residuals="inputs",
    cost=_matmul_cost,
    doc="Matrix product with np.matmul's batching, broadcasting and 1-D rules.",
)


def _linear_infer(x: TensorType, w: TensorType, b: TensorType) -> TensorType:
    out = _matmul_infer(x, w)
    rules.same_dtype(out, b)
    if rules.broadcast_shapes(out.shape, b.shape) != out.shape:
        raise ShapeError(f"bias of shape {b.shape} does not broadcast to x @ w's {out.shape}")
    return out


def _linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.matmul(x, w)
    if type(out) is not np.ndarray:  # 1-D @ 1-D: a NumPy scalar
        return np.asarray(out + b)
    out += b  # in place: the product's buffer is the result
    return out


def _linear_cost(out, x, w, b) -> int:
    return _matmul_cost(out, x, w) + out.size


def _linear_scratch(out, x, w, b) -> int:
    """NumPy's buffer for a broadcast bias in the in-place add (matmul allocates none)."""
    return ufunc_buffers(out.shape, b)


def _linear_vjp(e, g, out, x, w, b):
    return [*_matmul_vjp(e, g, out, x, w), e.sum_to(g, b.shape)]


register(
    "linear",
    family="linalg",
    inputs=3,
    infer=_linear_infer,
    forward=_linear_forward,
    vjp=_linear_vjp,
    residuals="inputs",
    cost=_linear_cost,
    scratch=_linear_scratch,
    doc="x @ w + b (np.matmul's rules; b broadcasts to the product) in one buffer: "
    "matmul then add hold the product and the sum at once.",
)
