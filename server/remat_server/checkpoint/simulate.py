"""Dry-run a schedule: check it is valid and predict its memory and FLOPs.

No kernel runs. The executor's accounted peak equals `peak_bytes` here exactly,
because both account buffers through the same `memory.LiveBytes` at the same steps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import RematError
from ..graph.ir import Graph
from ..ops import registry
from .memory import LiveBytes, MemoryModel, memory_model
from .schedule import Compute, Free, Schedule


class InvalidSchedule(RematError):
    """A planner produced a schedule that cannot run (a bug in the planner)."""


class OverLimit(Exception):
    """`simulate(..., peak_limit=N)` or `recompute_limit=F` stopped: the schedule's peak
    goes over N bytes, or it recomputes more than F FLOPs (so a planner comparing
    candidates skips the rest of one that cannot win)."""


@dataclass(frozen=True)
class Simulation:
    peak_bytes: int
    # Bytes in use at each step: the live ones after it, plus, for a Compute, the
    # temporaries of its op (so the peak is the timeline's maximum).
    timeline: tuple[int, ...]
    flops: int
    recompute_flops: int
    evaluations: Counter = field(default_factory=Counter)  # node -> times computed

    @property
    def recomputed_nodes(self) -> int:
        return sum(count - 1 for count in self.evaluations.values() if count > 1)


def node_flops(graph: Graph, name: str) -> int:
    node = graph.nodes[name]
    cost = registry.REGISTRY[node.op].cost
    per_element = getattr(cost, "per_element", None)
    if per_element is not None:
        return per_element * node.type.size
    return int(cost(node.type, *(graph.nodes[i].type for i in node.inputs), **node.attrs))


def simulate(
    graph: Graph,
    schedule: Schedule,
    model: MemoryModel | None = None,
    flops: Mapping[str, int] | None = None,
    peak_limit: int | None = None,
    recompute_limit: float | None = None,
) -> Simulation:
    """`flops`: each node's FLOPs when known (a Problem's `flops`), else computed here.
    Raises OverLimit as soon as the peak exceeds `peak_limit` or the recomputed FLOPs
    exceed `recompute_limit`."""
    nodes = graph.nodes
    live = {node.name for node in graph.inputs}
    model = model or memory_model(graph)
    scratch, nbytes = model.scratch, model.nbytes
    # `LiveBytes` tracks the buffers of the values that may share one (views, their
    # owners) and of the graph inputs; every other value holds its own bytes while it
    # is live, counted here in `own`: most values of most graphs, at a fraction of the
    # cost (the simulation is the inner loop of Budget's search).
    shared = model.shared | live
    accounting = LiveBytes(model, live)
    add, remove = accounting.add, accounting.remove
    own = 0
    peak = accounting.peak
    flops = {} if flops is None else flops
    timeline: list[int] = []
    record = timeline.append
    total_flops = recompute_flops = 0
    evaluations: dict[str, int] = {}
    for index, step in enumerate(schedule.steps):
        name = step.node
        if type(step) is Compute:
            node = nodes.get(name)
            if node is None:
                raise InvalidSchedule(f"step {index}: unknown node '{name}'")
            for source in node.inputs:
                if source not in live:
                    raise InvalidSchedule(
                        f"step {index}: computing '{name}' needs '{source}', which is not live"
                    )
            if name in live:
                raise InvalidSchedule(f"step {index}: '{name}' is computed while live")
            cost = flops.get(name)
            if cost is None:
                cost = node_flops(graph, name)
            total_flops += cost
            count = evaluations.get(name, 0)
            if count:
                recompute_flops += cost
                if recompute_limit is not None and recompute_flops > recompute_limit:
                    raise OverLimit(f"recomputes over {recompute_limit} FLOPs by step {index}")
            evaluations[name] = count + 1
            live.add(name)
            if name in shared:
                add(name)
            else:
                own += nbytes[name]
            # While `name` is computed, its temporaries sit on top of everything live.
            now = accounting.total + own + scratch.get(name, 0)
            record(now)
            if now > peak:
                peak = now
                if peak_limit is not None and peak > peak_limit:
                    raise OverLimit(f"peak {peak} bytes at step {index}")
            continue
        elif type(step) is Free:
            # Only a node's value is ever live: a free needs no lookup of the node.
            if name not in live:
                what = "which is not live" if name in nodes else "an unknown node"
                raise InvalidSchedule(f"step {index}: freeing '{name}', {what}")
            live.discard(name)
            if name in shared:
                remove(name)
            else:
                own -= nbytes[name]
        record(accounting.total + own)
    missing = sorted(schedule.results - live)
    if missing:
        raise InvalidSchedule(f"the schedule ends without '{missing[0]}' live")
    return Simulation(peak, tuple(timeline), total_flops, recompute_flops, Counter(evaluations))
