"""The fixed checkpoint heuristics: each picks which forward values to keep and lets
`recompute.schedule_with_checkpoints` do the rest."""

from __future__ import annotations

import math

from remat_proto.policies import Checkpoints, EveryK, SaveOps, label

from ...errors import InvalidArgument
from ...ops import registry
from ..problem import Problem
from ..recompute import schedule_with_checkpoints
from ..schedule import Schedule


def plan_recompute_all(problem: Problem, policy) -> Schedule:
    return schedule_with_checkpoints(problem, frozenset(), "recompute_all", mode="drop")


def every_k_kept(problem: Problem, k: int) -> frozenset[str]:
    """The checkpoints every_k(k) keeps: every k-th candidate."""
    return frozenset(problem.candidates[k - 1 :: k])


def sqrt_k(problem: Problem) -> int:
    return max(1, round(math.sqrt(len(problem.candidates))))


def plan_every_k(problem: Problem, policy: EveryK) -> Schedule:
    return schedule_with_checkpoints(
        problem, every_k_kept(problem, policy.k), f"every_k({policy.k})"
    )


def plan_sqrt(problem: Problem, policy) -> Schedule:
    return schedule_with_checkpoints(problem, every_k_kept(problem, sqrt_k(problem)), "sqrt")


def plan_checkpoints(problem: Problem, policy: Checkpoints) -> Schedule:
    for name in policy.names:
        if name not in problem.graph or not (
            problem.is_forward(name) or problem.graph[name].is_input
        ):
            raise InvalidArgument(
                f"policy checkpoints: '{name}' is not a node of the forward graph"
            )
    return schedule_with_checkpoints(problem, frozenset(policy.names), label(policy))


def plan_save_ops(problem: Problem, policy: SaveOps) -> Schedule:
    unknown = [op for op in policy.ops if registry.get(op) is None]
    if unknown:
        raise InvalidArgument(f"policy save_ops: unknown op '{unknown[0]}'")
    kept = save_ops_kept(problem, policy.ops)
    return schedule_with_checkpoints(problem, kept, f"save_ops({','.join(policy.ops)})")


# Op kinds save_ops counts as another's: a linear layer is a matrix product with its
# bias added in place, so save_ops(matmul) keeps linear layers as it did when the
# importers wrote them as matmul then add.
SAVED_WITH = {"matmul": ("linear",)}


def save_ops_kept(problem: Problem, ops) -> frozenset[str]:
    """The checkpoints save_ops(ops) keeps: every forward node of those ops (and of the
    kinds `SAVED_WITH` them)."""
    ops = set(ops).union(*(SAVED_WITH.get(op, ()) for op in ops))
    return frozenset(n for n in problem.forward_order if problem.graph[n].op in ops)
