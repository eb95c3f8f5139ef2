"""Planners: each takes a Problem and its policy and returns a Schedule.

>>> from remat_proto.policies import Sqrt
>>> # schedule = plan(problem, Sqrt())
"""

from __future__ import annotations

from remat_proto.policies import (
    DTR,
    Auto,
    Budget,
    Checkpoints,
    EveryK,
    MinMemory,
    Optimal,
    Policy,
    RecomputeAll,
    Revolve,
    SaveOps,
    Sqrt,
    StoreAll,
)

from ..problem import Problem
from ..schedule import Schedule
from .auto import plan_auto
from .budget import plan_budget
from .dtr import plan_dtr
from .heuristics import plan_checkpoints, plan_every_k, plan_recompute_all, plan_save_ops, plan_sqrt
from .min_memory import plan_min_memory
from .optimal import plan_optimal
from .revolve import plan_revolve
from .store_all import plan_store_all

PLANNERS = {
    StoreAll: plan_store_all,
    RecomputeAll: plan_recompute_all,
    EveryK: plan_every_k,
    Sqrt: plan_sqrt,
    Checkpoints: plan_checkpoints,
    SaveOps: plan_save_ops,
    Revolve: plan_revolve,
    Budget: plan_budget,
    Optimal: plan_optimal,
    DTR: plan_dtr,
    Auto: plan_auto,
    MinMemory: plan_min_memory,
}


def plan(problem: Problem, policy: Policy) -> Schedule:
    return PLANNERS[type(policy)](problem, policy)
