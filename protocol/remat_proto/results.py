"""What a run reports, the same records on the server and in the SDK: `Metrics`, the
budgeted planners' `PlannerReport`, and one `TraceEvent` per executed step."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

_Record = TypeVar("_Record")


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


def from_fields(cls: type[_Record], values: dict[str, Any]) -> _Record:
    """`cls(**values)` for a frozen dataclass such as `Metrics`, `PlannerReport` or the
    SDK's RunResult, at a quarter of the cost: every response builds and decodes them,
    and a frozen dataclass's __init__ sets each field through object.__setattr__.
    `values` holds only field names (decoders and the engine pass known ones) and every
    field without a default; the rest take their defaults.

        >>> from_fields(Metrics, {"peak_bytes": 8}) == Metrics(peak_bytes=8)
        True
    """
    record = object.__new__(cls)
    fields = record.__dict__
    defaults, count = _defaults(cls)
    fields.update(defaults)
    fields.update(values)
    if len(fields) != count:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in fields]
        raise TypeError(f"from_fields: {cls.__name__} needs {', '.join(missing)}")
    return record


@functools.cache
def _defaults(cls: type) -> tuple[dict[str, Any], int]:
    """The plain defaults of `cls`'s fields, and how many fields it has."""
    fields = dataclasses.fields(cls)
    if any(f.default_factory is not dataclasses.MISSING for f in fields):
        raise TypeError(f"from_fields: {cls.__name__} has a default factory")
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    return defaults, len(fields)
