"""Compile a request once: validate the graph at its input shapes, differentiate it,
pose the planning problem; then plan each policy once, on demand.

What a request compiles to depends only on its `CompileKey`: the graph (its content
id) and input shapes (the validated graph is cached on its own under those two, so
registering a graph validates it once for its first run too), wrt, loss, the outputs
given cotangents, and fetch. Tensors,
timeline/trace flags and deadlines do not enter it. A `Compiled` holds the validated
joint graph and the `Problem` (memory model, chain structure, store_all's peak...),
and one `Planned` per policy: schedule, simulation and the executor's `Program`.
Every field of the key changes what is built, so a different request never reuses a
wrong plan; the policy keys the plans inside.

`Budget(profile=True)` prices recomputation with op times measured on the inputs of
the first Run that asks for it, and is then cached like any other plan: an op's time
depends on its shapes, which the key fixes, not on the values, and profiling and
planning on every request made a profiled GPT-2 training step 20x store_all's.

    >>> # compiled = compile_request(key, spec, limits, shapes)
    >>> # planned, hit = compiled.plan(Sqrt())
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from remat_proto import dtypes, policies
from remat_proto.spec import GraphSpec, array_bytes

from ..autodiff import JointGraph, differentiate
from ..checkpoint import control
from ..checkpoint.planners import plan
from ..checkpoint.problem import Problem
from ..checkpoint.schedule import Schedule
from ..checkpoint.simulate import Simulation, simulate
from ..errors import Cancelled, DeadlineExceeded, InvalidArgument, RematError
from ..graph.ir import Graph
from ..graph.limits import Limits
from ..graph.validate import build_graph
from ..runtime import profiling
from ..runtime.executor import Program
from . import gc_pause

# Resident bytes, measured with tracemalloc on a 20k-node chain, a 64-layer MLP and a
# transformer block (tests/unit/test_compile_cache.py holds the estimates to within
# 2x): per node of a validated graph (IR node, attrs, type), per node a compile adds
# (the backward nodes, the memory model, the problem's tables) and per schedule step of
# a plan (the step, the executor's program entry, the simulated timeline).
VALIDATED_NODE_BYTES = 250
COMPILED_NODE_BYTES = 550
STEP_BYTES = 250
# How often a request waiting for another's plan checks whether it has itself ended.
_POLL_SECONDS = 0.05


class CompileKey(NamedTuple):
    """A plain tuple (hashed and compared at C speed: the key of every request)."""

    # ("validated", the graph's content id or ("object", id(spec)), every input's shape
    # in spec order): the key of the validated graph.
    graph: tuple
    wrt: tuple[str, ...]
    loss: str
    # Outputs whose cotangents the request sends; None: every float output (Differentiate).
    cotangents: tuple[str, ...] | None
    fetch: tuple[str, ...]


@dataclass(frozen=True)
class Validated:
    """A graph validated at given input shapes: what every compile of it starts from,
    and what registering a graph produces (so its first run does not validate again)."""

    graph: Graph
    spec: GraphSpec  # keeps id(spec) valid while cached

    @property
    def nbytes(self) -> int:
        return VALIDATED_NODE_BYTES * len(self.graph) + _constant_bytes(self.graph)


@dataclass(frozen=True)
class Planned:
    """One policy's plan of a Compiled: its schedule, the simulator's figures and the
    program the executor runs."""

    schedule: Schedule
    simulation: Simulation
    program: Program
    label: str  # e.g. "every_k(4)"
    seconds: float  # time spent planning and simulating

    @property
    def nbytes(self) -> int:
        return STEP_BYTES * len(self.schedule.steps)


class Compiled:
    """A compiled request: `graph` the joint graph (the validated graph itself when
    nothing is differentiated), `fetch` output name -> node, `problem` the planning
    problem shared by every policy, `result_bytes` what its outputs and gradients
    weigh; `plan(policy)` plans once per policy."""

    def __init__(
        self,
        key: CompileKey,
        spec: GraphSpec,
        joint: JointGraph,
        fetch: dict[str, str],
        problem: Problem,
        seconds: float,
    ):
        self.key, self.spec, self.joint = key, spec, joint  # spec: keeps id(spec) valid
        self.graph = joint.graph
        self.fetch = fetch
        self.problem = problem
        self.seconds = seconds
        self.result_bytes = sum(self.graph[node].type.nbytes for node in self.result_nodes)
        self._base_bytes = COMPILED_NODE_BYTES * len(self.graph) + _constant_bytes(self.graph)
        self._plans: dict[policies.Policy, Planned | Future] = {}
        self._lock = threading.Lock()

    @property
    def result_nodes(self) -> list[str]:
        grads = [self.graph.outputs[out] for out in self.joint.grad_outputs.values()]
        return [*self.fetch.values(), *grads]

    @property
    def nbytes(self) -> int:
        """Approximate resident bytes, plans included (the cache's measure)."""
        with self._lock:
            plans = [p for p in self._plans.values() if isinstance(p, Planned)]
        # A refusal keeps the least-memory schedule it found (least_memory.floor).
        floor = self.problem.memo.get("floor")
        kept = STEP_BYTES * len(floor.schedule.steps) if floor is not None else 0
        return self._base_bytes + kept + sum(p.nbytes for p in plans)

    def cached(self, policy: policies.Policy) -> Planned | None:
        """The plan for `policy` if it is made already."""
        found = self._plans.get(policy)
        return found if isinstance(found, Planned) else None

    def plan(
        self, policy: policies.Policy, feeds: Mapping[str, np.ndarray] | None = None
    ) -> tuple[Planned, bool]:
        """(the plan for `policy`, whether it was cached). Concurrent first requests
        for one policy plan once. A profiled Budget is planned on `feeds` (a Run's
        inputs) the first time; without them (Plan) it must be cached already."""
        profiled = isinstance(policy, policies.Budget) and policy.profile
        if profiled and feeds is None and self.cached(policy) is None:
            raise InvalidArgument(
                "policy budget(profile): profiling times ops on real inputs; "
                "Run with it first (Plan then returns the plan that Run made)"
            )
        while True:
            with self._lock:
                found = self._plans.get(policy)
                if found is None:
                    self._plans[policy] = future = Future()
            if isinstance(found, Planned):
                return found, True
            if found is None:
                break
            try:  # another request is planning it
                return _await(found), True
            except (Cancelled, DeadlineExceeded):
                control.check()  # this request ended too; else the other one did: plan
        try:
            with gc_pause.paused(len(self.graph)):
                planned = _plan(self._profiled(feeds) if profiled else self.problem, policy)
        except BaseException as error:
            with self._lock:
                del self._plans[policy]
            future.set_exception(error)
            raise
        with self._lock:
            self._plans[policy] = planned
        future.set_result(planned)
        return planned, False

    def _profiled(self, feeds: Mapping[str, np.ndarray]) -> Problem:
        """The problem priced by each forward op's time, measured on `feeds`."""
        costs = profiling.forward_costs(self.graph, self.joint.forward_nodes, feeds)
        problem = self.problem
        return Problem(
            self.graph, problem.results, problem.forward_nodes, costs, problem.milp_max_nodes
        )


def _await(planning: Future) -> Planned:
    """The plan another request is making, waiting only while this request lives (and
    not holding a work slot meanwhile: the planner may need one back to finish)."""
    with control.waiting():
        while True:
            try:
                return planning.result(timeout=_POLL_SECONDS)
            except FutureTimeout:
                control.check()


def validate(
    spec: GraphSpec, limits: Limits, input_shapes: Mapping[str, tuple[int, ...]] | None
) -> Validated:
    return Validated(build_graph(spec, limits, input_shapes), spec)


def compile_request(
    key: CompileKey, spec: GraphSpec, limits: Limits, graph: Graph, start: float
) -> Compiled:
    """Differentiate `graph` (validated at the key's shapes) and pose the problem for
    `key` (see the module doc); `start` is when compiling began."""
    fetch = key.fetch or tuple(graph.outputs)
    for name in fetch:
        if name not in graph.outputs:
            raise InvalidArgument(
                f"fetch: '{name}' is not an output of the graph "
                f"(outputs: {', '.join(graph.outputs) or 'none'})"
            )
    if key.loss and not key.wrt:
        raise InvalidArgument(
            f"loss '{key.loss}' is given but wrt is empty; name the "
            "inputs to differentiate with respect to"
        )
    joint = JointGraph(graph, frozenset(graph.nodes), {}, {})
    cotangents = key.cotangents
    if cotangents is None:  # Differentiate without a loss: seed every float output
        cotangents = tuple(
            name for name, node in graph.outputs.items() if dtypes.is_float(graph[node].dtype)
        )
    if key.wrt or key.cotangents is None:
        joint = differentiate(graph, limits, list(key.wrt), key.loss, list(cotangents))
    outputs = joint.graph.outputs
    wanted = {name: outputs[name] for name in fetch}
    results = frozenset(wanted.values()) | {outputs[o] for o in joint.grad_outputs.values()}
    problem = Problem(
        joint.graph, results, joint.forward_nodes, milp_max_nodes=limits.optimal_max_nodes
    )
    return Compiled(key, spec, joint, wanted, problem, time.perf_counter() - start)


def _plan(problem: Problem, policy: policies.Policy) -> Planned:
    start = time.perf_counter()
    schedule = plan(problem, policy)
    simulation = simulate(problem.graph, schedule, problem.model, problem.flops)
    report = schedule.report
    if report is not None and report.budget_bytes and simulation.peak_bytes > report.budget_bytes:
        raise RematError(
            f"internal error: policy {policies.label(policy)} planned a peak "
            f"of {simulation.peak_bytes} bytes over its budget of "
            f"{report.budget_bytes}"
        )
    program = Program(
        problem.graph, schedule, problem.forward_nodes, problem.model, simulation.timeline
    )
    label = schedule.policy if report is not None else policies.label(policy)
    return Planned(schedule, simulation, program, label, time.perf_counter() - start)


def _constant_bytes(graph) -> int:
    """Bytes of the arrays graph attributes hold (constants)."""
    return array_bytes(graph) + sys.getsizeof(graph.name)
