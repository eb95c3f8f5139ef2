"""What calls return: plain NumPy arrays and frozen metric records."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PlannerReport:
    """What a budgeted policy (budget, optimal, dtr, auto) decided: the byte limit it
    planned under, a status ("optimal", "feasible", "time_limit", "fallback",
    "store_all_fits"), the MILP's optimality gap, the planning seconds, the label of
    the plan that won (`chosen`) and why, in words (`detail`)."""

    budget_bytes: int = 0
    status: str = ""
    optimality_gap: float = 0.0
    solve_seconds: float = 0.0
    detail: str = ""
    chosen: str = ""


@dataclass(frozen=True)
class TraceEvent:
    """One executed schedule step: `phase` is "forward", "recompute", "backward" or
    "free"; times in seconds from the start of execution; `live_bytes` after it."""

    node: str
    op: str
    phase: str
    start_seconds: float
    seconds: float
    live_bytes: int


@dataclass(frozen=True)
class Metrics:
    """What a run cost. Bytes are accounted live bytes; seconds are wall time."""

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
    # tracemalloc's peak during execution plus the input bytes; 0 unless the run
    # asked for `measure_memory=True`.
    measured_peak_bytes: int = 0
    # The policy that planned the run, e.g. "every_k(4)".
    policy: str = ""
    # Time the request waited for the server to admit it (memory admission).
    queue_seconds: float = 0.0
    # For budgeted policies: what the planner decided (None for the others).
    planner: PlannerReport | None = None


@dataclass(frozen=True)
class RunResult:
    """`outputs[name]` and `grads[input]` are NumPy arrays; `timeline` holds the live
    bytes after every schedule step (empty unless the run asked for `timeline=True`);
    `trace` the executed steps with their timings (`trace=True`). A sharded run
    (`shards=N`) has each shard's metrics in `shards`, and their summary in `metrics`
    (see `remat.sharding.combined_metrics`)."""

    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    metrics: Metrics
    warnings: tuple[str, ...] = field(default=())
    timeline: tuple[int, ...] = field(default=())
    trace: tuple[TraceEvent, ...] = field(default=())
    shards: tuple[Metrics, ...] = field(default=())


@dataclass(frozen=True)
class PlanResult:
    """A dry run's figures: what a Run under `policy` would cost, from the simulator.

    `node_evaluations` maps each computed node to how many times the schedule computes
    it (more than once: recomputation); `timeline` is the live bytes after each step;
    `schedule` is the steps themselves, ("compute" | "free", node) pairs, when the plan
    asked for `include_schedule=True`. `input_bytes` are live for the whole run and
    included in `peak_bytes`.
    """

    peak_bytes: int
    flops: int
    recompute_flops: int
    node_evaluations: dict[str, int]
    timeline: tuple[int, ...]
    schedule: tuple[tuple[str, str], ...]
    policy: str
    recomputed_nodes: int
    plan_seconds: float
    input_bytes: int
    planner: PlannerReport | None = None


@dataclass(frozen=True)
class AttrInfo:
    name: str
    type: str
    required: bool
    doc: str = ""


@dataclass(frozen=True)
class OpInfo:
    name: str
    family: str
    min_inputs: int
    max_inputs: int  # -1: variadic
    attrs: tuple[AttrInfo, ...]
    differentiable: tuple[bool, ...]
    residuals: str
    doc: str = ""
