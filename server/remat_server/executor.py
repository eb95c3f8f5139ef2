"""Run a schedule with NumPy, timing each phase and accounting live bytes.

Phases: the first evaluation of a forward node is forward time, a repeat evaluation
is recompute time, every other node is backward time. Cancellation is checked
between steps, so a cancelled request stops within one step; its values are
dropped with the executor's frame.

Accounting follows `checkpoint.memory`: a result the model calls "new" is made a
fresh C-contiguous buffer (copied in the rare case an op returned a view or an
odd layout), so what NumPy holds is what the simulator predicted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from . import dtypes
from .checkpoint.memory import LiveBytes, MemoryModel, memory_model
from .checkpoint.schedule import Compute, Schedule
from .errors import Cancelled, InvalidArgument, RematError, ResourceExhausted, where
from .ir import Graph, Node
from .ops import registry


@dataclass
class Execution:
    values: dict[str, np.ndarray]  # the schedule's results
    peak_bytes: int
    forward_seconds: float
    backward_seconds: float
    recompute_seconds: float
    nodes_computed: int
    recomputed_nodes: int
    # (node, op, phase, start seconds, seconds, live bytes after) per step, when traced.
    trace: list[tuple[str, str, str, float, float, int]] | None = None


def execute(graph: Graph, schedule: Schedule, inputs: Mapping[str, np.ndarray],
            forward_nodes: frozenset[str],
            should_stop: Callable[[], bool] | None = None,
            model: MemoryModel | None = None, trace: bool = False) -> Execution:
    model = model or memory_model(graph)
    events: list | None = [] if trace else None
    began = time.perf_counter()
    values: dict[str, np.ndarray] = dict(inputs)
    accounting = LiveBytes(model, values)
    seconds = {"forward": 0.0, "backward": 0.0, "recompute": 0.0}
    computed: set[str] = set()
    nodes_computed = recomputed = 0
    with np.errstate(all="ignore"):  # NaN and Inf pass through; they are reported, not raised
        for step in schedule.steps:
            if should_stop is not None and should_stop():
                raise Cancelled("the request was cancelled or its deadline passed; "
                                f"stopped after {nodes_computed} node evaluations")
            name = step.node
            if not isinstance(step, Compute):
                accounting.remove(name)
                del values[name]
                if events is not None:
                    events.append((name, graph[name].op, "free", time.perf_counter() - began,
                                   0.0, accounting.total))
                continue
            node = graph[name]
            phase = ("recompute" if name in computed else "forward") \
                if name in forward_nodes else "backward"
            start = time.perf_counter()
            values[name] = _run_node(node, values, fresh=not model.is_view(name)
                                     and model.nbytes[name] > 0)
            took = time.perf_counter() - start
            seconds[phase] += took
            accounting.add(name)
            if events is not None:
                events.append((name, node.op, phase, start - began, took, accounting.total))
            nodes_computed += 1
            recomputed += phase == "recompute"
            computed.add(name)
    results = {name: values[name] for name in schedule.results}
    return Execution(results, accounting.peak, seconds["forward"], seconds["backward"],
                     seconds["recompute"], nodes_computed, recomputed, events)


def _run_node(node: Node, values: dict[str, np.ndarray], fresh: bool) -> np.ndarray:
    op = registry.get(node.op)
    arguments = [values[i] for i in node.inputs]
    try:
        result = op.forward(*arguments, **node.attrs)
    except (IndexError, ValueError) as exc:  # data-dependent errors, e.g. an index out of range
        raise InvalidArgument(f"{where(node.name, node.op, node.source)}: {exc}") from None
    except MemoryError:
        raise ResourceExhausted(f"{where(node.name, node.op, node.source)}: out of memory "
                                f"allocating {node.type.nbytes} bytes") from None
    result = np.asarray(result)
    if result.shape != node.shape or result.dtype != dtypes.NUMPY[node.dtype]:
        raise RematError(f"{where(node.name, node.op)}: produced {result.dtype}{result.shape}, "
                         f"but its shape rule says {node.dtype}{node.shape} (a bug in remat)")
    if fresh and (not result.flags.c_contiguous
                  or any(np.may_share_memory(result, a) for a in arguments)):
        result = np.array(result, order="C")  # the memory model promised a new buffer
    return result
