"""The one way an op function adds its node: `op(name, *inputs, **attrs)`, and the
argument helpers the op modules share (`remat.ops`, `remat.nn_ops`)."""

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
