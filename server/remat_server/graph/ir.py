"""The graph IR: immutable, validated nodes with inferred shapes and dtypes.

A `Graph` is the result of `validate.build_graph` on what a client sent (a
`remat_proto.spec.GraphSpec`, re-exported here): every node's op exists, its attrs are
complete and well typed, its inputs precede it, and its `shape` and `dtype` are
inferred. Everything downstream (autodiff, planners, executor) trusts it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from remat_proto import dtypes
from remat_proto.spec import GraphSpec, InputSpec, NodeSpec  # noqa: F401 (re-exported)

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


# Immutable by convention, not `frozen=True`: a frozen dataclass's __init__ costs four
# times a plain one's (0.5 against 0.12 us), paid for every node validated or emitted.
@dataclass(slots=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, Any]
    type: TensorType
    source: str = ""
    # What the node's checks, attrs and type follow from (op, input types, attrs as
    # given: `builder._signature`), shared by the nodes built alike; None when an attr
    # does not hash. Figures that depend on nothing else (an op's temporaries) are
    # looked up by it instead of building a key per node.
    signature: tuple | None = None

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

    __slots__ = ("name", "nodes", "outputs", "_consumers", "_inputs")

    def __init__(self, name: str, nodes: Mapping[str, Node], outputs: Mapping[str, str]):
        self.name = name
        self.nodes: Mapping[str, Node] = MappingProxyType(dict(nodes))
        self.outputs: Mapping[str, str] = MappingProxyType(dict(outputs))
        self._consumers: dict[str, tuple[str, ...]] | None = None
        self._inputs: tuple[Node, ...] | None = None

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
        if self._inputs is None:  # a scan of every node, asked by every pipeline stage
            self._inputs = tuple(node for node in self.nodes.values() if node.op == INPUT_OP)
        return list(self._inputs)

    def consumers(self, name: str) -> tuple[str, ...]:
        """Nodes that read `name`, in topological order (one entry per use)."""
        if self._consumers is None:
            table: dict[str, list[str]] = {n: [] for n in self.nodes}
            for node in self.nodes.values():
                for source in node.inputs:
                    table[source].append(node.name)
            self._consumers = {n: tuple(users) for n, users in table.items()}
        return self._consumers[name]

    def ancestors(self, names: list[str] | tuple[str, ...] | set[str]) -> set[str]:
        """`names` and every node they depend on: one sweep in reverse topological
        order (iterative: 100k-node chains are fine)."""
        seen = set(names)
        for node in reversed(self.nodes.values()):
            if node.name in seen:
                seen.update(node.inputs)
        return seen

    def descendants(self, names: list[str] | tuple[str, ...] | set[str]) -> set[str]:
        """`names` and every node that depends on them: one sweep in topological order."""
        seen = set(names)
        add = seen.add
        for node in self.nodes.values():
            for source in node.inputs:
                if source in seen:
                    add(node.name)
                    break
        return seen
