"""Checkpoint planners through the engine (no gRPC).

Every policy computes bit-identical outputs and gradients to store-all's (float32 and
float64; an MLP, a transformer block, a CNN, a residual net and a dropout net), every
schedule passes the simulator and the executor's accounted peak equals the prediction;
bad policies are INVALID_ARGUMENT; recompute counts match each policy's theory.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import support

import remat
from remat import models
from remat_proto.policies import Checkpoints, EveryK, RecomputeAll, Revolve, SaveOps, Sqrt, StoreAll
from remat_server.checkpoint.problem import Problem
from remat_server.checkpoint.recompute import schedule_with_checkpoints
from remat_server.checkpoint.simulate import simulate
from remat_server.engine import Engine, RunRequest
from remat_server.errors import InvalidArgument
from remat_server.graph.ir import GraphSpec, InputSpec, NodeSpec
from remat_server.graph.limits import Limits
from remat_server.ops.random import keep_mask
from remat_server.service.codec import graph_from_proto

ENGINE = Engine()
DROP_P = 0.3


def spec_of(model: models.Model) -> GraphSpec:
    return graph_from_proto(model.graph.to_proto(), Limits())


def residual(
    dtype: str, blocks: int = 4, batch: int = 4, width: int = 8, seed: int = 0
) -> models.Model:
    """h_{k+1} = h_k + tanh(h_k @ W_k); loss = sum(h * h). Outputs also a middle block,
    so a planner must keep a result live across the chain."""
    rng = np.random.default_rng(seed)
    g = remat.Graph("residual")
    inputs = {"x": rng.standard_normal((batch, width)).astype(dtype)}
    h = g.input("x", (batch, width), dtype)
    for k in range(blocks):
        inputs[f"w{k}"] = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(dtype)
        w = g.input(f"w{k}", (width, width), dtype)
        h = remat.add(h, remat.tanh(h @ w, name=f"t{k}"), name=f"h{k}")
        if k == 1:
            g.output("mid", h)
    g.output("loss", remat.sum(h * h, name="loss"))
    return models.Model(g, inputs, list(inputs))  # x too: a skip path carries its gradient


def dropout_net(
    dtype: str, layers: int = 3, batch: int = 6, width: int = 8, seed: int = 0
) -> models.Model:
    """h = dropout(tanh(h @ W_k), p, seed=k) per layer; loss = sum(h * h). The middle
    dropout's output is an output too, so its mask is compared directly."""
    rng = np.random.default_rng(seed)
    g = remat.Graph("dropout")
    inputs = {"x": rng.standard_normal((batch, width)).astype(dtype)}
    h = g.input("x", (batch, width), dtype)
    for k in range(layers):
        inputs[f"w{k}"] = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(dtype)
        w = g.input(f"w{k}", (width, width), dtype)
        h = remat.dropout(remat.tanh(h @ w, name=f"t{k}"), p=DROP_P, seed=k, name=f"d{k}")
        if k == 1:
            g.output("dropped", h)
    g.output("loss", remat.sum(h * h, name="loss"))
    return models.Model(g, inputs, list(inputs))


MODELS = {
    "mlp": lambda dtype: models.mlp(batch=8, widths=(6, 12, 12, 12, 12, 4), dtype=dtype),
    "transformer": lambda dtype: models.transformer_block(
        batch=2, seq=4, d_model=8, heads=2, d_ff=16, dtype=dtype
    ),
    "cnn": lambda dtype: models.cnn(batch=2, channels=(2, 4, 4), image=8, classes=3, dtype=dtype),
    "residual": residual,
    "dropout": dropout_net,
}
CHECKPOINTS = {  # real node names, mid-network
    "mlp": ("act0", "act2"),
    "transformer": ("ln1", "attn", "resid1"),
    "cnn": ("relu0", "pool1"),
    "residual": ("h0", "t2"),
    "dropout": ("d0", "t1"),
}


def policies_for(name: str) -> list:
    extra = [SaveOps(("conv2d",))] if name == "cnn" else []
    return [
        RecomputeAll(),
        *(EveryK(k) for k in range(1, 5)),
        Sqrt(),
        Checkpoints(CHECKPOINTS[name]),
        SaveOps(("matmul",)),
        *extra,
        *(Revolve(c) for c in range(1, 5)),
    ]


CASES = [(name, policy) for name in MODELS for policy in policies_for(name)]


@functools.cache
def reference(name: str, dtype: str):
    model = MODELS[name](dtype)
    spec = spec_of(model)
    result = ENGINE.run(RunRequest(spec, model.inputs, wrt=tuple(model.wrt), loss=model.loss))
    return model, spec, result


def run(name: str, dtype: str, policy):
    model, spec, _ = reference(name, dtype)
    return ENGINE.run(
        RunRequest(
            spec, model.inputs, wrt=tuple(model.wrt), loss=model.loss, policy=policy, timeline=True
        )
    )


# --- bit-identity and exact accounting -----------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,policy", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_policy_is_bit_identical_to_store_all(name, policy, dtype):
    model, spec, expected = reference(name, dtype)
    result = run(name, dtype, policy)
    assert set(result.outputs) == set(expected.outputs) and result.outputs
    for key, value in expected.outputs.items():
        assert value.dtype == np.dtype(dtype)
        assert np.array_equal(result.outputs[key], value), f"output {key}"
    assert set(result.grads) == set(model.wrt)
    for key, value in expected.grads.items():
        assert np.array_equal(result.grads[key], value), f"gradient of {key}"
    assert any(np.any(g != 0) for g in expected.grads.values())  # not trivially equal
    # The schedule passed the simulator (plan raises otherwise) and the executor's
    # accounted peak is the prediction, byte for byte.
    plan = ENGINE.plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy=policy)
    m = result.metrics
    assert m.peak_bytes == m.predicted_peak_bytes == plan.simulation.peak_bytes
    assert max(result.timeline) == m.peak_bytes
    assert m.recomputed_nodes == plan.simulation.recomputed_nodes
    assert m.nodes_computed == sum(plan.simulation.evaluations.values())
    assert m.flops == plan.simulation.flops and m.recompute_flops == plan.simulation.recompute_flops
    assert expected.metrics.peak_bytes == expected.metrics.predicted_peak_bytes


@pytest.mark.parametrize("name", list(MODELS))
def test_recompute_all_really_recomputes_and_never_beats_itself(name):
    _, _, store = reference(name, "float32")
    result = run(name, "float32", RecomputeAll())
    assert store.metrics.recomputed_nodes == 0
    assert result.metrics.recomputed_nodes > 0 and result.metrics.recompute_flops > 0
    # Keeping fewer values never costs memory, but an op's temporaries can meet more
    # live values under recomputation: on these tiny models by a few percent at most.
    assert result.metrics.peak_bytes <= 1.05 * store.metrics.peak_bytes


# --- dropout -------------------------------------------------------------------------------
def test_dropout_masks_are_identical_under_recomputation():
    model, spec, store = reference("dropout", "float64")
    # The masks are real (a fraction is dropped) and the values are what NumPy computes
    # with the same (seed, key) masks.
    h, dropped = model.inputs["x"], None
    for k in range(3):
        t = np.tanh(h @ model.inputs[f"w{k}"])
        mask = keep_mask(t.shape, DROP_P, k, f"d{k}")
        assert 0 < mask.sum() < mask.size
        h = t * mask / (1.0 - DROP_P)
        dropped = h if k == 1 else dropped
    np.testing.assert_allclose(store.outputs["dropped"], dropped, rtol=1e-13)
    np.testing.assert_allclose(store.outputs["loss"], np.sum(h * h), rtol=1e-13)
    assert np.count_nonzero(store.outputs["dropped"] == 0) > 0

    for policy in (
        RecomputeAll(),
        EveryK(3),
        SaveOps(("matmul",)),
        Revolve(1),
        Checkpoints(("t1",)),
    ):
        result = run("dropout", "float64", policy)
        plan = ENGINE.plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy=policy)
        recomputed = [f"d{k}" for k in range(3) if plan.simulation.evaluations[f"d{k}"] > 1]
        assert recomputed, f"{policy}: no dropout node was recomputed"
        assert np.array_equal(result.outputs["dropped"], store.outputs["dropped"])
        assert np.array_equal(result.outputs["loss"], store.outputs["loss"])
        for key, value in store.grads.items():
            assert np.array_equal(result.grads[key], value), f"{policy}: gradient of {key}"
    evaluations = ENGINE.plan(
        spec, wrt=tuple(model.wrt), loss=model.loss, policy=RecomputeAll()
    ).simulation.evaluations
    # d1 is an output: it stays live and is never recomputed; the others are, per read.
    assert evaluations["d0"] > 1 and evaluations["d2"] > 1 and evaluations["d1"] == 1


# --- bad policies ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: EveryK(0), r"EveryK: k must be >= 1"),
        (lambda: EveryK(-3), r"EveryK: k must be >= 1"),
        (lambda: Revolve(0), r"Revolve: slots must be >= 1"),
    ],
    ids=["every_k(0)", "every_k(-3)", "revolve(0)"],
)
def test_policy_constructors_refuse_what_needs_no_graph(make, message):
    # The same check guards the wire: a decoded policy is constructed (test_bad_input).
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "policy,message",
    [
        (Checkpoints(("missing",)), r"checkpoints: 'missing' is not a node of the forward graph"),
        (
            Checkpoints(("act0", "bwd/act0/mul")),  # a backward node cannot be a checkpoint
            r"checkpoints: 'bwd/act0/mul' is not a node of the forward graph",
        ),
        (SaveOps(("nope",)), r"save_ops: unknown op 'nope'"),
        (SaveOps(("matmul", "nope")), r"save_ops: unknown op 'nope'"),
    ],
    ids=str,
)
def test_bad_policy_is_invalid_argument(policy, message):
    model, spec, _ = reference("mlp", "float32")
    with pytest.raises(InvalidArgument, match=message) as info:
        ENGINE.plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy=policy)
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(InvalidArgument, match=message):
        ENGINE.run(
            RunRequest(spec, model.inputs, wrt=tuple(model.wrt), loss=model.loss, policy=policy)
        )


def _problem(spec: GraphSpec, wrt, loss="", cotangents=()) -> Problem:
    plan = ENGINE.plan(spec, wrt=wrt, loss=loss, cotangent_outputs=cotangents)
    return Problem(plan.joint.graph, plan.schedule.results, plan.joint.forward_nodes)


def test_revolve_without_chain_structure_is_invalid_argument():
    # With two or more forward nodes the first and the last of the forward order are
    # always boundaries (nothing precedes the first, nothing follows the last), so every
    # such graph is a chain of >= 2 segments. No chain means one forward node: here the
    # loss is a single reduction of the inputs.
    x = np.linspace(-1.0, 1.0, 6)
    single = GraphSpec(
        "single",
        (InputSpec("x", (6,), "float64"),),
        (NodeSpec("loss", "sum", ("x",)),),
        (("loss", "loss"),),
    )
    problem = _problem(single, ("x",), "loss")
    assert problem.forward_order == problem.boundaries == ("loss",)
    with pytest.raises(InvalidArgument, match="revolve: the forward graph has no chain structure"):
        ENGINE.plan(single, wrt=("x",), loss="loss", policy=Revolve(2))
    with pytest.raises(InvalidArgument, match="no chain structure"):
        ENGINE.run(RunRequest(single, {"x": x}, wrt=("x",), loss="loss", policy=Revolve(3)))
    # Other policies accept the same graph.
    assert (
        ENGINE.run(RunRequest(single, {"x": x}, wrt=("x",), loss="loss", policy=Sqrt()))
        .grads["x"]
        .tolist()
        == [1.0] * 6
    )

    # Even a graph whose values all meet at one node is a (short) chain: the first
    # branch is a boundary, the concat and the loss are the others.
    g = remat.Graph("fan")
    xs = g.input("x", (6,), "float64")
    cat = remat.concat(
        [remat.tanh(xs, name="a"), remat.exp(xs, name="b"), remat.sigmoid(xs, name="c")], name="cat"
    )
    g.output("loss", remat.sum(cat, name="loss"))
    fan = graph_from_proto(g.to_proto(), Limits())
    assert _problem(fan, ("x",), "loss").boundaries == ("a", "cat", "loss")
    store = ENGINE.run(RunRequest(fan, {"x": x}, wrt=("x",), loss="loss"))
    revolve = ENGINE.run(RunRequest(fan, {"x": x}, wrt=("x",), loss="loss", policy=Revolve(1)))
    assert np.array_equal(revolve.grads["x"], store.grads["x"])


# --- recompute counts on a pure chain ----------------------------------------------------------
def chain(n: int, width: int = 4, loss: bool = True) -> GraphSpec:
    """x -> t1 = tanh(x) -> ... -> tn (-> loss = sum(tn))."""
    return support.tanh_chain(n, width, loss=loss)


N = 16


def chain_evaluations(policy, n: int = N) -> list[int]:
    plan = ENGINE.plan(chain(n), wrt=("x",), loss="loss", policy=policy)
    evaluations = plan.simulation.evaluations
    forward = [f"t{i}" for i in range(1, n + 1)] + ["loss"]
    assert all(count == 1 for node, count in evaluations.items() if node not in forward), (
        "a backward node was computed twice"
    )
    assert evaluations["loss"] == 1
    return [evaluations[f"t{i}"] for i in range(1, n + 1)]


def test_chain_store_all_recomputes_nothing():
    plan = ENGINE.plan(chain(N), wrt=("x",), loss="loss", policy=StoreAll())
    assert chain_evaluations(StoreAll()) == [1] * N
    assert plan.simulation.recomputed_nodes == plan.simulation.recompute_flops == 0


def test_chain_recompute_all_closed_form():
    # Drop mode holds nothing: the backward reads t_n, t_{n-1}, ..., t_1 once each (tanh's
    # VJP reads its output), and each read recomputes t_1..t_j from x. So t_i is
    # evaluated once forward plus once per j >= i: 1 + (n - i + 1) = n - i + 2 times.
    assert chain_evaluations(RecomputeAll()) == [N - i + 2 for i in range(1, N + 1)]
    plan = ENGINE.plan(chain(N), wrt=("x",), loss="loss", policy=RecomputeAll())
    assert plan.simulation.recomputed_nodes == N * (N + 1) // 2
    tanh_flops = 10 * 4  # tanh costs 10 per element, width 4
    assert plan.simulation.recompute_flops == tanh_flops * N * (N + 1) // 2


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 16, 17])
def test_chain_every_k_evaluates_non_checkpoints_exactly_twice(k):
    # Checkpoints t_k, t_2k, ...; hold mode recomputes each segment once from its
    # checkpoint and holds it, so non-checkpoints are evaluated exactly twice.
    assert chain_evaluations(EveryK(k)) == [1 if i % k == 0 else 2 for i in range(1, N + 1)]


def test_chain_sqrt_uses_segments_of_sqrt_n():
    for n in (9, 16, 25):
        k = round(math.sqrt(n))
        assert chain_evaluations(Sqrt(), n) == [1 if i % k == 0 else 2 for i in range(1, n + 1)]


def _recomputed_by_theory(problem: Problem, kept) -> set[str]:
    """Forward values the backward reads, plus (through values that are not kept) what
    recomputing them reads; minus what stays live (kept values and results)."""
    graph, seen, stack = problem.graph, set(), []
    for b in problem.backward:
        stack.extend(i for i in graph[b].inputs if problem.is_forward(i))
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            if name not in kept:
                stack.extend(i for i in graph[name].inputs if problem.is_forward(i))
    return seen - set(kept) - problem.results


def _kept(problem: Problem, policy) -> set[str]:
    candidates = problem.candidates
    match policy:
        case EveryK(k):
            return set(candidates[k - 1 :: k])
        case Sqrt():
            k = max(1, round(math.sqrt(len(candidates))))
            return set(candidates[k - 1 :: k])
        case Checkpoints(names):
            return set(names)
        case SaveOps(ops):
            return {n for n in problem.forward_order if problem.graph[n].op in ops}


@pytest.mark.parametrize("name", list(MODELS) + ["chain", "mlp64"])
def test_hold_mode_policies_evaluate_exactly_what_the_backward_needs_twice(name):
    if name == "chain":
        spec, wrt, loss, names = chain(N), ("x",), "loss", ("t3", "t11")
    elif name == "mlp64":  # dry runs only: 64 layers of 1 MiB activations
        model = models.mlp(batch=4096, widths=(64,) * 65 + (10,))
        spec, wrt, loss = spec_of(model), tuple(model.wrt), model.loss
        names = tuple(f"act{i}" for i in range(5, 63, 6))
    else:
        model, spec, _ = reference(name, "float32")
        wrt, loss, names = tuple(model.wrt), model.loss, CHECKPOINTS[name]
    for policy in (
        *(EveryK(k) for k in range(1, 5)),
        Sqrt(),
        Checkpoints(names),
        SaveOps(("matmul",)),
    ):
        plan = ENGINE.plan(spec, wrt=wrt, loss=loss, policy=policy)
        problem = Problem(plan.joint.graph, plan.schedule.results, plan.joint.forward_nodes)
        evaluations = plan.simulation.evaluations
        assert max(evaluations.values()) <= 2, policy
        twice = {n for n, count in evaluations.items() if count == 2}
        assert twice == _recomputed_by_theory(problem, _kept(problem, policy)), policy
        assert all(evaluations[b] == 1 for b in problem.backward)


@pytest.mark.parametrize("name", list(MODELS) + ["chain"])
def test_keeping_every_forward_value_is_store_all(name):
    if name == "chain":
        spec, wrt, loss = chain(N), ("x",), "loss"
    else:
        model, spec, _ = reference(name, "float64")
        wrt, loss = tuple(model.wrt), model.loss
    plan = ENGINE.plan(spec, wrt=wrt, loss=loss, policy=StoreAll())
    problem = Problem(plan.joint.graph, plan.schedule.results, plan.joint.forward_nodes)
    schedule = schedule_with_checkpoints(problem, frozenset(problem.forward_order), "all")
    sim = simulate(problem.graph, schedule)
    assert sim.peak_bytes == plan.simulation.peak_bytes
    assert sim.recomputed_nodes == 0
    assert sim.evaluations == plan.simulation.evaluations


def test_save_ops_matmul_keeps_linear_layers():
    """A linear layer is a matrix product with its bias added in place: save_ops(matmul)
    keeps it, as it kept the product when the importers wrote matmul then add."""
    g = remat.Graph("two_layers")
    x = g.input("x", (4, 8), "float32")
    w1, b1 = g.input("w1", (8, 8), "float32"), g.input("b1", (8,), "float32")
    w2, b2 = g.input("w2", (8, 8), "float32"), g.input("b2", (8,), "float32")
    h = remat.tanh(remat.linear(x, w1, b1, name="h1"), name="t1")
    y = remat.tanh(remat.linear(h, w2, b2, name="h2"), name="t2")
    g.output("loss", remat.sum(y * y))
    spec = graph_from_proto(g.to_proto(), Limits())
    plan = ENGINE.plan(spec, wrt=("w1", "w2"), loss="loss", policy=SaveOps(("matmul",)))
    evaluations = plan.simulation.evaluations
    assert evaluations["h1"] == evaluations["h2"] == 1  # kept
    assert evaluations["t1"] == 2  # made again from h1 for the backward
