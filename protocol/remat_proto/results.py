"""What a run reports, the same records on the server and in the SDK: `Metrics`, the
budgeted planners' `PlannerReport`, and one `TraceEvent` per executed step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


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


class TraceEvent(NamedTuple):
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
    # Compiling (validation, autodiff, planning, simulation), or looking the compiled
    # plan up when `plan_cached`.
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
    # The plan came from the server's compile cache (a repeated request).
    plan_cached: bool = False
