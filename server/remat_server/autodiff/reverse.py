"""Reverse-mode autodiff, symbol to symbol: graph in, joint forward+backward graph out.

For each node in reverse topological order, the incoming gradient contributions are
summed as they arrive (in a fixed order), the op's VJP rule emits the nodes of
its local backward, and each resulting gradient is summed down to its input's shape
(un-broadcasting) before it joins that input's contributions. Only nodes on a path
from a `wrt` input to a target carry gradients; only float values carry them.

The result is deterministic: the same graph and request always give the same joint
graph, node for node, so any schedule of it computes bit-identical gradients.

Example:
    >>> from remat_server.graph.limits import Limits
    >>> # joint = differentiate(graph, Limits(), wrt=["w"], loss="loss")
    >>> # joint.graph.outputs["grad/w"] names the node holding d loss / d w
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

from remat_proto import dtypes

from ..errors import InvalidArgument, Unimplemented, where
from ..graph.builder import GraphBuilder
from ..graph.ir import INPUT_OP, Graph, TensorType
from ..graph.limits import Limits
from ..ops import registry
from .emitter import Emitter, Sym


@dataclass(frozen=True)
class JointGraph:
    """The joint graph plus where to find what the caller asked for."""

    graph: Graph
    forward_nodes: frozenset[str]  # nodes of the original graph
    grad_outputs: Mapping[str, str]  # wrt input -> output name holding its gradient
    cotangent_inputs: Mapping[str, str]  # output name -> input name for its cotangent


def differentiate(
    graph: Graph,
    limits: Limits,
    wrt: list[str],
    loss: str = "",
    cotangent_outputs: list[str] | None = None,
) -> JointGraph:
    """Add the backward pass of `graph` to it.

    Give `loss` (a scalar output or node name), or `cotangent_outputs`: output names
    that each get a new input `cotangent/<output>` seeding the backward pass (a VJP).
    """
    _check_wrt(graph, wrt)
    builder = GraphBuilder(graph.name, limits, base=graph)
    e = Emitter(builder)
    seeds, cotangent_inputs = _seeds(graph, builder, e, loss, cotangent_outputs or [])
    # Each node's gradient is accumulated as contributions arrive (a left fold in a
    # fixed order), so at most one partial sum per node is live, not one per consumer.
    total: dict[str, Sym] = {}
    for name, g in seeds:
        total[name] = g
    nodes, floats = graph.nodes, dtypes.FLOATS
    # Gradients flow only through float values on a path from a wrt input to a seed. A
    # node the loop below differentiates has a gradient, so it and its inputs lead to a
    # seed already: only the wrt side needs a set (the float test is made where an
    # input is looked up anyway, below).
    descendants = graph.descendants(set(wrt))

    ops = registry.REGISTRY
    for node in reversed(nodes.values()):
        g = total.get(node.name)
        if g is None or node.op == INPUT_OP or node.type.dtype not in floats:
            continue
        op = ops[node.op]
        if op.vjp is None:
            continue
        no_grad = op.no_grad
        sources = [nodes[name] for name in node.inputs]
        targets = [
            i
            for i, source in enumerate(sources)
            if source.name in descendants and source.type.dtype in floats and i not in no_grad
        ]
        if not targets:
            continue
        e.at(node)
        inputs = [Sym(e, source) for source in sources]
        attrs = node.attrs  # `**` of an empty read-only mapping costs 0.14 us: skipped
        grads = (
            op.vjp(e, g, Sym(e, node), *inputs, **attrs)
            if attrs
            else op.vjp(e, g, Sym(e, node), *inputs)
        )
        if len(grads) != len(node.inputs):
            raise Unimplemented(
                f"{where(node.name, node.op)}: its VJP returned {len(grads)} "
                f"gradients for {len(node.inputs)} inputs"
            )
        for i in targets:
            if grads[i] is not None:
                source = sources[i]
                contribution = _fit(e, grads[i], source.type)
                previous = total.get(source.name)
                total[source.name] = contribution if previous is None else previous + contribution

    outputs = dict(graph.outputs)
    grad_outputs: dict[str, str] = {}
    for name in wrt:
        source = graph[name]
        e.prefix, e.source = f"grad/{name}", ""
        g = total[name] if name in total else e.zeros(source.shape, source.dtype)
        out_name = _free_output_name(outputs, name)
        outputs[out_name] = g.name
        grad_outputs[name] = out_name
    return JointGraph(
        _pruned(builder, outputs, graph),
        frozenset(graph.nodes),
        grad_outputs,
        cotangent_inputs,
    )


def _check_wrt(graph: Graph, wrt: list[str]) -> None:
    if len(set(wrt)) != len(wrt):
        raise InvalidArgument(f"wrt names an input twice: {wrt}")
    for name in wrt:
        if name not in graph:
            raise InvalidArgument(f"wrt: '{name}' is not an input of the graph")
        node = graph[name]
        if not node.is_input:
            raise InvalidArgument(
                f"wrt: '{name}' is a node ({node.op}), not an input; "
                "gradients are taken with respect to inputs"
            )
        if not dtypes.is_float(node.dtype):
            raise InvalidArgument(
                f"wrt: input '{name}' has dtype {node.dtype}; only float inputs have gradients"
            )


def _resolve(graph: Graph, name: str) -> str:
    """An output name, else a node name, to the node it denotes."""
    if name in graph.outputs:
        return graph.outputs[name]
    if name in graph:
        return name
    raise InvalidArgument(f"loss: '{name}' is neither an output nor a node of the graph")


def _seeds(graph, builder, e, loss, cotangent_outputs):
    if bool(loss) == bool(cotangent_outputs):
        raise InvalidArgument(
            "give either a scalar `loss` or cotangents for outputs, not "
            + ("both" if loss else "neither")
        )
    if loss:
        node = graph[_resolve(graph, loss)]
        if node.shape != ():
            raise InvalidArgument(
                f"loss: {where(node.name, node.op, node.source)} has shape "
                f"{node.shape}; a loss must be a scalar (or send cotangents "
                "for non-scalar outputs)"
            )
        if not dtypes.is_float(node.dtype):
            raise InvalidArgument(f"loss: '{loss}' has dtype {node.dtype}; it must be float")
        e.prefix = "seed"
        return [(node.name, e.const(1.0, node.dtype))], {}
    seeds, inputs = [], {}
    for out_name in cotangent_outputs:
        if out_name not in graph.outputs:
            raise InvalidArgument(f"cotangent given for '{out_name}', which is not an output")
        node = graph[graph.outputs[out_name]]
        if not dtypes.is_float(node.dtype):
            raise InvalidArgument(
                f"cotangent for output '{out_name}': its dtype {node.dtype} is not float"
            )
        input_name = builder.fresh_name(f"cotangent/{out_name}")
        seeds.append((node.name, e.wrap(builder.add_input(input_name, node.type))))
        inputs[out_name] = input_name
    return seeds, inputs


def _fit(e: Emitter, g: Sym, target: TensorType) -> Sym:
    """Un-broadcast `g` to the input's shape; cast if a rule produced another float."""
    if g.node.type == target:  # the common case: nothing to do
        return g
    g = e.sum_to(g, target.shape)
    return g if g.dtype == target.dtype else e.cast(g, dtype=target.dtype)


def _pruned(builder: GraphBuilder, outputs: dict[str, str], original: Graph) -> Graph:
    """The joint graph without the backward nodes no output reads (a VJP rule emits
    gradients for every input, even those not in `wrt`); the original graph's nodes
    and all inputs stay. Only the backward nodes are swept (they follow the original
    ones): the forward half of a joint graph never needs it."""
    nodes = builder.nodes
    backward = len(nodes) - len(original)
    read = set(outputs.values())
    dropped = []
    for node in itertools.islice(reversed(nodes.values()), backward):
        if node.name in read:
            read.update(node.inputs)
        elif not node.is_input:  # a cotangent input stays, read or not
            dropped.append(node.name)
    if dropped:
        dropped = set(dropped)
        nodes = {name: node for name, node in nodes.items() if name not in dropped}
    return Graph(builder.name, nodes, outputs)


def _free_output_name(outputs: dict[str, str], name: str) -> str:
    """`grad/<name>`, or `grad2/<name>`, `grad3/<name>`... when differentiating again."""
    candidate, order = f"grad/{name}", 1
    while candidate in outputs:
        order += 1
        candidate = f"grad{order}/{name}"
    return candidate
