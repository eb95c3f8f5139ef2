"""The engine: compile once (validate, differentiate, plan, simulate), then execute.
No gRPC in here.

Example:
    >>> import numpy as np
    >>> from remat_proto.spec import GraphSpec, InputSpec, NodeSpec
    >>> spec = GraphSpec("g", (InputSpec("x", (3,), "float64"),),
    ...                  (NodeSpec("y", "square", ("x",)), NodeSpec("s", "sum", ("y",))),
    ...                  (("loss", "s"),))
    >>> engine = Engine()
    >>> result = engine.run(RunRequest(spec, {"x": np.array([1.0, 2.0, 3.0])},
    ...                                wrt=("x",), loss="loss"))
    >>> result.outputs["loss"].item(), result.grads["x"].tolist()
    (14.0, [2.0, 4.0, 6.0])
    >>> again = engine.run(RunRequest(spec, {"x": np.ones(3)}, wrt=("x",), loss="loss"))
    >>> result.metrics.plan_cached, again.metrics.plan_cached
    (False, True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace

import numpy as np

from remat_proto import policies
from remat_proto.results import Metrics, TraceEvent, from_fields
from remat_proto.spec import GraphSpec

from ..autodiff import JointGraph
from ..checkpoint import control
from ..checkpoint.memory import MemoryModel
from ..checkpoint.schedule import Schedule
from ..checkpoint.simulate import Simulation
from ..errors import InvalidArgument, ResourceExhausted, ResponseTooLarge
from ..graph.limits import Limits
from ..graph.validate import validate_shapeless
from ..runtime import measure
from . import gc_pause
from .cache import LRUCache
from .checks import cotangent_feeds, input_shapes, nonfinite_warnings
from .compile import Compiled, CompileKey, Planned, Validated, compile_request, validate

DEFAULT_CACHE_BYTES = 256 << 20


# Plain slotted dataclasses, immutable by convention: every request builds one of each,
# and a frozen dataclass's __init__ costs a setattr call per field.
@dataclass(slots=True)
class RunRequest:
    graph: GraphSpec
    inputs: Mapping[str, np.ndarray]
    fetch: tuple[str, ...] = ()
    wrt: tuple[str, ...] = ()
    loss: str = ""
    cotangents: Mapping[str, np.ndarray] = field(default_factory=dict)
    # A policy object, or the name of a parameterless one ("store_all", "sqrt", ...).
    policy: policies.Policy | str = "auto"  # store_all when it fits the request limit
    timeline: bool = False  # return the bytes in use at every schedule step
    measure_memory: bool = False  # also measure the real peak with tracemalloc
    trace: bool = False  # return every executed step with its timing
    # The graph's content id, when the caller knows it: the compile cache's key. Without
    # it the spec object itself is the key (the same object compiles once).
    graph_id: str = ""


@dataclass(slots=True)
class RunResult:
    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    metrics: Metrics
    warnings: tuple[str, ...] = ()
    timeline: tuple[int, ...] = ()
    trace: tuple[TraceEvent, ...] = ()


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
    cached: bool = False  # the plan came from the compile cache


class Engine:
    """`memory_budget_bytes` is the server's budget for all requests at once (0: none);
    no single request may plan above it or above `limits.max_request_bytes`.
    `cache_bytes` bounds the compiled requests kept (`LRUCache`; 0 keeps none).
    `solve_slots`, when given, is a limiter (`reserve(1, timeout=, cancelled=)`) that
    exact solves and Budget searches hold while they plan, so that only so many run at
    once; a request waits for one until its deadline. Its `lent()`, if any, is entered
    while a request waits for another's plan."""

    def __init__(
        self,
        limits: Limits | None = None,
        memory_budget_bytes: int = 0,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        solve_slots=None,
    ):
        self.limits = limits or Limits()
        self.memory_budget_bytes = memory_budget_bytes
        self.cache = LRUCache(cache_bytes)
        self.solve_slots = solve_slots
        self._auto = policies.Auto(self.request_limit)  # what plain `auto` means here

    @property
    def request_limit(self) -> int:
        """The most one request may use: the per-request limit, or the server's
        budget for all requests when that is smaller."""
        limit = self.limits.max_request_bytes
        return min(limit, self.memory_budget_bytes) if self.memory_budget_bytes > 0 else limit

    def with_server_defaults(self, policy: policies.Policy | str) -> policies.Policy:
        """Resolve names, and fill what a policy leaves to the server (0 means default)."""
        if isinstance(policy, str):
            try:
                policy = policies.resolve(policy)
            except ValueError as error:
                raise InvalidArgument(str(error)) from None
        if isinstance(policy, policies.Auto) and not policy.bytes:
            if self._auto.bytes != self.request_limit:
                self._auto = policies.Auto(self.request_limit)
            return self._auto
        if isinstance(policy, (policies.Optimal, policies.MinMemory)):  # the most it grants too
            limit = self.limits.optimal_time_limit
            asked = policy.time_limit or limit
            return replace(policy, time_limit=min(limit, asked))
        return policy

    def _control(
        self, should_stop: Callable[[], bool] | None, deadline: float | None
    ) -> control.PlanControl:
        """What planners may ask of the request: its end, and a solve slot."""
        stop = should_stop or _never
        exclusive = idle = None
        if self.solve_slots is not None:
            slots = self.solve_slots

            def exclusive():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                return slots.reserve(1, timeout=left, cancelled=stop)

            idle = getattr(slots, "lent", None)
        return control.PlanControl(deadline, stop, exclusive, idle)

    # --- compiling -----------------------------------------------------------------------
    def _graph_key(
        self, spec: GraphSpec, graph_id: str, given: Mapping[str, tuple[int, ...]]
    ) -> tuple:
        """The graph and its input shapes: what a validated graph is cached under."""
        if given:
            declared = {item.name for item in spec.inputs}
            unknown = sorted(set(given) - declared)
            if unknown:
                raise InvalidArgument(f"input_shapes: '{unknown[0]}' is not an input of the graph")
            shapes = tuple(tuple(given.get(i.name, i.shape)) for i in spec.inputs)
        else:
            shapes = tuple(i.shape for i in spec.inputs)
        return ("validated", graph_id or ("object", id(spec)), shapes)

    def _validated(
        self, key: tuple, spec: GraphSpec, given: Mapping[str, tuple[int, ...]]
    ) -> Validated:
        validated, _ = self.cache.get_or_build(
            key, lambda: gc_pause.call(len(spec.nodes), validate, spec, self.limits, given)
        )
        if validated.spec is not spec and key[1][0] == "object":  # impossible while held
            raise AssertionError("compile cache: a spec's id was reused")
        return validated

    def compile(
        self,
        spec: GraphSpec,
        *,
        graph_id: str = "",
        input_shapes: Mapping[str, tuple[int, ...]] | None = None,
        wrt: tuple[str, ...] = (),
        loss: str = "",
        cotangents: tuple[str, ...] | None = (),
        fetch: tuple[str, ...] = (),
    ) -> tuple[Compiled, bool]:
        """The compiled request, from the cache when it holds one: (compiled, hit).
        `cotangents=None` seeds every float output (Differentiate without a loss).
        A repeated request costs one lookup; the validated graph (shared by every
        compile of the graph at these shapes) is looked up only to compile."""
        start = time.perf_counter()
        given = input_shapes or {}
        key = self._key(spec, graph_id, given, wrt, loss, cotangents, fetch)

        def build() -> Compiled:
            validated = self._validated(key.graph, spec, given)
            return gc_pause.call(
                len(spec.nodes), compile_request, key, spec, self.limits, validated.graph, start
            )

        return self.cache.get_or_build(key, build)

    def _key(
        self,
        spec: GraphSpec,
        graph_id: str,
        given: Mapping[str, tuple[int, ...]],
        wrt,
        loss: str,
        cotangents,
        fetch,
    ) -> CompileKey:
        return CompileKey(
            self._graph_key(spec, graph_id, given),
            tuple(wrt),
            loss,
            None if cotangents is None else tuple(cotangents),
            tuple(fetch),
        )

    def validate(self, spec: GraphSpec, graph_id: str = "") -> None:
        """Check a graph as registering does: fully when every input shape is static
        (the validated graph is cached for its first run); with a -1 batch dimension,
        what does not depend on it (names, edges, cycles, ops)."""
        if any(i.shape and i.shape[0] == -1 for i in spec.inputs):
            validate_shapeless(spec, self.limits)
            return
        self._validated(self._graph_key(spec, graph_id, {}), spec, {})

    def _planned(
        self,
        compiled: Compiled,
        policy: policies.Policy,
        feeds: Mapping[str, np.ndarray] | None = None,
        plan_control: control.PlanControl | None = None,
    ) -> tuple[Planned, bool]:
        try:
            with control.controlled(plan_control or control.PlanControl()):
                planned, hit = compiled.plan(policy, feeds)
        except ResourceExhausted:  # refused, but its least-memory schedule is kept
            self.cache.resize(compiled.key)
            raise
        if not hit:
            self.cache.resize(compiled.key)  # it holds one more plan
        self._check_limit(planned)
        return planned, hit

    @staticmethod
    def _check_response(compiled: Compiled, max_response_bytes: int) -> None:
        if max_response_bytes and compiled.result_bytes > max_response_bytes:
            raise ResponseTooLarge(
                f"the outputs and gradients total {compiled.result_bytes:,} bytes, more "
                f"than one message of {max_response_bytes:,} can carry; use RunStream "
                "(remat.Client switches to it by itself)"
            )

    def _check_limit(self, planned: Planned) -> None:
        if planned.simulation.peak_bytes > self.request_limit:
            raise ResourceExhausted(
                f"the plan's predicted peak is {planned.simulation.peak_bytes:,} bytes, over "
                f"the per-request limit of {self.request_limit:,} (server flags "
                "--max-request-bytes, --memory-budget-bytes); try policy auto or a budget, "
                "or a smaller batch"
            )

    # --- the calls -------------------------------------------------------------------------
    def differentiate(
        self,
        spec: GraphSpec,
        wrt: tuple[str, ...],
        loss: str = "",
        input_shapes: Mapping[str, tuple[int, ...]] | None = None,
        graph_id: str = "",
    ) -> JointGraph:
        """The joint graph; without `loss`, every float output gets a cotangent input."""
        compiled, _ = self.compile(
            spec,
            graph_id=graph_id,
            input_shapes=input_shapes,
            wrt=wrt,
            loss=loss,
            cotangents=None if not loss else (),
        )
        return compiled.joint

    def plan(
        self,
        spec: GraphSpec,
        wrt: tuple[str, ...] = (),
        loss: str = "",
        cotangent_outputs: tuple[str, ...] = (),
        policy: policies.Policy | str = "auto",
        input_shapes: Mapping[str, tuple[int, ...]] | None = None,
        fetch: tuple[str, ...] = (),
        graph_id: str = "",
        should_stop: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> Plan:
        """Dry run: plan and simulate without any tensor (shapes come from the graph, or
        `input_shapes` for -1 batch dimensions). Planning stops once `should_stop()` or
        past `deadline` (time.monotonic())."""
        start = time.perf_counter()
        policy = self.with_server_defaults(policy)
        compiled, hit = self.compile(
            spec,
            graph_id=graph_id,
            input_shapes=input_shapes,
            wrt=wrt,
            loss=loss,
            cotangents=cotangent_outputs,
            fetch=fetch,
        )
        planned, plan_hit = self._planned(
            compiled, policy, plan_control=self._control(should_stop, deadline)
        )
        return Plan(
            compiled.joint,
            planned.schedule,
            planned.simulation,
            compiled.problem.model,
            compiled.fetch,
            planned.label,
            time.perf_counter() - start,
            hit and plan_hit,
        )

    def run(
        self,
        request: RunRequest,
        should_stop: Callable[[], bool] | None = None,
        admit: Callable[[int], AbstractContextManager] | None = None,
        max_response_bytes: int = 0,
        deadline: float | None = None,
    ) -> RunResult:
        """Compile (or find compiled), plan (or find planned) and execute; planning and
        execution stop once `should_stop()`, planning also past `deadline`
        (time.monotonic()).
        `admit(predicted_peak_bytes)`, when given, returns a context manager entered
        before execution (memory admission) that yields an object with
        `queue_seconds`, or None to run at once. With `max_response_bytes`,
        outputs and gradients that would total more are refused (ResponseTooLarge)
        before anything is planned or run."""
        start = time.perf_counter()
        spec = request.graph
        shapes = input_shapes(spec, request.inputs)
        policy = self.with_server_defaults(request.policy)
        # What `_key` computes, built directly: the request's shapes are the inputs'
        # (checked above), so this one lookup is all a repeated request pays to compile.
        key = CompileKey(
            ("validated", request.graph_id or ("object", id(spec)), tuple(shapes.values())),
            tuple(request.wrt),
            request.loss,
            tuple(request.cotangents),
            tuple(request.fetch),
        )
        compiled = self.cache.get(key)
        planned = compiled.cached(policy) if compiled is not None else None
        hit = plan_hit = planned is not None
        if planned is None:  # compile and plan, under one pause of the collector
            with gc_pause.paused(len(spec.nodes)):
                compiled, hit = self.compile(
                    spec,
                    graph_id=request.graph_id,
                    input_shapes=shapes,
                    wrt=request.wrt,
                    loss=request.loss,
                    cotangents=tuple(request.cotangents),
                    fetch=request.fetch,
                )
                self._check_response(compiled, max_response_bytes)
                planned, plan_hit = self._planned(
                    compiled, policy, request.inputs, self._control(should_stop, deadline)
                )
        else:
            self._check_response(compiled, max_response_bytes)
            self._check_limit(planned)
        joint = compiled.joint
        feeds = request.inputs  # the executor copies its feeds into its own values
        if request.cotangents:
            feeds = {**feeds, **cotangent_feeds(joint, request.cotangents)}
        plan_seconds = time.perf_counter() - start
        simulation = planned.simulation
        admission = (admit(simulation.peak_bytes) if admit else None) or _NOT_ADMITTED
        with admission as admitted:
            if request.measure_memory:
                with measure.peak_memory(True) as measured:
                    run = planned.program.run(feeds, should_stop, request.trace)
            else:
                run = planned.program.run(feeds, should_stop, request.trace)
        graph = compiled.graph
        outputs = {name: run.values[node] for name, node in compiled.fetch.items()}
        grads = {w: run.values[graph.outputs[out]] for w, out in joint.grad_outputs.items()}
        metrics = from_fields(
            Metrics,
            {
                "peak_bytes": run.peak_bytes,
                "predicted_peak_bytes": simulation.peak_bytes,
                "forward_seconds": run.forward_seconds,
                "backward_seconds": run.backward_seconds,
                "recompute_seconds": run.recompute_seconds,
                "plan_seconds": plan_seconds,
                "total_seconds": time.perf_counter() - start,
                "nodes_computed": run.nodes_computed,
                "recomputed_nodes": run.recomputed_nodes,
                "flops": simulation.flops,
                "recompute_flops": simulation.recompute_flops,
                "policy": planned.label,
                "measured_peak_bytes": (
                    measured.peak + sum(array.nbytes for array in feeds.values())
                    if request.measure_memory
                    else 0
                ),
                "queue_seconds": admitted.queue_seconds,
                "planner": planned.schedule.report,
                "plan_cached": hit and plan_hit,
            },
        )
        warnings = nonfinite_warnings(input=request.inputs, output=outputs, gradient=grads)
        return RunResult(
            outputs,
            grads,
            metrics,
            warnings,
            simulation.timeline if request.timeline else (),
            tuple(run.trace or ()),
        )


def _never() -> bool:
    return False


class _NotAdmitted:
    """The admission of a request the caller does not meter: no wait."""

    queue_seconds = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NOT_ADMITTED = _NotAdmitted()
