"""What calls return: plain NumPy arrays and frozen metric records."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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


@dataclass(frozen=True)
class RunResult:
    """`outputs[name]` and `grads[input]` are NumPy arrays."""

    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    metrics: Metrics
    warnings: tuple[str, ...] = field(default=())


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
