"""Checkpoint policies as small frozen values (JAX ad_checkpoint style), one namespace.

Each names its planner; `planners.plan(problem, policy)` dispatches on the type.

    >>> EveryK(4)
    EveryK(k=4)
    >>> by_name("sqrt")
    Sqrt()
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument


@dataclass(frozen=True)
class StoreAll:
    """Keep every forward value the backward pass reads."""


@dataclass(frozen=True)
class RecomputeAll:
    """Keep only graph inputs; recompute every forward value whenever it is read."""


@dataclass(frozen=True)
class EveryK:
    """Keep every k-th segment boundary along the forward order."""
    k: int


@dataclass(frozen=True)
class Sqrt:
    """Chen et al. 2016: about sqrt(n) segments of about sqrt(n) boundaries each."""


@dataclass(frozen=True)
class Checkpoints:
    """Keep exactly the named nodes (plus inputs); recompute the rest."""
    names: tuple[str, ...]


@dataclass(frozen=True)
class SaveOps:
    """Keep the outputs of the listed op kinds (e.g. matmul, conv2d); recompute the rest."""
    ops: tuple[str, ...]


@dataclass(frozen=True)
class Revolve:
    """Griewank-Walther binomial checkpointing with `slots` snapshots (the initial
    state included) over the chain of segments."""
    slots: int


@dataclass(frozen=True)
class Budget:
    """Least recomputation with peak <= `bytes` (or `fraction` of store_all's peak;
    exactly one is set). `profile` prices recomputation by measured op times."""
    bytes: int = 0
    fraction: float = 0.0
    profile: bool = False


@dataclass(frozen=True)
class Optimal:
    """Checkmate's MILP under the same kind of budget, solved within `time_limit`
    seconds (0: the server's default)."""
    bytes: int = 0
    fraction: float = 0.0
    time_limit: float = 0.0
    max_nodes: int = 0  # the server's limit on joint-graph nodes for the MILP (0: default)


@dataclass(frozen=True)
class DTR:
    """Dynamic Tensor Rematerialization under a budget, simulated at plan time."""
    bytes: int = 0
    fraction: float = 0.0


@dataclass(frozen=True)
class Auto:
    """Store-all when it fits `bytes` (0: the server's per-request limit), else the
    cheapest plan that fits."""
    bytes: int = 0


Policy = (StoreAll | RecomputeAll | EveryK | Sqrt | Checkpoints | SaveOps | Revolve | Budget
          | Optimal | DTR | Auto)
PARAMETERLESS = {"store_all": StoreAll, "recompute_all": RecomputeAll, "sqrt": Sqrt,
                 "auto": Auto}
BUDGETED = (Budget, Optimal, DTR)


def budget_label(bytes_: int, fraction: float) -> str:
    if fraction:
        return f"{fraction:g}"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if bytes_ >= scale:
            return f"{bytes_ / scale:.4g}{unit}"
    return f"{bytes_}B"


def check_budget(kind: str, bytes_: int, fraction: float) -> None:
    """Exactly one of bytes > 0 and 0 < fraction <= 1 (the server-side check)."""
    if bool(bytes_) == bool(fraction):
        raise InvalidArgument(f"policy {kind}: give exactly one of bytes and fraction")
    if bytes_ < 0:
        raise InvalidArgument(f"policy {kind}: bytes must be > 0, got {bytes_}")
    if fraction and not 0.0 < fraction <= 1.0:
        raise InvalidArgument(f"policy {kind}: fraction must be in (0, 1], got {fraction}")


def by_name(name: str) -> Policy:
    if name not in PARAMETERLESS:
        raise InvalidArgument(f"policy '{name}' is unknown; by name: "
                              f"{', '.join(PARAMETERLESS)} (others take parameters)")
    return PARAMETERLESS[name]()


def label(policy: Policy) -> str:
    """A short, stable name for metrics and tables: "every_k(4)", "revolve(3)"."""
    match policy:
        case EveryK(k):
            return f"every_k({k})"
        case Revolve(slots):
            return f"revolve({slots})"
        case Checkpoints(names):
            return f"checkpoints({','.join(names)})"
        case SaveOps(ops):
            return f"save_ops({','.join(ops)})"
        case Budget(bytes_, fraction, profile):
            return f"budget({budget_label(bytes_, fraction)}{',profile' if profile else ''})"
        case Optimal(bytes_, fraction, _, _):
            return f"optimal({budget_label(bytes_, fraction)})"
        case DTR(bytes_, fraction):
            return f"dtr({budget_label(bytes_, fraction)})"
        case Auto(bytes_):
            return f"auto({budget_label(bytes_, 0.0)})" if bytes_ else "auto"
    return {StoreAll: "store_all", RecomputeAll: "recompute_all", Sqrt: "sqrt"}[type(policy)]
