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


Policy = StoreAll | RecomputeAll | EveryK | Sqrt | Checkpoints | SaveOps | Revolve
PARAMETERLESS = {"store_all": StoreAll, "recompute_all": RecomputeAll, "sqrt": Sqrt}


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
    return {StoreAll: "store_all", RecomputeAll: "recompute_all", Sqrt: "sqrt"}[type(policy)]
