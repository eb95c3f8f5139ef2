"""The engine: validate, differentiate, plan, simulate, execute. No gRPC in here.

Example:
    >>> import numpy as np
    >>> from remat_server.ir import GraphSpec, InputSpec, NodeSpec
    >>> spec = GraphSpec("g", (InputSpec("x", (3,), "float64"),),
    ...                  (NodeSpec("y", "square", ("x",)), NodeSpec("s", "sum", ("y",))),
    ...                  (("loss", "s"),))
    >>> result = Engine().run(RunRequest(spec, {"x": np.array([1.0, 2.0, 3.0])},
    ...                                  wrt=("x",), loss="loss"))
    >>> result.outputs["loss"].item(), result.grads["x"].tolist()
    (14.0, [2.0, 4.0, 6.0])
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, ContextManager, Mapping

import numpy as np

from . import dtypes, measure, profile
from .autodiff import JointGraph, differentiate
from .build import build_graph
from .checkpoint import policies
from .checkpoint.planners import plan
from .checkpoint.memory import MemoryModel, memory_model
from .checkpoint.problem import Problem
from .checkpoint.schedule import PlannerReport, Schedule
from .checkpoint.simulate import Simulation, simulate
from .errors import InvalidArgument, RematError, ResourceExhausted, ResponseTooLarge
from .executor import execute
from .ir import Graph, GraphSpec
from .limits import Limits


@dataclass(frozen=True)
class RunRequest:
    graph: GraphSpec
    inputs: Mapping[str, np.ndarray]
    fetch: tuple[str, ...] = ()
    wrt: tuple[str, ...] = ()
    loss: str = ""
    cotangents: Mapping[str, np.ndarray] = field(default_factory=dict)
    # A policy object, or the name of a parameterless one ("store_all", "sqrt", ...).
    policy: policies.Policy | str = "auto"  # store_all when it fits the request limit
    timeline: bool = False  # return live bytes after every schedule step
    measure_memory: bool = False  # also measure the real peak with tracemalloc
    trace: bool = False  # return every executed step with its timing


@dataclass(frozen=True)
class Metrics:
    peak_bytes: int = 0
    predicted_peak_bytes: int = 0
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    recompute_seconds: float = 0.0
    plan_seconds: float = 0.0
    total_seconds: float = 0.0
    nodes_computed: int = 0
    recomputed_nodes: int = 0
    flops: int = 0
    recompute_flops: int = 0
    measured_peak_bytes: int = 0  # tracemalloc's peak plus the inputs; 0 unless requested
    policy: str = ""
    queue_seconds: float = 0.0  # waiting for memory admission
    planner: PlannerReport | None = None


@dataclass(frozen=True)
class RunResult:
    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    metrics: Metrics
    warnings: tuple[str, ...] = ()
    timeline: tuple[int, ...] = ()
    trace: tuple[tuple[str, str, str, float, float, int], ...] = ()


@dataclass(frozen=True)
class Plan:
    """A planned request: the joint graph, its schedule and the simulator's figures."""

    joint: JointGraph
    schedule: Schedule
    simulation: Simulation
    model: MemoryModel
    fetch: dict[str, str]  # output name -> node
    policy: str  # its label, e.g. "every_k(4)"
    seconds: float


class Engine:
    """`memory_budget_bytes` is the server's budget for all requests at once (0: none);
    no single request may plan above it or above `limits.max_request_bytes`."""

    def __init__(self, limits: Limits | None = None, memory_budget_bytes: int = 0):
        self.limits = limits or Limits()
        self.memory_budget_bytes = memory_budget_bytes

    @property
    def request_limit(self) -> int:
        """The most one request may use: the per-request limit, or the server's
        budget for all requests when that is smaller."""
        limit = self.limits.max_request_bytes
        return min(limit, self.memory_budget_bytes) if self.memory_budget_bytes > 0 else limit

    def with_server_defaults(self, policy: policies.Policy | str) -> policies.Policy:
        """Resolve names, and fill what a policy leaves to the server (0 means default)."""
        policy = policies.by_name(policy) if isinstance(policy, str) else policy
        if isinstance(policy, policies.Auto) and not policy.bytes:
            return policies.Auto(self.request_limit)
        if isinstance(policy, policies.Optimal):  # the server's limit is also the most it grants
            limit = self.limits.optimal_time_limit
            asked = policy.time_limit or limit  # NaN, inf and negatives are refused later
            return replace(policy, time_limit=limit if limit < asked < math.inf else asked,
                           max_nodes=policy.max_nodes or self.limits.optimal_max_nodes)
        return policy

    def differentiate(self, spec: GraphSpec, wrt: tuple[str, ...], loss: str = "",
                      input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> JointGraph:
        """The joint graph; without `loss`, every float output gets a cotangent input."""
        unknown = sorted(set(input_shapes or {}) - {i.name for i in spec.inputs})
        if unknown:
            raise InvalidArgument(f"input_shapes: '{unknown[0]}' is not an input of the graph")
        graph = build_graph(spec, self.limits, input_shapes)
        cotangents = [] if loss else [name for name, node in graph.outputs.items()
                                      if dtypes.is_float(graph[node].dtype)]
        return differentiate(graph, self.limits, list(wrt), loss, cotangents)

    def plan(self, spec: GraphSpec, wrt: tuple[str, ...] = (), loss: str = "",
             cotangent_outputs: tuple[str, ...] = (), policy: policies.Policy | str = "auto",
             input_shapes: Mapping[str, tuple[int, ...]] | None = None,
             fetch: tuple[str, ...] = ()) -> Plan:
        """Dry run: plan and simulate without any tensor (shapes come from the graph, or
        `input_shapes` for -1 batch dimensions)."""
        unknown = sorted(set(input_shapes or {}) - {i.name for i in spec.inputs})
        if unknown:
            raise InvalidArgument(f"input_shapes: '{unknown[0]}' is not an input of the graph")
        start = time.perf_counter()
        graph = build_graph(spec, self.limits, input_shapes)
        return self._plan(graph, fetch, wrt, loss, cotangent_outputs, policy, start)

    def _plan(self, graph: Graph, fetch, wrt, loss, cotangent_outputs, policy,
              start: float, feeds: Mapping[str, np.ndarray] | None = None) -> Plan:
        fetch = tuple(fetch) or tuple(graph.outputs)
        for name in fetch:
            if name not in graph.outputs:
                raise InvalidArgument(f"fetch: '{name}' is not an output of the graph "
                                      f"(outputs: {', '.join(graph.outputs) or 'none'})")
        if loss and not wrt:
            raise InvalidArgument(f"loss '{loss}' is given but wrt is empty; name the "
                                  "inputs to differentiate with respect to")
        joint = JointGraph(graph, frozenset(graph.nodes), {}, {})
        if wrt:
            joint = differentiate(graph, self.limits, list(wrt), loss, list(cotangent_outputs))
        graph = joint.graph
        wanted = {name: graph.outputs[name] for name in fetch}
        results = set(wanted.values()) | {graph.outputs[o] for o in joint.grad_outputs.values()}
        policy = self.with_server_defaults(policy)
        costs = None
        if isinstance(policy, policies.Budget) and policy.profile:
            if feeds is None:
                raise InvalidArgument("policy budget(profile): profiling times ops on real "
                                      "inputs; use it with Run, not Plan")
            costs = profile.forward_costs(graph, joint.forward_nodes, feeds)
        problem = Problem(graph, frozenset(results), joint.forward_nodes, costs)
        schedule = plan(problem, policy)
        model = problem.model
        simulation = simulate(graph, schedule, model)
        report = schedule.report
        if report is not None and report.budget_bytes and simulation.peak_bytes > report.budget_bytes:
            raise RematError(f"internal error: policy {policies.label(policy)} planned a peak "
                             f"of {simulation.peak_bytes} bytes over its budget of "
                             f"{report.budget_bytes}")
        if simulation.peak_bytes > self.request_limit:
            raise ResourceExhausted(
                f"the plan's predicted peak is {simulation.peak_bytes:,} bytes, over the "
                f"per-request limit of {self.request_limit:,} (server flags "
                "--max-request-bytes, --memory-budget-bytes); try policy auto or a budget, "
                "or a smaller batch")
        return Plan(joint, schedule, simulation, model, wanted,
                    schedule.policy if report is not None else policies.label(policy),
                    time.perf_counter() - start)

    def run(self, request: RunRequest, should_stop: Callable[[], bool] | None = None,
            admit: Callable[[int], ContextManager] | None = None,
            max_response_bytes: int = 0) -> RunResult:
        """Plan and execute. `admit(predicted_peak_bytes)`, when given, is entered
        before execution (memory admission) and yields an object with `queue_seconds`.
        With `max_response_bytes`, outputs and gradients that would total more are
        refused (ResponseTooLarge) before anything runs."""
        start = time.perf_counter()
        graph = build_graph(request.graph, self.limits, _input_shapes(request.graph, request.inputs))
        _check_inputs(graph, request.inputs)
        planned = self._plan(graph, request.fetch, request.wrt, request.loss,
                             tuple(request.cotangents), request.policy, start, request.inputs)
        joint, graph = planned.joint, planned.joint.graph
        if max_response_bytes:
            _check_response_bytes(graph, planned, max_response_bytes)
        feeds = dict(request.inputs)
        feeds.update(_cotangent_feeds(joint, request.cotangents))
        admission = admit(planned.simulation.peak_bytes) if admit else nullcontext(None)
        with admission as admitted, measure.peak_memory(request.measure_memory) as measured:
            run = execute(graph, planned.schedule, feeds, joint.forward_nodes, should_stop,
                          planned.model, trace=request.trace)
        outputs = {name: run.values[node] for name, node in planned.fetch.items()}
        grads = {w: run.values[graph.outputs[out]] for w, out in joint.grad_outputs.items()}
        simulation = planned.simulation
        input_bytes = sum(graph[name].type.nbytes for name in feeds)
        metrics = Metrics(
            peak_bytes=run.peak_bytes, predicted_peak_bytes=simulation.peak_bytes,
            forward_seconds=run.forward_seconds, backward_seconds=run.backward_seconds,
            recompute_seconds=run.recompute_seconds, plan_seconds=planned.seconds,
            total_seconds=time.perf_counter() - start, nodes_computed=run.nodes_computed,
            recomputed_nodes=run.recomputed_nodes, flops=simulation.flops,
            recompute_flops=simulation.recompute_flops, policy=planned.policy,
            measured_peak_bytes=measured.peak + input_bytes if request.measure_memory else 0,
            queue_seconds=admitted.queue_seconds if admitted is not None else 0.0,
            planner=planned.schedule.report)
        warnings = _nonfinite("input", request.inputs) + _nonfinite("output", outputs) \
            + _nonfinite("gradient", grads)
        return RunResult(outputs, grads, metrics, tuple(warnings),
                         simulation.timeline if request.timeline else (), tuple(run.trace or ()))


def _check_response_bytes(graph: Graph, planned: Plan, limit: int) -> None:
    nodes = list(planned.fetch.values()) + [graph.outputs[out]
                                            for out in planned.joint.grad_outputs.values()]
    total = sum(graph[node].type.nbytes for node in nodes)
    if total > limit:
        raise ResponseTooLarge(
            f"the outputs and gradients total {total:,} bytes, more than one message of "
            f"{limit:,} can carry; use RunStream (remat.Client switches to it by itself)")


def _input_shapes(spec: GraphSpec, inputs: Mapping[str, np.ndarray]) -> dict:
    declared = {item.name for item in spec.inputs}
    extra = sorted(set(inputs) - declared)
    if extra:
        raise InvalidArgument(f"inputs: '{extra[0]}' is not an input of the graph")
    missing = [name for name in declared if name not in inputs]
    if missing:
        raise InvalidArgument(f"inputs: no tensor given for input '{missing[0]}'")
    return {name: tuple(array.shape) for name, array in inputs.items()}


def _check_inputs(graph: Graph, inputs: Mapping[str, np.ndarray]) -> None:
    for name, array in inputs.items():
        expected = graph[name].dtype
        if array.dtype != dtypes.NUMPY[expected]:
            raise InvalidArgument(f"inputs: '{name}' is declared {expected} but the tensor "
                                  f"is {array.dtype}")


def _cotangent_feeds(joint: JointGraph, cotangents: Mapping[str, np.ndarray]) -> dict:
    feeds = {}
    for out_name, input_name in joint.cotangent_inputs.items():  # names checked by autodiff
        array, node = cotangents[out_name], joint.graph[input_name]
        if array.shape != node.shape or array.dtype != dtypes.NUMPY[node.dtype]:
            raise InvalidArgument(f"cotangents: '{out_name}' must be {node.dtype}{list(node.shape)}"
                                  f" like its output, got {array.dtype}{list(array.shape)}")
        feeds[input_name] = array
    return feeds


def _nonfinite(kind: str, arrays: Mapping[str, np.ndarray]) -> list[str]:
    found = []
    for name, array in arrays.items():
        # A sum propagates NaN and infinities in one pass without allocating (isfinite
        # would make a bool array the size of a 1 GiB tensor); only when it is not
        # finite (or overflowed) are the bad values counted.
        if dtypes.is_float(array.dtype.name) and not _finite_sum(array):
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                found.append(f"{kind} '{name}' has {bad} NaN or Inf values")
    return found


def _finite_sum(array: np.ndarray) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(array.sum()))


def max_abs_diff(grads: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """The largest |a - b| over every element of every gradient (NaN where the
    reference has NaN counts as equal; a missing gradient or a shape change as inf)."""
    worst = 0.0
    for name, ref in reference.items():
        value = grads.get(name)
        if value is None or value.shape != ref.shape:
            return float("inf")
        if value.size == 0:
            continue
        a, b = value.astype(np.float64), ref.astype(np.float64)
        diff = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b))
        worst = max(worst, float(np.nan_to_num(diff, nan=np.inf).max()))
    return worst
