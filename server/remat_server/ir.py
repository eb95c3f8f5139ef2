"""The graph IR: immutable, validated nodes with inferred shapes and dtypes.

Two stages share this module:

* `GraphSpec` is what a client sent, decoded but not yet checked (`InputSpec`,
  `NodeSpec`): any names, any ops, any attrs.
* `Graph` is the result of `build.build_graph`: every node's op exists, its attrs
  are complete and well typed, its inputs precede it, and its `shape` and `dtype`
  are inferred. Everything downstream (autodiff, planners, executor) trusts it.

Example:
    >>> from remat_server.ir import GraphSpec, InputSpec, NodeSpec
    >>> spec = GraphSpec("g", inputs=(InputSpec("x", (2, 3), "float32"),),
    ...                  nodes=(NodeSpec("y", "relu", ("x",)),), outputs=(("y", "y"),))
    >>> spec.nodes[0].op
    'relu'
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterator, Mapping, NamedTuple

from . import dtypes

INPUT_OP = "input"


class TensorType(NamedTuple):
    """Static shape and dtype of a value."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * dtypes.itemsize(self.dtype)


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    source: str = ""


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True, slots=True)
class GraphSpec:
    name: str
    inputs: tuple[InputSpec, ...]
    nodes: tuple[NodeSpec, ...]
    # (output name, node name) pairs, in declaration order.
    outputs: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, Any]
    type: TensorType
    source: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    @property
    def is_input(self) -> bool:
        return self.op == INPUT_OP


class Graph:
    """A validated graph. Nodes are stored in a topological order.

    Immutable by convention: `nodes` and `outputs` are read-only mappings.
    """

    __slots__ = ("name", "nodes", "outputs", "_consumers")

    def __init__(self, name: str, nodes: Mapping[str, Node], outputs: Mapping[str, str]):
        self.name = name
        self.nodes: Mapping[str, Node] = MappingProxyType(dict(nodes))
        self.outputs: Mapping[str, str] = MappingProxyType(dict(outputs))
        self._consumers: dict[str, tuple[str, ...]] | None = None

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def __contains__(self, name: str) -> bool:
        return name in self.nodes

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def inputs(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.is_input]

    def consumers(self, name: str) -> tuple[str, ...]:
        """Nodes that read `name`, in topological order (one entry per use)."""
        if self._consumers is None:
            table: dict[str, list[str]] = {n: [] for n in self.nodes}
            for node in self.nodes.values():
                for source in node.inputs:
                    table[source].append(node.name)
            self._consumers = {n: tuple(users) for n, users in table.items()}
        return self._consumers[name]

    def ancestors(self, names: "list[str] | tuple[str, ...] | set[str]") -> set[str]:
        """`names` and every node they depend on (iterative, no recursion)."""
        return self._reach(names, lambda name: self.nodes[name].inputs)

    def descendants(self, names: "list[str] | tuple[str, ...] | set[str]") -> set[str]:
        """`names` and every node that depends on them."""
        return self._reach(names, self.consumers)

    @staticmethod
    def _reach(names, neighbours) -> set[str]:
        seen: set[str] = set()
        stack = list(names)
        while stack:
            name = stack.pop()
            if name not in seen:
                seen.add(name)
                stack.extend(neighbours(name))
        return seen
