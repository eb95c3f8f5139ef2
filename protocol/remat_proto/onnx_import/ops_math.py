"""ONNX elementwise, activation, matrix and reduction ops -> remat ops.

Where a derivative is undefined (Relu at 0, Clip at its bounds, max ties) the remat
op follows PyTorch, so the mapping is one op to one op wherever remat has it;
composites (Elu, PRelu, HardSigmoid, Gemm, ReduceL2...) keep PyTorch's convention at
the kinks too.
"""

from __future__ import annotations

import math

import numpy as np

from .context import NodeCtx
from .emit import Sym, broadcast, norm_axis
from .errors import Unsupported
from .fold import axes_input
from .shapes import reduce_axes

UNARY = {
    "Relu": "relu",
    "Neg": "neg",
    "Exp": "exp",
    "Sin": "sin",
    "Cos": "cos",
    "Log": "log",
    "Sqrt": "sqrt",
    "Abs": "abs",
    "Sign": "sign",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "Erf": "erf",
    "Not": "logical_not",
    "IsNaN": "isnan",
}
BINARY = {
    "Add": "add",
    "Sub": "sub",
    "Mul": "mul",
    "Div": "div",
    "Equal": "eq",
    "Greater": "gt",
    "GreaterOrEqual": "ge",
    "Less": "lt",
    "LessOrEqual": "le",
    "And": "logical_and",
    "Or": "logical_or",
    "Xor": "logical_xor",
}
VARIADIC = {"Max": "maximum", "Min": "minimum", "Sum": "add", "Mean": "add"}


def _unary(c: NodeCtx):
    return c.b.unary(UNARY[c.op], c.sym(0))


def _binary(c: NodeCtx):
    return c.b.binary(BINARY[c.op], c.sym(0), c.sym(1))


def _variadic(c: NodeCtx):
    xs = [c.sym(i) for i in range(c.n_inputs) if c.has(i)]
    out = xs[0]
    for x in xs[1:]:
        out = c.b.binary(VARIADIC[c.op], out, x)
    if c.op == "Mean" and len(xs) > 1:
        out = c.b.binary("div", out, c.b.scalar(float(len(xs)), out.dtype))
    return out


def _uniform(c: NodeCtx, i: int, what: str) -> float:
    """A constant input that must hold one value (possibly repeated)."""
    value = c.const(i, what).reshape(-1)
    if value.size == 0 or np.any(value != value[0]):
        raise Unsupported(f"{what} must be a single value")
    return float(value[0])


def _pow(c: NodeCtx):
    x = c.sym(0)
    if not c.is_static(1):
        raise Unsupported("Pow with a computed exponent (remat's pow takes a constant)")
    exponent = _uniform(c, 1, "the exponent")
    if not math.isfinite(exponent):
        raise Unsupported(f"Pow with exponent {exponent}")
    out = c.b.unary("pow", x, exponent=exponent)
    return c.b.broadcast_to(out, broadcast(x.shape, c.shape(1)))


def _reciprocal(c: NodeCtx):
    x = c.sym(0)
    return c.b.binary("div", c.b.scalar(1.0, x.dtype), x)


def _is_inf(c: NodeCtx):
    x = c.sym(0)
    found = c.b.unary("isinf", x, dtype="bool")
    positive, negative = c.attr("detect_positive", 1), c.attr("detect_negative", 1)
    if positive and negative:
        return found
    if not positive and not negative:
        return c.b.binary("logical_and", found, c.b.scalar(False, "bool"))
    side = c.b.binary("gt" if positive else "lt", x, c.b.scalar(0.0, x.dtype))
    return c.b.binary("logical_and", found, side)


def _clip(c: NodeCtx):
    x = c.sym(0)
    bounds = {}
    for i, key in ((1, "min"), (2, "max")):
        if c.has(i):
            if not c.is_static(i):
                raise Unsupported(f"Clip with a computed {key} (remat's clip takes constants)")
            bounds[key] = _uniform(c, i, key)
    return c.b.unary("clip", x, **bounds)


def _leaky_relu(c: NodeCtx):
    return c.b.unary("leaky_relu", c.sym(0), negative_slope=float(c.attr("alpha", 0.01)))


def _gelu(c: NodeCtx):
    return c.b.unary("gelu", c.sym(0), approximate=c.attr("approximate", "none"))


def _exp_minus_one(c: NodeCtx, x: Sym, positive: Sym) -> Sym:
    """exp(x) - 1 where x <= 0, evaluated at 0 elsewhere so that no inf * 0 reaches the
    gradient of the branch `where` discards."""
    zero = c.b.scalar(0.0, x.dtype)
    exp = c.b.unary("exp", c.b.where(positive, zero, x))
    return c.b.binary("sub", exp, c.b.scalar(1.0, x.dtype))


def _elu(c: NodeCtx):
    x = c.sym(0)
    alpha = float(c.attr("alpha", 1.0 if c.op == "Elu" else 1.67326319217681884765625))
    positive = c.b.binary("gt", x, c.b.scalar(0.0, x.dtype))
    negative = c.b.binary("mul", c.b.scalar(alpha, x.dtype), _exp_minus_one(c, x, positive))
    out = c.b.where(positive, x, negative)
    if c.op == "Selu":
        gamma = float(c.attr("gamma", 1.05070102214813232421875))
        out = c.b.binary("mul", out, c.b.scalar(gamma, x.dtype))
    return out


def _prelu(c: NodeCtx):
    x, slope = c.sym(0), c.sym(1)
    positive = c.b.binary("gt", x, c.b.scalar(0.0, x.dtype))
    return c.b.where(positive, x, c.b.binary("mul", slope, x))


def _hard_sigmoid(c: NodeCtx):
    """hardtanh(alpha x + beta, 0, 1): torch's hardsigmoid, gradient zero at the kinks."""
    x = c.sym(0)
    alpha, beta = float(c.attr("alpha", 0.2)), float(c.attr("beta", 0.5))
    y = c.b.binary(
        "add", c.b.binary("mul", x, c.b.scalar(alpha, x.dtype)), c.b.scalar(beta, x.dtype)
    )
    return c.b.unary("hardtanh", y, min_val=0.0, max_val=1.0)


def _softmax(c: NodeCtx):
    x = c.sym(0)
    op = "softmax" if c.op == "Softmax" else "log_softmax"
    return c.b.unary(op, x, axis=norm_axis(int(c.attr("axis", -1)), x.ndim))


def _cast(c: NodeCtx):
    x = c.sym(0)
    if c.op == "CastLike":
        return c.b.cast(x, c.sym(1).dtype)
    return c.b.cast(x, c.remat_dtype(c.attr("to")))


def _where(c: NodeCtx):
    return c.b.where(c.sym(0), c.sym(1), c.sym(2))


def _identity(c: NodeCtx):
    return c.values[0]


def _matmul(c: NodeCtx):
    return c.b.matmul(c.sym(0), c.sym(1))


def _gemm(c: NodeCtx):
    a, b = c.sym(0), c.sym(1)
    if a.ndim != 2 or b.ndim != 2:
        raise Unsupported(f"Gemm of ranks {a.ndim} and {b.ndim} (ONNX requires 2)")
    if c.attr("transA", 0):
        a = c.b.transpose(a, (1, 0))
    if c.attr("transB", 0):
        b = c.b.transpose(b, (1, 0))
    y = c.b.matmul(a, b)
    alpha, beta = float(c.attr("alpha", 1.0)), float(c.attr("beta", 1.0))
    if alpha != 1.0:
        y = c.b.binary("mul", y, c.b.scalar(alpha, y.dtype))
    if c.has(2) and beta != 0.0:
        bias = c.sym(2)
        if beta != 1.0:
            bias = c.b.binary("mul", bias, c.b.scalar(beta, bias.dtype))
        y = c.b.binary("add", y, bias)
    return y


REDUCE = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min"}


def _reduce(c: NodeCtx):
    x = c.sym(0)
    axes = reduce_axes(
        x.ndim,
        axes_input(c, 1, 13 if c.op == "ReduceSum" else 18),
        c.attr("noop_with_empty_axes", 0),
    )
    keep = bool(c.attr("keepdims", 1))
    if c.op in ("ReduceSumSquare", "ReduceL2"):
        x = c.b.unary("square", x)
    elif c.op == "ReduceL1":
        x = c.b.unary("abs", x)
    out = c.b.reduce(REDUCE.get(c.op, "sum"), x, axes, keep)
    if c.op == "ReduceL2":
        out = c.b.unary("sqrt", out)
    elif c.op == "ReduceLogSum":
        out = c.b.unary("log", out)
    return out


def _arg(c: NodeCtx):
    x = c.sym(0)
    return c.b.arg(c.op.lower(), x, int(c.attr("axis", 0)), bool(c.attr("keepdims", 1)))


def _check_gelu(attrs, opset):
    value = attrs.get("approximate", "none")
    return [] if value in ("none", "tanh") else [f"approximate '{value}'"]


def _check_arg(attrs, opset):
    return (
        ["select_last_index=1 (remat picks the first index)"]
        if attrs.get("select_last_index")
        else []
    )


OPS = {op: _unary for op in UNARY}
OPS.update({op: _binary for op in BINARY})
OPS.update({op: _variadic for op in VARIADIC})
OPS.update(
    {op: _reduce for op in (*REDUCE, "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum")}
)
OPS.update(
    {
        "Pow": _pow,
        "Reciprocal": _reciprocal,
        "IsInf": _is_inf,
        "Clip": _clip,
        "LeakyRelu": _leaky_relu,
        "Gelu": _gelu,
        "Elu": _elu,
        "Selu": _elu,
        "PRelu": _prelu,
        "HardSigmoid": _hard_sigmoid,
        "Softmax": _softmax,
        "LogSoftmax": _softmax,
        "Cast": _cast,
        "CastLike": _cast,
        "Where": _where,
        "Identity": _identity,
        "MatMul": _matmul,
        "Gemm": _gemm,
        "ArgMax": _arg,
        "ArgMin": _arg,
    }
)
CHECKS = {"Gelu": _check_gelu, "ArgMax": _check_arg, "ArgMin": _check_arg}
