"""The least memory any schedule needs (policy MinMemory, and the floor RESOURCE_EXHAUSTED
names): against a brute-force search over every schedule on tiny graphs (`brute_force`),
and the proven bound against what schedules reach."""

from __future__ import annotations

from dataclasses import replace

import brute_force
import numpy as np
import pytest
import support

import remat
from remat_proto.policies import Budget, MinMemory, RecomputeAll
from remat_server.checkpoint.planners import least_memory, plan
from remat_server.checkpoint.planners.bounds import simulated
from remat_server.checkpoint.problem import Problem
from remat_server.engine import Engine, RunRequest
from remat_server.errors import ResourceExhausted
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

ENGINE = Engine()


def _spec(g: remat.Graph):
    return graph_from_proto(g.to_proto(), Limits())


def wide() -> remat.Graph:
    """Two branches of different sizes joined at the end."""
    g = remat.Graph("wide")
    x = g.input("x", (2, 8), "float64")
    big = remat.tanh(remat.matmul(x, g.input("w", (8, 32), "float64"), name="up"), name="big")
    small = remat.tanh(x, name="small")
    g.output("loss", remat.sum(big, name="s1") + remat.sum(small, name="s2"))
    return g


GRAPHS = {  # name -> (spec, wrt)
    "chain3": (lambda: support.tanh_chain(3, 4, "float64", loss=True), ("x",)),
    "skip": (lambda: support.skip_chain(3), ("x",)),
    "wide": (lambda: _spec(wide()), ("x",)),
}


def problem(name: str) -> Problem:
    build, wrt = GRAPHS[name]
    planned = ENGINE.plan(build(), wrt=wrt, loss="loss")
    return Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_min_memory_reaches_the_brute_force_minimum_and_claims_no_more_than_it_proves(name):
    p = problem(name)
    minimum = brute_force.least_peak(p)
    schedule = plan(p, MinMemory(time_limit=30))
    assert simulated(p, schedule).peak_bytes == minimum
    assert schedule.report.budget_bytes == minimum
    # The bound never claims more than the truth, and the minimum is called proven
    # only where the bound meets it (the MILP's bound holds for its class only).
    bound = least_memory.peak_lower_bound(p)
    assert bound <= minimum
    proven = bound == minimum
    assert (schedule.report.status == "optimal") == proven, schedule.report.detail
    assert ("proven minimum" in schedule.report.detail) == proven


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_min_memory_recomputes_least_at_that_peak(name):
    p = problem(name)
    schedule = plan(p, MinMemory(time_limit=30))
    sim = simulated(p, schedule)
    cheapest = plan(p, Budget(bytes=sim.peak_bytes))  # Budget also runs the exact MILP here
    assert sim.recompute_flops <= simulated(p, cheapest).recompute_flops


def test_min_memory_goes_under_recompute_all():
    """recompute_all keeps every input live and each recomputed chain whole; the MILP's
    floor is lower on a CNN (so a refusal no longer names recompute_all's peak)."""
    model = remat.models.cnn()
    planned = ENGINE.plan(
        _spec(model.graph), wrt=tuple(model.wrt), loss=model.loss, policy="store_all"
    )
    p = Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)
    floor = simulated(p, plan(p, RecomputeAll())).peak_bytes
    schedule = plan(p, MinMemory(time_limit=5))
    peak = simulated(p, schedule).peak_bytes
    assert peak < floor
    assert least_memory.peak_lower_bound(p) <= peak


def test_min_memory_runs_with_gradients_bit_identical_to_store_all():
    model = remat.models.cnn()
    spec = _spec(model.graph)
    request = RunRequest(spec, model.inputs, wrt=tuple(model.wrt), loss=model.loss)
    expected = ENGINE.run(replace(request, policy="store_all"))
    result = ENGINE.run(replace(request, policy=MinMemory(time_limit=5)))
    assert result.metrics.peak_bytes < expected.metrics.peak_bytes
    for key, value in expected.grads.items():
        assert np.array_equal(result.grads[key], value), key


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_a_refused_budget_names_the_minimum_and_no_more_proof_than_it_has(name):
    p = problem(name)
    minimum = brute_force.least_peak(p)
    bound = least_memory.peak_lower_bound(p)
    with pytest.raises(ResourceExhausted) as info:
        plan(p, Budget(bytes=minimum - 1))
    message = str(info.value)
    if bound == minimum:
        assert f"the lowest peak any schedule reaches is {minimum:,} bytes" in message
        assert "proven minimum" in message
    else:
        assert f"the lowest peak found is {minimum:,} bytes" in message
        assert f"none can peak under {bound:,} bytes (proven bound)" in message
    # Just at the floor, a schedule fits.
    assert simulated(p, plan(p, Budget(bytes=minimum))).peak_bytes <= minimum


def test_a_refusal_over_the_exact_solvers_reach_names_the_floor_without_a_solve(monkeypatch):
    """Over REFUSAL_MAX_NODES a refusal names the lowest peak the heuristics find and the
    proven bound (equal here: on a chain, recompute_all with its loss recomputed last
    meets it), without running the exact solver."""

    def no_solve(*args, **kwargs):
        raise AssertionError("the exact solver ran for a refusal")

    monkeypatch.setattr(least_memory.milp, "least_memory", no_solve)
    spec = support.tanh_chain(60, 64, "float64", loss=True)
    planned = ENGINE.plan(spec, wrt=("x",), loss="loss")
    p = Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)
    assert least_memory.milp.size(p) > least_memory.REFUSAL_MAX_NODES
    recompute_all = simulated(p, plan(p, RecomputeAll())).peak_bytes
    with pytest.raises(ResourceExhausted) as info:
        plan(p, Budget(bytes=least_memory.peak_lower_bound(p) - 1))
    found = least_memory.floor(p, "test")
    assert found.describe() in str(info.value)
    assert found.bound <= found.peak < recompute_all
    assert found.proven and found.by == "recompute_all, results last"


def test_a_big_graph_under_its_proven_bound_is_refused_without_searching(monkeypatch):
    """On a graph over QUICK_REFUSAL_NODES, a budget under the proven bound is refused
    naming that bound, without the lowest-peak search (seconds on long chains); a
    budget over the bound, or a floor already known, still gets the floor."""
    monkeypatch.setattr(least_memory, "QUICK_REFUSAL_NODES", 10)
    spec = support.tanh_chain(60, 64, "float64", loss=True)
    planned = ENGINE.plan(spec, wrt=("x",), loss="loss")
    p = Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)
    bound = least_memory.peak_lower_bound(p)
    with pytest.raises(ResourceExhausted) as info:
        plan(p, Budget(bytes=bound - 1))
    assert f"no schedule can peak under {bound:,} bytes (proven bound)" in str(info.value)
    assert "floor" not in p.memo  # nothing searched
    found = least_memory.floor(p, "test")  # once known (min_memory), it is named
    with pytest.raises(ResourceExhausted) as info:
        plan(p, Budget(bytes=bound - 1))
    assert found.describe() in str(info.value)
