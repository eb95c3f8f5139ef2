"""What a planner plans: the joint graph, what must be live at the end, and which
nodes are forward (recomputable) values. Plus the chain structure planners share:
a forward order and its segment boundaries.

A boundary is a forward node every later forward computation reaches only through
it (inputs aside): after it, nothing computed before it is needed by the forward
pass. Boundaries cut the forward pass into a chain of segments, the structure that
every-k, sqrt and revolve checkpoint along.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

from ..graph.ir import INPUT_OP, Graph, Node
from ..ops import registry
from .memory import MemoryModel, memory_model
from .simulate import node_flops

# Cached figures that depend on the graph, never on the backward order.
_ORDER_FREE = (
    "model",
    "flops",
    "input_bytes",
    "needed",
    "position",
    "forward_order",
    "boundaries",
    "candidates",
)


@dataclass(frozen=True, eq=False)
class Problem:
    graph: Graph
    results: frozenset[str]
    forward_nodes: frozenset[str]  # names of the original (differentiated) graph's nodes
    # Price of computing each node (default: its FLOPs); profiled seconds when asked.
    costs: Mapping[str, float] | None = field(default=None)
    # The exact MILP's size limit (server flag --optimal-max-nodes); larger joint graphs
    # fall back to the budget planner.
    milp_max_nodes: int = 300
    # The backward nodes in the order to run them (a topological order of `backward`);
    # None: the joint graph's (autodiff's emission order). See `with_backward`.
    backward_order: tuple[str, ...] | None = None
    # Figures planners share (e.g. store_all's peak), for every policy planned on it.
    memo: dict = field(default_factory=dict, repr=False)

    @cached_property
    def model(self) -> MemoryModel:
        return memory_model(self.graph)

    def cost(self, name: str) -> float:
        if self.costs is not None:
            return self.costs[name]
        return self.flops[name]

    @cached_property
    def flops(self) -> dict[str, int]:
        """Every computed node's FLOPs, once for all the policies planned on it."""
        graph, ops = self.graph, registry.REGISTRY
        flops: dict[str, int] = {}
        # Ops priced per output element cost the same for the same (op, type): asked once.
        per_element: dict[tuple, int] = {}
        for name, node in graph.nodes.items():
            if node.op == INPUT_OP:
                continue
            key = (node.op, node.type)
            cost = per_element.get(key)
            if cost is None:
                cost = node_flops(graph, name)
                if getattr(ops[node.op].cost, "per_element", None) is not None:
                    per_element[key] = cost
            flops[name] = cost
        return flops

    @cached_property
    def input_bytes(self) -> int:
        """Bytes of the graph inputs: live for the whole run under every schedule."""
        model = self.model
        return sum(
            model.nbytes[model.owner[n.name]]
            for n in self.graph.inputs
            if model.owner[n.name] == n.name
        )

    @cached_property
    def needed(self) -> frozenset[str]:
        return frozenset(self.graph.ancestors(self.results))

    @cached_property
    def position(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.graph.nodes)}

    def is_forward(self, name: str) -> bool:
        return name in self.forward_nodes and not self.graph[name].is_input

    @cached_property
    def backward(self) -> tuple[str, ...]:
        """Needed non-forward, non-input nodes, in the topological order planners run
        them in: `backward_order`, else the graph's."""
        if self.backward_order is not None:
            return self.backward_order
        return tuple(
            n
            for n in self.graph.nodes
            if n in self.needed and not self.is_forward(n) and not self.graph[n].is_input
        )

    @cached_property
    def eager_order(self) -> tuple[Node, ...]:
        """Every needed non-input node once, as an eager program runs them (store_all,
        DTR): the forward nodes in graph order, then `backward`."""
        nodes, needed = self.graph.nodes, self.needed
        if self.backward_order is None:  # the joint graph lists the forward nodes first
            return tuple([node for n, node in nodes.items() if n in needed and node.op != INPUT_OP])
        forward = [node for n, node in nodes.items() if n in needed and self.is_forward(n)]
        return (*forward, *(nodes[n] for n in self.backward_order))

    def with_backward(self, order: tuple[str, ...]) -> Problem:
        """This problem with the backward pass run in `order` (a permutation of
        `backward`): a fresh memo, and the figures no order changes carried over."""
        other = replace(self, backward_order=tuple(order), memo={})
        for name in _ORDER_FREE:
            if name in self.__dict__:
                other.__dict__[name] = self.__dict__[name]
        return other

    @cached_property
    def forward_order(self) -> tuple[str, ...]:
        """Needed forward nodes, each placed as late as its consumers allow (iterative
        DFS post-order from the forward values the rest of the plan reads), so side
        branches such as a weight penalty sit next to their use, not across the chain."""
        graph, needed = self.graph, self.needed
        roots = [
            n
            for n in graph.nodes
            if self.is_forward(n)
            and n in needed
            and (n in self.results or any(not self.is_forward(c) for c in graph.consumers(n)))
        ]
        order, done = [], set()
        for root in roots:
            stack = [(root, False)]
            while stack:
                name, expanded = stack.pop()
                if name in done:
                    continue
                if expanded:
                    done.add(name)
                    order.append(name)
                    continue
                stack.append((name, True))
                stack.extend(
                    (i, False)
                    for i in reversed(graph[name].inputs)
                    if self.is_forward(i) and i not in done
                )
        return tuple(order)

    @cached_property
    def boundaries(self) -> tuple[str, ...]:
        """Forward nodes in `forward_order` that no earlier forward value reaches past."""
        order = self.forward_order
        index = {name: i for i, name in enumerate(order)}
        last_use = [i for i in range(len(order))]
        for i, name in enumerate(order):
            for source in self.graph[name].inputs:
                if source in index:
                    last_use[index[source]] = max(last_use[index[source]], i)
        result, reach = [], -1
        for i, name in enumerate(order):
            if reach <= i:
                result.append(name)
            reach = max(reach, last_use[i])
        return tuple(result)

    @cached_property
    def candidates(self) -> tuple[str, ...]:
        """Boundaries worth checkpointing: those the backward pass reads anyway (a layer's
        activation), so keeping one costs no memory its segment would not hold. Falls
        back to all boundaries when fewer than two are read."""
        read = {source for b in self.backward for source in self.graph[b].inputs}
        chosen = tuple(b for b in self.boundaries if b in read)
        return chosen if len(chosen) >= 2 else self.boundaries
