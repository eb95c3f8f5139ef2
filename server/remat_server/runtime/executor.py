"""Run a schedule with NumPy, timing each phase.

A schedule is compiled once into a `Program`: per step, the op's forward function,
its argument names, its attributes as a plain dict, its phase and what the memory
model says its result costs. A repeated request runs the same Program: the loop does
no lookups, no attribute validation and no phase bookkeeping of its own.

Phases: the first evaluation of a forward node is forward time, a repeat evaluation
is recompute time, every other node is backward time. Cancellation is checked
between steps, so a cancelled request stops within one step; its values are
dropped with the executor's frame.

Accounting follows `checkpoint.memory`: a result the model calls "new" is made a
fresh C-contiguous buffer (copied in the rare case an op returned a view, an input or
an odd layout), so what NumPy holds is what the simulator predicted. The live bytes
after each step are therefore the simulation's timeline, which the Program carries:
the executor reports them rather than counting the same model again per step. The
independent check of that promise is tracemalloc (`measure_memory`), whose peak the
tests hold to the prediction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from remat_proto import dtypes
from remat_proto.results import TraceEvent

from ..checkpoint.memory import MemoryModel, memory_model
from ..checkpoint.schedule import Compute, Schedule
from ..checkpoint.simulate import simulate
from ..errors import Cancelled, InvalidArgument, RematError, ResourceExhausted, where
from ..graph.ir import Graph, Node
from ..ops import registry

FORWARD, RECOMPUTE, BACKWARD, FREE = 0, 1, 2, 3
_NO_ATTRS: dict = {}  # shared by every node without attributes (never written)
PHASES = ("forward", "recompute", "backward", "free")


@dataclass
class Execution:
    values: dict[str, np.ndarray]  # the schedule's results
    peak_bytes: int
    forward_seconds: float
    backward_seconds: float
    recompute_seconds: float
    nodes_computed: int
    recomputed_nodes: int
    trace: list[TraceEvent] | None = None  # every executed step, when traced


class Program:
    """A schedule ready to run: `Program(graph, schedule, forward_nodes, model,
    timeline)`, then `run(feeds)` as often as needed (thread-safe: it keeps no state
    between runs)."""

    __slots__ = (
        "phases",
        "entries",
        "timeline",
        "results",
        "peak_bytes",
        "nodes_computed",
        "recomputed_nodes",
    )

    def __init__(
        self,
        graph: Graph,
        schedule: Schedule,
        forward_nodes: frozenset[str],
        model: MemoryModel,
        timeline: tuple[int, ...],
    ):
        nodes, nbytes, ops = graph.nodes, model.nbytes, registry.REGISTRY
        # Step i is (phases[i], entries[i], timeline[i]): three parallel sequences, not
        # a tuple per step (a 100,000-node graph has 400,000 steps). An entry is one per
        # node, shared by its steps: (name, node, forward, inputs, attrs, fresh, (shape,
        # NumPy dtype) of its result, shared by the nodes of one type).
        by_name: dict[str, tuple] = {}
        kinds: dict = {}
        phases = bytearray(len(schedule.steps))
        entries = [None] * len(schedule.steps)
        computed = set()
        recomputed = 0
        for index, step in enumerate(schedule.steps):
            name = step.node
            entry = by_name.get(name)
            if entry is None:
                node = nodes[name]
                type_ = node.type
                kind = kinds.get(type_)
                if kind is None:
                    kind = kinds[type_] = (type_.shape, dtypes.NUMPY[type_.dtype])
                entry = by_name[name] = (
                    name,
                    node,
                    ops[node.op].forward,
                    node.inputs,
                    dict(node.attrs) if node.attrs else _NO_ATTRS,
                    nbytes.get(name, 0) > 0,  # owns a buffer (views are not in nbytes)
                    kind,
                )
            entries[index] = entry
            if type(step) is not Compute:
                phases[index] = FREE
            elif name not in forward_nodes:
                phases[index] = BACKWARD
            elif name in computed:
                phases[index] = RECOMPUTE
                recomputed += 1
            else:  # FORWARD is 0, the bytearray's initial value
                computed.add(name)
        self.phases, self.entries, self.timeline = bytes(phases), entries, timeline
        self.results = tuple(schedule.results)
        # The timeline counts each op's temporaries while it runs (checkpoint.simulate).
        self.peak_bytes = max(timeline, default=0)
        self.nodes_computed = len(phases) - phases.count(FREE)
        self.recomputed_nodes = recomputed

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        should_stop: Callable[[], bool] | None = None,
        trace: bool = False,
    ) -> Execution:
        if trace:
            return self._run_traced(feeds, should_stop)
        values: dict[str, np.ndarray] = dict(feeds)
        seconds = [0.0, 0.0, 0.0]
        clock = time.perf_counter
        # Time is read where the phase changes, not around every step: a few calls per
        # run instead of two per node (frees count in the phase they fall in).
        current, since = FORWARD, clock()
        done = 0
        with np.errstate(all="ignore"):  # NaN and Inf pass through; reported, not raised
            for phase, (name, node, forward, inputs, attrs, fresh, kind) in zip(
                self.phases, self.entries
            ):
                if should_stop is not None and should_stop():
                    raise Cancelled(
                        "the request was cancelled or its deadline passed; "
                        f"stopped after {done} node evaluations"
                    )
                if phase == FREE:
                    del values[name]
                    continue
                if phase != current:
                    now = clock()
                    seconds[current] += now - since
                    current, since = phase, now
                values[name] = _run_node(
                    node, forward, [values[i] for i in inputs], attrs, fresh, kind
                )
                done += 1
        seconds[current] += clock() - since
        return self._execution(values, seconds, None)

    def _run_traced(self, feeds, should_stop) -> Execution:
        """`run`, timing every step and recording it as a TraceEvent."""
        events: list[TraceEvent] = []
        values: dict[str, np.ndarray] = dict(feeds)
        seconds = [0.0, 0.0, 0.0]
        clock = time.perf_counter
        began = clock()
        with np.errstate(all="ignore"):
            for done, (phase, (name, node, forward, inputs, attrs, fresh, kind), live) in enumerate(
                zip(self.phases, self.entries, self.timeline)
            ):
                if should_stop is not None and should_stop():
                    raise Cancelled(
                        "the request was cancelled or its deadline passed; "
                        f"stopped after {done} steps"
                    )
                if phase == FREE:
                    del values[name]
                    events.append(TraceEvent(name, node.op, "free", clock() - began, 0.0, live))
                    continue
                start = clock()
                values[name] = _run_node(
                    node, forward, [values[i] for i in inputs], attrs, fresh, kind
                )
                took = clock() - start
                seconds[phase] += took
                events.append(TraceEvent(name, node.op, PHASES[phase], start - began, took, live))
        return self._execution(values, seconds, events)

    def _execution(self, values: dict, seconds: list[float], events) -> Execution:
        return Execution(
            {name: values[name] for name in self.results},
            self.peak_bytes,
            seconds[FORWARD],
            seconds[BACKWARD],
            seconds[RECOMPUTE],
            self.nodes_computed,
            self.recomputed_nodes,
            events,
        )


def execute(
    graph: Graph,
    schedule: Schedule,
    inputs: Mapping[str, np.ndarray],
    forward_nodes: frozenset[str],
    should_stop: Callable[[], bool] | None = None,
    model: MemoryModel | None = None,
    trace: bool = False,
) -> Execution:
    """Compile and run a schedule once (a simulation supplies its live bytes)."""
    model = model or memory_model(graph)
    timeline = simulate(graph, schedule, model).timeline
    return Program(graph, schedule, forward_nodes, model, timeline).run(inputs, should_stop, trace)


def _run_node(
    node: Node, forward, arguments: list, attrs: dict, fresh: bool, kind: tuple
) -> np.ndarray:
    """Run one node; `kind` is its result's (shape, NumPy dtype), which the result must
    have."""
    try:
        result = forward(*arguments, **attrs)
    except (IndexError, ValueError) as exc:  # data-dependent errors, e.g. an index out of range
        raise InvalidArgument(f"{where(node.name, node.op, node.source)}: {exc}") from None
    except MemoryError:
        raise ResourceExhausted(
            f"{where(node.name, node.op, node.source)}: out of memory "
            f"allocating {node.type.nbytes} bytes"
        ) from None
    if type(result) is not np.ndarray:  # ufuncs on 0-d arrays return NumPy scalars
        result = np.asarray(result)
    if result.shape != kind[0] or result.dtype != kind[1]:
        raise RematError(
            f"{where(node.name, node.op)}: produced {result.dtype}{result.shape}, "
            f"but its shape rule says {node.dtype}{node.shape} (a bug in remat)"
        )
    # The memory model promised a new buffer: a result that owns its memory (base None)
    # and is not an argument itself is one; anything else is checked, and copied if it
    # shares memory with an argument.
    if fresh and (
        result.base is not None
        or not result.flags.c_contiguous
        or any(result is a for a in arguments)
    ):
        if not result.flags.c_contiguous or any(np.may_share_memory(result, a) for a in arguments):
            result = np.array(result, order="C")
    return result
