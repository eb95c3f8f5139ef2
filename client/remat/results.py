"""What calls return: plain NumPy arrays and frozen metric records. `Metrics`,
`PlannerReport` and `TraceEvent` are the server's own records (`remat_proto.results`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from remat_proto.results import Metrics, PlannerReport, TraceEvent

__all__ = [
    "AttrInfo",
    "Metrics",
    "OpInfo",
    "PlannerReport",
    "PlanResult",
    "RunResult",
    "TraceEvent",
]


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
    it (more than once: recomputation); `timeline` is the bytes in use at each step
    (live values, plus the temporaries of the op a step runs);
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
    plan_cached: bool = False  # the plan came from the server's compile cache


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
