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


def tanh(x, *, name=None):
    return op("tanh", x, name=name)


def sigmoid(x, *, name=None):
    return op("sigmoid", x, name=name)


def relu(x, *, name=None):
    return op("relu", x, name=name)


def gelu(x, *, name=None):
    """GELU, tanh approximation (torch's approximate="tanh")."""
    return op("gelu", x, name=name)


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


def conv2d(x, w, stride=1, padding=0, dilation=1, *, name=None):
    """2-D convolution, NCHW input and OIHW weight (add a bias by broadcasting)."""
    return op(
        "conv2d",
        x,
        w,
        stride=_pair(stride),
        padding=_pair(padding),
        dilation=_pair(dilation),
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
# (end of normalization)


# --- convolution (groups, bias, transposed) -----------------------------------------------
# (end of convolution (groups, bias, transposed))


# --- resizing and padding -----------------------------------------------------------------
# (end of resizing and padding)


# --- activations --------------------------------------------------------------------------
# (end of activations)


# --- logical and arg reductions -----------------------------------------------------------
# (end of logical and arg reductions)


# --- attention ----------------------------------------------------------------------------
# (end of attention)
