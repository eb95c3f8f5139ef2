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
from typing import Any

from .graph import Graph, Node


def _graph_of(*args: Any) -> Graph:
    for arg in args:
        if isinstance(arg, Node):
            return arg.graph
        if isinstance(arg, (list, tuple)):
            for item in arg:
                if isinstance(item, Node):
                    return item.graph
    raise TypeError("at least one argument must be a remat Node (to know the graph)")


def op(op_name: str, *inputs: Any, name: str | None = None, **attrs: Any) -> Node:
    """Any op the server lists (`remat ops`), by name:
    `remat.op("scatter_add", g, i, axis=0, size=5)`."""
    graph = _graph_of(*inputs)
    like = next((i for i in inputs if isinstance(i, Node)), None)
    return graph.add(op_name, [graph.lift(i, like=like) for i in inputs], attrs, name=name)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _axes(axis) -> list[int] | None:
    return None if axis is None else [axis] if isinstance(axis, int) else list(axis)


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


# --- neural networks ------------------------------------------------------------------------
def softmax(x, axis: int = -1, *, name=None):
    return op("softmax", x, axis=axis, name=name)


def log_softmax(x, axis: int = -1, *, name=None):
    return op("log_softmax", x, axis=axis, name=name)


def cross_entropy(logits, labels, *, name=None):
    """Mean over the batch of -log softmax(logits)[label]; labels are integers."""
    graph = _graph_of(logits)
    return graph.add("cross_entropy", [logits, graph.lift(labels)], name=name)


def layer_norm(x, weight, bias, eps: float = 1e-5, *, name=None):
    """Normalize over the trailing weight.ndim axes, then scale and shift."""
    return op("layer_norm", x, weight, bias, eps=float(eps), name=name)


def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, *, name=None):
    """2-D convolution, NCHW input and (O, C / groups, kh, kw) weight, optional bias (O,);
    torch.nn.functional.conv2d's argument order."""
    return op(
        "conv2d",
        x,
        w,
        *([] if bias is None else [bias]),
        stride=_pair(stride),
        padding=_pair(padding),
        dilation=_pair(dilation),
        groups=None if groups == 1 else int(groups),  # omitted: ungrouped graphs stay as they were
        name=name,
    )


def max_pool2d(x, kernel, stride=None, padding=0, *, name=None):
    return op(
        "max_pool2d",
        x,
        kernel=_pair(kernel),
        stride=_pair(stride if stride is not None else kernel),
        padding=_pair(padding),
        name=name,
    )


def avg_pool2d(x, kernel, stride=None, padding=0, *, name=None):
    """Average pooling; padding counts toward the divisor (torch's default)."""
    return op(
        "avg_pool2d",
        x,
        kernel=_pair(kernel),
        stride=_pair(stride if stride is not None else kernel),
        padding=_pair(padding),
        name=name,
    )


def dropout(x, p: float = 0.5, seed: int = 0, *, name=None):
    """Inverted dropout; the mask depends only on (seed, node name), so recomputing
    the node reproduces it exactly."""
    return op("dropout", x, p=float(p), seed=int(seed), name=name)


# --- normalization ------------------------------------------------------------------------
def batch_norm(x, weight, bias, running_mean, running_var, training=False, eps=1e-5, *, name=None):
    """Per-channel normalization of x (N, C, *), then `* weight + bias` (all (C,)).
    training=True uses the batch's mean and biased variance over every axis but 1 (and
    differentiates through them); False uses running_mean/running_var. The running
    statistics get no gradient and are not updated: see `batch_norm_running_stats`."""
    return op(
        "batch_norm",
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training=bool(training),
        eps=float(eps),
        name=name,
    )


def rms_norm(x, weight, eps=1e-6, *, name=None):
    """x / sqrt(mean(x ** 2) + eps) * weight over the trailing weight.ndim axes."""
    return op("rms_norm", x, weight, eps=float(eps), name=name)


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


# --- convolution (groups, bias, transposed) -----------------------------------------------
def conv_transpose2d(
    x, w, bias=None, stride=1, padding=0, output_padding=0, dilation=1, groups=1, *, name=None
):
    """Transposed convolution (conv2d's adjoint in x), torch.nn.functional.conv_transpose2d:
    x (N, C_in, H, W), w (C_in, C_out / groups, kh, kw), optional bias (C_out,). Output
    size (H - 1) * stride - 2 * padding + dilation * (kh - 1) + output_padding + 1.

        >>> import remat
        >>> g = remat.Graph()
        >>> x, w = g.input("x", (1, 4, 8, 8)), g.input("w", (4, 2, 3, 3))
        >>> remat.ops.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1).op
        'conv_transpose2d'
    """
    return op(
        "conv_transpose2d",
        x,
        w,
        *([] if bias is None else [bias]),
        stride=_pair(stride),
        padding=_pair(padding),
        output_padding=_pair(output_padding),
        dilation=_pair(dilation),
        groups=int(groups),
        name=name,
    )


# (end of convolution (groups, bias, transposed))


# --- resizing and padding -----------------------------------------------------------------
def upsample_nearest2d(x, size, *, name=None):
    """Resize x (N, C, H, W) to `size` (an int or (H_out, W_out)) by copying the source
    row floor(dst * in / out): F.interpolate(x, size, mode="nearest")."""
    return op("upsample_nearest2d", x, size=_pair(size), name=name)


def upsample_bilinear2d(x, size, align_corners=False, *, name=None):
    """Bilinear resize of x (N, C, H, W) to `size` (an int or (H_out, W_out)), up or
    down: F.interpolate(x, size, mode="bilinear", align_corners=align_corners).

        >>> import remat
        >>> g = remat.Graph()
        >>> up = remat.ops.upsample_bilinear2d(g.input("x", (1, 3, 4, 4)), 8)
        >>> g.nodes[-1].attrs
        {'size': (8, 8), 'align_corners': False}
    """
    return op(
        "upsample_bilinear2d", x, size=_pair(size), align_corners=bool(align_corners), name=name
    )


def pad(x, pads, mode="constant", value=0.0, *, name=None):
    """Pad every axis of x by (begin, end) rows. `pads` is in ONNX order: all begins,
    then all ends (2 * rank ints >= 0). mode "constant" fills with `value`, "reflect"
    mirrors without repeating the edge (pad < size), "edge" repeats the edge row
    (torch's "replicate"). torch's F.pad lists pairs from the last axis backwards:
    F.pad(x, (1, 2)) on a 2-D x is pad(x, (0, 1, 0, 2)).

        >>> import remat
        >>> g = remat.Graph()
        >>> padded = remat.ops.pad(g.input("x", (2, 3)), (0, 1, 0, 2), mode="reflect")
        >>> g.nodes[-1].attrs["pads"]
        (0, 1, 0, 2)
    """
    return op("pad", x, pads=tuple(int(p) for p in pads), mode=mode, value=float(value), name=name)


# (end of resizing and padding)


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
