"""Budget's repair search (`checkpoint.planners.remake`): free values across a
schedule's peak and make them again at their next reader."""

from __future__ import annotations

import pytest
import support

from remat import models
from remat_proto import policies as P
from remat_server.checkpoint.backward_order import reordered
from remat_server.checkpoint.planners import plan
from remat_server.checkpoint.planners.bounds import simulated, store_all_peak
from remat_server.checkpoint.planners.least_memory import floor
from remat_server.checkpoint.planners.remake import lowest, repaired, starts
from remat_server.checkpoint.planners.store_all import plan_store_all
from remat_server.checkpoint.problem import Problem
from remat_server.engine import Engine
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

MODELS = {
    "residual": lambda: support.residual_blocks(3, dtype="float64"),
    "unet": lambda: models.unet(batch=4, channels=(2, 4), image=8, dtype="float64"),
    "cnn": lambda: models.cnn(batch=8, channels=(1, 2, 4), image=8, dtype="float64"),
    "transformer": lambda: models.transformer_block(
        batch=2, seq=16, d_model=8, heads=2, d_ff=16, dtype="float64"
    ),
}


def problem_of(model) -> Problem:
    spec = graph_from_proto(model.graph.to_proto(), Limits())
    planned = Engine().plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy="store_all")
    return Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)


CASES = [(name, fraction) for name in MODELS for fraction in (0.9, 0.8, 0.7, 0.5)]


@pytest.mark.parametrize("name,fraction", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_a_repaired_schedule_fits_and_computes_what_store_all_does(name, fraction):
    """Repaired from store_all, in both backward orders: it fits its limit when found
    and runs bit for bit as store_all does."""
    model = MODELS[name]()
    problem = problem_of(model)
    limit = int(fraction * store_all_peak(problem))
    for ordered in (problem, reordered(problem)):
        if ordered is None:
            continue
        schedule = repaired(ordered, plan_store_all(ordered), limit)
        if schedule is None:
            continue
        sim = simulated(ordered, schedule)
        assert sim.peak_bytes <= limit
        support.assert_runs_as_store_all(ordered, schedule, model.inputs)


def test_store_all_under_its_own_peak_comes_back_unchanged():
    problem = problem_of(MODELS["residual"]())
    schedule = plan_store_all(problem)
    assert repaired(problem, schedule, store_all_peak(problem)).steps == schedule.steps


def test_no_move_below_every_schedules_floor():
    problem = problem_of(MODELS["residual"]())
    assert repaired(problem, plan_store_all(problem), store_all_peak(problem) // 10) is None


def test_budget_remakes_relus_of_kept_convolutions_in_residual_blocks():
    """Three residual blocks at 70% of store_all: keep each block's first convolution
    output, free the ReLU of it (and its mask), make both again for the backward pass:
    3,072 FLOPs, three ReLUs. Budget's keep sets and heuristics recomputed 20,480, a
    30 s MILP 19,456; OR-Tools' CP-SAT proved 3,072 optimal among schedules that
    compute each value at most twice, in a fixed forward order."""
    model = support.residual_blocks(3)
    problem = problem_of(model)
    schedule = plan(problem, P.Budget(fraction=0.7))
    assert schedule.report.chosen.startswith("remade("), schedule.report.chosen
    sim = simulated(problem, schedule)
    assert sim.peak_bytes <= 0.7 * store_all_peak(problem)
    assert sim.recompute_flops == 3072
    recomputed = {n for n, count in sim.evaluations.items() if count > 1}
    assert {problem.graph[n].op for n in recomputed} == {"relu"}, recomputed
    support.assert_runs_as_store_all(problem, schedule, model.inputs)


@pytest.mark.parametrize("name,fraction", [("residual", 0.8), ("unet", 0.9), ("cnn", 0.9)])
def test_store_all_is_repaired_on_skip_connection_graphs(name, fraction):
    """Not vacuous: on these, store_all over the limit is repaired in one order or both."""
    problem = problem_of(MODELS[name]())
    limit = int(fraction * store_all_peak(problem))
    found = [
        repaired(ordered, plan_store_all(ordered), limit)
        for ordered in (problem, reordered(problem))
        if ordered is not None
    ]
    assert any(schedule is not None for schedule in found)


def test_the_floor_knows_the_repairs_lowest_peak():
    """A refusal's floor (and MinMemory's start) includes the lowest peak the repair's
    moves reach: on this CNN 77% of store_all's, where the other low-memory schedules
    and a 2 s MILP stopped at 85%."""
    model = models.cnn()
    problem = problem_of(model)
    found = floor(problem, "min_memory")
    reached = min(
        lowest(ordered, make())[1]
        for ordered in (problem, reordered(problem))
        if ordered is not None
        for make in starts(ordered).values()
    )
    assert found.peak <= reached < 0.8 * store_all_peak(problem)
    assert simulated(problem, found.schedule).peak_bytes == found.peak
    support.assert_runs_as_store_all(problem, found.schedule, model.inputs)


def test_a_graph_with_nothing_to_compute_has_no_moves():
    """An output that is an input: an empty schedule, found by the service tests (the
    floor of a refusal called the repair on it)."""
    from remat_proto.spec import GraphSpec, InputSpec

    spec = GraphSpec("identity", [InputSpec("x", (4, 2), "float64")], [], [("o", "x")])
    planned = Engine().plan(spec, policy="store_all")
    problem = Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)
    schedule = plan_store_all(problem)
    assert schedule.steps == ()
    assert lowest(problem, schedule) == (schedule, problem.input_bytes)
    assert repaired(problem, schedule, 1) is None


# (model, fraction of store_all's peak, most FLOPs recomputed, what the recomputed ops
# must show). A three-level U-Net at 90%: ReLUs remade with the max-pool output one
# reads (the "all" way: DTR's 14,592 were Budget's best without it). Three residual
# blocks of width 2 at 80%: the gradient entering the last block made again from the
# loss's seed, its other source kept (the "free" way), and each ReLU with its mask from
# the kept pre-activation (the "siblings" way); the keep sets' best recomputed a
# convolution (2,368), a 30 s MILP 640 in its fixed order.
WAYS_CASES = {
    "unet, inputs remade": (
        lambda: models.unet(batch=2, channels=(2, 4, 8), image=8, dtype="float64"),
        0.9,
        1024,
        lambda ops: "max_pool2d" in ops,
    ),
    "residual, masks and gradients": (
        lambda: support.residual_blocks(3, width=2, batch=2, image=4, dtype="float64"),
        0.8,
        384,
        lambda ops: "conv2d" not in ops,
    ),
}


@pytest.mark.parametrize("case", WAYS_CASES)
def test_moves_that_remake_more_than_the_value(case):
    make, fraction, most, shows = WAYS_CASES[case]
    model = make()
    problem = problem_of(model)
    schedule = plan(problem, P.Budget(fraction=fraction))
    sim = simulated(problem, schedule)
    assert sim.peak_bytes <= fraction * store_all_peak(problem)
    assert 0 < sim.recompute_flops <= most, (schedule.report.chosen, sim.recompute_flops)
    recomputed = {problem.graph[n].op for n, count in sim.evaluations.items() if count > 1}
    assert shows(recomputed), recomputed
    support.assert_runs_as_store_all(problem, schedule, model.inputs)
