"""The exact MILP planner (Checkmate) on small graphs.

Its schedules pass the simulator under the budget, are proven optimal, never
recompute more than a fixed heuristic that fits the same budget, and give
bit-identical gradients; an impossible budget is RESOURCE_EXHAUSTED; an oversized
graph or a solver that times out falls back to the budget planner.

Budgets are fractions of store_all's peak that each graph can meet: on graphs this
small the backward pass's working set (gradient, local derivative, the activation it
reads) is most of the peak, so 0.4 of store_all is infeasible on all of them, and
budgets near the minimum can take HiGHS tens of seconds to prove optimal. The budgets
below solve in about a second each.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types

import numpy as np
import pytest
import support

import remat
from remat_proto.policies import EveryK, Optimal, Revolve
from remat_server.checkpoint.backward_order import memory_aware
from remat_server.checkpoint.planners import milp, milp_order
from remat_server.checkpoint.planners.bounds import simulated, store_all_peak
from remat_server.checkpoint.planners.heuristics import plan_every_k, plan_recompute_all, plan_sqrt
from remat_server.checkpoint.planners.milp import _Milp
from remat_server.checkpoint.planners.moment_bound import recompute_lower_bound
from remat_server.checkpoint.planners.moment_chain import chain_lower_bound
from remat_server.checkpoint.planners.optimal import plan_optimal
from remat_server.checkpoint.planners.revolve import plan_revolve
from remat_server.checkpoint.problem import Problem
from remat_server.checkpoint.schedule import Schedule
from remat_server.engine import Engine, RunRequest
from remat_server.errors import InvalidArgument, ResourceExhausted
from remat_server.graph.ir import GraphSpec, InputSpec, NodeSpec
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

ENGINE = Engine()
RNG = np.random.default_rng(3)


def _from_sdk(g: remat.Graph) -> GraphSpec:
    return graph_from_proto(g.to_proto(), Limits())


def diamond(dtype: str = "float64") -> GraphSpec:
    """a = tanh(x) feeds two branches and, by a skip connection, their sum."""
    g = remat.Graph("diamond")
    x = g.input("x", (4, 6), dtype)
    a = remat.tanh(x, name="a")
    d = remat.add(remat.exp(a, name="b") * remat.sigmoid(a, name="c"), a, name="d")
    e = remat.tanh(d, name="e")
    g.output("loss", remat.sum(e * e, name="loss"))
    return _from_sdk(g)


def viewed(dtype: str = "float64") -> GraphSpec:
    """Activations read through transposes and reshapes (views sharing a buffer)."""
    g = remat.Graph("views")
    x = g.input("x", (4, 6), dtype)
    h = remat.tanh(x, name="h")
    r = remat.reshape(remat.transpose(h, name="hT"), (3, 8), name="r")
    s = remat.reshape(remat.sigmoid(r, name="s"), (6, 4), name="r2")
    e = remat.exp(s, name="e")
    g.output("loss", remat.sum(e * remat.transpose(h, name="hT2"), name="loss"))
    return _from_sdk(g)


def mlp(dtype: str = "float64", layers: int = 2, batch: int = 8, width: int = 3) -> GraphSpec:
    """h = tanh(h @ W_k) per layer; loss = sum(h * h). Built from server specs."""
    inputs = [InputSpec("x", (batch, width), dtype)]
    nodes, h = [], "x"
    for k in range(layers):
        inputs.append(InputSpec(f"w{k}", (width, width), dtype))
        nodes += [NodeSpec(f"z{k}", "matmul", (h, f"w{k}")), NodeSpec(f"h{k}", "tanh", (f"z{k}",))]
        h = f"h{k}"
    nodes += [NodeSpec("sq", "mul", (h, h)), NodeSpec("loss", "sum", ("sq",))]
    return GraphSpec("mlp", tuple(inputs), tuple(nodes), (("loss", "loss"),))


GRAPHS = {  # name -> (spec builder, wrt)
    "chain6": (lambda dtype="float64": support.tanh_chain(6, 4, dtype, loss=True), ("x",)),
    "chain8": (lambda dtype="float64": support.tanh_chain(8, 4, dtype, loss=True), ("x",)),
    "diamond": (diamond, ("x",)),
    "views": (viewed, ("x",)),
    "mlp": (mlp, ("x", "w0", "w1")),
}
CASES = [
    ("chain6", 0.9),
    ("chain6", 0.8),
    ("chain6", 0.7),
    ("chain8", 0.75),
    ("diamond", 0.9),
    ("diamond", 0.8),
    ("views", 0.9),
    ("mlp", 0.9),
]


def feeds_for(spec: GraphSpec) -> dict[str, np.ndarray]:
    return {i.name: RNG.standard_normal(i.shape).astype(i.dtype) / 2 for i in spec.inputs}


@functools.cache
def problem(name: str) -> Problem:
    build, wrt = GRAPHS[name]
    planned = ENGINE.plan(build(), wrt=wrt, loss="loss")
    return Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)


@functools.cache
def solved(name: str, fraction: float):
    p = problem(name)
    schedule = plan_optimal(p, Optimal(fraction=fraction))
    return schedule, simulated(p, schedule)


def heuristics(p: Problem) -> dict:
    found = {"recompute_all": plan_recompute_all(p, None), "sqrt": plan_sqrt(p, None)}
    found.update({f"every_k({k})": plan_every_k(p, EveryK(k)) for k in range(1, 5)})
    for slots in range(1, 5):
        try:
            found[f"revolve({slots})"] = plan_revolve(p, Revolve(slots))
        except InvalidArgument:  # no chain structure: revolve does not apply
            pass
    return found


@pytest.mark.parametrize("name,fraction", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_schedule_fits_and_is_proven_optimal(name, fraction):
    p = problem(name)
    schedule, sim = solved(name, fraction)  # simulated() raises on an invalid schedule
    report = schedule.report
    assert report.budget_bytes == int(fraction * store_all_peak(p))
    assert sim.peak_bytes <= report.budget_bytes < store_all_peak(p)
    assert report.status == "optimal" and report.optimality_gap == 0.0
    # Proven by the MILP, or by Budget's schedule reaching the bound of one moment or of
    # a chain of them (no MILP).
    by_milp = report.chosen == "milp" and report.detail.startswith("MILP with ")
    by_bound = re.search(
        r"what every schedule within the budget must \((the moment bound|the bound over "
        r"\d+ moments)(, at |\))",
        report.detail,
    )
    assert by_milp or by_bound, report.detail
    assert report.solve_seconds > 0
    assert schedule.policy == f"optimal({fraction:g})"
    # Below store_all's peak in both of Budget's orders, something must be recomputed.
    reordered = p.with_backward(memory_aware(p))
    if store_all_peak(reordered) > report.budget_bytes:
        assert sim.recompute_flops > 0


@pytest.mark.parametrize("name,fraction", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_never_loses_to_a_heuristic_that_fits(name, fraction):
    # Views are handled exactly (each buffer is charged to its owner, which outlives its
    # views), so this holds on graphs with views too.
    p = problem(name)
    schedule, sim = solved(name, fraction)
    fitting = 0
    for label, other in heuristics(p).items():
        theirs = simulated(p, other)
        if theirs.peak_bytes <= schedule.report.budget_bytes:
            fitting += 1
            assert sim.recompute_flops <= theirs.recompute_flops, label
    assert fitting or name in ("diamond", "views")  # there, only the MILP fits some budgets


@pytest.mark.parametrize("name,fraction", [("chain6", 0.7), ("diamond", 0.8), ("views", 0.9)])
def test_the_milp_predicts_the_simulated_peak(name, fraction):
    # U[t,k] is the live bytes (inputs aside) after computing k in stage t; the schedule
    # frees exactly where the MILP's FREE does (or earlier), so its peak is the MILP's.
    p = problem(name)
    schedule, sim = solved(name, fraction)
    milp = _Milp(p, milp_order.default(p), schedule.report.budget_bytes - p.input_bytes)
    res = milp.solve(30.0)
    assert res.status == 0
    u = res.x[milp.u0 : milp.u0 + len(milp.order) * (len(milp.order) + 1) // 2]
    predicted = p.input_bytes + milp.unit * int(round(u.max()))
    own = simulated(p, Schedule(milp.steps(res.x), p.results, "optimal"))
    assert own.peak_bytes <= predicted <= schedule.report.budget_bytes
    assert own.peak_bytes == predicted


@pytest.mark.parametrize(
    "name,fraction,dtype",
    [
        ("chain6", 0.7, "float64"),
        ("diamond", 0.8, "float32"),
        # (at 90% the memory-aware backward order fits without recomputing)
        ("views", 0.8, "float64"),
        ("mlp", 0.9, "float32"),
    ],
)
def test_gradients_bit_identical_to_store_all(name, fraction, dtype):
    build, wrt = GRAPHS[name]
    spec = build(dtype)
    feeds = feeds_for(spec)
    expected = ENGINE.run(RunRequest(spec, feeds, wrt=wrt, loss="loss"))
    result = ENGINE.run(
        RunRequest(spec, feeds, wrt=wrt, loss="loss", policy=Optimal(fraction=fraction))
    )
    assert result.metrics.recompute_flops > 0
    assert result.metrics.peak_bytes == result.metrics.predicted_peak_bytes
    assert result.metrics.peak_bytes <= int(fraction * expected.metrics.peak_bytes)
    assert np.array_equal(result.outputs["loss"], expected.outputs["loss"])
    for key, value in expected.grads.items():
        assert np.array_equal(result.grads[key], value), f"gradient of {key}"

    # The planner's schedule run directly by the executor gives the same values.
    planned = ENGINE.plan(spec, wrt=wrt, loss="loss")
    p = Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)
    schedule = plan_optimal(p, Optimal(fraction=fraction))
    support.assert_runs_as_store_all(p, schedule, feeds)


def test_store_all_fits_is_optimal_without_a_solve():
    p = problem("chain8")
    schedule = plan_optimal(p, Optimal(fraction=1.0))
    assert schedule.report.status == "optimal" and schedule.report.chosen == "store_all"
    assert simulated(p, schedule).recompute_flops == 0


@pytest.mark.parametrize(
    "policy,why",
    [
        # 79 bytes: under the bound every schedule's peak reaches (128, which the
        # MILP's least-memory schedule meets), so refused before any solve
        (Optimal(fraction=0.3), "under the proven bound"),
        (Optimal(bytes=16), "the graph inputs alone exceed it"),  # x alone is 32 bytes
    ],
)
def test_impossible_budget_is_resource_exhausted(policy, why):
    with pytest.raises(ResourceExhausted, match="the lowest peak") as info:
        plan_optimal(problem("chain6"), policy)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert "policy optimal(" in str(info.value)
    assert re.search(why, str(info.value))
    with pytest.raises(ResourceExhausted, match="the lowest peak"):
        ENGINE.plan(GRAPHS["chain6"][0](), wrt=("x",), loss="loss", policy=policy)


def test_a_budget_under_the_proven_bound_is_refused_without_a_solve(monkeypatch):
    # The refusal's floor may run the MILP at the floor's own peak, time allowing (so
    # whether it does depends on the machine); never at the budget asked for.
    unpatched = milp.solve

    def solve(problem, budget, *args, **kwargs):
        if budget == 100:
            raise AssertionError("the MILP ran for a budget no schedule can meet")
        return unpatched(problem, budget, *args, **kwargs)

    monkeypatch.setattr("remat_server.checkpoint.planners.milp.solve", solve)
    with pytest.raises(ResourceExhausted, match="under the proven bound"):
        plan_optimal(problem("chain6"), Optimal(bytes=100))


def test_over_the_node_limit_a_schedule_at_the_moment_bound_is_proven_optimal():
    """No MILP runs, yet Budget's schedule is the optimum of every schedule: it
    recomputes what the moment bound proves every schedule within the budget must."""
    p = dataclasses.replace(problem("chain8"), milp_max_nodes=10)
    schedule = plan_optimal(p, Optimal(fraction=0.9))
    report = schedule.report
    assert report.status == "optimal" and report.optimality_gap == 0.0
    assert "what every schedule within the budget must (the moment bound" in report.detail
    cost = simulated(p, schedule).recompute_flops
    bound = recompute_lower_bound(p, report.budget_bytes).cost
    assert 0 < bound <= cost <= bound * (1 + 1e-5)
    assert simulated(p, schedule).peak_bytes <= report.budget_bytes


def test_too_many_nodes_falls_back_to_the_budget_planner(monkeypatch):
    support.without_moment_bound(monkeypatch)
    p = dataclasses.replace(problem("chain8"), milp_max_nodes=10)
    schedule = plan_optimal(p, Optimal(fraction=0.9))
    report = schedule.report
    assert report.status == "fallback" and report.chosen
    assert report.detail.startswith(
        f"the joint graph has {len(milp_order.default(p))} nodes, over the MILP "
        "limit of 10 (server flag --optimal-max-nodes)"
    )
    assert schedule.policy == "optimal(0.9)"
    assert simulated(p, schedule).peak_bytes <= report.budget_bytes


@pytest.mark.parametrize(
    "name, fraction",
    [
        ("chain8", 0.75),
        ("chain8", 0.5),
        ("chain6", 0.7),  # DTR's schedule
        ("views", 0.9),  # DTR's, with views pinning their owners
        ("diamond", 0.8),
        ("mlp4", 0.95),
    ],
)
def test_the_budget_planners_schedule_is_a_feasible_start_for_the_milp(name, fraction):
    """The warm start (`milp_start`): Budget's schedule in Checkmate's stages, with R
    and S fixed to it, satisfies every row of the MILP, and the schedule HiGHS reads
    back fits and recomputes no more than Budget's (plus the masks its order computes
    twice, none here: no ReLU)."""
    from remat_server.checkpoint.planners import milp_start
    from remat_server.checkpoint.planners.budget import search

    p = problem(name) if name in GRAPHS else Problem(*_joint(mlp(layers=4, width=6)))
    limit = int(fraction * store_all_peak(p))
    known = search(p, limit, "budget")
    model = milp._Milp(p, milp_order.of_schedule(p, known), limit - p.input_bytes)
    index, value = milp_start.columns(model, known)
    model.lb[index] = model.ub[index] = value  # nothing left to choose but FREE and U
    result = model.solve(60.0)
    assert result.status == milp.OPTIMAL, result.message
    schedule = Schedule(model.steps(result.x), p.results, "start")
    ours, theirs = simulated(p, schedule), simulated(p, known)
    assert ours.peak_bytes <= limit
    assert ours.recompute_flops <= theirs.recompute_flops


def test_timeout_without_a_schedule_falls_back_to_the_budget_planner(monkeypatch):
    # A larger graph and a near-minimal budget: HiGHS finds no schedule in 10 ms, and
    # here it has no start (as for a schedule the MILP's stages cannot express).
    from remat_server.checkpoint.planners import milp_start

    monkeypatch.setattr(milp_start, "columns", lambda model, schedule: None)
    support.without_moment_bound(monkeypatch)
    p = Problem(*_joint(mlp(layers=4, width=6)))
    schedule = plan_optimal(p, Optimal(fraction=0.95, time_limit=0.01))
    report = schedule.report
    assert report.status == "fallback"
    assert "found no feasible schedule within 0.01 s" in report.detail
    assert simulated(p, schedule).peak_bytes <= report.budget_bytes


def _joint(spec: GraphSpec):
    planned = ENGINE.plan(spec, wrt=tuple(i.name for i in spec.inputs), loss="loss")
    return planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes


@pytest.mark.parametrize("asked, granted", [(0.0, 5.0), (2.0, 2.0), (1e9, 5.0)])
def test_the_server_limit_is_the_default_and_the_most_a_client_gets(asked, granted):
    from remat_server.engine import Engine
    from remat_server.graph.limits import Limits

    engine = Engine(Limits(optimal_time_limit=5.0))
    assert (
        engine.with_server_defaults(Optimal(fraction=0.5, time_limit=asked)).time_limit == granted
    )


@pytest.mark.parametrize(
    "bound_above_budget, proven",
    [(False, False), (True, False), (True, True)],
    ids=["stopped, bound 0", "stopped, bound above Budget's", "optimal in its class"],
)
def test_a_milp_schedule_worse_than_budget_gives_way_to_budgets_schedule(
    monkeypatch, bound_above_budget, proven
):
    """Stopped at its time limit, the MILP's incumbent may recompute more than the budget
    planner's schedule: Optimal then returns the cheaper one, with the MILP's bound.
    That bound covers the MILP's class only; Budget's schedules come from outside it
    (a ReLU's mask made once, in the backward pass) and may be under it, and then the
    gap is over the bound every schedule has (`moment_bound`). The same holds for a
    schedule the MILP proved optimal in its class: Optimal returned it, 'optimal' with
    gap 0, on three small residual blocks where Budget's recomputes 384 FLOPs to its 640."""
    from remat_server.checkpoint.planners import optimal

    p = problem("chain8")
    limit = int(0.75 * store_all_peak(p))
    poor = plan_recompute_all(p, None)  # fits this budget, recomputing the most
    assert simulated(p, poor).peak_bytes <= limit
    poor_cost = simulated(p, poor).recompute_flops
    bound = (poor_cost if proven else poor_cost - 1) if bound_above_budget else 0.0
    solved = milp.Solution(
        poor, False, proven, 0.0 if proven else 0.5, 0.1, "MILP (test)", bound=bound
    )
    monkeypatch.setattr(optimal.milp, "solve", lambda *args, **kwargs: solved)
    # (the moment bound would prove Budget's schedule optimal, and no MILP would run)
    support.without_moment_bound(monkeypatch, scale=0.5 if bound_above_budget else 0.0)
    schedule = plan_optimal(p, Optimal(bytes=limit))
    ours = simulated(p, schedule)
    assert ours.peak_bytes <= limit
    assert ours.recompute_flops < poor_cost
    status, milps = ("feasible", "optimum in its class") if proven else ("time_limit", "incumbent")
    assert schedule.report.status == status and schedule.report.chosen != "milp"
    assert f"recomputes less than the MILP's {milps}" in schedule.report.detail
    claimed = "every schedule of its class recomputes at least"
    assert (claimed in schedule.report.detail) != bound_above_budget, schedule.report.detail
    if bound_above_budget:  # the bound of every schedule, above 0 here
        every = chain_lower_bound(p, limit, enough=ours.recompute_flops)
        moment = every.cost * 0.5
        assert 0 < moment <= ours.recompute_flops
        gap = (ours.recompute_flops - moment) / ours.recompute_flops
        assert f"({every.name})" in schedule.report.detail
    else:  # the MILP's bound, 0: (cost - 0) / cost
        gap = 1.0
    assert schedule.report.optimality_gap == pytest.approx(gap)


def test_when_no_milp_schedule_fits_the_budget_planner_still_tries(monkeypatch):
    """The MILP's stages cannot recompute results at the end, so its infeasibility is
    not proof: the budget planner answers when it finds a schedule."""
    from remat_server.checkpoint.planners import optimal

    p = problem("chain8")
    refused = milp.Solution(None, True, False, 0.0, 0.1, "MILP (test)", why="infeasible (test)")
    monkeypatch.setattr(optimal.milp, "solve", lambda *args, **kwargs: refused)
    support.without_moment_bound(monkeypatch)  # (it proves Budget's schedule optimal here)
    schedule = plan_optimal(p, Optimal(fraction=0.75))
    assert schedule.report.status == "fallback"
    detail = schedule.report.detail  # both of the MILP's classes (`milp_classes`) refused
    assert detail.startswith("infeasible (test); in the results-last order, infeasible (test)")
    assert "; planned by the budget planner" in detail
    assert simulated(p, schedule).peak_bytes <= schedule.report.budget_bytes


@pytest.mark.parametrize("bound_above_base", [0.0, 100.0, None])
def test_a_stopped_solves_gap_is_over_the_recomputation(monkeypatch, bound_above_base):
    """HiGHS's relative gap counts every computation, the forward and backward passes
    included, so a large recomputation gap looked small: the gap reported is
    (recompute cost - proven bound on it) / recompute cost, and 1 without a bound."""

    p = problem("chain8")
    limit = int(0.75 * store_all_peak(p))
    poor = plan_recompute_all(p, None)
    cost = simulated(p, poor).recompute_flops
    order = milp_order.default(p)
    base = sum(p.cost(n) for n in order)
    bound = -np.inf if bound_above_base is None else base + bound_above_base
    stopped = milp.Solution(poor, False, False, 0.01, 0.1, "MILP (test)")
    result = milp._Result(milp.LIMIT, None, 0.01, bound, "time limit")
    monkeypatch.setattr(milp, "_solved", lambda *args, **kwargs: (stopped, result))
    monkeypatch.setattr(milp_order, "default", lambda problem: order)
    solution = milp.solve(p, limit, 1.0, "optimal(test)")
    proven = bound_above_base or 0.0
    assert solution.bound == proven
    assert solution.gap == pytest.approx((cost - proven) / cost)


@pytest.mark.parametrize(
    "shape, fraction, flops",
    [(dict(width=2, batch=2, image=4), 0.8, 384), (dict(), 0.6, 149_504)],
    ids=["width 2 at 80%", "width 4 at 60%"],
)
def test_a_chain_of_moments_proves_budgets_schedule_optimal_on_residual_blocks(
    monkeypatch, shape, fraction, flops
):
    """Three residual blocks: one moment's bound is half of Budget's recomputation
    (192 and 78,848 FLOPs), and the MILP took 123 s to prove a worse schedule (640)
    optimal in its class. The bound over a chain of moments reaches Budget's: optimal
    among all schedules, and no MILP runs."""
    from remat_server.checkpoint.planners import optimal

    def no_milp(*args, **kwargs):
        raise AssertionError("the MILP ran although a bound proved the optimum")

    # Optimal's own MILP only: Budget's search runs a short one on graphs this small.
    monkeypatch.setattr(optimal, "milp_classes", types.SimpleNamespace(solve=no_milp))
    model = support.residual_blocks(3, dtype="float64", **shape)
    planned = ENGINE.plan(
        graph_from_proto(model.graph.to_proto(), Limits()), wrt=tuple(model.wrt), loss="loss"
    )
    p = Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)
    schedule = plan_optimal(p, Optimal(fraction=fraction, time_limit=60))
    report = schedule.report
    assert report.status == "optimal" and report.optimality_gap == 0.0, report.detail
    assert re.search(r"\(the bound over \d+ moments, at ", report.detail), report.detail
    sim = simulated(p, schedule)
    assert sim.recompute_flops == flops and sim.peak_bytes <= report.budget_bytes
    assert recompute_lower_bound(p, report.budget_bytes).cost < 0.55 * flops
