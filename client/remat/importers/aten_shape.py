"""`from_torch`'s shape ATen ops: views, permutations, slicing, concatenation,
indexing, embedding lookups, repeats, triangles and cumulative sums (registered into
`aten_table.HANDLERS` on import; see there for the handlers' contract)."""

from __future__ import annotations

import math

from .aten_table import _dim, _out_shape, _reshape, _scalar, _slice, aten
from .torch_values import Tensor, Unsupported


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
