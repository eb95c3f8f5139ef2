"""Tightening a fitting schedule (`checkpoint.planners.tighten`): the recomputations the
budget leaves room to spare are undone, and computations nothing reads are dropped."""

from __future__ import annotations

from dataclasses import replace

import pytest
import support
from test_remake import MODELS, problem_of

from remat import models
from remat_proto import policies as P
from remat_server.checkpoint.planners import plan, tighten
from remat_server.checkpoint.planners.bounds import simulated, store_all_peak
from remat_server.checkpoint.planners.store_all import plan_store_all
from remat_server.checkpoint.schedule import Compute, Free

# (model, fraction of store_all's peak, a policy whose schedule fits it): each
# recomputes more than it must there.
SLACK = [
    ("residual", 0.9, P.EveryK(2)),  # 447,488 FLOPs -> 76,800
    ("unet", 0.9, P.EveryK(2)),  # 77,312 -> 47,104
    ("unet", 0.7, P.DTR(fraction=0.7)),  # 183,040 -> 173,312
]


@pytest.mark.parametrize(
    "name,fraction,policy", SLACK, ids=[f"{n}-{f}-{p.__class__.__name__}" for n, f, p in SLACK]
)
def test_a_tightened_schedule_fits_recomputes_less_and_computes_the_same(name, fraction, policy):
    model = MODELS[name]()
    problem = problem_of(model)
    limit = int(fraction * store_all_peak(problem))
    schedule = plan(problem, policy)
    before = simulated(problem, schedule)
    assert before.peak_bytes <= limit
    tight = tighten.tightened(problem, schedule, limit)
    after = simulated(problem, tight)
    assert after.peak_bytes <= limit
    assert after.recompute_flops < before.recompute_flops
    support.assert_runs_as_store_all(problem, tight, model.inputs)


OWN_PEAK = [(name, policy) for name in sorted(MODELS) for policy in ("every_k:2", "recompute_all")]


@pytest.mark.parametrize("name,policy", OWN_PEAK, ids=[f"{n}-{p}" for n, p in OWN_PEAK])
def test_tightening_under_a_schedules_own_peak_never_goes_over_nor_costs_more(name, policy):
    problem = problem_of(MODELS[name]())
    schedule = plan(problem, P.parse(policy))
    before = simulated(problem, schedule)
    tight = simulated(problem, tighten.tightened(problem, schedule, before.peak_bytes))
    assert tight.peak_bytes <= before.peak_bytes
    assert tight.recompute_flops <= before.recompute_flops


def test_budget_tightens_the_schedule_it_chose(monkeypatch):
    """On this transformer block at 90% Budget's best keep set recomputes values the
    budget has room to keep: its answer is that schedule tightened, and cheaper."""
    model = MODELS["transformer"]()
    tightened = plan(problem_of(model), P.Budget(fraction=0.9))
    monkeypatch.setattr(
        "remat_server.checkpoint.planners.budget.tightened", lambda problem, s, limit, share: s
    )
    problem = problem_of(model)
    loose = plan(problem, P.Budget(fraction=0.9))
    assert tightened.report.chosen == f"{loose.report.chosen}, tightened"
    cost = simulated(problem, tightened).recompute_flops
    assert cost < simulated(problem, loose).recompute_flops
    assert simulated(problem, tightened).peak_bytes <= 0.9 * store_all_peak(problem)
    support.assert_runs_as_store_all(problem, tightened, model.inputs)


def test_a_computation_nothing_reads_is_dropped():
    problem = problem_of(MODELS["residual"]())
    schedule = plan_store_all(problem)
    inputs = {node.name for node in problem.graph.inputs}
    first = next(
        s.node for s in schedule.steps if set(problem.graph[s.node].inputs) <= inputs
    )  # its inputs stay live: it can be computed again at the very end
    wasted = replace(schedule, steps=(*schedule.steps, Compute(first), Free(first)))
    assert simulated(problem, wasted).recompute_flops > 0
    assert tighten.unread_dropped(problem, list(wasted.steps)) == list(schedule.steps)


def test_a_schedule_budget_beat_can_win_once_tightened():
    """On this transformer block at 70%, DTR (466,944 FLOPs) beats every keep set, but
    a keep set tightened recomputes less than DTR tightened: Budget tightens the last
    few schedules its best beat too, and answers with the cheapest."""
    model = models.transformer_block(batch=4, seq=16, d_model=16, heads=2, d_ff=32, dtype="float64")
    problem = problem_of(model)
    schedule = plan(problem, P.Budget(fraction=0.7))
    assert schedule.report.chosen.startswith("keep_set("), schedule.report.chosen
    assert schedule.report.chosen.endswith(", tightened")
    sim = simulated(problem, schedule)
    assert sim.peak_bytes <= 0.7 * store_all_peak(problem)
    assert sim.recompute_flops <= 225_280
    dtr = simulated(problem, plan(problem, P.DTR(fraction=0.7)))
    assert sim.recompute_flops < dtr.recompute_flops
    support.assert_runs_as_store_all(problem, schedule, model.inputs)
