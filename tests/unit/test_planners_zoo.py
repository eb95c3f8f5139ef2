"""Every planner on every zoo model (issue 14): each schedule passes the simulator, stays
within its budget (the engine refuses a plan over it), and gives gradients bit-identical
to store_all's. A budget no schedule meets is refused with RESOURCE_EXHAUSTED naming
the floor or the proven bound, never a wrong plan."""

from __future__ import annotations

import numpy as np
import pytest

from remat_proto import policies as P
from remat_server.checkpoint.planners.moment_bound import recompute_lower_bound
from remat_server.checkpoint.problem import Problem
from remat_server.engine import Engine, RunRequest
from remat_server.errors import ResourceExhausted
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

torch = pytest.importorskip("torch")
zoo = pytest.importorskip("zoo")
from zoo_loss import remat_workload  # noqa: E402  (after the torch skip)

BATCH = 64  # activations outweigh the parameters: the budgets need recomputation
POLICIES = [
    P.Sqrt(),
    P.EveryK(2),
    P.Revolve(2),
    P.RecomputeAll(),
    P.DTR(fraction=0.6),
    P.Budget(fraction=0.7),
    P.Budget(fraction=0.5),
    P.Budget(fraction=0.3),
    P.Optimal(fraction=0.7, time_limit=1.0),  # the MILP briefly, else the fallback
    P.MinMemory(time_limit=1.0),
]
ENGINE = Engine()


@pytest.fixture(scope="module", params=list(zoo.MODELS))
def workload(request):
    graph, feeds, wrt = remat_workload(request.param, BATCH)
    spec = graph_from_proto(graph.to_proto(), Limits())
    wrt = tuple(wrt)
    reference = ENGINE.run(RunRequest(spec, feeds, wrt=wrt, loss="loss", policy="store_all"))
    return spec, feeds, wrt, reference


@pytest.mark.parametrize("policy", POLICIES, ids=P.label)
def test_every_planner_is_valid_within_budget_and_bit_identical(workload, policy):
    spec, feeds, wrt, reference = workload
    try:
        result = ENGINE.run(RunRequest(spec, feeds, wrt=wrt, loss="loss", policy=policy))
    except ResourceExhausted as refused:
        assert isinstance(policy, (P.Budget, P.DTR, P.Optimal)), refused
        assert "proven bound" in str(refused) or "lowest peak" in str(refused)
        return
    metrics = result.metrics
    # A real schedule (activations dominate at BATCH): it evaluates some node again. (On
    # the U-Net at 70% only copies are, for free, in the memory-aware backward order.)
    assert metrics.recomputed_nodes > 0
    report = metrics.planner
    if report is not None and report.budget_bytes:
        assert metrics.predicted_peak_bytes <= report.budget_bytes
        # No schedule within a limit recomputes less than the moment bound.
        planned = ENGINE.plan(spec, wrt=wrt, loss="loss", policy=policy)
        joint = planned.joint
        problem = Problem(joint.graph, planned.schedule.results, joint.forward_nodes)
        bound = recompute_lower_bound(problem, report.budget_bytes, seconds=3.0).cost
        assert metrics.recompute_flops >= bound, (spec.name, P.label(policy), bound)
    assert metrics.peak_bytes == metrics.predicted_peak_bytes  # the executor's accounting
    for name, grad in reference.grads.items():
        assert np.array_equal(result.grads[name], grad), (spec.name, P.label(policy), name)
