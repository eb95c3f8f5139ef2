"""The Budget planner and Auto, through the engine.

Acceptance (issue 4): on the sample models at 50%, 30% and 15% of store-all's peak,
Budget's schedule passes the simulator, fits, gives gradients bit-identical to
store-all's, and recomputes no more than any fixed heuristic (sqrt, every_k, save_ops)
that fits the same budget. When Budget finds nothing, no heuristic fits either.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import support

from remat import models
from remat_proto import policies as P
from remat_server.checkpoint.planners import bounds, budget, chain_dp, least_memory, plan
from remat_server.checkpoint.planners.budget import search
from remat_server.checkpoint.planners.keep_sets import backward_reads, hold_floor, regrowth
from remat_server.checkpoint.problem import Problem
from remat_server.checkpoint.recompute import hoistable, schedule_with_checkpoints
from remat_server.engine import Engine, RunRequest
from remat_server.errors import InvalidArgument, ResourceExhausted
from remat_server.graph.ir import GraphSpec
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

ENGINE = Engine()
MODELS = {  # activations dominate in the first three, weights weigh in the last two
    "mlp": lambda: models.mlp(batch=256, widths=(16,) * 12 + (4,), dtype="float64"),
    "chain": lambda: models.Model(
        support.tanh_chain(24, 32, loss=True),
        {"x": np.random.default_rng(0).standard_normal(32)},
        ["x"],
    ),
    "transformer": lambda: models.transformer_block(
        batch=4, seq=16, d_model=16, heads=2, d_ff=32, dtype="float64"
    ),
    "cnn": lambda: models.cnn(batch=8, dtype="float64"),
}
FRACTIONS = (0.5, 0.3, 0.15)
HEURISTICS = [
    P.Sqrt(),
    *(P.EveryK(k) for k in range(1, 9)),
    P.SaveOps(("matmul",)),
    P.SaveOps(("conv2d",)),
    *(P.Revolve(slots) for slots in (1, 2, 3, 5, 8)),
]


def spec_of(model) -> GraphSpec:
    graph = model.graph
    return graph if isinstance(graph, GraphSpec) else graph_from_proto(graph.to_proto(), Limits())


@functools.cache
def reference(name: str):
    model = MODELS[name]()
    spec = spec_of(model)
    result = ENGINE.run(
        RunRequest(spec, model.inputs, wrt=tuple(model.wrt), loss=model.loss, policy="store_all")
    )
    planned = ENGINE.plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy="store_all")
    problem = Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)
    return model, spec, result, problem


def figures(problem: Problem, policy) -> tuple[int, int]:
    """(peak bytes, recompute FLOPs) of a policy's schedule, or None if it cannot plan."""
    try:
        sim = bounds.simulated(problem, plan(problem, policy))
    except (InvalidArgument, ResourceExhausted):
        return None
    return sim.peak_bytes, sim.recompute_flops


CASES = [(name, fraction) for name in MODELS for fraction in FRACTIONS]


@pytest.mark.parametrize("name,fraction", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_budget_fits_and_beats_every_heuristic_that_fits(name, fraction):
    model, spec, expected, problem = reference(name)
    limit = int(fraction * expected.metrics.peak_bytes)
    heuristics = {P.label(h): figures(problem, h) for h in HEURISTICS}
    fitting = {k: v for k, v in heuristics.items() if v is not None and v[0] <= limit}
    try:
        planned = ENGINE.plan(
            spec, wrt=tuple(model.wrt), loss=model.loss, policy=P.Budget(fraction=fraction)
        )
    except ResourceExhausted as error:
        assert "the lowest peak" in str(error)
        assert not fitting, f"Budget found nothing but {sorted(fitting)} fit"
        lowest = least_memory.floor(problem, "test").peak
        assert lowest > limit
        return
    sim, report = planned.simulation, planned.schedule.report
    assert sim.peak_bytes <= limit == report.budget_bytes
    assert report.status in ("feasible", "store_all_fits") and report.chosen
    for label, (peak, recompute) in fitting.items():
        assert sim.recompute_flops <= recompute, f"{label} recomputes less at peak {peak}"
    result = ENGINE.run(
        RunRequest(
            spec,
            model.inputs,
            wrt=tuple(model.wrt),
            loss=model.loss,
            policy=P.Budget(fraction=fraction),
        )
    )
    assert result.metrics.peak_bytes == result.metrics.predicted_peak_bytes == sim.peak_bytes
    for key, value in expected.grads.items():
        assert np.array_equal(result.grads[key], value), f"gradient of {key}"


@pytest.mark.parametrize("name", ["mlp", "chain", "transformer"])
def test_budget_at_each_heuristics_own_peak_recomputes_no_more(name):
    """'At equal or lower peak': give Budget exactly the peak a heuristic reached."""
    _, _, _, problem = reference(name)
    for heuristic in HEURISTICS:
        own = figures(problem, heuristic)
        if own is None:
            continue
        schedule = search(problem, own[0], "budget")
        sim = bounds.simulated(problem, schedule)
        assert sim.peak_bytes <= own[0]
        assert sim.recompute_flops <= own[1], P.label(heuristic)


def test_store_all_fits_means_no_recomputation():
    _, _, expected, problem = reference("mlp")
    schedule = search(problem, expected.metrics.peak_bytes, "budget(1)")
    assert schedule.report.status == "store_all_fits" and schedule.report.chosen == "store_all"
    assert bounds.simulated(problem, schedule).recompute_flops == 0


def test_chain_dp_reaches_revolve_at_its_peak():
    """The DP's reversals include revolve's binomial ones, with heterogeneous costs, and
    a step's working bytes are the emitter's own (replayed, not summed), so at
    revolve's exact peak it finds a schedule that fits and recomputes no more."""
    _, _, _, problem = reference("chain")
    for slots in (2, 3, 4):
        peak, recompute = figures(problem, P.Revolve(slots))
        solution = chain_dp.solve(problem, peak)
        best = None
        for level in solution.feasible_levels()[::-1]:
            sim = bounds.simulated(problem, solution.schedule(int(level), "dp"))
            if sim.peak_bytes <= peak:
                best = sim.recompute_flops
                break
        assert best is not None and best <= recompute, (slots, best, recompute)


@pytest.mark.parametrize("name, fraction", [("chain", 0.3), ("mlp", 0.5), ("wide_mlp", 0.7)])
def test_chain_dp_never_underestimates_a_level(name, fraction):
    """Every schedule the DP emits fits the bytes of the level it was planned for (its
    sizes are the emitter's own actions replayed, rounded up), so the highest level
    that fits is the best the DP can do, and the levels up to `sure` fit the budget.
    Underestimates made it trust levels whose schedules did not fit: the loss held from
    the first reversal, the gradient coming into a range live while it advances, a
    state live through the next step."""
    if name == "wide_mlp":  # batch 1024, width 16: activations outweigh weights
        model = models.mlp(batch=1024, widths=(16,) * 8 + (10,), dtype="float32")
        planned = ENGINE.plan(spec_of(model), wrt=tuple(model.wrt), loss=model.loss)
        problem = Problem(
            planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes
        )
    else:
        _, _, _, problem = reference(name)
    peak = bounds.simulated(problem, plan(problem, P.StoreAll())).peak_bytes
    budget = int(fraction * peak)
    solution = chain_dp.solve(problem, budget)
    assert len(solution.feasible_levels()) > 0
    assert 0 <= solution.sure < solution.feasible_levels()[-1]  # some levels need a probe
    for level in solution.feasible_levels():
        sim = bounds.simulated(problem, solution.schedule(int(level), "dp"))
        assert sim.peak_bytes - problem.input_bytes <= level * solution.unit, level
        if level <= solution.sure:  # the level search trusts these without a probe
            assert sim.peak_bytes <= budget, level


def _span_by_span(z: chain_dp.Sizes) -> dict[str, np.ndarray]:
    """Rotor's recurrence as written (see chain_dp's module doc), one span (s, t) and one
    level m at a time: the reference `chain_dp.tables` computes in arrays."""
    L, M, inf = z.steps, z.levels, np.inf
    C, D, E = (np.full((L + 2, L + 2, M), inf) for _ in range(3))

    def at(table, s, t, m):
        return table[s, t, m] if m >= 0 else inf

    for s in range(1, L + 1):
        for m in range(M):
            C[s, s, m] = z.reverse[s] if m >= z.need_r[s] else inf
            D[s, s, m] = z.reverse_kept[s] if m >= z.need_rd[s] else inf
            E[s, s, m] = min(C[s, s, m], at(D, s, s, m - z.st[s]))
    for d in range(1, L):
        for s in range(1, L - d + 1):
            t = s + d
            after = z.res_prefix[t] - z.res_prefix[s]
            for m in range(M):
                for out in (C, D):
                    record = z.record[s] + at(out, s + 1, t, m - z.rec[s])
                    if m < z.need_c[s] + after or m < z.need_f[s] + z.inc[t]:
                        record = inf
                    best, reach = inf, 0
                    for split in range(s + 1, t + 1):  # advance s..split-1, keep a snapshot
                        reach = max(reach, z.need_f[s] if split == s + 1 else z.through[split - 1])
                        if m < reach + z.inc[t]:
                            continue
                        produced = z.res_prefix[t] - z.res_prefix[split - 1]
                        option = (
                            z.prefix[split - 1]
                            - z.prefix[s - 1]
                            + at(out, split, t, m - z.st[split - 1])
                            + at(E, s, split - 1, m - produced)
                        )
                        best = min(best, option)
                    out[s, t, m] = min(best, record)
                E[s, t, m] = min(C[s, t, m], at(D, s, t, m - z.st[t]))
    return {"C": C, "D": D, "E": E}


class _Levels:
    """A chain solution as `level_search` sees it: levels 0..99 feasible, 0..sure sure."""

    def __init__(self, sure: int):
        self.sure = sure

    def feasible_levels(self) -> np.ndarray:
        return np.arange(100)


@pytest.mark.parametrize(
    "sure, highest_fitting, expected, most_probes",
    [
        (60, 80, 80, 6),  # above the sure levels: bisected there only
        (60, 60, 60, 7),  # nothing above fits: the sure level, once
        (60, 40, 40, 13),  # the sure level does not fit after all: bisected below it
        (-1, 30, 30, 7),  # none sure: the plain bisection
    ],
)
def test_level_search_probes_only_levels_not_sure_to_fit(
    sure, highest_fitting, expected, most_probes
):
    probed = []

    def fits(level: int) -> bool:
        probed.append(level)
        return level <= highest_fitting

    found = chain_dp.level_search(_Levels(sure), fits, probes=16)
    assert found == expected and len(probed) <= most_probes, probed
    if expected >= sure:  # below the sure level only when it did not fit
        assert min(probed) >= sure, probed


@pytest.mark.parametrize("name, fraction", [("chain", 0.4), ("mlp", 0.5)])
def test_chain_dp_tables_follow_the_recurrence(name, fraction):
    """The arrays, a diagonal of spans at a time, hold what the recurrence span by span
    gives: every level of every table."""
    _, _, _, problem = reference(name)
    peak = bounds.simulated(problem, plan(problem, P.StoreAll())).peak_bytes
    steps = chain_dp._merged_steps(problem)
    z = chain_dp.sizes(chain_dp._step_figures(problem, steps), int(fraction * peak))
    tables, _ = chain_dp.tables(z)
    expected = _span_by_span(z)
    for name in "CDE":
        assert np.array_equal(tables[name], expected[name]), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one"),
        ({"bytes": 10, "fraction": 0.5}, "exactly one"),
        ({"fraction": 1.5}, "fraction"),
        ({"bytes": -5}, "exactly one|bytes"),
    ],
)
def test_bad_budgets_are_refused_by_the_constructor(kwargs, message):
    # Before anything is sent; a hostile wire message meets the same check when the
    # server decodes it (test_bad_input: INVALID_ARGUMENT).
    with pytest.raises(ValueError, match=message):
        P.Budget(**kwargs)


def test_profile_prices_recomputation_in_seconds_and_needs_inputs():
    model, spec, expected, _ = reference("mlp")
    policy = P.Budget(fraction=0.6, profile=True)
    result = ENGINE.run(
        RunRequest(spec, model.inputs, wrt=tuple(model.wrt), loss=model.loss, policy=policy)
    )
    assert "seconds" in result.metrics.planner.detail
    assert result.metrics.peak_bytes <= 0.6 * expected.metrics.peak_bytes
    for key, value in expected.grads.items():
        assert np.array_equal(result.grads[key], value)
    # Plan has no inputs to time: it returns the plan a Run made, or says to Run first.
    fresh = P.Budget(fraction=0.65, profile=True)
    with pytest.raises(InvalidArgument, match="Run with it first"):
        ENGINE.plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy=fresh)
    planned = ENGINE.plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy=policy)
    assert planned.cached and planned.simulation.peak_bytes == result.metrics.predicted_peak_bytes


# --- auto ---------------------------------------------------------------------------------
def run_auto(limit: int, name: str = "mlp"):
    model, spec, _, _ = reference(name)
    engine = Engine(Limits(max_request_bytes=limit))
    return engine.run(RunRequest(spec, model.inputs, wrt=tuple(model.wrt), loss=model.loss))


def test_auto_is_store_all_when_it_fits():
    _, _, expected, _ = reference("mlp")
    result = run_auto(expected.metrics.peak_bytes)
    assert result.metrics.policy == "store_all" and result.metrics.recompute_flops == 0
    assert result.metrics.planner.status == "store_all_fits"


def test_auto_plans_under_the_limit_when_store_all_does_not_fit():
    _, _, expected, _ = reference("mlp")
    limit = int(0.6 * expected.metrics.peak_bytes)  # the lowest reachable is ~0.44
    result = run_auto(limit)
    assert result.metrics.policy == "auto" and result.metrics.planner.status == "feasible"
    assert result.metrics.peak_bytes <= limit < expected.metrics.peak_bytes
    assert result.metrics.recompute_flops > 0
    for key, value in expected.grads.items():
        assert np.array_equal(result.grads[key], value)


def test_auto_nothing_fits_names_the_minimum_before_running():
    _, _, _, problem = reference("mlp")
    lowest = least_memory.floor(problem, "test").peak
    with pytest.raises(
        ResourceExhausted, match="the lowest peak (found|any schedule reaches) is"
    ) as error:
        run_auto(lowest // 2)
    assert f"{lowest:,}" in str(error.value) and "--max-request-bytes" in str(error.value)


def small_chain(length: int):
    return models.Model(support.tanh_chain(length, 64, loss=True), {"x": np.zeros(64)}, ["x"])


def test_budget_is_within_ten_percent_of_every_proven_optimum():
    """Where the exact MILP proves optimality (small graphs, 5 s each), Budget's
    recompute FLOPs are within 10% of the optimum's."""
    proven = []
    for length in (4, 6):
        model = small_chain(length)
        spec = spec_of(model)
        planned = ENGINE.plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy="store_all")

        def fresh(planned=planned):
            return Problem(
                planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes
            )

        for fraction in (0.9, 0.8, 0.7, 0.6):
            try:
                exact = plan(fresh(), P.Optimal(fraction=fraction, time_limit=5.0))
            except ResourceExhausted:
                continue  # proven infeasible: Budget must agree
            if exact.report.status != "optimal":
                continue
            optimum = bounds.simulated(fresh(), exact).recompute_flops
            ours = bounds.simulated(fresh(), plan(fresh(), P.Budget(fraction=fraction)))
            assert ours.recompute_flops <= 1.10 * optimum, (length, fraction, optimum)
            proven.append((length, fraction))
    assert len(proven) >= 4, proven  # the comparison is not vacuous


def test_a_small_unet_is_searched_in_the_order_that_lowers_its_floor():
    """A 2-level U-Net at 80% of store_all's peak: with the backward node each
    recompute_all peak serves run earlier (the floor's order, `peak_order`), keeping
    every value fits, so the optimum recomputes nothing. Searched only in the emitted
    and memory-aware orders, Budget recomputed 45,056 FLOPs there."""
    model = models.unet(batch=4, channels=(2, 4), image=16, classes=2, dtype="float64")
    planned = ENGINE.plan(spec_of(model), wrt=tuple(model.wrt), loss=model.loss)
    problem = Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)
    limit = bounds.budget_bytes(problem, 0, 0.8)
    schedule = search(problem, limit, "budget(0.8)")
    simulation = bounds.simulated(problem, schedule)
    assert simulation.peak_bytes <= limit
    assert simulation.recompute_flops == 0, schedule.report.chosen
    assert schedule.report.chosen.endswith("in the floor's order"), schedule.report.chosen


def test_a_refusal_searches_the_floor_once(monkeypatch):
    """Budget tries DTR in each backward order it searches (three on a U-Net). DTR as
    a policy names the floor when nothing fits; as Budget's candidate it must not: each
    order's problem has its own memo, so that was a floor search per order (the
    sample CNN at 60% was refused after 8.5 s, 6.3 s of it three floors)."""
    searches = []
    heuristic_floor = least_memory._heuristic_floor
    monkeypatch.setattr(
        least_memory,
        "_heuristic_floor",
        lambda *args: searches.append(args) or heuristic_floor(*args),
    )
    monkeypatch.setattr(budget, "EXACT_MAX_NODES", 0)  # no MILP: the structured search alone
    model = models.unet(batch=4, channels=(2, 4), image=16, classes=2, dtype="float64")
    planned = ENGINE.plan(spec_of(model), wrt=tuple(model.wrt), loss=model.loss)
    problem = Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)
    limit = least_memory.peak_lower_bound(problem)  # under the lowest peak found: refused
    with pytest.raises(ResourceExhausted, match="the lowest peak found"):
        search(problem, limit, "budget")
    assert len(searches) == 1


def test_a_budget_below_the_proven_bound_is_refused_at_once():
    """While a node is computed its inputs and result are live, and every schedule ends
    with the inputs and all results live: that bound holds for every policy, and a
    budget below it fails before searching."""
    _, _, _, problem = reference("mlp")
    bound = least_memory.peak_lower_bound(problem)
    for policy in (P.StoreAll(), P.RecomputeAll(), P.Sqrt(), P.DTR(fraction=0.9)):
        assert figures(problem, policy)[0] >= bound, P.label(policy)
    with pytest.raises(ResourceExhausted, match=f"under {bound:,} bytes|is {bound:,} bytes"):
        search(problem, bound - 1, "budget")


def _last_need_by_walking(problem: Problem, kept: frozenset[str]) -> dict[str, int]:
    """The definition: each backward node needs the forward values it reads and,
    through values that are not kept, what recomputing them reads (a walk per node)."""
    found: dict[str, int] = {}
    for position, node in enumerate(problem.backward):
        stack = [i for i in problem.graph[node].inputs if problem.is_forward(i)]
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in kept:
                found[name] = position
            else:
                stack.extend(i for i in problem.graph[name].inputs if problem.is_forward(i))
    return found


@pytest.mark.parametrize("name", list(MODELS))
def test_kept_values_are_held_until_their_last_recomputation(name):
    """The one-pass `_last_need` equals walking every backward node's ancestors, for
    keep sets from none to all (seeded)."""
    from remat_server.checkpoint import recompute

    problem = reference(name)[3]
    forward = [n for n in problem.graph.nodes if problem.is_forward(n)]
    last_read: dict[str, int] = {}
    for position, node in enumerate(problem.backward):
        for source in problem.graph[node].inputs:
            last_read[source] = position
    rng = np.random.default_rng(7)
    for share in (0.0, 0.1, 0.5, 0.9, 1.0):
        kept = frozenset(n for n in forward if rng.random() < share)
        assert recompute._last_need(problem, kept, last_read) == _last_need_by_walking(
            problem, kept
        ), share


def test_dropping_a_value_is_priced_with_what_regrows_it():
    """The keep-set search's second ranking prices a value with its forward ancestors
    up to the values kept anyway (those the backward pass reads)."""
    problem = reference("chain")[3]
    chain = [n for n in problem.forward_order if problem.graph[n].op == "tanh"]
    cost = problem.cost
    assert regrowth(problem, chain[5], {chain[2]}) == sum(cost(n) for n in chain[3:6])
    assert regrowth(problem, chain[5], {chain[4]}) == cost(chain[5])  # its input is kept
    assert regrowth(problem, chain[5], set()) >= sum(cost(n) for n in chain[:6])


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", ["hold", "drop"])
@pytest.mark.parametrize("hoist", [False, True], ids=["in_order", "hoisted"])
def test_the_floor_that_rules_keep_sets_out_never_exceeds_their_cost(name, mode, hoist):
    """Budget skips a keep set, unbuilt, when `hold_floor` already costs the best found:
    the floor must never exceed what the schedule really recomputes. Seeded random keep
    sets over the values the backward reads, from none to all."""
    _, _, _, problem = reference(name)
    if hoist and not hoistable(problem):
        pytest.skip("nothing to hoist (no ReLU)")
    read = sorted(backward_reads(problem, hoist))
    rng = np.random.default_rng(len(read))
    for share in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0):
        kept = frozenset(n for n in read if rng.random() < share)
        schedule = schedule_with_checkpoints(problem, kept, "probe", mode=mode, hoist=hoist)
        real = bounds.evaluations_cost(problem, bounds.simulated(problem, schedule).evaluations)
        floor = hold_floor(problem, kept, hoist)
        assert floor <= real + 1e-9, (share, floor, real)
        if not kept:  # nothing kept: the bound is no triviality
            assert 0 < floor <= real
