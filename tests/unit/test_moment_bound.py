"""The moment bound (`planners.moment_bound`): a lower bound on every schedule's
recomputation under a byte limit, alone and over a chain of moments
(`planners.moment_chain`). No schedule any planner emits within the limit recomputes
less (Optimal's proven optima included); it is 0 where store_all fits, above 0 where
the limit forces recomputation, infinite where nothing fits; and Optimal reports its
gap against it when the budget planner answers. On small transformer blocks it proves
Budget's schedules optimal (among all schedules, not a MILP's class)."""

from __future__ import annotations

import math

import pytest
import support

import remat
from remat_proto import policies as P
from remat_server.checkpoint.planners import plan
from remat_server.checkpoint.planners.bounds import (
    budget_bytes,
    recompute_cost,
    simulated,
    store_all_peak,
)
from remat_server.checkpoint.planners.moment_bound import (
    _moments,
    moment_costs,
    recompute_lower_bound,
)
from remat_server.checkpoint.planners.moment_chain import (
    chain_cost,
    chain_lower_bound,
    stretch_anchors,
)
from remat_server.checkpoint.problem import Problem
from remat_server.engine import Engine
from remat_server.errors import ResourceExhausted
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

ENGINE = Engine()


def mlp() -> remat.Graph:
    """Three ReLU layers (their masks are backward nodes a schedule may make early)."""
    g = remat.Graph("mlp")
    h = g.input("x", (8, 6), "float64")
    for k in range(3):
        h = remat.relu(remat.matmul(h, g.input(f"w{k}", (6, 6), "float64")), name=f"r{k}")
    g.output("loss", remat.sum(h * h, name="loss"))
    return g


def block(batch: int, seq: int) -> remat.models.Model:
    """A small transformer block: attention, layer norms, a GELU MLP (128 joint nodes)."""
    return remat.models.transformer_block(
        batch=batch, seq=seq, d_model=8, heads=2, d_ff=16, dtype="float64"
    )


BLOCK_WRT = tuple(block(1, 1).wrt)  # its parameters

GRAPHS = {  # name -> (spec, wrt)
    "chain8": (lambda: support.tanh_chain(8, 4, "float64", loss=True), ("x",)),
    "skip": (lambda: support.skip_chain(4), ("x",)),
    "mlp": (lambda: graph_from_proto(mlp().to_proto(), Limits()), ("x", "w0", "w1", "w2")),
    "block16": (lambda: graph_from_proto(block(4, 16).graph.to_proto(), Limits()), BLOCK_WRT),
    "block8": (lambda: graph_from_proto(block(2, 8).graph.to_proto(), Limits()), BLOCK_WRT),
}
# (graph, fraction of store_all's peak) where some planner's schedule fits
CASES = [
    *(("chain8", f) for f in (0.9, 0.75, 0.6, 0.5)),
    *(("skip", f) for f in (0.9, 0.75, 0.6)),
    *(("mlp", f) for f in (0.9, 0.8, 0.75)),
]


def problem(name: str, milp_max_nodes: int = 300) -> Problem:
    build, wrt = GRAPHS[name]
    planned = ENGINE.plan(build(), wrt=wrt, loss="loss")
    return Problem(
        planned.joint.graph,
        planned.schedule.results,
        planned.joint.forward_nodes,
        milp_max_nodes=milp_max_nodes,
    )


def schedules_within(name: str, fraction: float) -> dict[str, float]:
    """label -> recompute cost of every planner's schedule that keeps to the limit."""
    policies = [P.StoreAll(), P.RecomputeAll(), P.Sqrt(), *(P.EveryK(k) for k in range(1, 5))]
    policies += [P.DTR(fraction=fraction), P.Budget(fraction=fraction)]
    policies += [P.Optimal(fraction=fraction, time_limit=2.0)]
    limit = budget_bytes(problem(name), 0, fraction)
    found = {}
    for policy in policies:
        p = problem(name)
        try:
            schedule = plan(p, policy)
        except ResourceExhausted:
            continue
        if simulated(p, schedule).peak_bytes <= limit:
            found[P.label(policy)] = recompute_cost(p, schedule)
    return found


@pytest.mark.parametrize("name, fraction", CASES)
def test_no_schedule_within_the_limit_recomputes_less(name, fraction):
    p = problem(name)
    limit = budget_bytes(p, 0, fraction)
    bound = recompute_lower_bound(p, limit).cost
    chained = chain_lower_bound(problem(name), limit).cost
    assert chained >= bound
    found = schedules_within(name, fraction)
    assert found, "no planner fits: the case tests nothing"
    below = {label: cost for label, cost in found.items() if cost < chained}
    assert not below, (bound, chained, below)


def test_the_bound_is_above_0_where_the_limit_forces_recomputation():
    """chain8 at 75%: Optimal proves its optimum; the bound is above 0 and under it."""
    p = problem("chain8")
    limit = budget_bytes(p, 0, 0.75)
    bound = recompute_lower_bound(p, limit)
    optimal = plan(problem("chain8"), P.Optimal(fraction=0.75, time_limit=5.0))
    assert optimal.report.status == "optimal"
    assert 0 < bound.cost <= recompute_cost(p, optimal)
    assert bound.anchor is not None and not p.is_forward(bound.anchor)


def test_the_bound_is_0_where_store_all_fits():
    p = problem("mlp")
    assert recompute_lower_bound(p, store_all_peak(p)).cost == 0.0


def test_a_limit_under_the_inputs_is_proven_infeasible():
    p = problem("skip")
    assert math.isinf(recompute_lower_bound(p, p.input_bytes - 1).cost)


def test_optimal_reports_its_gap_against_the_bound_when_budget_answers(monkeypatch):
    """Over the MILP's node limit, without the moment search (which finds the optimum
    here, see test_moment_schedule.py), Optimal answers with the budget planner's
    schedule, and its gap is over the moment bound (before, a fallback reported a gap
    of 0)."""
    from remat_server.checkpoint.planners import optimal

    monkeypatch.setattr(optimal, "moment_schedule", lambda *args, **kwargs: None)
    p = problem("chain8", milp_max_nodes=0)
    limit = budget_bytes(p, 0, 0.6)
    schedule = plan(p, P.Optimal(fraction=0.6))
    report = schedule.report
    assert report.status == "fallback"
    cost = recompute_cost(p, schedule)
    single = recompute_lower_bound(p, limit).cost
    bound = chain_lower_bound(p, limit, enough=cost)
    assert 0 < single < bound.cost <= cost  # the chain's bound is the tighter here
    assert report.optimality_gap == pytest.approx((cost - bound.cost) / cost)
    assert f"({bound.name})" in report.detail and bound.name == "the bound over 6 moments"


# (block, fraction) where the limit forces recomputation and Budget finds a schedule.
BLOCK_CASES = [
    *(("block16", f) for f in (0.97, 0.95, 0.92, 0.9)),
    *(("block8", f) for f in (0.9, 0.8)),
]


@pytest.mark.parametrize("name, fraction", BLOCK_CASES)
def test_budget_is_within_ten_percent_of_the_bound_on_transformer_blocks(name, fraction):
    """Issue 14's goal, against a bound on every schedule: the MILP's LP bound is 0 on
    these blocks and its 20 s runs prove nothing. Today Budget reaches the bound (its
    schedules are optimal); 10% is what the planner promises."""
    p = problem(name)
    limit = budget_bytes(p, 0, fraction)
    bound = recompute_lower_bound(p, limit).cost
    ours = recompute_cost(p, plan(problem(name), P.Budget(fraction=fraction)))
    assert 0 < bound <= ours <= 1.10 * bound, (bound, ours)


def test_optimal_proves_budgets_schedule_on_a_transformer_block_without_its_milp(monkeypatch):
    from remat_server.checkpoint.planners import optimal

    def no_milp(*args, **kwargs):
        raise AssertionError("the MILP ran although the moment bound proved the optimum")

    monkeypatch.setattr(optimal.milp_classes, "solve", no_milp)
    p = problem("block16")
    schedule = plan(p, P.Optimal(fraction=0.95))
    assert schedule.report.status == "optimal" and schedule.report.optimality_gap == 0.0
    assert "(the moment bound, at bwd/attn/softmax_grad)" in schedule.report.detail
    assert simulated(p, schedule).peak_bytes <= schedule.report.budget_bytes


def test_an_anchor_limit_and_a_time_limit_only_weaken_the_bound():
    p = problem("block16")
    limit = budget_bytes(p, 0, 0.95)
    full = recompute_lower_bound(p, limit)
    binding = sum(moment is not None for moment in _moments(p, limit))
    assert full.solved == binding > 0  # every binding anchor solved, in well under 10 s
    assert recompute_lower_bound(p, limit, anchors=1).solved == 1
    assert recompute_lower_bound(p, limit, anchors=1).cost <= full.cost
    nothing = recompute_lower_bound(p, limit, seconds=0.0)
    assert (nothing.cost, nothing.anchor, nothing.solved) == (0.0, None, 0)


@pytest.mark.parametrize("name, fraction", [("chain8", 0.6), ("skip", 0.6), ("block8", 0.8)])
def test_a_chain_of_one_anchor_is_that_anchors_moment_bound(name, fraction):
    p = problem(name)
    limit = budget_bytes(p, 0, fraction)
    scored = list(moment_costs(p, limit, deadline=math.inf))
    assert scored and any(cost > 0 for _, cost in scored)
    # The chain's objective counts every computation, so HiGHS's relative tolerance
    # applies to all of them (its bound is lowered by that much, never raised).
    slack = 2e-6 * sum(p.flops.values())
    for anchor, cost in scored:
        assert chain_cost(p, limit, [anchor], 30.0) == pytest.approx(cost, abs=slack)


def test_the_chains_anchors_are_each_an_ancestor_of_the_next():
    p = problem("block16")
    scored = list(moment_costs(p, budget_bytes(p, 0, 0.9), deadline=math.inf))
    chain = stretch_anchors(p, scored, 4)
    assert len(chain) > 1
    for earlier, later in zip(chain, chain[1:]):
        assert earlier in p.graph.ancestors({later}) and earlier != later


def test_a_chain_with_a_moment_nothing_fits_proves_infeasibility():
    p = problem("chain8")
    scored = list(moment_costs(p, budget_bytes(p, 0, 0.6), deadline=math.inf))
    chain = stretch_anchors(p, scored, 3)
    assert math.isinf(chain_cost(p, p.input_bytes - 1, chain, 5.0))
    assert chain_lower_bound(problem("mlp"), store_all_peak(problem("mlp"))).cost == 0.0
