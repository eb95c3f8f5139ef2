"""Elementwise ops with NumPy broadcasting. Gradients are returned in the output's
shape; autodiff sums them down to each input's shape (un-broadcasting)."""

from __future__ import annotations

import math

import numpy as np

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .registry import Attr, elementwise_cost, free, register

FLOAT, NUMERIC = dtypes.FLOATS, rules.NUMERIC
ALL = frozenset(dtypes.NUMPY)

# --- arithmetic -----------------------------------------------------------------
register(
    "add",
    family="elementwise",
    inputs=2,
    infer=rules.binary(NUMERIC),
    forward=np.add,
    vjp=lambda e, g, out, a, b: [g, g],
    residuals="none",
    cost=elementwise_cost(1),
)
register(
    "sub",
    family="elementwise",
    inputs=2,
    infer=rules.binary(NUMERIC),
    forward=np.subtract,
    vjp=lambda e, g, out, a, b: [g, -g],
    residuals="none",
    cost=elementwise_cost(1),
)
register(
    "mul",
    family="elementwise",
    inputs=2,
    infer=rules.binary(NUMERIC),
    forward=np.multiply,
    vjp=lambda e, g, out, a, b: [g * b, g * a],
    residuals="inputs",
    cost=elementwise_cost(1),
)
register(
    "div",
    family="elementwise",
    inputs=2,
    infer=rules.binary(FLOAT),
    forward=np.divide,
    vjp=lambda e, g, out, a, b: [g / b, -(g * out) / b],
    residuals="inputs+output",
    cost=elementwise_cost(1),
)
register(
    "neg",
    family="elementwise",
    infer=rules.unary(NUMERIC),
    forward=np.negative,
    vjp=lambda e, g, out, x: [-g],
    residuals="none",
    cost=elementwise_cost(1),
)


def _pow(x, exponent):
    """x ** exponent, with the common exponents on fast paths (np.power's general
    path costs ~60 ms per million float32 elements)."""
    fast = {
        1.0: lambda: x.copy(),
        2.0: lambda: x * x,
        3.0: lambda: x * x * x,
        0.5: lambda: np.sqrt(x),
        -1.0: lambda: 1.0 / x,
        -2.0: lambda: 1.0 / (x * x),
    }
    return fast[exponent]() if exponent in fast else np.power(x, exponent)


register(
    "pow",
    family="elementwise",
    infer=rules.unary(FLOAT),
    forward=_pow,
    vjp=lambda e, g, out, x, exponent: [g * (exponent * e.pow(x, exponent=exponent - 1.0))],
    residuals="inputs",
    cost=elementwise_cost(10),
    attrs={"exponent": Attr("float", check=math.isfinite, requirement="must be finite")},
    doc="x ** exponent for a scalar exponent.",
)
register(
    "square",
    family="elementwise",
    infer=rules.unary(NUMERIC),
    forward=np.square,
    vjp=lambda e, g, out, x: [g * (2.0 * x)],
    residuals="inputs",
    cost=elementwise_cost(1),
)
register(
    "abs",
    family="elementwise",
    infer=rules.unary(NUMERIC),
    forward=np.abs,
    vjp=lambda e, g, out, x: [g * e.sign(x)],
    residuals="inputs",
    cost=elementwise_cost(1),
)
register(
    "sign",
    family="elementwise",
    infer=rules.unary(NUMERIC),
    forward=np.sign,
    vjp=lambda e, g, out, x: [None],
    residuals="none",
    cost=elementwise_cost(1),
    doc="-1, 0 or 1; its derivative is zero almost everywhere.",
)
register(
    "maximum",
    family="elementwise",
    inputs=2,
    infer=rules.binary(NUMERIC),
    forward=np.maximum,
    vjp=lambda e, g, out, a, b: _select_grads(e, g, a, b, "gt"),
    residuals="inputs",
    cost=elementwise_cost(1),
    doc="Ties split the gradient equally between both inputs (as torch.maximum).",
)
register(
    "minimum",
    family="elementwise",
    inputs=2,
    infer=rules.binary(NUMERIC),
    forward=np.minimum,
    vjp=lambda e, g, out, a, b: _select_grads(e, g, a, b, "lt"),
    residuals="inputs",
    cost=elementwise_cost(1),
    doc="Ties split the gradient equally between both inputs (as torch.minimum).",
)


def _select_grads(e, g, a, b, wins: str):
    """Gradient of maximum/minimum: to the winning input, halved on ties."""
    a_share = e.cast(e.op(wins, a, b), dtype=g.dtype) + 0.5 * e.cast(e.eq(a, b), dtype=g.dtype)
    return [g * a_share, g * (1.0 - a_share)]


# --- transcendental and activations (more in activations.py) -----------------------
def _sigmoid(x):
    # tanh form: one transcendental, no overflow for large |x|.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# Float unary ops: name -> (forward, VJP, what the VJP reads, FLOPs per element). The
# VJPs read like a derivative table; tanh and sigmoid emit one fused value each
# (activation_grad.py) instead of the three a composite 1 - y^2 or y (1 - y) would.
FLOAT_UNARY = {
    "exp": (np.exp, lambda e, g, out, x: [g * out], "output", 10),
    "log": (np.log, lambda e, g, out, x: [g / x], "inputs", 10),
    "sqrt": (np.sqrt, lambda e, g, out, x: [g / (2.0 * out)], "output", 10),
    "sin": (np.sin, lambda e, g, out, x: [g * e.cos(x)], "inputs", 10),
    "cos": (np.cos, lambda e, g, out, x: [-(g * e.sin(x))], "inputs", 10),
    "tanh": (np.tanh, lambda e, g, out, x: [e.tanh_grad(out, g)], "output", 10),
    "sigmoid": (_sigmoid, lambda e, g, out, x: [e.sigmoid_grad(out, g)], "output", 12),
}
for _name, (_forward, _vjp, _residuals, _flops) in FLOAT_UNARY.items():
    register(
        _name,
        family="elementwise",
        infer=rules.unary(FLOAT),
        forward=_forward,
        vjp=_vjp,
        residuals=_residuals,
        cost=elementwise_cost(_flops),
    )
register(
    "relu",
    family="elementwise",
    infer=rules.unary(FLOAT),
    forward=lambda x: np.maximum(x, 0).astype(x.dtype, copy=False),
    # where, not g * cast(mask): the mask stays bool (1 byte an element), no float copy.
    vjp=lambda e, g, out, x: [e.where(e.gt(x, e.const(0.0, x.dtype)), g, e.const(0.0, g.dtype))],
    residuals="inputs",
    cost=elementwise_cost(1),
)

# --- selection, comparison, conversion, constants ---------------------------------


def _where_infer(cond: TensorType, a: TensorType, b: TensorType) -> TensorType:
    rules.require_dtype(cond, frozenset({"bool"}), "condition")
    dtype = rules.same_dtype(a, b)
    return TensorType(rules.broadcast_shapes(cond.shape, a.shape, b.shape), dtype)


def _where_vjp(e, g, out, cond, a, b):
    zero = e.const(0.0, g.dtype)
    return [None, e.where(cond, g, zero), e.where(cond, zero, g)]


# np.where branches per element, and a mask such as relu's (random signs) mispredicts
# half the branches: measured 18x slower (7.7 ms vs 0.42 ms on 2M float32) than ANDing
# each side's bits with an all-ones or all-zeros mask. The select is exact: it moves
# bits (NaNs, infinities and signed zeros included), never arithmetic.
SELECT_MIN_ELEMENTS = 1024  # below, np.where's set-up cost is the smaller


def _where(cond, a, b):
    shape = np.broadcast_shapes(cond.shape, a.shape, b.shape)
    if a.dtype != b.dtype or a.dtype.kind not in "fiu" or math.prod(shape) < SELECT_MIN_ELEMENTS:
        return np.where(cond, a, b)
    bits = np.dtype(f"i{a.itemsize}")
    mask = np.empty(shape, bits)
    mask[...] = cond  # 1 or 0
    np.negative(mask, out=mask)  # all ones or all zeros
    if b.size == 1 and not b.view(bits).any():  # b is +0 (a VJP's zero branch)
        return np.bitwise_and(a.view(bits), mask, out=mask).view(a.dtype)
    out = np.bitwise_and(a.view(bits), mask)
    np.invert(mask, out=mask)
    np.bitwise_or(out, np.bitwise_and(b.view(bits), mask, out=mask), out=out)
    return out.view(a.dtype)


register(
    "where",
    family="elementwise",
    inputs=3,
    infer=_where_infer,
    forward=_where,
    # The mask, a temporary of the result's size (none when b is zero).
    workspace=lambda cond, a, b: tuple(rules.broadcast_shapes(cond.shape, a.shape, b.shape)),
    vjp=_where_vjp,
    residuals="inputs",
    cost=elementwise_cost(1),
    no_grad=(0,),
    doc="where(cond, a, b): a where cond is true, else b.",
)

for _name, _fn in (
    ("gt", np.greater),
    ("ge", np.greater_equal),
    ("lt", np.less),
    ("le", np.less_equal),
    ("eq", np.equal),
):
    register(
        _name,
        family="elementwise",
        inputs=2,
        infer=rules.binary(ALL, out_dtype="bool"),
        forward=_fn,
        vjp=None,
        residuals="none",
        cost=elementwise_cost(1),
        doc="Comparison; the result is bool and not differentiable.",
    )


def _cast_vjp(e, g, out, x, dtype):
    return [e.cast(g, dtype=x.dtype) if dtypes.is_float(x.dtype) else None]


register(
    "cast",
    family="elementwise",
    infer=lambda x, dtype: TensorType(x.shape, dtype),
    forward=lambda x, dtype: x.astype(dtypes.NUMPY[dtype]),
    vjp=_cast_vjp,
    residuals="none",
    cost=elementwise_cost(1),
    attrs={
        "dtype": Attr(
            "string",
            check=lambda d: d in dtypes.NUMPY,
            requirement=f"must be one of {', '.join(dtypes.NUMPY)}",
        )
    },
)


def _constant_infer(value: np.ndarray) -> TensorType:
    try:
        return TensorType(tuple(value.shape), dtypes.of_array(value))
    except KeyError:
        raise ShapeError(f"constant has unsupported dtype {value.dtype}") from None


register(
    "constant",
    family="elementwise",
    inputs=0,
    infer=_constant_infer,
    forward=lambda value: value,
    vjp=lambda e, g, out, value: [],
    residuals="none",
    cost=free,
    memory="external",
    attrs={"value": Attr("tensor")},
    doc="A tensor fixed in the graph.",
)
