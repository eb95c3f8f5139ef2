"""Planners: each takes (joint graph, options) and returns a Schedule.

Only store-all exists so far; recomputing policies are added by name here.
"""
from __future__ import annotations

from ...errors import InvalidArgument
from .store_all import plan_store_all

PLANNERS = {"store_all": plan_store_all}


def get_planner(name: str):
    if name not in PLANNERS:
        raise InvalidArgument(f"policy '{name}' is not available on this server; "
                              f"known policies: {', '.join(sorted(PLANNERS))}")
    return PLANNERS[name]
