"""Normalization ops (batch_norm, rms_norm) and the SDK's batch_norm_running_stats:
gradients against centered differences (first and second order, both batch_norm
modes), float32, forwards and gradients against torch.nn.functional (including a
zero-variance channel, zero weights and an all-zero rms row), the forwards' memory
(no temporary of x's size), and the running-statistic composite against torch's update
through a real in-process server."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import support

import remat
from remat_server.engine import RunRequest
from remat_server.errors import InvalidArgument
from remat_server.ops import REGISTRY


def normal(*shape, seed=0, scale=1.0, shift=0.0):
    return shift + scale * np.random.default_rng(seed).standard_normal(shape)


def positive(*shape, seed=0):
    return np.random.default_rng(seed).uniform(0.5, 2.0, shape)


def bn_inputs(*shape, seed=0, shift=0.0):
    """x (N, C, *) and the four (C,) vectors, the running variance positive."""
    c = shape[1]
    return {
        "x": normal(*shape, seed=seed, scale=1.5, shift=shift),
        "weight": normal(c, seed=seed + 1),
        "bias": normal(c, seed=seed + 2),
        "running_mean": normal(c, seed=seed + 3),
        "running_var": positive(c, seed=seed + 4),
    }


BN_WRT = ["x", "weight", "bias"]

# (id, op, inputs, attrs, wrt). Every float input is <= ~60 elements.
CASES = [
    ("batch_norm-train-2d", "batch_norm", bn_inputs(6, 3), {"training": True}, BN_WRT),
    (
        "batch_norm-train-3d",
        "batch_norm",
        bn_inputs(3, 2, 4, seed=10, shift=0.5),
        {"training": True, "eps": 1e-3},
        BN_WRT,
    ),
    (
        "batch_norm-train-4d",
        "batch_norm",
        bn_inputs(2, 3, 2, 3, seed=20),
        {"training": True},
        BN_WRT,
    ),
    ("batch_norm-eval-2d", "batch_norm", bn_inputs(5, 4, seed=30), {}, BN_WRT),
    (
        "batch_norm-eval-3d",
        "batch_norm",
        bn_inputs(2, 3, 4, seed=40),
        {"training": False, "eps": 0.1},
        BN_WRT,
    ),
    ("batch_norm-eval-4d", "batch_norm", bn_inputs(2, 2, 3, 3, seed=50), {}, BN_WRT),
    (
        "rms_norm-k1",
        "rms_norm",
        {"x": normal(3, 2, 5), "weight": normal(5, seed=1)},
        {},
        ["x", "weight"],
    ),
    (
        "rms_norm-k2",
        "rms_norm",
        {"x": normal(3, 2, 4, seed=2), "weight": normal(2, 4, seed=3)},
        {"eps": 1e-3},
        ["x", "weight"],
    ),
    (
        "rms_norm-1d",
        "rms_norm",
        {"x": normal(7, seed=4), "weight": normal(7, seed=5)},
        {},
        ["x", "weight"],
    ),
    (
        "stats-unbiased-4d",
        "batch_norm_stats",
        {"x": normal(3, 2, 2, 3, seed=96)},
        {"unbiased": True},
        ["x"],
    ),
    ("stats-biased-2d", "batch_norm_stats", {"x": normal(5, 3, seed=97, shift=2.0)}, {}, ["x"]),
]
IDS = [case[0] for case in CASES]


# --- first-order gradients, float32 -------------------------------------------------------
@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_gradients_match_centered_differences(case_id, op, inputs, attrs, wrt):
    spec, feeds = support.op_graph(op, inputs, attrs)
    support.check_grads(spec, feeds, wrt, tol=1e-6)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_float32_keeps_dtype(case_id, op, inputs, attrs, wrt):
    result, expected = support.run_float32(op, inputs, attrs, wrt)
    assert np.allclose(result.outputs["out"], expected, rtol=1e-4, atol=1e-5)
    expected_grads = support.ENGINE.run(
        RunRequest(*support.op_graph(op, inputs, attrs), wrt=tuple(wrt), loss="loss")
    ).grads
    for name in wrt:
        assert np.allclose(result.grads[name], expected_grads[name], rtol=1e-3, atol=1e-4)


# --- second order: differentiate the joint graph again ------------------------------------
@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_second_order_hessian_vector_products(case_id, op, inputs, attrs, wrt):
    support.check_hvp(op, inputs, attrs, wrt, seed=11)


# --- against torch.nn.functional ---------------------------------------------------------
def _torch_call(torch, op, t, attrs):
    F = torch.nn.functional
    if op == "batch_norm":
        # training=True updates the running tensors in place: hand torch clones.
        return F.batch_norm(
            t["x"],
            t["running_mean"].clone(),
            t["running_var"].clone(),
            t["weight"],
            t["bias"],
            training=attrs.get("training", False),
            momentum=0.0,
            eps=attrs.get("eps", 1e-5),
        )
    if op == "batch_norm_stats":
        x = t["x"]
        axes = (0, *range(2, x.ndim))
        correction = 1 if attrs.get("unbiased", False) else 0
        return torch.stack([x.mean(axes), x.var(axes, correction=correction)])
    w = t["weight"]
    return F.rms_norm(t["x"], tuple(w.shape), w, attrs.get("eps", 1e-6))


def _compare_with_torch(op, inputs, attrs, wrt):
    torch = pytest.importorskip("torch")
    spec, feeds = support.op_graph(op, inputs, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=tuple(wrt), loss="loss"))
    tensors = {k: torch.tensor(a, requires_grad=k in wrt) for k, a in inputs.items()}
    expected = _torch_call(torch, op, tensors, attrs)
    (expected * torch.tensor(feeds["__weight"])).sum().backward()
    assert support.rel(result.outputs["out"], expected.detach().numpy()) <= 1e-9
    for name in wrt:
        assert support.rel(result.grads[name], tensors[name].grad.numpy()) <= 1e-9, name


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_matches_torch(case_id, op, inputs, attrs, wrt):
    _compare_with_torch(op, inputs, attrs, wrt)


def _degenerate_bn():
    """Channel 0 constant (zero batch variance: xhat = 0, the output is the bias),
    channel 1 with a zero weight, channel 2 far from 0 (mean 1e3, std 1)."""
    inputs = bn_inputs(4, 3, 2, seed=60)
    inputs["x"][:, 0] = 0.7
    inputs["x"][:, 2] = normal(4, 2, seed=61, shift=1e3)
    inputs["weight"][1] = 0.0
    return inputs


BOUNDARIES = [
    ("batch_norm-train-degenerate", "batch_norm", _degenerate_bn(), {"training": True}),
    ("batch_norm-eval-degenerate", "batch_norm", _degenerate_bn(), {}),
    ("batch_norm-eval-eps0", "batch_norm", bn_inputs(3, 2, 3, seed=71), {"eps": 0.0}),
    ("batch_norm-eval-batch1", "batch_norm", bn_inputs(1, 4, seed=72), {}),
    (
        "rms_norm-zero-row",
        "rms_norm",
        {"x": np.vstack([np.zeros(5), normal(2, 5, seed=80)]), "weight": normal(5, seed=81)},
        {},
    ),
    (
        "rms_norm-eps0",
        "rms_norm",
        {"x": normal(3, 4, seed=82), "weight": normal(4, seed=83)},
        {"eps": 0.0},
    ),
]


@pytest.mark.parametrize("case_id, op, inputs, attrs", BOUNDARIES, ids=[b[0] for b in BOUNDARIES])
def test_boundaries_match_torch(case_id, op, inputs, attrs):
    wrt = BN_WRT if op == "batch_norm" else ["x", "weight"]
    _compare_with_torch(op, inputs, attrs, wrt)


@pytest.mark.parametrize("training", [True, False])
def test_running_statistics_get_no_gradient(training):
    """running_mean and running_var are no_grad (zeros when asked for), in both modes."""
    assert REGISTRY["batch_norm"].no_grad == (3, 4)
    spec, feeds = support.op_graph("batch_norm", bn_inputs(3, 2), {"training": training})
    wrt = ("running_mean", "running_var")
    grads = support.ENGINE.run(RunRequest(spec, feeds, wrt=wrt, loss="loss")).grads
    for name in wrt:
        np.testing.assert_array_equal(grads[name], np.zeros(2))


# --- forward memory: no temporary of x's size besides the result --------------------------
@pytest.mark.parametrize(
    "op, inputs, attrs",
    [
        ("batch_norm", bn_inputs(64, 8, 16, 16), {"training": True}),
        ("batch_norm", bn_inputs(64, 8, 16, 16), {}),
        ("rms_norm", {"x": normal(64, 8, 256), "weight": normal(8, 256)}, {}),
    ],
    ids=["batch_norm-train", "batch_norm-eval", "rms_norm"],
)
def test_forward_allocates_only_its_result(op, inputs, attrs):
    forward = REGISTRY[op].forward
    full = {"eps": 1e-5, **({"training": False} if op == "batch_norm" else {}), **attrs}
    x = inputs["x"]
    tracemalloc.start()
    try:
        out = forward(*inputs.values(), **full)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == x.shape and out.dtype == x.dtype
    assert peak < 1.1 * x.nbytes, f"peak {peak} bytes for a result of {x.nbytes}"


def test_batch_norm_stats_allocate_a_chunk_of_x():
    """The centered x is formed an eighth of the batch at a time (plus einsum's buffers)."""
    x = normal(64, 8, 16, 16)
    tracemalloc.start()
    try:
        out = REGISTRY["batch_norm_stats"].forward(x, unbiased=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (2, 8)
    assert peak < 0.25 * x.nbytes, f"peak {peak} bytes for x of {x.nbytes}"


# --- validation ----------------------------------------------------------------------------
def _bn_with(**changes):
    inputs = bn_inputs(2, 3, 2)
    inputs.update(changes)
    return inputs


BAD = [
    ("batch_norm", _bn_with(x=normal(3)), {}, "rank >= 2"),
    ("batch_norm", _bn_with(weight=normal(4)), {}, "weight"),
    ("batch_norm", _bn_with(bias=normal(3, 1)), {}, "bias"),
    ("batch_norm", _bn_with(running_mean=normal(2)), {}, "running_mean"),
    ("batch_norm", _bn_with(running_var=normal(1)), {}, "running_var"),
    ("batch_norm", _bn_with(weight=normal(3).astype(np.float32)), {}, "dtype mismatch"),
    ("batch_norm", {k: a.astype(np.int64) for k, a in _bn_with().items()}, {}, "dtype"),
    ("batch_norm", bn_inputs(1, 3), {"training": True}, "more than 1 value per channel"),
    ("batch_norm", bn_inputs(2, 3), {"eps": -1e-5}, ">= 0"),
    ("batch_norm", bn_inputs(2, 3), {"training": True, "eps": 0.0}, "positive when training"),
    ("batch_norm", bn_inputs(2, 3), {"eps": float("inf")}, "finite"),
    ("batch_norm", bn_inputs(2, 3), {"momentum": 0.1}, "unexpected attribute"),
    ("batch_norm_stats", {"x": normal(3)}, {}, "rank >= 2"),
    ("batch_norm_stats", {"x": normal(1, 3)}, {"unbiased": True}, "more than 1 value"),
    ("rms_norm", {"x": normal(2, 3), "w": normal(2)}, {}, "trailing shape"),
    ("rms_norm", {"x": normal(2, 3), "w": np.array(1.0)}, {}, "trailing shape"),
    ("rms_norm", {"x": normal(3), "w": normal(2, 3)}, {}, "trailing shape"),
    ("rms_norm", {"x": normal(2, 3), "w": normal(3)}, {"eps": -1.0}, ">= 0"),
    ("rms_norm", {"x": normal(2, 3), "w": normal(3).astype(np.float32)}, {}, "dtype mismatch"),
]


@pytest.mark.parametrize(
    "op, inputs, attrs, message", BAD, ids=[f"{b[0]}-{k}-{b[3]}" for k, b in enumerate(BAD)]
)
def test_invalid_graphs_are_rejected_naming_the_node(op, inputs, attrs, message):
    with pytest.raises(InvalidArgument, match="node 'out'") as info:
        support.run_op(op, inputs, attrs)
    assert message in str(info.value)


# --- SDK: wrappers and the running-statistics composite, through a real server -------------
@pytest.fixture(scope="module")
def client():
    with remat.Client.in_process() as client:
        yield client


def _stats_graph(x_shape, c, momentum, unbiased, dtype="float64"):
    g = remat.Graph("running_stats")
    x = g.input("x", x_shape, dtype=dtype)
    mean = g.input("mean", (c,), dtype=dtype)
    var = g.input("var", (c,), dtype=dtype)
    new_mean, new_var = remat.ops.batch_norm_running_stats(
        x, mean, var, momentum=momentum, unbiased=unbiased, name="bn"
    )
    g.output("new_mean", new_mean)
    g.output("new_var", new_var)
    return g


SHAPES = [(6, 3), (3, 2, 5), (2, 3, 2, 3), (2, 2, 1, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_running_stats_match_torch_update(client, shape):
    torch = pytest.importorskip("torch")
    c = shape[1]
    x, mean, var = normal(*shape, seed=90, shift=2.0), normal(c, seed=91), positive(c, seed=92)
    result = client.run(_stats_graph(shape, c, 0.1, True), {"x": x, "mean": mean, "var": var})
    t_mean, t_var = torch.tensor(mean), torch.tensor(var)
    torch.nn.functional.batch_norm(torch.tensor(x), t_mean, t_var, training=True, momentum=0.1)
    assert support.rel(result.outputs["new_mean"], t_mean.numpy()) <= 1e-9
    assert support.rel(result.outputs["new_var"], t_var.numpy()) <= 1e-9


@pytest.mark.parametrize("momentum", [0.1, 0.25, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_running_stats_formula(client, shape, momentum):
    c = shape[1]
    x, mean, var = normal(*shape, seed=93), normal(c, seed=94), positive(c, seed=95)
    axes = (0, *range(2, len(shape)))
    n = x.size // c
    for unbiased in (True, False):
        graph = _stats_graph(shape, c, momentum, unbiased)
        result = client.run(graph, {"x": x, "mean": mean, "var": var})
        batch_var = x.var(axis=axes) * (n / (n - 1) if unbiased else 1.0)
        expected_mean = (1 - momentum) * mean + momentum * x.mean(axis=axes)
        expected_var = (1 - momentum) * var + momentum * batch_var
        np.testing.assert_allclose(result.outputs["new_mean"], expected_mean, rtol=1e-12)
        np.testing.assert_allclose(result.outputs["new_var"], expected_var, rtol=1e-12)


def test_running_stats_need_no_static_shape(client):
    """The composite knows no rank or size: a batch of -1 binds at run time, float32
    stays float32."""
    graph = _stats_graph((-1, 3, 4), 3, 0.1, True, dtype="float32")
    for batch in (2, 5):
        x = normal(batch, 3, 4, seed=batch).astype(np.float32)
        mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
        out = client.run(graph, {"x": x, "mean": mean, "var": var}).outputs
        assert out["new_mean"].dtype == out["new_var"].dtype == np.float32
        np.testing.assert_allclose(out["new_mean"], 0.1 * x.mean(axis=(0, 2)), rtol=1e-5)
        np.testing.assert_allclose(
            out["new_var"], 0.9 + 0.1 * x.var(axis=(0, 2), ddof=1), rtol=1e-5
        )


def test_running_stats_differentiate(client):
    """The composite is made of differentiable ops: its gradient w.r.t. x matches
    torch's through mean and unbiased var."""
    torch = pytest.importorskip("torch")
    graph = _stats_graph((3, 2, 4), 2, 0.1, True)
    graph.output("loss", remat.ops.sum(graph["bn/mean"] ** 2) + remat.ops.sum(graph["bn/var"]))
    x = normal(3, 2, 4, seed=96)
    result = client.run(
        graph, {"x": x, "mean": np.ones(2), "var": np.ones(2)}, wrt=["x"], loss="loss"
    )
    t = torch.tensor(x, requires_grad=True)
    new_mean, new_var = 0.9 + 0.1 * t.mean((0, 2)), 0.9 + 0.1 * t.var((0, 2), unbiased=True)
    ((new_mean**2).sum() + new_var.sum()).backward()
    assert support.rel(result.grads["x"], t.grad.numpy()) <= 1e-9


def test_sdk_wrappers_match_the_ops(client):
    g = remat.Graph("norms")
    inputs = bn_inputs(4, 3, 2, seed=100)
    handles = {k: g.input(k, a.shape, dtype="float64") for k, a in inputs.items()}
    rx = g.input("rx", (2, 3, 4), dtype="float64")
    rw = g.input("rw", (3, 4), dtype="float64")
    args = [handles[k] for k in inputs]
    g.output("train", remat.ops.batch_norm(*args, training=True, eps=1e-3, name="bn_train"))
    g.output("eval", remat.ops.batch_norm(*args))
    g.output("rms", remat.ops.rms_norm(rx, rw, eps=1e-4))
    g.output("loss", remat.ops.sum(remat.ops.tanh(g["bn_train"])))
    feeds = {**inputs, "rx": normal(2, 3, 4, seed=101), "rw": normal(3, 4, seed=102)}
    result = client.run(g, feeds, wrt=["x", "weight"], loss="loss")
    assert g["bn_train"].op == "batch_norm"
    np.testing.assert_array_equal(
        result.outputs["train"],
        support.run_op("batch_norm", inputs, {"training": True, "eps": 1e-3}),
    )
    np.testing.assert_array_equal(result.outputs["eval"], support.run_op("batch_norm", inputs))
    np.testing.assert_array_equal(
        result.outputs["rms"],
        support.run_op("rms_norm", {"x": feeds["rx"], "w": feeds["rw"]}, {"eps": 1e-4}),
    )
    assert result.grads["x"].shape == inputs["x"].shape
    assert result.grads["weight"].shape == (3,)
