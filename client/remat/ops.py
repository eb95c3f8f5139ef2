"""Op functions: `remat.relu(x)`, `remat.sum(x, axis=1)`, ... Each appends one node to
the graph its first node argument belongs to and returns the new node's handle.

Python numbers are accepted wherever a tensor is (they become constants of the other
operand's dtype). Every function takes an optional `name=`.

    >>> import remat
    >>> g = remat.Graph()
    >>> x = g.input("x", (2, 3))
    >>> remat.softmax(x, axis=-1, name="probs").name
    'probs'
"""

from __future__ import annotations

from collections.abc import Sequence

from .graph import Graph, Node

# `op` and the helpers live in op_call; the neural-network ops in nn_ops.
from .nn_ops import (  # noqa: F401 (re-exported: remat.ops.<name>)
    avg_pool2d,
    batch_norm,
    conv2d,
    conv_transpose2d,
    cross_entropy,
    dropout,
    layer_norm,
    log_softmax,
    max_pool2d,
    pad,
    rms_norm,
    softmax,
    upsample_bilinear2d,
    upsample_nearest2d,
)
from .op_call import _axes, _graph_of, op  # noqa: F401 (op: remat.ops.op)


# --- elementwise -------------------------------------------------------------------------
def add(a, b, *, name=None):
    return op("add", a, b, name=name)


def sub(a, b, *, name=None):
    return op("sub", a, b, name=name)


def mul(a, b, *, name=None):
    return op("mul", a, b, name=name)


def div(a, b, *, name=None):
    return op("div", a, b, name=name)


def neg(x, *, name=None):
    return op("neg", x, name=name)


def exp(x, *, name=None):
    return op("exp", x, name=name)


def log(x, *, name=None):
    return op("log", x, name=name)


def sqrt(x, *, name=None):
    return op("sqrt", x, name=name)


def square(x, *, name=None):
    return op("square", x, name=name)


def abs(x, *, name=None):
    return op("abs", x, name=name)  # noqa: A001 - mirrors numpy


def sign(x, *, name=None):
    return op("sign", x, name=name)


def sin(x, *, name=None):
    return op("sin", x, name=name)


def cos(x, *, name=None):
    return op("cos", x, name=name)


def tanh(x, *, name=None):
    return op("tanh", x, name=name)


def sigmoid(x, *, name=None):
    return op("sigmoid", x, name=name)


def relu(x, *, name=None):
    return op("relu", x, name=name)


def gelu(x, approximate: str = "tanh", *, name=None):
    """GELU as torch.nn.functional.gelu: approximate="tanh" (the default here, unlike
    torch's) or "none" for the exact x * Phi(x)."""
    # The default is not sent: graphs built before the attr existed keep their bytes (id).
    return op("gelu", x, approximate=None if approximate == "tanh" else approximate, name=name)


def maximum(a, b, *, name=None):
    return op("maximum", a, b, name=name)


def minimum(a, b, *, name=None):
    return op("minimum", a, b, name=name)


def gt(a, b, *, name=None):
    return op("gt", a, b, name=name)


def ge(a, b, *, name=None):
    return op("ge", a, b, name=name)


def lt(a, b, *, name=None):
    return op("lt", a, b, name=name)


def le(a, b, *, name=None):
    return op("le", a, b, name=name)


def eq(a, b, *, name=None):
    return op("eq", a, b, name=name)


def pow(x, exponent: float, *, name=None):  # noqa: A001 - mirrors numpy
    """x ** exponent for a scalar exponent."""
    return op("pow", x, exponent=float(exponent), name=name)


def where(cond, a, b, *, name=None):
    """`a` where `cond` (bool) is true, else `b`; broadcasts like np.where."""
    like = a if isinstance(a, Node) else b
    graph = _graph_of(cond, a, b)
    return graph.add(
        "where", [graph.lift(cond), graph.lift(a, like=like), graph.lift(b, like=like)], name=name
    )


def cast(x, dtype: str, *, name=None):
    return op("cast", x, dtype=dtype, name=name)


def constant(value, graph: Graph, *, dtype: str | None = None, name=None) -> Node:
    """A tensor baked into `graph`."""
    return graph.constant(value, dtype=dtype, name=name)


# --- reductions ---------------------------------------------------------------------------
def sum(x, axis=None, keepdims: bool = False, *, name=None):  # noqa: A001
    """Sum over `axis` (an int, a tuple, or None for all)."""
    return op("sum", x, axes=_axes(axis), keepdims=keepdims, name=name)


def mean(x, axis=None, keepdims: bool = False, *, name=None):
    return op("mean", x, axes=_axes(axis), keepdims=keepdims, name=name)


def max(x, axis=None, keepdims: bool = False, *, name=None):  # noqa: A001
    """Maximum; tied maxima share the gradient equally (like torch.amax)."""
    return op("max", x, axes=_axes(axis), keepdims=keepdims, name=name)


# --- linear algebra and shape ------------------------------------------------------------
def matmul(a, b, *, name=None):
    """np.matmul semantics: batched, broadcasting, 1-D operands promoted."""
    return op("matmul", a, b, name=name)


def linear(x, w, b, *, name=None):
    """x @ w + b as one op (matmul's rules; b broadcasts to the product). It holds one
    buffer where `matmul(x, w) + b` holds the product and the sum at once.

        >>> import numpy as np, remat
        >>> g = Graph("affine")
        >>> y = linear(g.input("x", (8, 4)), g.input("w", (4, 3)), g.input("b", (3,)))
        >>> _ = g.output("y", y)
        >>> y.op
        'linear'
        >>> with remat.Client.in_process() as client:
        ...     feeds = {"x": np.ones((8, 4)), "w": np.ones((4, 3)), "b": np.arange(3.0)}
        ...     feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
        ...     client.run(g, feeds).outputs["y"][0]
        array([4., 5., 6.], dtype=float32)
    """
    return op("linear", x, w, b, name=name)


def transpose(x, axes: Sequence[int] | None = None, *, name=None):
    return op("transpose", x, axes=None if axes is None else list(axes), name=name)


def reshape(x, shape: Sequence[int], *, name=None):
    return op("reshape", x, shape=list(shape), name=name)


def broadcast_to(x, shape: Sequence[int], *, name=None):
    return op("broadcast_to", x, shape=list(shape), name=name)


def concat(xs: Sequence[Node], axis: int = 0, *, name=None):
    return op("concat", *xs, axis=axis, name=name)


def slice(
    x,
    starts: Sequence[int],
    stops: Sequence[int] | None = None,  # noqa: A001
    steps: Sequence[int] | None = None,
    *,
    name=None,
):
    """x[starts[0]:stops[0]:steps[0], ...] over the leading len(starts) axes."""
    return op(
        "slice",
        x,
        starts=list(starts),
        stops=None if stops is None else list(stops),
        steps=None if steps is None else list(steps),
        name=name,
    )


def take(x, indices, axis: int = 0, *, name=None):
    """Gather along `axis` with integer indices (np.take); the gradient scatter-adds."""
    graph = _graph_of(x, indices)
    return graph.add("take", [x, graph.lift(indices)], {"axis": axis}, name=name)


def take_along_axis(x, indices, axis: int = -1, *, name=None):
    graph = _graph_of(x, indices)
    return graph.add("take_along_axis", [x, graph.lift(indices)], {"axis": axis}, name=name)


# --- activations --------------------------------------------------------------------------
def erf(x, *, name=None):
    """The error function (torch.erf, scipy.special.erf)."""
    return op("erf", x, name=name)


def silu(x, *, name=None):
    """x * sigmoid(x) (SiLU, swish)."""
    return op("silu", x, name=name)


def clip(x, min: float | None = None, max: float | None = None, *, name=None):  # noqa: A002
    """torch.clamp: bound x below by `min` and above by `max` (None: unbounded). The
    gradient passes where min <= x <= max, bounds included.

        >>> import remat
        >>> g = remat.Graph()
        >>> remat.ops.clip(g.input("x", (3,)), min=0.0).op
        'clip'
    """
    return op(
        "clip",
        x,
        min=None if min is None else float(min),
        max=None if max is None else float(max),
        name=name,
    )


def hardtanh(x, min_val: float = -1.0, max_val: float = 1.0, *, name=None):
    """Clamp to [min_val, max_val]; the gradient passes only strictly inside (torch's
    hardtanh). relu6 is hardtanh(x, 0.0, 6.0)."""
    return op("hardtanh", x, min_val=float(min_val), max_val=float(max_val), name=name)


def leaky_relu(x, negative_slope: float = 0.01, *, name=None):
    """x where x > 0, else negative_slope * x (the gradient at 0 is negative_slope)."""
    return op("leaky_relu", x, negative_slope=float(negative_slope), name=name)


# (end of activations)


# --- logical and arg reductions -----------------------------------------------------------
def isnan(x, *, name=None):
    """True where x is NaN (a bool tensor)."""
    return op("isnan", x, name=name)


def isinf(x, *, name=None):
    """True where x is +inf or -inf (a bool tensor)."""
    return op("isinf", x, name=name)


def logical_not(x, *, name=None):
    return op("logical_not", x, name=name)


def logical_and(a, b, *, name=None):
    """Elementwise and of two bool tensors, broadcasting."""
    return op("logical_and", a, b, name=name)


def logical_or(a, b, *, name=None):
    return op("logical_or", a, b, name=name)


def logical_xor(a, b, *, name=None):
    return op("logical_xor", a, b, name=name)


def min(x, axis=None, keepdims: bool = False, *, name=None):  # noqa: A001
    """Minimum; tied minima share the gradient equally (like torch.amin)."""
    return op("min", x, axes=_axes(axis), keepdims=keepdims, name=name)


def argmax(x, axis: int, keepdims: bool = False, *, name=None):
    """Index (int64) of the maximum along `axis`; ties give the first index, a NaN
    counts as the maximum (torch.argmax, np.argmax).

        >>> import remat
        >>> g = remat.Graph()
        >>> remat.ops.argmax(g.input("x", (2, 3)), axis=1).dtype
        'int64'
    """
    return op("argmax", x, axis=axis, keepdims=keepdims, name=name)


def argmin(x, axis: int, keepdims: bool = False, *, name=None):
    """Index (int64) of the minimum along `axis`; ties give the first index, a NaN
    counts as the minimum (torch.argmin, np.argmin)."""
    return op("argmin", x, axis=axis, keepdims=keepdims, name=name)


# (end of logical and arg reductions)


# --- attention ----------------------------------------------------------------------------
def scaled_dot_product_attention(
    q,
    k,
    v,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    *,
    name=None,
):
    """softmax(scale * q @ k^T [masked]) @ v, fused: q (..., L, E), k (..., S, E),
    v (..., S, Ev) -> (..., L, Ev), torch.nn.functional.scaled_dot_product_attention.

    `mask` is bool (True = may attend) or float (added to the scores), broadcastable
    to (..., L, S); `causal` lets query i attend keys j <= i; `scale` None means
    1 / sqrt(E); dropout on the weights draws its mask from (seed, node name), so a
    recomputation reproduces it. No (..., L, S) matrix is kept for the backward pass:
    it recomputes the weights from q and k.

        >>> import remat
        >>> g = remat.Graph()
        >>> q, k, v = g.input("q", (2, 4, 8)), g.input("k", (2, 6, 8)), g.input("v", (2, 6, 3))
        >>> scaled_dot_product_attention(q, k, v, causal=True, name="attn").name
        'attn'
    """
    inputs = [q, k, v]
    if mask is not None:
        import numpy as np  # only to keep a literal bool mask bool

        like = next((x for x in inputs if isinstance(x, Node)), None)
        bool_literal = not isinstance(mask, Node) and np.asarray(mask).dtype == np.bool_
        inputs.append(_graph_of(*inputs, mask).lift(mask, like=None if bool_literal else like))
    return op(
        "scaled_dot_product_attention",
        *inputs,
        causal=bool(causal),
        scale=0.0 if scale is None else float(scale),
        dropout_p=float(dropout_p),
        seed=int(seed),
        name=name,
    )


# (end of attention)


# --- composites ------------------------------------------------------------------------
def batch_norm_running_stats(
    x, running_mean, running_var, momentum=0.1, unbiased=True, *, name=None
):
    """The running statistics after one training-mode batch_norm step on x (N, C, *),
    PyTorch's rule: new = (1 - momentum) * running + momentum * batch statistic, the
    batch variance unbiased (n / (n - 1), n = x.size / C) when `unbiased`. Returns
    (new_mean, new_var), named `<name>/mean` and `<name>/var` when `name` is given.

        >>> import remat
        >>> from remat.ops import batch_norm_running_stats
        >>> g = remat.Graph()
        >>> x = g.input("x", (8, 3, 4, 4), dtype="float64")
        >>> mean = g.input("mean", (3,), dtype="float64")
        >>> var = g.input("var", (3,), dtype="float64")
        >>> new_mean, new_var = batch_norm_running_stats(x, mean, var, name="bn")
        >>> new_var.name
        'bn/var'
    """
    stats = op("batch_norm_stats", x, unbiased=unbiased)  # (2, C): mean, variance
    batch_mean, batch_var = take(stats, 0, axis=0), take(stats, 1, axis=0)
    names = (None, None) if name is None else (f"{name}/mean", f"{name}/var")
    return tuple(
        add((1.0 - momentum) * running, momentum * batch, name=out)
        for running, batch, out in zip((running_mean, running_var), (batch_mean, batch_var), names)
    )


# (end of normalization)
