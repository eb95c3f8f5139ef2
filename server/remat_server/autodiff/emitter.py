"""Emit graph nodes from VJP rules as if writing NumPy: `g * (1 - y * y)`.

A `Sym` is a node handle with arithmetic operators; an `Emitter` appends nodes to a
`GraphBuilder` (so every backward node is validated and shape-inferred like a
client's) and names them after the forward node being differentiated.

Example (inside a VJP rule):
    >>> # vjp=lambda e, g, y, x: [g * (1 - y * y)]          # tanh
"""

from __future__ import annotations

from typing import Any

import numpy as np

from remat_proto import dtypes

from ..graph.builder import GraphBuilder
from ..graph.ir import Node
from ..ops import registry


class Sym:
    __slots__ = ("e", "node", "name")

    def __init__(self, e: Emitter, node: Node):
        self.e = e
        self.node = node
        self.name = node.name

    shape = property(lambda self: self.node.type.shape)
    dtype = property(lambda self: self.node.type.dtype)
    ndim = property(lambda self: len(self.node.type.shape))

    def _lift(self, other: Any) -> Sym:
        return other if isinstance(other, Sym) else self.e.const(other, self.dtype)

    def __add__(self, other):
        return self.e.op("add", self, self._lift(other))

    def __radd__(self, other):
        return self.e.op("add", self._lift(other), self)

    def __sub__(self, other):
        return self.e.op("sub", self, self._lift(other))

    def __rsub__(self, other):
        return self.e.op("sub", self._lift(other), self)

    def __mul__(self, other):
        return self.e.op("mul", self, self._lift(other))

    def __rmul__(self, other):
        return self.e.op("mul", self._lift(other), self)

    def __truediv__(self, other):
        return self.e.op("div", self, self._lift(other))

    def __rtruediv__(self, other):
        return self.e.op("div", self._lift(other), self)

    def __neg__(self):
        return self.e.op("neg", self)

    def __matmul__(self, other):
        return self.e.op("matmul", self, other)

    def __repr__(self) -> str:
        return f"Sym({self.name}: {self.dtype}{list(self.shape)})"


class Emitter:
    """Appends nodes named `bwd/<forward node>/<op>` while differentiating that node."""

    def __init__(self, builder: GraphBuilder):
        self.builder = builder
        self.prefix = "bwd"
        self.source = ""
        # The constants' nodes, not Syms: a Sym refers to its emitter, and a cycle here
        # would keep the whole joint graph (the builder's nodes) alive once the garbage
        # collector has frozen it (`engine.gc_pause`): a leak per big compile evicted.
        self._constants: dict[tuple[str, float], Node] = {}

    def at(self, node: Node) -> Emitter:
        """Name and attribute the next nodes to the forward node `node`."""
        self.prefix = f"bwd/{node.name}"
        self.source = f"{node.source} (gradient)" if node.source else ""
        return self

    def wrap(self, node: Node) -> Sym:
        return Sym(self, node)

    def op(self, op_name: str, *inputs: Sym, **attrs: Any) -> Sym:
        name = self.builder.fresh_name(f"{self.prefix}/{op_name}")
        node = self.builder.add(op_name, [i.name for i in inputs], attrs, name, self.source)
        return Sym(self, node)

    def __getattr__(self, op_name: str):
        if registry.get(op_name) is None:
            raise AttributeError(op_name)
        return lambda *inputs, **attrs: self.op(op_name, *inputs, **attrs)

    def const(self, value: float, dtype: str) -> Sym:
        """A scalar constant; shared across the graph (one node per value and dtype)."""
        key = (dtype, float(value))
        node = self._constants.get(key)
        if node is None:
            array = np.asarray(value, dtype=dtypes.NUMPY[dtype])
            name = self.builder.fresh_name(f"const/{dtype}/{float(value)!r}")
            node = self._constants[key] = self.builder.add("constant", (), {"value": array}, name)
        return Sym(self, node)

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Sym:
        return self.op("broadcast_to", self.const(0.0, dtype), shape=tuple(shape))

    def sum_to(self, x: Sym, shape: tuple[int, ...]) -> Sym:
        """Un-broadcast: sum `x` down to `shape` (the inverse of NumPy broadcasting)."""
        shape = tuple(shape)
        if x.shape == shape:
            return x
        lead = x.ndim - len(shape)
        axes = tuple(range(lead)) + tuple(
            lead + i for i, dim in enumerate(shape) if dim == 1 and x.shape[lead + i] != 1
        )
        summed = self.op("sum", x, axes=axes, keepdims=True) if axes else x
        return summed if summed.shape == shape else self.op("reshape", summed, shape=shape)
