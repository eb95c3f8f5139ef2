"""The SDK contract (DESIGN.md, "Wire and SDK contract") against a real server."""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

import remat

SEED = 20240


def here() -> int:
    """The caller's line number (for asserting the file:line the SDK recorded)."""
    return sys._getframe(1).f_lineno


# --- building graphs ------------------------------------------------------------------------
def test_operators_and_python_scalars_on_either_side(client):
    g = remat.Graph("operators")
    x = g.input("x", (2, 3), "float64")
    w = g.input("w", (3, 2), dtype="float64")
    exprs = {
        "add": x + 1.5, "radd": 2 + x, "sub": x - 0.5, "rsub": 3 - x, "mul": x * 2,
        "rmul": 0.25 * x, "div": x / 4, "rdiv": 1.0 / x, "matmul": x @ w, "pow3": x ** 3,
        "pow2": x ** 2, "powhalf": x ** 0.5, "rpow": 2 ** x, "rpow_half": 0.5 ** x, "neg": -x,
        "mixed": -(x * x - 1) / (x + 2) ** 2,
    }
    for name, node in exprs.items():
        assert isinstance(node, remat.Node)
        assert node.dtype == "float64", name  # scalars take the tensor's dtype
        g.output(name, node)
    rng = np.random.default_rng(SEED)
    xv, wv = rng.uniform(0.5, 2.0, (2, 3)), rng.standard_normal((3, 2))
    out = client.run(g, {"x": xv, "w": wv}).outputs
    expected = {
        "add": xv + 1.5, "radd": 2 + xv, "sub": xv - 0.5, "rsub": 3 - xv, "mul": xv * 2,
        "rmul": 0.25 * xv, "div": xv / 4, "rdiv": 1.0 / xv, "matmul": xv @ wv, "pow3": xv ** 3,
        "pow2": xv ** 2, "powhalf": np.sqrt(xv), "rpow": 2 ** xv, "rpow_half": 0.5 ** xv,
        "neg": -xv,
        "mixed": -(xv * xv - 1) / (xv + 2) ** 2,
    }
    assert set(out) == set(expected)
    for name, value in expected.items():
        assert out[name].dtype == np.float64, name
        np.testing.assert_allclose(out[name], value, rtol=1e-12, err_msg=name)
    # Gradients flow through the scalar-on-the-left forms too.
    g.output("total", remat.sum(3 - 2 ** x * 0.5 + 1 / x))
    grad = client.run(g, {"x": xv, "w": wv}, wrt=["x"], loss="total").grads["x"]
    np.testing.assert_allclose(grad, -0.5 * np.log(2) * 2 ** xv - 1 / xv ** 2, rtol=1e-12)
    with pytest.raises(ValueError):
        (-2) ** x  # no real-valued gradient path for a negative base


def test_op_functions_take_names_and_graph_indexing(client):
    g = remat.Graph("named")
    x = g.input("x", (4, 3), "float64")
    assert isinstance(x, remat.Node) and x.op == "input" and x.name == "x"
    h = remat.relu(x, name="h")
    s = remat.sum(h, axis=1, keepdims=True, name="rowsum")
    p = remat.softmax(x, axis=-1, name="probs")
    m = remat.mean(x, name="avg")
    returned = g.output("rowsum", s)
    g.output("probs", p)
    g.output("avg", m)
    assert returned is s
    assert g["h"] is h and g["rowsum"].op == "sum" and g["x"] is x
    assert "probs" in g and "nothing" not in g
    assert g.output_names == ["rowsum", "probs", "avg"]
    with pytest.raises(KeyError):
        g["nothing"]
    with pytest.raises(ValueError):
        g.output("avg", h)  # an output name is defined once
    xv = np.random.default_rng(SEED).standard_normal((4, 3))
    out = client.run(g, {"x": xv}, fetch=["rowsum", "probs"]).outputs
    assert set(out) == {"rowsum", "probs"}
    np.testing.assert_allclose(out["rowsum"], np.maximum(xv, 0).sum(1, keepdims=True), rtol=1e-12)
    e = np.exp(xv - xv.max(-1, keepdims=True))
    np.testing.assert_allclose(out["probs"], e / e.sum(-1, keepdims=True), rtol=1e-12)


def test_duplicate_names_are_rejected_client_side():
    g = remat.Graph("dups")
    x = g.input("x", (2,))
    with pytest.raises(ValueError, match="'x'"):
        g.input("x", (3,))
    remat.relu(x, name="r")
    with pytest.raises(ValueError, match="'r'"):
        remat.exp(x, name="r")
    with pytest.raises(ValueError, match="'x'"):
        remat.neg(x, name="x")
    other = remat.Graph("other")
    with pytest.raises(ValueError):
        g.add("add", (x, other.input("y", (2,))))
    with pytest.raises(ValueError):
        g.input("z", (2,), dtype="complex64")
    assert [n.name for n in g.nodes] == ["r"] and [i.name for i in g.inputs] == ["x"]


def rich_graph() -> remat.Graph:
    """Every attribute kind: ints, floats, bool, string, tensor constants; a -1 batch."""
    g = remat.Graph("rich")
    x = g.input("x", (-1, 2, 3), "float32")
    idx = g.input("idx", (2,), "int64")
    c = g.constant(np.arange(3, dtype=np.float32), name="c")
    y = remat.reshape(x + c, (-1, 6), name="flat")
    y = remat.take(y, idx, axis=1, name="picked")
    z = remat.sum(remat.transpose(y, (1, 0)), axis=(0,), keepdims=True)
    z = remat.cast(remat.abs(z) ** 1.5, "float64", name="as64")
    g.output("z", z)
    g.output("y", y)
    return g


def test_proto_and_json_round_trips():
    g = rich_graph()
    message = g.to_proto()
    back = remat.Graph.from_proto(message)
    assert back.to_proto() == message
    assert back.output_names == g.output_names
    assert [n.name for n in back] == [n.name for n in g]
    assert back["as64"].dtype == "float64" and back["picked"].op == "take"
    from_json = remat.Graph.from_json(g.to_json())
    assert from_json.to_proto() == message
    # Sources survive: they are what the server quotes in errors.
    assert all(n.source.startswith("tests/service/test_sdk.py:") or
               n.source.startswith("test_sdk.py:") for n in message.nodes)
    # Deterministic bytes: the registered content id depends on them.
    assert rich_graph().to_proto().SerializeToString(deterministic=True) != b""


def test_round_tripped_graph_runs_identically(client):
    g = rich_graph()
    rng = np.random.default_rng(SEED)
    feeds = {"x": rng.standard_normal((5, 2, 3)).astype(np.float32), "idx": np.array([4, 0])}
    a = client.run(g, feeds)
    b = client.run(remat.Graph.from_json(g.to_json()), feeds)
    for name in ("y", "z"):
        np.testing.assert_array_equal(a.outputs[name], b.outputs[name])
    flat = (feeds["x"] + np.arange(3, dtype=np.float32)).reshape(5, 6)[:, [4, 0]]
    np.testing.assert_allclose(a.outputs["y"], flat, rtol=1e-6)
    assert a.outputs["z"].dtype == np.float64 and a.outputs["z"].shape == (1, 5)
    np.testing.assert_allclose(a.outputs["z"], np.abs(flat.T.sum(0, keepdims=True)) ** 1.5,
                               rtol=1e-5)


# --- the client ---------------------------------------------------------------------------------
def quadratic() -> remat.Graph:
    g = remat.Graph("quadratic")
    x = g.input("x", (-1, 3), "float64")
    w = g.input("w", (3, 2), "float64")
    h = remat.tanh(x @ w, name="h")
    g.output("loss", remat.sum(h * h, name="s"))
    g.output("h", h)
    return g


def test_run_returns_numpy_arrays_and_every_metric(client):
    rng = np.random.default_rng(SEED)
    for batch in (2, 5):  # a -1 batch dimension binds per call
        xv, wv = rng.standard_normal((batch, 3)), rng.standard_normal((3, 2))
        result = client.run(quadratic(), {"x": xv, "w": wv}, wrt=["x", "w"], loss="loss",
                            policy="store_all")
        assert isinstance(result, remat.RunResult)
        for value in (*result.outputs.values(), *result.grads.values()):
            assert isinstance(value, np.ndarray) and value.flags.writeable
        h = np.tanh(xv @ wv)
        dz = 2 * h * (1 - h * h)
        np.testing.assert_allclose(result.outputs["loss"], np.sum(h * h), rtol=1e-12)
        np.testing.assert_allclose(result.grads["x"], dz @ wv.T, rtol=1e-10)
        np.testing.assert_allclose(result.grads["w"], xv.T @ dz, rtol=1e-10)
        m = result.metrics
        assert isinstance(m, remat.Metrics)
        assert {f.name for f in dataclasses.fields(m)} >= {
            "peak_bytes", "predicted_peak_bytes", "forward_seconds", "backward_seconds",
            "recompute_seconds", "total_seconds", "nodes_computed", "recomputed_nodes", "flops",
            "recompute_flops"}
        assert m.peak_bytes == m.predicted_peak_bytes >= xv.nbytes + wv.nbytes
        assert m.forward_seconds > 0 and m.backward_seconds > 0
        assert m.total_seconds >= m.forward_seconds + m.backward_seconds
        assert m.nodes_computed >= 4 and m.flops >= 2 * batch * 3 * 2
        # store_all recomputes nothing.
        assert m.recomputed_nodes == 0 and m.recompute_flops == 0 and m.recompute_seconds == 0
    with pytest.raises(ValueError):
        remat.policies.resolve("no_such_policy")


def test_in_process_client_is_a_context_manager():
    g = remat.Graph("tiny")
    x = g.input("x", (3,), "float64")
    g.output("y", remat.exp(x))
    with remat.Client.in_process() as client:
        target = client.target
        np.testing.assert_allclose(client.run(g, {"x": [0.0, 1.0, 2.0]}).outputs["y"],
                                   np.exp([0.0, 1.0, 2.0]), rtol=1e-15)
    with pytest.raises(ValueError):  # the channel is closed
        client.run(g, {"x": [0.0, 1.0, 2.0]})
    # ... and the in-process server is gone.
    with remat.Client(target, timeout=2) as other:
        with pytest.raises((remat.UnavailableError, remat.DeadlineExceededError)):
            other.run(g, {"x": [0.0, 1.0, 2.0]})


def hvp_graph() -> remat.Graph:
    g = remat.Graph("hvp")
    x = g.input("x", (4,), "float64")
    w = g.input("w", (4, 3), "float64")
    g.output("loss", remat.sum(remat.tanh(x @ w) ** 2) + remat.sum(remat.exp(x * 0.3)))
    return g


def test_differentiate_extend_and_differentiate_again_gives_hessian_vector_products(client):
    rng = np.random.default_rng(SEED)
    feeds = {"x": rng.standard_normal(4), "w": rng.standard_normal((4, 3))}
    v = rng.standard_normal(4)
    g = hvp_graph()
    joint = client.differentiate(g, wrt=["x"], loss="loss")
    assert isinstance(joint, remat.Graph)
    assert joint.output_names == ["loss", "grad/x"] and joint.grad_outputs == {"x": "grad/x"}
    # Extend the joint graph: gv = <grad f(x), v>; its gradient in x is H v.
    grad_x = joint[joint.outputs["grad/x"]]
    vec = joint.input("v", (4,), "float64")
    joint.output("gv", remat.sum(grad_x * vec, name="gv"))
    hvp = client.run(joint, {**feeds, "v": v}, wrt=["x"], loss="gv").grads["x"]
    # The same by differentiating the extended graph symbolically.
    second = client.differentiate(joint, wrt=["x"], loss="gv")
    assert second.grad_outputs == {"x": "grad2/x"}
    assert second.output_names == ["loss", "grad/x", "gv", "grad2/x"]
    symbolic = client.run(second, {**feeds, "v": v}, fetch=["grad2/x"]).outputs["grad2/x"]
    np.testing.assert_allclose(symbolic, hvp, rtol=1e-12)
    # Against centered differences of the gradient, in float64.
    h = 1e-5

    def grad_at(x):
        return client.run(g, {**feeds, "x": x}, wrt=["x"], loss="loss").grads["x"]
    numeric = (grad_at(feeds["x"] + h * v) - grad_at(feeds["x"] - h * v)) / (2 * h)
    relative = np.max(np.abs(hvp - numeric)) / np.max(np.abs(numeric))
    assert relative <= 1e-6, relative


# --- errors ------------------------------------------------------------------------------------
def test_graph_errors_are_remat_exceptions_quoting_the_users_line(client):
    g = remat.Graph("bad")
    x = g.input("x", (2, 3), "float64")
    bad, line = remat.matmul(x, x, name="bad_matmul"), here()
    g.output("out", bad)
    with pytest.raises(remat.InvalidArgumentError) as info:
        client.run(g, {"x": np.zeros((2, 3))})
    message = str(info.value)
    assert f"test_sdk.py:{line}" in message, message
    assert "'bad_matmul'" in message
    assert info.value.code == "INVALID_ARGUMENT"
    assert isinstance(info.value, remat.RematError) and isinstance(info.value, ValueError)
    with pytest.raises(remat.InvalidArgumentError, match=f"test_sdk.py:{line}"):
        client.differentiate(g, wrt=["x"])
    with pytest.raises(remat.InvalidArgumentError, match=f"test_sdk.py:{line}"):
        client.register(g)


def test_run_time_errors_quote_the_users_line(client):
    g = remat.Graph("gather")
    x = g.input("x", (3,), "float64")
    idx = g.input("idx", (2,), "int64")
    picked, line = remat.take(x, idx, name="picked"), here()
    g.output("out", picked)
    with pytest.raises(remat.InvalidArgumentError) as info:
        client.run(g, {"x": np.zeros(3), "idx": np.array([0, 3])})
    assert f"test_sdk.py:{line}" in str(info.value) and "'picked'" in str(info.value)
    np.testing.assert_array_equal(
        client.run(g, {"x": np.array([1.0, 2.0, 3.0]), "idx": np.array([2, 0])}).outputs["out"],
        [3.0, 1.0])


def test_request_errors_map_to_remat_exceptions(client):
    g = quadratic()
    feeds = {"x": np.zeros((2, 3)), "w": np.zeros((3, 2))}
    with pytest.raises(remat.InvalidArgumentError, match="'ghost'"):
        client.run(g, feeds, wrt=["ghost"], loss="loss")
    with pytest.raises(remat.InvalidArgumentError, match="'h'"):
        client.run(g, feeds, wrt=["x"], loss="h")  # not a scalar
    with pytest.raises(remat.InvalidArgumentError, match="'w'"):
        client.run(g, {"x": feeds["x"]})
    # A cotangent makes a non-scalar output differentiable: a vector-Jacobian product.
    ct = np.ones((2, 2))
    vjp = client.run(g, feeds, wrt=["w"], cotangents={"h": ct}).grads["w"]
    np.testing.assert_allclose(vjp, feeds["x"].T @ ct, rtol=1e-12)  # tanh'(0) = 1
