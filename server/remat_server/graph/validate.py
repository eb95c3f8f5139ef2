"""Turn a client's `GraphSpec` into a validated `Graph`, or raise InvalidArgument.

Checks, in order, each with a message naming the node: graph-wide counts (nodes,
edges), empty and duplicate names, dangling inputs, cycles, then per node (through
`GraphBuilder.add`) unknown op, arity, attributes, shapes and dtypes, size limits.
Inputs may declare a leading -1 (batch) dimension; `input_shapes` binds it.
"""

from __future__ import annotations

import graphlib
from collections.abc import Mapping

from ..errors import InvalidArgument, where
from ..ops import registry
from .builder import GraphBuilder
from .ir import Graph, GraphSpec, NodeSpec, TensorType
from .limits import Limits


def build_graph(
    spec: GraphSpec, limits: Limits, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> Graph:
    """Validate `spec` and infer every node's shape and dtype.

    `input_shapes` gives the concrete shape of inputs (needed for -1 batch dims);
    a given shape must match the declared one wherever the declaration is not -1.
    """
    _check_counts(spec, limits)
    _index_names(spec)
    ordered = _topological_order(spec)
    builder = GraphBuilder(spec.name, limits)
    for item in spec.inputs:
        shape = _bind_shape(item.name, item.shape, (input_shapes or {}).get(item.name), item.source)
        builder.add_input(item.name, TensorType(shape, item.dtype), item.source)
    for node in ordered:
        builder.add(node.op, node.inputs, dict(node.attrs), node.name, node.source)
    outputs: dict[str, str] = {}
    for out_name, node_name in spec.outputs:
        if not out_name:
            raise InvalidArgument("graph output with an empty name")
        if out_name in outputs:
            raise InvalidArgument(f"output '{out_name}' is declared twice")
        if node_name not in builder.nodes:
            raise InvalidArgument(
                f"output '{out_name}' refers to '{node_name}', which is not defined in the graph"
            )
        outputs[out_name] = node_name
    return builder.graph(outputs)


def validate_shapeless(spec: GraphSpec, limits: Limits) -> None:
    """What can be checked before a -1 batch dimension is bound: counts, names, edges,
    cycles and ops."""
    _check_counts(spec, limits)
    _index_names(spec)
    _topological_order(spec)
    for node in spec.nodes:
        if registry.get(node.op) is None:
            raise InvalidArgument(
                f"{where(node.name, node.op, node.source)}: unknown op "
                f"'{node.op}' (ListOps lists the known ones)"
            )


def _check_counts(spec: GraphSpec, limits: Limits) -> None:
    count = len(spec.inputs) + len(spec.nodes)
    if count > limits.max_nodes:
        raise InvalidArgument(
            f"graph '{spec.name}' has {count} nodes; the limit is "
            f"{limits.max_nodes} (server flag --max-nodes)"
        )
    edges = sum(len(n.inputs) for n in spec.nodes)
    if edges > limits.max_edges:
        raise InvalidArgument(
            f"graph '{spec.name}' has {edges} edges; the limit is "
            f"{limits.max_edges} (server flag --max-edges)"
        )


def _index_names(spec: GraphSpec) -> None:
    """Reject empty or duplicate names."""
    defined: set[str] = set()
    for item in (*spec.inputs, *spec.nodes):
        if not item.name:
            raise InvalidArgument(
                "a node or input has an empty name"
                + (f" (built at {item.source})" if item.source else "")
            )
        if item.name in defined:
            raise InvalidArgument(f"{where(item.name, '', item.source)}: the name is defined twice")
        defined.add(item.name)


def _topological_order(spec: GraphSpec) -> list[NodeSpec]:
    """The nodes in declaration order when it is already topological (it is what the
    user wrote, and store-all's memory depends on it: one pass, which also proves every
    input defined), else graphlib's order (iterative, so 100k-node chains are fine),
    which also finds cycles, once every input is known to be defined."""
    defined = {item.name for item in spec.inputs}
    for node in spec.nodes:
        if not all(name in defined for name in node.inputs):
            break
        defined.add(node.name)
    else:
        return list(spec.nodes)
    defined.update(node.name for node in spec.nodes)
    for node in spec.nodes:
        for source_name in node.inputs:
            if source_name not in defined:
                raise InvalidArgument(
                    f"{where(node.name, node.op, node.source)}: input "
                    f"'{source_name}' is not defined in the graph"
                )
    sorter = graphlib.TopologicalSorter({n.name: n.inputs for n in spec.nodes})
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        first = next((n for n in spec.nodes if n.name == cycle[0]), None)
        path = " -> ".join(cycle)
        label = where(cycle[0], first.op if first else "", first.source if first else "")
        raise InvalidArgument(f"{label}: the graph has a cycle: {path}") from None
    specs = {n.name: n for n in spec.nodes}
    return [specs[name] for name in order if name in specs]  # inputs are in the order too


def _bind_shape(name: str, declared: tuple[int, ...], given, source: str) -> tuple[int, ...]:
    declared = tuple(declared)
    label = where(name, "input", source)
    if any(d < 0 for d in declared[1:]) or (declared and declared[0] < -1):
        raise InvalidArgument(f"{label}: shape {declared}: only the leading dimension may be -1")
    if given is None:
        if declared and declared[0] == -1:
            raise InvalidArgument(
                f"{label}: the batch dimension (-1) needs a concrete size; "
                "send a tensor for it or give its shape"
            )
        return declared
    given = tuple(given)
    if len(given) != len(declared) or any(d not in (-1, g) for d, g in zip(declared, given)):
        raise InvalidArgument(
            f"{label}: declared shape {declared} does not match the given shape {given}"
        )
    return given
