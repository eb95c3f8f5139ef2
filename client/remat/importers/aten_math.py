"""`from_torch`'s elementwise, comparison, logical, reduction and linear-algebra ATen
ops (registered into `aten_table.HANDLERS` on import; see there for the handlers'
contract)."""

from __future__ import annotations

import math

import numpy as np

from .aten_table import _dim, _dims, _out_shape, _reshape, _scalar, aten
from .torch_values import Tensor, Unsupported


# --- elementwise arithmetic ---------------------------------------------------------------
def _times(cx, value, alpha, dtype):
    """value * alpha as a node (folded when value is a constant)."""
    if alpha is None or alpha == 1:
        return cx.node(value, dtype)
    if not isinstance(value, Tensor):
        return cx.node(value * alpha, dtype)
    return cx.op("mul", [cx.node(value, dtype), cx.node(alpha, dtype)])


@aten("add")
def _add(cx, a):
    dt = cx.out_dtype
    return cx.op("add", [cx.node(a.self, dt), _times(cx, a.other, a.alpha, dt)])


@aten("sub")
def _sub(cx, a):
    dt = cx.out_dtype
    return cx.op("sub", [cx.node(a.self, dt), _times(cx, a.other, a.alpha, dt)])


@aten("rsub")
def _rsub(cx, a):
    dt = cx.out_dtype
    return cx.op("sub", [cx.node(a.other, dt), _times(cx, a.self, a.alpha, dt)])


def _binary(op):
    def handler(cx, a):
        dt = cx.out_dtype
        return cx.op(op, [cx.node(a.self, dt), cx.node(a.other, dt)])

    return handler


aten("mul")(_binary("mul"))
aten("div.Tensor", "div.Scalar", "true_divide")(_binary("div"))
aten("maximum", "max.other", "fmax")(_binary("maximum"))
aten("minimum", "min.other", "fmin")(_binary("minimum"))


@aten("div.Tensor_mode", "div.Scalar_mode")
def _div_mode(cx, a):
    if a.rounding_mode is not None:
        raise Unsupported(f"rounding_mode={a.rounding_mode!r} on values that depend on inputs")
    return _binary("div")(cx, a)


def _compare(op):
    def handler(cx, a):
        dt = cx.result_type(a.self, a.other)
        return cx.op(op, [cx.node(a.self, dt), cx.node(a.other, dt)])

    return handler


for _op in ("eq", "lt", "le", "gt", "ge"):
    aten(_op)(_compare(_op))


@aten("ne")
def _ne(cx, a):
    return cx.op("logical_not", [_compare("eq")(cx, a)])


def _logical(op):
    def handler(cx, a):
        inputs = [a.self] if a.other is None else [a.self, a.other]
        if any(cx.dtype_of(v) != cx.torch.bool for v in inputs):
            raise Unsupported("bitwise ops on integers are not supported (bool only)")
        return cx.op(op, [cx.node(v, "bool") for v in inputs])

    return handler


aten("logical_and", "bitwise_and", "__and__")(_logical("logical_and"))
aten("logical_or", "bitwise_or", "__or__")(_logical("logical_or"))
aten("logical_xor", "bitwise_xor", "__xor__")(_logical("logical_xor"))
aten("logical_not", "bitwise_not")(_logical("logical_not"))


def _unary(op, **attrs):
    def handler(cx, a):
        x = a.self if "self" in a else a.input
        return cx.op(op, [cx.node(x, cx.out_dtype)], **attrs)

    return handler


# ATen ops that are remat ops of the same name.
for _op in (
    *("neg", "exp", "log", "sqrt", "square", "sin", "cos", "tanh", "sigmoid", "relu", "silu"),
    *("abs", "sign", "erf"),
):
    aten(_op)(_unary(_op))
aten("relu6")(_unary("hardtanh", min_val=0.0, max_val=6.0))


@aten("isnan", "isinf")
def _isnan(cx, a):
    op = cx.fx.target.overloadpacket.__name__
    return cx.op(op, [cx.node(a.self)])


@aten("rsqrt")
def _rsqrt(cx, a):
    dt = cx.out_dtype
    return cx.op("div", [cx.node(1.0, dt), cx.op("sqrt", [cx.node(a.self, dt)])])


@aten("reciprocal")
def _reciprocal(cx, a):
    dt = cx.out_dtype
    return cx.op("div", [cx.node(1.0, dt), cx.node(a.self, dt)])


@aten("log1p")
def _log1p(cx, a):
    dt = cx.out_dtype
    return cx.op("log", [cx.op("add", [cx.node(a.self, dt), cx.node(1.0, dt)])])


@aten("expm1")
def _expm1(cx, a):
    dt = cx.out_dtype
    return cx.op("sub", [cx.op("exp", [cx.node(a.self, dt)]), cx.node(1.0, dt)])


@aten("gelu")
def _gelu(cx, a):
    return cx.op("gelu", [cx.node(a.self)], approximate=a.approximate or "none")


@aten("leaky_relu")
def _leaky_relu(cx, a):
    return cx.op("leaky_relu", [cx.node(a.self)], negative_slope=float(a.negative_slope))


@aten("hardtanh")
def _hardtanh(cx, a):
    return cx.op("hardtanh", [cx.node(a.self)], min_val=float(a.min_val), max_val=float(a.max_val))


@aten("hardsigmoid")
def _hardsigmoid(cx, a):
    """hardtanh(x + 3, 0, 6) / 6: no gradient at +-3, like torch. (torch's float64
    gradient is 1e-8 off: its kernel scales by the float32 constant 1.0f / 6.0f.)"""
    dt = cx.out_dtype
    shifted = cx.op("add", [cx.node(a.self, dt), cx.node(3.0, dt)])
    clipped = cx.op("hardtanh", [shifted], min_val=0.0, max_val=6.0)
    return cx.op("div", [clipped, cx.node(6.0, dt)])


@aten("hardswish")
def _hardswish(cx, a):
    """x * hardtanh(x + 3, 0, 6) / 6: 0 at x = -3 and 1 at x = 3, like torch."""
    dt = cx.out_dtype
    x = cx.node(a.self, dt)
    shifted = cx.op("add", [x, cx.node(3.0, dt)])
    clipped = cx.op("hardtanh", [shifted], min_val=0.0, max_val=6.0)
    return cx.op("div", [cx.op("mul", [x, clipped]), cx.node(6.0, dt)])


@aten("clamp", "clip", "clamp_min", "clamp_max")
def _clamp(cx, a):
    attrs = {}
    if a.min is not None:
        attrs["min"] = float(_scalar(a.min, "clamp's bound"))
    if a.max is not None:
        attrs["max"] = float(_scalar(a.max, "clamp's bound"))
    return cx.op("clip", [cx.node(a.self, cx.out_dtype)], **attrs)


@aten("pow.Tensor_Scalar")
def _pow(cx, a):
    exponent = float(_scalar(a.exponent, "the exponent"))
    if exponent == 1.0:
        return cx.node(a.self, cx.out_dtype)
    return cx.op("pow", [cx.node(a.self, cx.out_dtype)], exponent=exponent)


@aten("pow.Tensor_Tensor")
def _pow_tensor(cx, a):
    if isinstance(a.exponent, Tensor) or getattr(a.exponent, "numel", lambda: 1)() != 1:
        raise Unsupported("a tensor exponent (only scalar exponents are supported)")
    exponent = float(a.exponent.item())
    return cx.op("pow", [cx.node(a.self, cx.out_dtype)], exponent=exponent)


@aten("pow.Scalar")
def _pow_scalar_base(cx, a):
    base = float(_scalar(a.self, "the base"))
    if base <= 0:
        raise Unsupported("a scalar base must be positive (computed as exp(y * log(base)))")
    dt = cx.out_dtype
    return cx.op("exp", [cx.op("mul", [cx.node(a.exponent, dt), cx.node(math.log(base), dt)])])


@aten("where.self", "where.ScalarSelf", "where.ScalarOther", "where.Scalar")
def _where(cx, a):
    dt = cx.out_dtype
    cond = cx.node(a.condition, "bool")
    return cx.op("where", [cond, cx.node(a.self, dt), cx.node(a.other, dt)])


@aten("masked_fill")
def _masked_fill(cx, a):
    dt = cx.out_dtype
    return cx.op("where", [cx.node(a.mask, "bool"), cx.node(a.value, dt), cx.node(a.self, dt)])


# --- conversions and identities ----------------------------------------------------------
def _identity(cx, a):
    """The value itself; the importer casts it to the node's dtype (to, type_as...)."""
    return a.self


aten(
    "to",
    "_to_copy",
    "type_as",
    "clone",
    "contiguous",
    "alias",
    "lift_fresh_copy",
    "lift_fresh",
)(_identity)


@aten("copy")
def _copy(cx, a):
    """copy_(self, src): self's shape and dtype, src's values."""
    src = cx.node(a.src, a.self.dtype if isinstance(a.self, Tensor) else cx.out_dtype)
    shape = _out_shape(cx)
    if cx.shape_of(a.src) == shape:
        return src
    return cx.op("broadcast_to", [src], shape=list(shape))


@aten("fill", "zero")
def _fill(cx, a):
    """fill_ / zero_: self's shape and dtype, every element the value."""
    shape, value = _out_shape(cx), a.value if a.value is not None else 0
    if isinstance(value, Tensor):
        return cx.op("broadcast_to", [cx.node(value, cx.out_dtype)], shape=list(shape))
    return cx.node(cx.torch.full(shape, _scalar(value, "the fill value"), dtype=cx.out_dtype))


@aten("detach")
def _detach(cx, a):
    x = a.self
    if not cx.torch.is_floating_point(cx.torch.empty((), dtype=x.dtype)):
        return x
    return cx.stop_gradient(x.node, x.shape, x.dtype)


@aten("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
def _dropout(cx, a):
    p, train = float(a.p), bool(a.train)
    if not train or p == 0.0:
        return a.input
    packet = cx.fx.target.overloadpacket.__name__.rstrip("_")
    if packet != "dropout":
        raise Unsupported(f"{packet} in training mode (only elementwise dropout)")
    if p >= 1.0:
        return cx.node(cx.torch.zeros(_out_shape(cx), dtype=cx.out_dtype))
    return cx.op("dropout", [cx.node(a.input)], p=p, seed=int(cx.seed))


# --- reductions ---------------------------------------------------------------------
def _reduce(op):
    def handler(cx, a):
        x = a.self
        axes = _dims(a.dim, x.ndim)
        dt = cx.out_dtype
        return cx.op(op, [cx.node(x, dt)], axes=axes, keepdims=bool(a.keepdim))

    return handler


aten("sum")(_reduce("sum"))
aten("mean")(_reduce("mean"))
aten("amax", "max.default")(_reduce("max"))
aten("amin", "min.default")(_reduce("min"))


def _max_dim(op):
    def handler(cx, a):
        x = a.self
        axis = _dim(a.dim, x.ndim)
        node = cx.node(x)
        index = cx.op(op, [node], axis=axis, keepdims=True)
        values = cx.op("take_along_axis", [node, index], axis=axis)
        if not a.keepdim:
            shape = x.shape[:axis] + x.shape[axis + 1 :]
            values, index = _reshape(cx, values, shape), _reshape(cx, index, shape)
        return [values, index]

    return handler


aten("max.dim")(_max_dim("argmax"))
aten("min.dim")(_max_dim("argmin"))


def _argmax(op):
    def handler(cx, a):
        x = a.self
        node = cx.node(x)
        if a.dim is None:
            flat = _reshape(cx, node, (math.prod(x.shape),), x.shape)
            index = cx.op(op, [flat], axis=0)
            return _reshape(cx, index, _out_shape(cx)) if a.keepdim else index
        return cx.op(op, [node], axis=_dim(a.dim, x.ndim), keepdims=bool(a.keepdim))

    return handler


aten("argmax")(_argmax("argmax"))
aten("argmin")(_argmax("argmin"))


@aten("var", "std")
def _var(cx, a):
    x = a.self
    axes = _dims(a.dim, x.ndim)
    if a.correction is not None:
        correction = float(_scalar(a.correction, "correction"))
    else:
        correction = 1.0 if a.unbiased is None or a.unbiased else 0.0
    n = math.prod(x.shape[d] for d in axes)
    node = cx.node(x)
    mean = cx.op("mean", [node], axes=axes, keepdims=True)
    centered = cx.op("sub", [node, mean])
    squares = cx.op("sum", [cx.op("square", [centered])], axes=axes, keepdims=bool(a.keepdim))
    var = cx.op("div", [squares, cx.node(max(n - correction, 0.0), x.dtype)])
    packet = cx.fx.target.overloadpacket.__name__
    return cx.op("sqrt", [var]) if packet == "std" else var


@aten("logsumexp")
def _logsumexp(cx, a):
    x = a.self
    axes = _dims(a.dim, x.ndim)
    node = cx.node(x, cx.out_dtype)
    top = cx.op("max", [node], axes=axes, keepdims=True)
    shifted = cx.op("exp", [cx.op("sub", [node, top])])
    total = cx.op("log", [cx.op("sum", [shifted], axes=axes, keepdims=True)])
    result = cx.op("add", [total, top])
    return result if a.keepdim else _reshape(cx, result, _out_shape(cx))


# --- linear algebra -------------------------------------------------------------------
# x @ w + b becomes remat's `linear`: one buffer, where matmul then add hold the
# product and the sum at once (at GPT-2's least peak, that pair was the peak).
@aten("linear")
def _linear(cx, a):
    x, w, shape = a.input, cx.node(a.weight), cx.shape_of(a.weight)
    if len(shape) == 2:
        w, shape = cx.op("transpose", [w]), shape[::-1]
    return _affine(cx, (cx.node(x), cx.shape_of(x)), (w, shape), a.bias, cx.out_dtype)


def _affine(cx, x, w, bias, dtype):
    """x @ w (+ bias), `x` and `w` each a (node, shape): one `linear` node when the
    bias broadcasts to the product."""
    (x, x_shape), (w, w_shape) = x, w
    if bias is None:
        return cx.op("matmul", [x, w])
    if _broadcasts_to(cx.shape_of(bias), _matmul_shape(x_shape, w_shape)):
        return cx.op("linear", [x, w, cx.node(bias, dtype)])
    return cx.op("add", [cx.op("matmul", [x, w]), cx.node(bias, dtype)])


def _matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """np.matmul's result shape."""
    a2 = a if len(a) > 1 else (1, *a)
    b2 = b if len(b) > 1 else (*b, 1)
    batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    return (*batch, *a2[-2:-1][: len(a) > 1], *b2[-1:][: len(b) > 1])


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:  # they do not broadcast at all
        return False


@aten("matmul", "mm", "bmm", "mv")
def _matmul(cx, a):
    dt = cx.out_dtype
    other = a.mat2 if a.mat2 is not None else a.vec if a.vec is not None else a.other
    return cx.op("matmul", [cx.node(a.self, dt), cx.node(other, dt)])


@aten("addmm", "baddbmm", "addmv")
def _addmm(cx, a):
    dt = cx.out_dtype
    first = a.mat1 if a.mat1 is not None else a.batch1 if a.batch1 is not None else a.mat
    second = a.mat2 if a.mat2 is not None else a.batch2 if a.batch2 is not None else a.vec
    if a.alpha in (None, 1) and a.beta in (None, 1):
        return _affine(
            cx,
            (cx.node(first, dt), cx.shape_of(first)),
            (cx.node(second, dt), cx.shape_of(second)),
            a.self,
            dt,
        )
    product = cx.op("matmul", [cx.node(first, dt), cx.node(second, dt)])
    product = _times(cx, Tensor(product, (), dt), a.alpha, dt)
    if a.beta == 0:
        return product
    return cx.op("add", [_times(cx, a.self, a.beta, dt), product])
