"""The memory-aware backward order (`checkpoint.backward_order`) and Budget planning
under it as well as under the emitted order."""

from __future__ import annotations

import pytest
import support

from remat import models
from remat_proto import policies as P
from remat_server.checkpoint.backward_order import memory_aware
from remat_server.checkpoint.planners import budget, keep_sets, plan
from remat_server.checkpoint.planners.bounds import simulated, store_all_peak
from remat_server.checkpoint.planners.least_memory import floor
from remat_server.checkpoint.planners.store_all import plan_store_all
from remat_server.checkpoint.problem import Problem
from remat_server.engine import Engine
from remat_server.errors import ResourceExhausted
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

# A 2-level U-Net small enough for the exact MILP (84 nodes): the weight gradient of the
# convolution after the concatenation is the concatenation's last reader.
SMALL_UNET = dict(batch=1, channels=(2, 4), image=8, dtype="float64")
MODELS = {
    "unet": lambda: models.unet(**SMALL_UNET),
    "cnn": lambda: models.cnn(batch=8, channels=(1, 2, 4), image=8, dtype="float64"),
    "transformer": lambda: models.transformer_block(
        batch=2, seq=16, d_model=8, heads=2, d_ff=16, dtype="float64"
    ),
    "mlp": lambda: models.mlp(batch=32, widths=(8,) * 6 + (4,), dtype="float64"),
}


def problem_of(model) -> Problem:
    spec = graph_from_proto(model.graph.to_proto(), Limits())
    planned = Engine().plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy="store_all")
    return Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_order_is_a_topological_permutation_of_the_backward_pass(name):
    problem = problem_of(MODELS[name]())
    order = memory_aware(problem)
    assert sorted(order) == sorted(problem.backward)
    done = {node.name for node in problem.graph if node.name not in set(problem.backward)}
    for node in order:
        missing = [i for i in problem.graph[node].inputs if i not in done]
        assert not missing, (node, missing)
        done.add(node)
    # Store-all in that order is a valid schedule and computes every node once.
    reordered = problem.with_backward(order)
    sim = simulated(reordered, plan_store_all(reordered))
    assert (
        sim.recompute_flops == 0 and sim.flops == simulated(problem, plan_store_all(problem)).flops
    )


def test_the_unet_holds_less_in_the_memory_aware_order():
    """Running the concatenation's last reader (a weight gradient) before the input
    gradient that allocates frees the concatenation first."""
    problem = problem_of(MODELS["unet"]())
    emitted = store_all_peak(problem)
    reordered = problem.with_backward(memory_aware(problem))
    assert simulated(reordered, plan_store_all(reordered)).peak_bytes < 0.9 * emitted


def test_budget_recomputes_nothing_where_the_optimum_recomputes_nothing():
    """At 90% of store_all's peak the MILP proves that no recomputation is needed (it
    reorders); Budget, in the emitted order, recomputed 1,024 FLOPs."""
    model = MODELS["unet"]()
    problem = problem_of(model)
    exact = plan(problem, P.Optimal(fraction=0.9, time_limit=60.0))
    assert simulated(problem, exact).recompute_flops == 0
    ours = plan(problem_of(model), P.Budget(fraction=0.9))
    sim = simulated(problem, ours)
    assert sim.recompute_flops == 0
    assert sim.peak_bytes <= 0.9 * store_all_peak(problem)
    assert ours.report.chosen.endswith("in memory-aware order"), ours.report.chosen


def test_a_reordered_schedule_gives_store_alls_gradients():
    """Both reorderings Budget searches (the memory-aware order, the floor's) win here."""
    model = models.unet(batch=4, channels=(2, 4), image=8, dtype="float64")
    problem = problem_of(model)
    chosen = {}
    for fraction in (0.8, 0.7):
        schedule = plan(problem_of(model), P.Budget(fraction=fraction))
        chosen[fraction] = schedule.report.chosen
        support.assert_runs_as_store_all(problem, schedule, model.inputs)
    assert "memory-aware" in chosen[0.8], chosen
    assert "in the floor's order" in chosen[0.7], chosen


@pytest.mark.parametrize("name", ["transformer", "unet"])
def test_budget_is_never_worse_than_under_the_emitted_order_alone(name, monkeypatch):
    """The transformer block peaks higher in the memory-aware order, the U-Net lower:
    Budget plans under both and keeps the cheaper schedule."""
    model = MODELS[name]()
    higher = store_all_peak(problem_of(model).with_backward(memory_aware(problem_of(model))))
    assert (higher > store_all_peak(problem_of(model))) == (name == "transformer")
    fractions = (0.95, 0.9, 0.85, 0.8)
    both = [_planned(model, fraction) for fraction in fractions]
    monkeypatch.setattr(budget._Candidates, "reordered", lambda self: None)
    emitted = [_planned(model, fraction) for fraction in fractions]
    assert any(cost is not None for cost in emitted), "no fraction fits: vacuous"
    for fraction, ours, alone in zip(fractions, both, emitted):
        assert alone is None or (ours is not None and ours <= alone), (fraction, ours, alone)


def _planned(model, fraction: float) -> float | None:
    """Budget's recompute FLOPs at `fraction` of store_all's peak (None: nothing fits)."""
    problem = problem_of(model)
    try:
        return simulated(problem, plan(problem, P.Budget(fraction=fraction))).recompute_flops
    except ResourceExhausted:
        return None


@pytest.mark.parametrize("name", ["unet", "cnn"])
def test_the_floor_is_never_above_store_all_in_either_order(name):
    """The lowest peak a refusal names: on these graphs keeping everything in the
    memory-aware order peaks under store_all, and under the low-memory schedules the
    floor knew before (a 2 s floor on this CNN in float32 named 20,200 bytes, over
    store_all's 20,020)."""
    problem = problem_of(MODELS[name]())
    reordered = problem.with_backward(memory_aware(problem))
    lowest = floor(problem, "test")
    assert lowest.peak <= store_all_peak(reordered) < store_all_peak(problem)
    assert simulated(problem, lowest.schedule).peak_bytes == lowest.peak


def test_a_free_copy_is_kept_as_its_inputs():
    """The concatenation of a U-Net costs nothing to make again: a keep set holds the
    upsampled half instead (the skip half is kept anyway) and remakes it."""
    problem = problem_of(models.unet(batch=4, channels=(2, 4), image=8, dtype="float64"))
    concat = next(n for n in problem.forward_order if problem.graph[n].op == "concat")
    kept = frozenset({concat, *problem.graph[concat].inputs[:1]})
    swapped = keep_sets.swap_copies(problem, kept)
    assert concat not in swapped and set(problem.graph[concat].inputs) <= swapped
    assert keep_sets.swap_copies(problem, swapped) == swapped  # nothing left to swap


def test_budget_reaches_the_optimum_of_a_unet_at_80_percent():
    """The optimum recomputes nothing (proven by the MILP in the memory-aware order; in
    the emitted order its class needs 512 FLOPs). Budget recomputed 2,048 FLOPs, then
    1,280 in the memory-aware order; keeping the concatenation as its inputs, none."""
    model = models.unet(batch=4, channels=(2, 4), image=8, dtype="float32")
    problem = problem_of(model)
    schedule = plan(problem, P.Budget(fraction=0.8))
    sim = simulated(problem, schedule)
    assert sim.recompute_flops == 0 and sim.peak_bytes <= 0.8 * store_all_peak(problem)
    assert "copies remade" in schedule.report.chosen, schedule.report.chosen
    support.assert_runs_as_store_all(problem, schedule, model.inputs)
