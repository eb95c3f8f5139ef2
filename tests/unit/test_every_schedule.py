"""The planners and the proven bounds against a search over every schedule
(`brute_force`) on tiny graphs, at budgets from store_all's peak down to under the
least any schedule needs.

- Where a schedule fits, Budget and Optimal each return one that fits, recomputing no
  less than the search's optimum (whose schedule the simulator replays at its cost).
  Optimal finds the optimum: on these graphs one of its MILP's two classes
  (`milp_classes`) holds it. Budget recomputes at most 10% more.
- Where none fits, both refuse it (RESOURCE_EXHAUSTED).
- The moment bound, and the bound over a chain of moments, never exceed the optimum;
  on chains the chain's bound reaches it where one moment's does not.
- The moment search's schedules fit and, where its program proves a bound, the bound
  is under the optimum; on most cases it finds the optimum.
"""

from __future__ import annotations

import functools

import brute_force
import pytest
import support

import remat
from remat_proto.policies import Budget, Optimal
from remat_server.checkpoint.planners import plan
from remat_server.checkpoint.planners.bounds import simulated, store_all_peak
from remat_server.checkpoint.planners.moment_bound import recompute_lower_bound
from remat_server.checkpoint.planners.moment_chain import chain_lower_bound
from remat_server.checkpoint.planners.moment_schedule import moment_schedule
from remat_server.checkpoint.problem import Problem
from remat_server.engine import Engine
from remat_server.errors import ResourceExhausted
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

ENGINE = Engine()


def residual() -> remat.Graph:
    """A residual block: d = tanh(tanh(tanh(x)) + x), and a skip from its first value."""
    g = remat.Graph("residual")
    x = g.input("x", (4, 4), "float64")
    a = remat.tanh(x, name="a")
    c = remat.add(remat.tanh(a, name="b"), x, name="c")
    g.output("loss", remat.sum(remat.tanh(c, name="d") * a, name="loss"))
    return g


GRAPHS = {
    "chain3": lambda: support.tanh_chain(3, 4, "float64", loss=True),
    "chain4": lambda: support.tanh_chain(4, 4, "float64", loss=True),
    "skip3": lambda: support.skip_chain(3),
    "residual": lambda: graph_from_proto(residual().to_proto(), Limits()),
}
# Budgets: fractions of store_all's peak, the least any schedule needs, a byte under it.
BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, "floor", "under")
PLANNERS = {
    "budget": lambda limit: Budget(bytes=limit),
    "optimal": lambda limit: Optimal(bytes=limit, time_limit=30.0),
}


@functools.cache
def joint(name: str):
    planned = ENGINE.plan(GRAPHS[name](), wrt=("x",), loss="loss")
    return planned.joint, planned.schedule.results


def problem(name: str) -> Problem:
    """A fresh problem (planners memoise figures in one)."""
    joint_graph, results = joint(name)
    return Problem(joint_graph.graph, results, joint_graph.forward_nodes)


@functools.cache
def floor(name: str) -> int:
    return brute_force.least_peak(problem(name))


def limit_of(name: str, budget) -> int:
    if budget == "floor":
        return floor(name)
    if budget == "under":
        return floor(name) - 1
    return int(budget * store_all_peak(problem(name)))


@functools.cache
def search(name: str, budget):
    """The search's (least recomputation, a schedule with it), or None: none fits."""
    return brute_force.least_recompute(problem(name), limit_of(name, budget))


CASES = [
    (name, budget)
    for name in GRAPHS
    for budget in BUDGETS
    if isinstance(budget, str) or limit_of(name, budget) > floor(name)
]


@pytest.mark.parametrize("name,budget", CASES)
def test_planners_and_bounds_against_every_schedule(name, budget):
    limit = limit_of(name, budget)
    found = search(name, budget)
    if found is None:
        for make in PLANNERS.values():
            with pytest.raises(ResourceExhausted):
                plan(problem(name), make(limit))
        return
    optimum, schedule = found
    replay = simulated(problem(name), schedule)
    assert replay.peak_bytes <= limit and replay.recompute_flops == optimum
    assert recompute_lower_bound(problem(name), limit).cost <= optimum * (1 + 1e-9)
    assert chain_lower_bound(problem(name), limit).cost <= optimum * (1 + 1e-9)
    costs = {}
    for planner, make in PLANNERS.items():
        sim = simulated(problem(name), plan(problem(name), make(limit)))
        assert sim.peak_bytes <= limit, planner
        assert sim.recompute_flops >= optimum, planner
        costs[planner] = sim.recompute_flops
    assert costs["optimal"] == optimum
    assert costs["budget"] <= 1.10 * optimum, costs


@pytest.mark.parametrize("name,budget", [("chain3", 0.8), ("chain4", 0.7), ("chain4", "floor")])
def test_a_chain_of_moments_proves_the_optimum_where_one_moment_does_not(name, budget):
    """Each moment of a tanh chain's backward pass pays for one value made again."""
    limit = limit_of(name, budget)
    optimum, _ = search(name, budget)
    single = recompute_lower_bound(problem(name), limit).cost
    chained = chain_lower_bound(problem(name), limit)
    assert single < 0.9 * optimum
    assert optimum * (1 - 1e-5) <= chained.cost <= optimum
    assert len(chained.chain) > 1 and chained.name == f"the bound over {len(chained.chain)} moments"


def test_the_cases_reach_down_to_the_floor_where_recomputation_is_forced():
    """Not vacuous: some budgets fit only by recomputing, and one fits nothing."""
    outcomes = [search(name, budget) for name, budget in CASES]
    assert sum(1 for o in outcomes if o is not None and o[0] > 0) >= 8
    assert sum(1 for o in outcomes if o is None) == len(GRAPHS)


FITTING = [(name, budget) for name, budget in CASES if search(name, budget) is not None]


def test_the_moment_search_against_every_schedule():
    reached = 0
    for name, budget in FITTING:
        limit = limit_of(name, budget)
        optimum, _ = search(name, budget)
        bound = chain_lower_bound(problem(name), limit)
        anchors = bound.chain or ((bound.anchor,) if bound.anchor else ())
        if not anchors:  # the limit binds nowhere: nothing to search
            continue
        found = moment_schedule(problem(name), limit, anchors, seconds=10.0)
        if found is None:
            continue
        sim = simulated(problem(name), found.schedule)
        assert sim.peak_bytes <= limit and sim.recompute_flops == found.cost >= optimum
        assert found.bound is None or found.bound.cost <= optimum * (1 + 1e-9)
        reached += found.cost == optimum
        cheaper = moment_schedule(problem(name), limit, anchors, seconds=10.0, ceiling=found.cost)
        assert cheaper is None or cheaper.cost < found.cost
    assert reached >= 8, reached  # 9 of the 13 cases where the limit binds, today
