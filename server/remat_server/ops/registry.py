"""The op registry: one `register(...)` call per op, grouped by family modules.

An op is its shape rule, its NumPy forward and its VJP side by side (micrograd's
closeness, PyTorch derivatives.yaml's table). The VJP does not compute numbers: it
emits graph nodes through an emitter `e`, so the backward pass is itself a graph.

Signatures (attrs are passed as keyword arguments, already validated and complete):

    infer(*input_types: TensorType, **attrs) -> TensorType      raises ShapeError
    forward(*arrays: np.ndarray, **attrs) -> np.ndarray
    vjp(e, g, out, *inputs, **attrs) -> list[Sym | None]        one entry per input
    cost(out: TensorType, *input_types, **attrs) -> int          FLOPs
    normalize(*input_types, **attrs) -> dict                     optional attr rewrite
    workspace(*input_types, **attrs) -> tuple[int, ...]          optional, see below

A VJP may return a gradient in the broadcast (output) shape; autodiff sums it down
to the input's shape. `None` means "no gradient flows to this input".

`memory` says what the forward's result costs: "new" (a fresh buffer, the default),
"view" (shares input 0's buffer: transpose, broadcast_to, slice), "view_if_contiguous"
(reshape: a view of a C-contiguous input, else a copy) or "external" (constant: its
bytes belong to the request). Planners, simulator and executor account by it.

`workspace` gives the shape of the largest temporary a forward allocates besides its
result (conv's zero-padded copy of the input); the graph builder holds it to the same
per-tensor limits as every value, so a tiny request cannot make a huge temporary.

`scratch(out, *input_types, **attrs) -> int` gives the bytes of every temporary the
forward holds at its own peak, besides its inputs and its result: what the memory
model adds, while the op runs, to the live bytes (issue 14: the predicted peak is the
real one). A VJP's temporaries are those of the ops it emits. None means 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..graph.ir import TensorType

REQUIRED = object()
NODE_NAME = object()  # default sentinel: the attr defaults to the node's own name

ATTR_TYPES = ("int", "float", "string", "bool", "ints", "floats", "tensor")


@dataclass(frozen=True)
class Attr:
    type: str
    default: Any = REQUIRED
    # Returns True when the value is acceptable; `requirement` explains the rule.
    check: Callable[[Any], bool] | None = None
    requirement: str = ""
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class OpDef:
    name: str
    family: str
    infer: Callable[..., TensorType]
    forward: Callable[..., Any]
    # None: the op has no derivative at all (comparisons, integer ops).
    vjp: Callable[..., list] | None
    residuals: str
    cost: Callable[..., int]
    min_inputs: int
    max_inputs: int  # -1: variadic
    attrs: dict[str, Attr] = field(default_factory=dict)
    no_grad: tuple[int, ...] = ()
    normalize: Callable[..., dict] | None = None
    doc: str = ""
    memory: str = "new"
    workspace: Callable[..., tuple[int, ...]] | None = None
    scratch: Callable[..., int] | None = None

    @property
    def names_itself(self) -> bool:
        """Whether an attr defaults to the node's own name (a random stream's)."""
        return any(attr.default is NODE_NAME for attr in self.attrs.values())

    def differentiable(self, position: int) -> bool:
        return self.vjp is not None and position not in self.no_grad


RESIDUALS = ("none", "inputs", "output", "inputs+output")
MEMORY_KINDS = ("new", "view", "view_if_contiguous", "external")
REGISTRY: dict[str, OpDef] = {}


def register(
    name: str,
    *,
    family: str,
    infer,
    forward,
    vjp,
    residuals: str,
    cost,
    inputs: int | tuple[int, int] = 1,
    attrs: dict[str, Attr] | None = None,
    no_grad: tuple[int, ...] = (),
    normalize=None,
    doc: str = "",
    memory: str = "new",
    workspace=None,
    scratch=None,
) -> OpDef:
    """Add one op to the registry. `inputs` is an arity or (min, max); max -1 is variadic."""
    if name in REGISTRY:
        raise ValueError(f"op {name!r} is registered twice")
    if residuals not in RESIDUALS:
        raise ValueError(f"op {name!r}: residuals must be one of {RESIDUALS}")
    if memory not in MEMORY_KINDS:
        raise ValueError(f"op {name!r}: memory must be one of {MEMORY_KINDS}")
    low, high = (inputs, inputs) if isinstance(inputs, int) else inputs
    for attr_name, attr in (attrs or {}).items():
        if attr.type not in ATTR_TYPES:
            raise ValueError(f"op {name!r}: attr {attr_name!r} has unknown type {attr.type!r}")
    op = OpDef(
        name=name,
        family=family,
        infer=infer,
        forward=forward,
        vjp=vjp,
        residuals=residuals,
        cost=cost,
        min_inputs=low,
        max_inputs=high,
        attrs=dict(attrs or {}),
        no_grad=no_grad,
        normalize=normalize,
        doc=doc,
        memory=memory,
        workspace=workspace,
        scratch=scratch,
    )
    REGISTRY[name] = op
    return op


def get(name: str) -> OpDef | None:
    return REGISTRY.get(name)


def elementwise_cost(flops_per_element: int) -> Callable[..., int]:
    """Cost rule for ops doing a fixed amount of work per output element. The rule
    carries its rate (`per_element`), so FLOPs of big graphs are counted without a
    call per node."""

    def cost(out, *inputs, **attrs) -> int:
        return flops_per_element * out.size

    cost.per_element = flops_per_element
    return cost


def free(out, *inputs, **attrs) -> int:
    """Cost rule for ops that only move or view data."""
    return 0


free.per_element = 0
