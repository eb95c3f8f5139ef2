"""The schedule: the universal currency between planners and runners.

A flat list of steps, like Checkmate's instruction list. `Compute(node)` needs all of
the node's inputs live and makes its value live; `Free(node)` drops a value. Graph
inputs are live when a schedule starts. A forward node may be computed more than
once: that is recomputation.

Example:
    >>> steps = (Compute("h"), Compute("y"), Free("h"))
    >>> [type(s).__name__ for s in steps]
    ['Compute', 'Compute', 'Free']
"""

from __future__ import annotations

from dataclasses import dataclass

from remat_proto.results import PlannerReport


# Steps are immutable by convention (hashable, never assigned to): `frozen=True` would
# double the cost of making one, and planners make millions.
@dataclass(slots=True, unsafe_hash=True)
class Compute:
    node: str


@dataclass(slots=True, unsafe_hash=True)
class Free:
    node: str


Step = Compute | Free


@dataclass(frozen=True)
class Schedule:
    steps: tuple[Step, ...]
    # Values that must be live when the schedule ends (the requested outputs).
    results: frozenset[str]
    policy: str = "store_all"
    report: PlannerReport | None = None
