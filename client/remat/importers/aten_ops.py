"""The ATen op table of `from_torch`: each handler maps one ATen op onto remat ops.

A handler gets the importer (`cx`: `cx.op`, `cx.node`, `cx.out`...) and the call's
arguments by schema name (`a.self`, `a.dim`), where tensors computed by the graph are
`Tensor`s (node, shape, torch dtype) and everything else is a constant (torch tensor or
Python value). It returns a remat node (or a list of them, or a constant); the importer
casts it to torch's dtype for the node when they differ. Calls whose tensors are all
constants never reach a handler: they are folded by running the ATen op itself. This
module holds the elementwise, shape, reduction and linear-algebra ops; `aten_nn` the
convolution, pooling, normalization, attention and loss ops.

Where a derivative is undefined the mapping follows PyTorch's convention: max pooling
and torch.max(dim) send the gradient to the first maximum (max_pool2d, argmax +
take_along_axis),
amax and max() split ties (remat's max), clamp passes it at its bounds (clip),
hardtanh does not (hardtanh), ReLU gives 0 at 0.
"""

from __future__ import annotations

import math

from .torch_values import Tensor, Unsupported

HANDLERS: dict = {}  # "add" (every overload) or "add.Tensor" -> handler(cx, args)

# Ops that only read their tensor arguments' shapes and dtypes: folded with zeros
# standing in for graph values.
META = frozenset(
    {
        "new_ones",
        "new_zeros",
        "new_full",
        "new_empty",
        "new_empty_strided",
        "zeros_like",
        "ones_like",
        "full_like",
        "empty_like",
        "sym_size",
        "sym_numel",
        "sym_stride",
        "size",
        "dim",
        "numel",
        "_assert_tensor_metadata",
        "_assert_scalar",
        "_assert_async",
        "sym_constrain_range_for_size",
        "sym_constrain_range",
    }
)

# Ops that would bake one random sample into the graph.
RANDOM = frozenset(
    {
        "rand",
        "randn",
        "randint",
        "rand_like",
        "randn_like",
        "randint_like",
        "bernoulli",
        "normal",
        "uniform",
        "multinomial",
        "randperm",
        "native_dropout",
        "exponential",
    }
)


def aten(*names):
    """Register a handler for ATen ops: "add" (every overload) or "add.Tensor"."""

    def register(handler):
        for name in names:
            HANDLERS[name] = handler
        return handler

    return register


# --- small helpers ---------------------------------------------------------------------
def _dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _dims(dims, ndim: int) -> list[int]:
    """Normalized, sorted axes; None or [] mean all of them (torch's reductions)."""
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    if len(dims) == 0:
        return list(range(ndim))
    return sorted({_dim(d, ndim) for d in dims})


def _scalar(value, what: str) -> float:
    """A Python number from a number or a one-element constant tensor."""
    if isinstance(value, Tensor):
        raise Unsupported(f"{what} must not depend on the inputs")
    if hasattr(value, "item"):
        if value.numel() != 1:
            raise Unsupported(f"{what} must be a single number")
        return value.item()
    return value


def _reshape(cx, node, shape, from_shape=None):
    if from_shape is not None and tuple(from_shape) == tuple(shape):
        return node
    return cx.op("reshape", [node], shape=[int(d) for d in shape])


def _out_shape(cx) -> tuple[int, ...]:
    return tuple(cx.out.shape)


def _slice(cx, x: Tensor | object, node, dim: int, start: int, stop: int, step: int = 1):
    """node[..., start:stop:step, ...] on axis `dim` (the others whole)."""
    shape = cx.shape_of(x)
    starts = [0] * dim + [start]
    stops = list(shape[:dim]) + [stop]
    steps = [1] * dim + [step]
    return cx.op("slice", [node], starts=starts, stops=stops, steps=steps)


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


for _op in ("neg", "exp", "log", "sqrt", "tanh", "sigmoid", "relu", "abs", "sign", "erf"):
    aten(_op)(_unary(_op))
aten("silu")(_unary("silu"))
aten("square")(_unary("square"))
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


# --- shapes -------------------------------------------------------------------------------
@aten(
    "view",
    "_unsafe_view",
    "reshape",
    "flatten",
    "unflatten",
    "unsqueeze",
    "squeeze",
    "view_as",
    "reshape_as",
    "_reshape_alias",
)
def _view(cx, a):
    x = a.self
    return _reshape(cx, cx.node(x), _out_shape(cx), x.shape)


@aten("broadcast_tensors")
def _broadcast_tensors(cx, a):
    nodes = []
    for t, val in zip(a.tensors, cx.out):
        shape = tuple(val.shape)
        node = cx.node(t)
        same = tuple(cx.shape_of(t)) == shape
        nodes.append(node if same else cx.op("broadcast_to", [node], shape=list(shape)))
    return nodes


@aten("expand", "expand_as", "broadcast_to")
def _expand(cx, a):
    x, shape = a.self, _out_shape(cx)
    if x.shape == shape:
        return x
    return cx.op("broadcast_to", [cx.node(x)], shape=list(shape))


@aten("permute")
def _permute(cx, a):
    x = a.self
    axes = [_dim(d, x.ndim) for d in a.dims]
    if axes == list(range(x.ndim)):
        return x
    return cx.op("transpose", [cx.node(x)], axes=axes)


@aten("transpose.int", "swapaxes", "swapdims")
def _transpose(cx, a):
    x = a.self
    if x.ndim < 2:
        return x
    d0 = _dim(a.dim0 if "dim0" in a else a.axis0, x.ndim)
    d1 = _dim(a.dim1 if "dim1" in a else a.axis1, x.ndim)
    if d0 == d1:
        return x
    axes = list(range(x.ndim))
    axes[d0], axes[d1] = axes[d1], axes[d0]
    return cx.op("transpose", [cx.node(x)], axes=axes)


@aten("t", "numpy_T")
def _t(cx, a):
    x = a.self
    if x.ndim < 2:
        return x
    return cx.op("transpose", [cx.node(x)], axes=list(reversed(range(x.ndim))))


@aten("slice.Tensor")
def _slice_tensor(cx, a):
    x = a.self
    dim = _dim(a.dim, x.ndim)
    size = x.shape[dim]
    step = int(a.step or 1)
    start, stop, step = slice(a.start, a.end, step).indices(size)
    if (start, stop, step) == (0, size, 1):
        return x
    return _slice(cx, x, cx.node(x), dim, start, stop, step)


@aten("narrow")
def _narrow(cx, a):
    x = a.self
    dim = _dim(a.dim, x.ndim)
    start = int(_scalar(a.start, "narrow's start")) % max(x.shape[dim], 1)
    return _slice(cx, x, cx.node(x), dim, start, start + int(a.length))


@aten("select.int")
def _select(cx, a):
    x = a.self
    dim = _dim(a.dim, x.ndim)
    index = int(a.index) % x.shape[dim]
    piece = _slice(cx, x, cx.node(x), dim, index, index + 1)
    return _reshape(cx, piece, _out_shape(cx))


@aten("cat", "concat", "concatenate")
def _cat(cx, a):
    dt = cx.out_dtype
    shape = _out_shape(cx)
    parts = [t for t in a.tensors if tuple(cx.shape_of(t)) != (0,)]
    if len(parts) == 1:
        return cx.node(parts[0], dt)
    return cx.op("concat", [cx.node(t, dt) for t in parts], axis=_dim(a.dim, len(shape)))


@aten("stack")
def _stack(cx, a):
    dt = cx.out_dtype
    shape = _out_shape(cx)
    dim = _dim(a.dim, len(shape))
    piece = shape[:dim] + (1,) + shape[dim + 1 :]
    nodes = [_reshape(cx, cx.node(t, dt), piece) for t in a.tensors]
    return nodes[0] if len(nodes) == 1 else cx.op("concat", nodes, axis=dim)


@aten("split", "split_with_sizes", "chunk", "unbind", "tensor_split", "unsafe_split")
def _split(cx, a):
    x = a.self
    pieces = cx.out
    packet = cx.fx.target.overloadpacket.__name__
    dim = _dim(a.dim if a.dim is not None else 0, x.ndim)
    node, start, nodes = cx.node(x), 0, []
    for piece in pieces:
        size = piece.shape[dim] if packet != "unbind" else 1
        part = _slice(cx, x, node, dim, start, start + size)
        nodes.append(_reshape(cx, part, tuple(piece.shape)) if packet == "unbind" else part)
        start += size
    return nodes


@aten("index_select")
def _index_select(cx, a):
    x = a.self
    return cx.op("take", [cx.node(x), cx.node(a.index, "int64")], axis=_dim(a.dim, x.ndim))


@aten("gather")
def _gather(cx, a):
    x, dim = a.self, _dim(a.dim, a.self.ndim)
    index_shape = cx.shape_of(a.index)
    node = cx.node(x)
    if any(i != s for d, (i, s) in enumerate(zip(index_shape, x.shape)) if d != dim):
        stops = [i if d != dim else s for d, (i, s) in enumerate(zip(index_shape, x.shape))]
        node = cx.op("slice", [node], starts=[0] * x.ndim, stops=stops)
    return cx.op("take_along_axis", [node, cx.node(a.index, "int64")], axis=dim)


@aten("index.Tensor")
def _index(cx, a):
    """x[i0, i1, ...] with integer index tensors (None skips an axis)."""
    torch, x = cx.torch, a.self
    indices = list(a.indices)
    axes = [d for d, i in enumerate(indices) if i is not None]
    for i in indices:
        if i is not None and cx.dtype_of(i) == torch.bool:
            raise Unsupported("boolean-mask indexing (its result's shape depends on data)")
    if len(axes) == 1:
        axis = axes[0]
        index = indices[axis]
        if not isinstance(index, Tensor):
            index = torch.remainder(index, x.shape[axis])
        return cx.op("take", [cx.node(x), cx.node(index, "int64")], axis=axis)
    if axes != list(range(axes[0], axes[-1] + 1)):
        raise Unsupported("index tensors on non-adjacent axes")
    if any(isinstance(indices[d], Tensor) for d in axes):
        raise Unsupported("several index tensors that depend on inputs")
    # Constant indices: one flat index into the indexed axes merged into one.
    first, sizes = axes[0], [x.shape[d] for d in axes]
    broadcast = torch.broadcast_tensors(*[indices[d] for d in axes])
    flat = torch.zeros(broadcast[0].shape, dtype=torch.int64)
    for index, size in zip(broadcast, sizes):
        flat = flat * size + torch.remainder(index, size)
    merged = x.shape[:first] + (math.prod(sizes),) + x.shape[axes[-1] + 1 :]
    node = _reshape(cx, cx.node(x), merged, x.shape)
    return cx.op("take", [node, cx.node(flat, "int64")], axis=first)


@aten("embedding")
def _embedding(cx, a):
    weight, indices = a.weight, a.indices
    if a.scale_grad_by_freq:
        raise Unsupported("scale_grad_by_freq=True")
    index = cx.node(indices, "int64")
    out = cx.op("take", [cx.node(weight), index], axis=0)
    pad = a.padding_idx if a.padding_idx is not None else -1
    if pad < 0 or not isinstance(weight, Tensor):
        return out
    if not isinstance(indices, Tensor) and not bool((indices == pad).any()):
        return out
    # torch sends no gradient to the padding row from the positions that use it.
    dim = weight.shape[1]
    row = _slice(cx, weight, cx.node(weight), 0, pad, pad + 1)
    row = cx.stop_gradient(row, (1, dim), weight.dtype)
    mask = cx.op("eq", [index, cx.node(pad, "int64")])
    mask = _reshape(cx, mask, cx.shape_of(indices) + (1,))
    return cx.op("where", [mask, row, out])


@aten("repeat")
def _repeat(cx, a):
    x, repeats = a.self, [int(r) for r in a.repeats]
    shape = (1,) * (len(repeats) - x.ndim) + x.shape
    spread = [d for pair in zip([1] * len(shape), shape) for d in pair]
    target = [d for pair in zip(repeats, shape) for d in pair]
    node = _reshape(cx, cx.node(x), spread, x.shape)
    node = cx.op("broadcast_to", [node], shape=target)
    return _reshape(cx, node, _out_shape(cx))


@aten("triu", "tril")
def _triangle(cx, a):
    torch, x = cx.torch, a.self
    packet = cx.fx.target.overloadpacket.__name__.rstrip("_")
    rows, cols = x.shape[-2:]
    ones = torch.ones(rows, cols, dtype=torch.bool)
    keep = getattr(torch, packet)(ones, int(a.diagonal or 0))
    zero = cx.node(torch.zeros((), dtype=x.dtype))
    return cx.op("where", [cx.node(keep), cx.node(x), zero])


@aten("cumsum")
def _cumsum(cx, a):
    """A matmul with a triangle of ones (remat has no scan op)."""
    torch, x = cx.torch, a.self
    dim = _dim(a.dim, x.ndim)
    dt = cx.out_dtype
    work = dt if dt.is_floating_point else torch.float64
    n = x.shape[dim]
    node = cx.node(x, work)
    axes = list(range(x.ndim))
    axes[dim], axes[-1] = axes[-1], axes[dim]
    if dim != x.ndim - 1:
        node = cx.op("transpose", [node], axes=axes)
    node = cx.op("matmul", [node, cx.node(torch.triu(torch.ones(n, n, dtype=work)))])
    if dim != x.ndim - 1:
        node = cx.op("transpose", [node], axes=axes)
    return node


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
@aten("linear")
def _linear(cx, a):
    x, w = a.input, a.weight
    wt = cx.op("transpose", [cx.node(w)]) if cx.shape_of(w) and len(cx.shape_of(w)) == 2 else w
    out = cx.op("matmul", [cx.node(x), cx.node(wt)])
    if a.bias is not None:
        out = cx.op("add", [out, cx.node(a.bias, cx.out_dtype)])
    return out


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
    product = cx.op("matmul", [cx.node(first, dt), cx.node(second, dt)])
    product = _times(cx, Tensor(product, (), dt), a.alpha, dt)
    if a.beta == 0:
        return product
    return cx.op("add", [_times(cx, a.self, a.beta, dt), product])
