"""Size limits a graph must respect, checked before anything is allocated.

Python integers do not overflow, so `math.prod` of client-sent dimensions is exact;
we still compare each factor first so a hostile shape costs no big-number work.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument


@dataclass(frozen=True)
class Limits:
    max_nodes: int = 100_000
    max_edges: int = 1_000_000
    max_rank: int = 8
    max_dim: int = 1 << 31
    max_elements: int = 1 << 28  # 1 GiB of float32 per tensor
    # Peak bytes the plan of one request may reach (RESOURCE_EXHAUSTED beyond).
    max_request_bytes: int = 4 << 30
    # The exact MILP planner: joint-graph size it accepts, and its default time limit.
    optimal_max_nodes: int = 300
    optimal_time_limit: float = 60.0


def check_shape(shape: tuple[int, ...], limits: Limits, what: str) -> None:
    """Raise InvalidArgument if `shape` is negative or over a limit; `what` names it."""
    if len(shape) > limits.max_rank:
        raise InvalidArgument(
            f"{what}: rank {len(shape)} exceeds the limit of {limits.max_rank} "
            "(server flag --max-rank)"
        )
    elements = 1
    for dim in shape:
        if dim < 0:
            raise InvalidArgument(f"{what}: dimension {dim} in shape {shape} is negative")
        if dim > limits.max_dim:
            raise InvalidArgument(
                f"{what}: dimension {dim} exceeds the limit of {limits.max_dim} "
                "(server flag --max-dim)"
            )
        elements *= dim
        if elements > limits.max_elements:
            raise InvalidArgument(
                f"{what}: shape {tuple(shape)} has more than {limits.max_elements} elements, "
                "the per-tensor limit (server flag --max-elements)"
            )
