"""Engine, store-all planner, simulator and executor, without gRPC: schedules are valid,
accounted memory equals the prediction (and a hand count), deep chains need no
recursion, metrics are filled in, NaN/Inf pass through with a warning, cancellation
stops the run, inputs stay live, and fetch is checked."""

from __future__ import annotations

import numpy as np
import pytest

from remat_server.autodiff import differentiate
from remat_server.checkpoint.planners.store_all import plan_store_all
from remat_server.checkpoint.problem import Problem
from remat_server.checkpoint.schedule import Compute, Free, Schedule
from remat_server.checkpoint.simulate import InvalidSchedule, simulate
from remat_server.engine import Engine, RunRequest
from remat_server.errors import Cancelled, InvalidArgument
from remat_server.graph.ir import GraphSpec, InputSpec, NodeSpec
from remat_server.graph.limits import Limits
from remat_server.graph.validate import build_graph
from remat_server.runtime.executor import execute

F64 = 8  # bytes per float64 element


def N(name, op, *inputs, **attrs):
    return NodeSpec(name, op, tuple(inputs), attrs)


def spec_of(feeds: dict, nodes, outputs, name="t") -> GraphSpec:
    return GraphSpec(
        name,
        tuple(InputSpec(k, v.shape, v.dtype.name) for k, v in feeds.items()),
        tuple(nodes),
        tuple(outputs),
    )


def mlp(seed=0, batch=8, sizes=(6, 16, 16, 3)):
    rng = np.random.default_rng(seed)
    feeds = {
        "x": rng.standard_normal((batch, sizes[0])),
        "y": rng.standard_normal((batch, sizes[-1])),
    }
    nodes, prev = [], "x"
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        feeds[f"w{i}"] = rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)
        feeds[f"b{i}"] = rng.standard_normal(d_out) * 0.1
        nodes += [N(f"mm{i}", "matmul", prev, f"w{i}"), N(f"z{i}", "add", f"mm{i}", f"b{i}")]
        prev = f"z{i}"
        if i < len(sizes) - 2:
            nodes.append(N(f"a{i}", "relu", prev))
            prev = f"a{i}"
    nodes += [N("d", "sub", prev, "y"), N("d2", "square", "d"), N("loss", "mean", "d2")]
    params = tuple(k for k in feeds if k[0] in "wb")
    return spec_of(feeds, nodes, [("pred", prev), ("loss", "loss")], "mlp"), feeds, params


def residual_net(seed=1, batch=4, width=8, blocks=4):
    """h_{k+1} = h_k + tanh(h_k @ W_k), plus a long skip from x to the end."""
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((batch, width))}
    nodes, prev = [], "x"
    for k in range(blocks):
        feeds[f"w{k}"] = rng.standard_normal((width, width)) / np.sqrt(width)
        nodes += [
            N(f"mm{k}", "matmul", prev, f"w{k}"),
            N(f"t{k}", "tanh", f"mm{k}"),
            N(f"h{k}", "add", prev, f"t{k}"),
        ]
        prev = f"h{k}"
    nodes += [N("skip", "mul", prev, "x"), N("loss", "sum", "skip")]
    return spec_of(feeds, nodes, [("loss", "loss")], "resnet"), feeds, tuple(feeds)


def joint_and_schedule(spec, wrt, loss="loss"):
    graph = build_graph(spec, Limits())
    joint = differentiate(graph, Limits(), list(wrt), loss)
    results = frozenset(joint.graph.outputs.values())
    return joint, plan_store_all(Problem(joint.graph, results, joint.forward_nodes))


# --- store-all and the simulator --------------------------------------------------------
@pytest.mark.parametrize("net", [mlp, residual_net], ids=["mlp", "residual"])
def test_store_all_schedule_is_valid_and_computes_each_node_once(net):
    spec, _, params = net()
    joint, schedule = joint_and_schedule(spec, params)
    sim = simulate(joint.graph, schedule)  # raises InvalidSchedule if a value is missing
    # VJP rules may emit nodes nobody reads (e.g. d/dx of a matmul when only the weight is
    # in wrt); store-all computes exactly the ancestors of the results, each once.
    needed = joint.graph.ancestors(schedule.results)
    assert set(sim.evaluations) == {n for n in needed if not joint.graph[n].is_input}
    assert set(sim.evaluations.values()) == {1}
    assert sim.recomputed_nodes == 0 and sim.recompute_flops == 0
    # Every intermediate is freed by the end: only the results and the inputs (held by the
    # request) stay live.
    held = set(schedule.results) | {n.name for n in joint.graph.inputs}
    assert sim.timeline[-1] == sum(joint.graph[r].type.nbytes for r in held)
    assert sim.peak_bytes == max(sim.timeline + (sum(n.type.nbytes for n in joint.graph.inputs),))


def test_simulator_rejects_a_schedule_that_reads_a_freed_value():
    spec, _, params = mlp()
    joint, schedule = joint_and_schedule(spec, params)
    broken = Schedule((Free("x"),) + schedule.steps, schedule.results)
    with pytest.raises(InvalidSchedule, match="'x'"):
        simulate(joint.graph, broken)
    with pytest.raises(InvalidSchedule, match="without"):
        simulate(joint.graph, Schedule((), schedule.results))


@pytest.mark.parametrize("net", [mlp, residual_net], ids=["mlp", "residual"])
def test_executor_peak_equals_simulator_prediction(net):
    spec, feeds, params = net()
    metrics = Engine().run(RunRequest(spec, feeds, wrt=params, loss="loss")).metrics
    assert metrics.peak_bytes == metrics.predicted_peak_bytes
    assert metrics.peak_bytes > sum(a.nbytes for a in feeds.values())
    # Same equality straight from the executor, forward only too.
    joint, schedule = joint_and_schedule(spec, params)
    run = execute(joint.graph, schedule, feeds, joint.forward_nodes)
    assert run.peak_bytes == simulate(joint.graph, schedule).peak_bytes == metrics.peak_bytes
    forward = Engine().run(RunRequest(spec, feeds)).metrics
    assert forward.peak_bytes == forward.predicted_peak_bytes < metrics.peak_bytes


def test_peak_of_a_tiny_chain_by_hand():
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((4, 5)), "w": rng.standard_normal((5, 3))}
    spec = spec_of(
        feeds, [N("y", "matmul", "x", "w"), N("z", "tanh", "y"), N("s", "sum", "z")], [("s", "s")]
    )
    x, w, y, z, s = 20 * F64, 15 * F64, 12 * F64, 12 * F64, 1 * F64  # 160, 120, 96, 96, 8
    # Store-all: inputs stay live (the request holds them); each computed value is freed
    # right after its last use.
    expected_timeline = [
        x + w + y,  # compute y  -> 376
        x + w + y + z,  # compute z  -> 472, the peak
        x + w + z,  # free y
        x + w + z + s,  # compute s
        x + w + s,  # free z
    ]
    graph = build_graph(spec, Limits())
    schedule = plan_store_all(Problem(graph, frozenset({"s"}), frozenset(graph.nodes)))
    assert schedule.steps == (Compute("y"), Compute("z"), Free("y"), Compute("s"), Free("z"))
    sim = simulate(graph, schedule)
    assert list(sim.timeline) == expected_timeline
    assert sim.peak_bytes == x + w + y + z == 472
    metrics = Engine().run(RunRequest(spec, feeds)).metrics
    assert metrics.peak_bytes == metrics.predicted_peak_bytes == 472
    # FLOPs by hand: matmul 2*4*3*5, tanh 10 per element, sum one per input element.
    assert metrics.flops == 2 * 4 * 3 * 5 + 10 * 12 + 12


def test_peak_of_a_tiny_chain_with_gradient_by_hand():
    # loss = sum(exp(x)), x: 3 float64. The joint graph (named by autodiff) is
    #   e = exp(x); loss = sum(e); one = const 1.0 (the seed);
    #   bwd/loss: r = reshape(one, (1,)); b = broadcast_to(r, (3,));
    #   bwd/e:    g = b * e                               (= grad/x)
    feeds = {"x": np.array([0.1, -0.2, 0.3])}
    spec = spec_of(feeds, [N("e", "exp", "x"), N("loss", "sum", "e")], [("loss", "loss")])
    result = Engine().run(RunRequest(spec, feeds, wrt=("x",), loss="loss"))
    np.testing.assert_allclose(result.grads["x"], np.exp(feeds["x"]), rtol=1e-15)
    joint, schedule = joint_and_schedule(spec, ("x",))
    assert [n.op for n in joint.graph] == [
        "input",
        "exp",
        "sum",
        "constant",
        "reshape",
        "broadcast_to",
        "mul",
    ]
    vec, scalar = 3 * F64, F64
    # x (24, held by the request throughout) -> +e (48) -> +loss (56). The seed `one` is a
    # constant (its bytes belong to the graph: 0), r and b are views of it (0 more), so
    # the timeline stays at 56 until g = b * e allocates (80, the peak); then e and b go.
    sim = simulate(joint.graph, schedule)
    assert sim.timeline == (48, 56, 56, 56, 56, 56, 56, 80, 56, 56)
    assert sim.peak_bytes == 3 * vec + scalar == 80  # x, e, g and loss
    assert result.metrics.peak_bytes == result.metrics.predicted_peak_bytes == 80


# --- deep graphs -------------------------------------------------------------------------
def test_ten_thousand_node_chain_forward_and_backward_without_recursion():
    depth = 10_000
    x = np.array([0.5, -1.0, 2.0, 0.1])
    nodes, prev = [], "x"
    for i in range(depth):
        nodes.append(N(f"t{i}", "tanh", prev))
        prev = f"t{i}"
    nodes.append(N("loss", "sum", prev))
    spec = spec_of({"x": x}, nodes, [("last", prev), ("loss", "loss")], "chain")
    result = Engine().run(RunRequest(spec, {"x": x}, wrt=("x",), loss="loss"))
    value, grad = x.copy(), np.ones_like(x)
    for _ in range(depth):
        value = np.tanh(value)
        grad *= 1 - value**2
    np.testing.assert_allclose(result.outputs["last"], value, rtol=1e-12)
    np.testing.assert_allclose(result.grads["x"], grad, rtol=1e-9)
    assert np.all(grad > 0)  # the check is not vacuous: the gradient did not underflow
    assert result.metrics.nodes_computed > 2 * depth


def test_long_chain_declared_out_of_order_is_sorted_iteratively():
    depth = 3000
    x = np.array([0.3, -0.7])
    nodes, prev = [], "x"
    for i in range(depth):
        nodes.append(N(f"t{i}", "sigmoid" if i % 2 else "tanh", prev))
        prev = f"t{i}"
    nodes.append(N("loss", "sum", prev))
    spec = spec_of({"x": x}, list(reversed(nodes)), [("loss", "loss")], "reversed")
    in_order = spec_of({"x": x}, nodes, [("loss", "loss")], "ordered")
    a = Engine().run(RunRequest(spec, {"x": x}, wrt=("x",), loss="loss"))
    b = Engine().run(RunRequest(in_order, {"x": x}, wrt=("x",), loss="loss"))
    assert a.outputs["loss"] == b.outputs["loss"]
    np.testing.assert_array_equal(a.grads["x"], b.grads["x"])


# --- metrics -------------------------------------------------------------------------------
def test_metrics_are_populated():
    spec, feeds, params = mlp()
    result = Engine().run(RunRequest(spec, feeds, wrt=params, loss="loss"))
    m = result.metrics
    joint, schedule = joint_and_schedule(spec, params)
    computes = sum(isinstance(s, Compute) for s in schedule.steps)
    needed = joint.graph.ancestors(schedule.results)
    assert m.nodes_computed == computes == sum(not joint.graph[n].is_input for n in needed)
    assert m.recomputed_nodes == 0 and m.recompute_flops == 0 and m.recompute_seconds == 0.0
    assert m.forward_seconds >= 0 and m.backward_seconds >= 0 and m.plan_seconds >= 0
    assert m.total_seconds >= m.forward_seconds + m.backward_seconds
    assert m.flops == simulate(joint.graph, schedule).flops > 0
    # Backward costs roughly twice the forward: the flops include both passes.
    forward = Engine().run(RunRequest(spec, feeds)).metrics
    assert 0 < forward.flops < m.flops
    assert forward.backward_seconds == 0.0 and forward.nodes_computed == len(spec.nodes)


# --- NaN and Inf ---------------------------------------------------------------------------
def test_nan_and_inf_pass_through_with_warnings():
    x = np.array([1.0, np.nan, np.inf, -2.0])
    feeds = {"x": x, "ok": np.ones(4)}
    spec = spec_of(
        feeds,
        [N("e", "mul", "x", "ok"), N("out", "tanh", "e"), N("loss", "sum", "out")],
        [("out", "out"), ("loss", "loss")],
    )
    result = Engine().run(RunRequest(spec, feeds, wrt=("x",), loss="loss"))
    out = result.outputs["out"]
    assert np.isnan(out[1]) and out[2] == 1.0
    np.testing.assert_allclose(out[[0, 3]], np.tanh([1.0, -2.0]))
    assert np.isnan(result.outputs["loss"])
    np.testing.assert_allclose(result.grads["x"][[0, 3]], 1 - np.tanh([1.0, -2.0]) ** 2)
    assert np.isnan(result.grads["x"][1])
    warnings = " | ".join(result.warnings)
    assert "input 'x'" in warnings and "'ok'" not in warnings
    assert "output 'out'" in warnings and "output 'loss'" in warnings
    assert "gradient 'x'" in warnings


def test_finite_run_has_no_warnings():
    spec, feeds, params = mlp()
    assert Engine().run(RunRequest(spec, feeds, wrt=params, loss="loss")).warnings == ()


# --- cancellation --------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_should_stop_cancels_the_run(k):
    spec, feeds, params = mlp()
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > k

    with pytest.raises(Cancelled):
        Engine().run(RunRequest(spec, feeds, wrt=params, loss="loss"), should_stop=should_stop)
    assert len(calls) == k + 1  # checked before every step, stopped at the first True


def test_should_stop_is_polled_once_per_step_when_never_true():
    spec, feeds, params = mlp()
    calls = []
    result = Engine().run(
        RunRequest(spec, feeds, wrt=params, loss="loss"),
        should_stop=lambda: calls.append(1) and False,
    )
    _, schedule = joint_and_schedule(spec, params)
    assert len(calls) == len(schedule.steps)
    assert set(result.grads) == set(params)


# --- inputs ---------------------------------------------------------------------------------
def test_inputs_stay_live_for_the_whole_schedule():
    # The request message holds the input bytes for the whole call, so no planner frees
    # them, not even unused ones: the accounting matches what the process really holds.
    feeds = {"x": np.ones(100), "u": np.ones(50), "v": np.ones((2, 3))}
    spec = spec_of(feeds, [N("y", "tanh", "x"), N("z", "exp", "y")], [("z", "z")])
    graph = build_graph(spec, Limits())
    schedule = plan_store_all(Problem(graph, frozenset({"z"}), frozenset(graph.nodes)))
    assert schedule.steps == (Compute("y"), Compute("z"), Free("y"))
    x, u, v = 800, 400, 48
    sim = simulate(graph, schedule)
    assert sim.timeline == (x + u + v + x, x + u + v + 2 * x, x + u + v + x)
    assert sim.peak_bytes == x + u + v + 2 * x == 2848
    metrics = Engine().run(RunRequest(spec, feeds)).metrics
    assert metrics.peak_bytes == metrics.predicted_peak_bytes == 2848


# --- fetch -----------------------------------------------------------------------------------
def test_fetch_selects_outputs():
    spec, feeds, _ = mlp()
    result = Engine().run(RunRequest(spec, feeds, fetch=("loss",)))
    assert set(result.outputs) == {"loss"} and result.outputs["loss"].shape == ()
    both = Engine().run(RunRequest(spec, feeds))
    assert set(both.outputs) == {"pred", "loss"}
    assert both.outputs["loss"] == result.outputs["loss"]


@pytest.mark.parametrize("name", ["d2", "nope", "x"])
def test_fetch_of_a_non_output_is_invalid_argument(name):
    spec, feeds, _ = mlp()
    with pytest.raises(InvalidArgument, match=f"fetch: '{name}' is not an output"):
        Engine().run(RunRequest(spec, feeds, fetch=(name,)))


def test_unknown_policy_is_invalid_argument():
    spec, feeds, _ = mlp()
    with pytest.raises(InvalidArgument, match="policy 'nope'"):
        Engine().run(RunRequest(spec, feeds, policy="nope"))
