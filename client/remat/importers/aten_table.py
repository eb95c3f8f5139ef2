"""The ATen op table of `from_torch`: each handler maps one ATen op onto remat ops.

A handler gets the importer (`cx`: `cx.op`, `cx.node`, `cx.out`...) and the call's
arguments by schema name (`a.self`, `a.dim`), where tensors computed by the graph are
`Tensor`s (node, shape, torch dtype) and everything else is a constant (torch tensor or
Python value). It returns a remat node (or a list of them, or a constant); the importer
casts it to torch's dtype for the node when they differ. Calls whose tensors are all
constants never reach a handler: they are folded by running the ATen op itself. This
module holds the table and the helpers the handlers share; `aten_math` the elementwise,
reduction and linear-algebra ops, `aten_shape` the shape ops, `aten_nn` the
convolution, pooling, normalization, attention and loss ops.

Where a derivative is undefined the mapping follows PyTorch's convention: max pooling
and torch.max(dim) send the gradient to the first maximum (max_pool2d, argmax +
take_along_axis),
amax and max() split ties (remat's max), clamp passes it at its bounds (clip),
hardtanh does not (hardtanh), ReLU gives 0 at 0.
"""

from __future__ import annotations

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
