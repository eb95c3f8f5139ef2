"""Auto, the default policy: store_all when it fits the request's memory limit, else
the cheapest plan that fits (the budget planner's search), else RESOURCE_EXHAUSTED
before anything is allocated, naming the least memory a schedule needs
(`least_memory.floor`).

The engine fills `Auto.bytes == 0` with the server's per-request limit, so a plain
request never plans over what the server would admit.

    >>> from remat_proto.policies import Auto
    >>> Auto(bytes=1 << 30)
    Auto(bytes=1073741824)
"""

from __future__ import annotations

from dataclasses import replace

from remat_proto.policies import Auto, label

from ..problem import Problem
from ..schedule import Schedule
from .budget import search
from .store_all import plan_store_all


def plan_auto(problem: Problem, policy: Auto) -> Schedule:
    if policy.bytes <= 0:  # no limit at all: nothing to plan around
        return plan_store_all(problem)
    schedule = search(
        problem,
        policy.bytes,
        label(policy),
        why="the request's memory limit; the server's is --max-request-bytes",
    )
    # A run that is plain store_all is reported as such; otherwise as "auto".
    return replace(
        schedule, policy="store_all" if schedule.report.chosen == "store_all" else "auto"
    )
