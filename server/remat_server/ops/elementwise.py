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


# --- what NumPy allocates inside one ufunc call (the `scratch` rules build on it) -------
BUFFER = 8192  # np.getbufsize(): elements per operand of a buffered ufunc loop
# NumPy's iterator buffers an operand only when at least this many whole inner runs
# (cores) fit in BUFFER elements; with one, it iterates the operand in place.
MIN_BUFFERED_RUNS = 2


def ufunc_buffers(out_shape, *operands: TensorType, cast: tuple[TensorType, ...] = ()) -> int:
    """Bytes of the buffers NumPy's iterator (>= 2.3) allocates for one ufunc call over
    C-contiguous operands broadcasting to `out_shape` (measured, not documented).

    Axes (of size > 1) coalesce where every operand agrees on broadcasting them; the
    innermost run of such axes is the core. The buffer holds as many whole cores as fit
    in BUFFER elements, growing outward axis by axis. An operand broadcast along some
    axes but not all gets one if it holds two cores or more; an operand cast to the
    loop's dtype (`cast`, given as the type it is cast to) always gets one. Operands of
    one element, full-size operands and the fresh result never do. A non-contiguous
    operand may get one too: the memory model assumes contiguous ones.
    """
    out_shape = tuple(out_shape)
    if not cast:  # the common case, answered without the walk below (a call per node)
        for t in operands:
            if t.shape != out_shape and math.prod(t.shape) != 1:
                break
        else:
            return 0
    if math.prod(out_shape) == 0:  # nothing to iterate
        return 0
    everyone = operands + tuple(cast)
    axes = [i for i, d in enumerate(out_shape) if d != 1]
    flags = []  # per operand: broadcast along each axis?
    for t in everyone:
        padded = (1,) * (len(out_shape) - len(t.shape)) + tuple(t.shape)
        flags.append(tuple(padded[i] == 1 for i in axes))
    pattern = [tuple(f[j] for f in flags) for j in range(len(axes))]
    j = len(axes) - 1
    while j >= 0 and pattern[j] == pattern[-1]:
        j -= 1
    core = span = math.prod(out_shape[i] for i in axes[j + 1 :])
    for i in reversed(axes[: j + 1]):
        if span * out_shape[i] > BUFFER:
            span *= BUFFER // span
            break
        span *= out_shape[i]
    total = 0
    if j >= 0 and span >= MIN_BUFFERED_RUNS * core:  # several runs: broadcast operands are buffered
        total += span * sum(
            dtypes.itemsize(t.dtype) for t, f in zip(operands, flags) if any(f) and not all(f)
        )
    return total + min(max(span, core), BUFFER) * sum(dtypes.itemsize(t.dtype) for t in cast)


def broadcast_scratch(out, *inputs, **attrs) -> int:
    """`scratch` of an op that is one ufunc call over its inputs."""
    return ufunc_buffers(out.shape, *inputs)


# --- arithmetic -----------------------------------------------------------------
register(
    "add",
    family="elementwise",
    inputs=2,
    infer=rules.binary(NUMERIC),
    forward=np.add,
    scratch=broadcast_scratch,
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
    scratch=broadcast_scratch,
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
    scratch=broadcast_scratch,
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
    scratch=broadcast_scratch,
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


def _cube(x):  # in the result buffer, an array for a 0-d x too
    out = np.multiply(x, x, out=np.empty_like(x))
    return np.multiply(out, x, out=out)


def _inverse_square(x):
    out = np.multiply(x, x, out=np.empty_like(x))
    return np.divide(1.0, out, out=out)


def _pow(x, exponent):
    """x ** exponent, with the common exponents on fast paths (np.power's general
    path costs ~60 ms per million float32 elements), each in its result buffer."""
    fast = {
        1.0: lambda: x.copy(),
        2.0: lambda: x * x,
        3.0: lambda: _cube(x),
        0.5: lambda: np.sqrt(x),
        -1.0: lambda: 1.0 / x,
        -2.0: lambda: _inverse_square(x),
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
    scratch=broadcast_scratch,
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
    scratch=broadcast_scratch,
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
    # tanh form: one transcendental, no overflow for large |x|; in the result buffer.
    out = np.multiply(x, 0.5, out=np.empty_like(x))
    np.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    return out


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
# half the branches: measured 18x slower (7.7 ms vs 0.42 ms on 2M float32) than a
# select on the bits: ((a ^ b) * cond) ^ b is a where cond is 1 and b where it is 0,
# three vectorized passes in the result buffer and no mask (faster than the former
# all-ones/all-zeros mask, a temporary of the result's size). The select is exact: it
# moves bits (NaNs, infinities and signed zeros included), never arithmetic.
SELECT_MIN_ELEMENTS = 1024  # below, np.where's set-up cost is the smaller


def _bit_select(cond, a, b) -> bool:
    shape = np.broadcast_shapes(cond.shape, a.shape, b.shape)
    return a.dtype == b.dtype and a.dtype.kind in "fiu" and math.prod(shape) >= SELECT_MIN_ELEMENTS


def _where(cond, a, b):
    if not _bit_select(cond, a, b):
        return np.where(cond, a, b)
    bits = np.dtype(f"i{a.itemsize}")
    b_bits = b.view(bits)
    shape = np.broadcast_shapes(cond.shape, a.shape, b.shape)
    if b.size == 1 and not b_bits.any():  # b is +0 (a VJP's zero branch): one pass
        return np.multiply(a.view(bits), cond).reshape(shape).view(a.dtype)
    out = np.bitwise_xor(a.view(bits), b_bits, out=np.empty(shape, bits))
    np.multiply(out, cond, out=out)  # 0 where cond is false
    return np.bitwise_xor(out, b_bits, out=out).view(a.dtype)


def _where_scratch(out, cond, a, b) -> int:
    if dtypes.NUMPY[a.dtype].kind not in "fiu" or out.size < SELECT_MIN_ELEMENTS:
        return ufunc_buffers(out.shape, cond, a, b)  # np.where
    bits = TensorType(out.shape, f"int{8 * dtypes.itemsize(a.dtype)}")
    cond_cast = (TensorType(cond.shape, bits.dtype),)  # cond, cast from bool to the bits
    if b.size == 1:  # the upper bound: b's value decides on the one-pass form
        return ufunc_buffers(out.shape, a, cast=cond_cast)
    return max(  # each pass's buffers, one pass at a time
        ufunc_buffers(out.shape, a, b),
        ufunc_buffers(out.shape, bits, cast=cond_cast),
        ufunc_buffers(out.shape, bits, b),
    )


register(
    "where",
    family="elementwise",
    inputs=3,
    infer=_where_infer,
    forward=_where,
    scratch=_where_scratch,
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
        scratch=broadcast_scratch,
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
