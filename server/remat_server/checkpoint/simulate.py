"""Dry-run a schedule: check it is valid and predict its memory and FLOPs.

No kernel runs. The executor's accounted peak equals `peak_bytes` here exactly,
because both account buffers through the same `memory.LiveBytes` at the same steps.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import RematError
from ..ir import Graph
from ..ops import registry
from .memory import LiveBytes, MemoryModel, memory_model
from .schedule import Compute, Free, Schedule


class InvalidSchedule(RematError):
    """A planner produced a schedule that cannot run (a bug in the planner)."""


@dataclass(frozen=True)
class Simulation:
    peak_bytes: int
    timeline: tuple[int, ...]  # live bytes after each step
    flops: int
    recompute_flops: int
    evaluations: Counter = field(default_factory=Counter)  # node -> times computed

    @property
    def recomputed_nodes(self) -> int:
        return sum(count - 1 for count in self.evaluations.values() if count > 1)


def node_flops(graph: Graph, name: str) -> int:
    node = graph[name]
    op = registry.get(node.op)
    return int(op.cost(node.type, *(graph[i].type for i in node.inputs), **node.attrs))


def simulate(graph: Graph, schedule: Schedule, model: MemoryModel | None = None) -> Simulation:
    live = {node.name for node in graph.inputs}
    accounting = LiveBytes(model or memory_model(graph), live)
    timeline, flops, recompute_flops = [], 0, 0
    evaluations: Counter = Counter()
    for index, step in enumerate(schedule.steps):
        name = step.node
        if name not in graph:
            raise InvalidSchedule(f"step {index}: unknown node '{name}'")
        if isinstance(step, Compute):
            missing = [i for i in graph[name].inputs if i not in live]
            if missing:
                raise InvalidSchedule(f"step {index}: computing '{name}' needs '{missing[0]}', "
                                      "which is not live")
            if name in live:
                raise InvalidSchedule(f"step {index}: '{name}' is computed while live")
            cost = node_flops(graph, name)
            flops += cost
            if evaluations[name]:
                recompute_flops += cost
            evaluations[name] += 1
            live.add(name)
            accounting.add(name)
        elif isinstance(step, Free):
            if name not in live:
                raise InvalidSchedule(f"step {index}: freeing '{name}', which is not live")
            live.discard(name)
            accounting.remove(name)
        timeline.append(accounting.total)
    missing = sorted(schedule.results - live)
    if missing:
        raise InvalidSchedule(f"the schedule ends without '{missing[0]}' live")
    return Simulation(accounting.peak, tuple(timeline), flops, recompute_flops, evaluations)
