"""The SDK contract (DESIGN.md, "Wire and SDK contract") against a real server. Graph
building runs against remat.Client; what a call returns, against both clients
(`any_client`)."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

import remat
from remat_proto import wire as proto_wire

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
        "add": x + 1.5,
        "radd": 2 + x,
        "sub": x - 0.5,
        "rsub": 3 - x,
        "mul": x * 2,
        "rmul": 0.25 * x,
        "div": x / 4,
        "rdiv": 1.0 / x,
        "matmul": x @ w,
        "pow3": x**3,
        "pow2": x**2,
        "powhalf": x**0.5,
        "rpow": 2**x,
        "rpow_half": 0.5**x,
        "neg": -x,
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
        "add": xv + 1.5,
        "radd": 2 + xv,
        "sub": xv - 0.5,
        "rsub": 3 - xv,
        "mul": xv * 2,
        "rmul": 0.25 * xv,
        "div": xv / 4,
        "rdiv": 1.0 / xv,
        "matmul": xv @ wv,
        "pow3": xv**3,
        "pow2": xv**2,
        "powhalf": np.sqrt(xv),
        "rpow": 2**xv,
        "rpow_half": 0.5**xv,
        "neg": -xv,
        "mixed": -(xv * xv - 1) / (xv + 2) ** 2,
    }
    assert set(out) == set(expected)
    for name, value in expected.items():
        assert out[name].dtype == np.float64, name
        np.testing.assert_allclose(out[name], value, rtol=1e-12, err_msg=name)
    # Gradients flow through the scalar-on-the-left forms too.
    g.output("total", remat.sum(3 - 2**x * 0.5 + 1 / x))
    grad = client.run(g, {"x": xv, "w": wv}, wrt=["x"], loss="total").grads["x"]
    np.testing.assert_allclose(grad, -0.5 * np.log(2) * 2**xv - 1 / xv**2, rtol=1e-12)
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
    assert g["avg"] is m and g["probs"] is p  # output names resolve to their nodes
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
    assert all(
        n.source.startswith("tests/service/test_sdk.py:") or n.source.startswith("test_sdk.py:")
        for n in message.nodes
    )
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
    np.testing.assert_allclose(
        a.outputs["z"], np.abs(flat.T.sum(0, keepdims=True)) ** 1.5, rtol=1e-5
    )


# --- the client ---------------------------------------------------------------------------------
def quadratic() -> remat.Graph:
    g = remat.Graph("quadratic")
    x = g.input("x", (-1, 3), "float64")
    w = g.input("w", (3, 2), "float64")
    h = remat.tanh(x @ w, name="h")
    g.output("loss", remat.sum(h * h, name="s"))
    g.output("h", h)
    return g


def test_run_returns_numpy_arrays_and_every_metric(any_client):
    rng = np.random.default_rng(SEED)
    for batch in (2, 5):  # a -1 batch dimension binds per call
        xv, wv = rng.standard_normal((batch, 3)), rng.standard_normal((3, 2))
        result = any_client.run(
            quadratic(), {"x": xv, "w": wv}, wrt=["x", "w"], loss="loss", policy="store_all"
        )
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
            "peak_bytes",
            "predicted_peak_bytes",
            "forward_seconds",
            "backward_seconds",
            "recompute_seconds",
            "total_seconds",
            "nodes_computed",
            "recomputed_nodes",
            "flops",
            "recompute_flops",
        }
        assert m.peak_bytes == m.predicted_peak_bytes >= xv.nbytes + wv.nbytes
        assert m.forward_seconds > 0 and m.backward_seconds > 0
        assert m.total_seconds >= m.forward_seconds + m.backward_seconds
        assert m.nodes_computed >= 4 and m.flops >= 2 * batch * 3 * 2
        # store_all recomputes nothing.
        assert m.recomputed_nodes == 0 and m.recompute_flops == 0 and m.recompute_seconds == 0
    with pytest.raises(ValueError):
        remat.policies.resolve("no_such_policy")


def hvp_graph() -> remat.Graph:
    g = remat.Graph("hvp")
    x = g.input("x", (4,), "float64")
    w = g.input("w", (4, 3), "float64")
    g.output("loss", remat.sum(remat.tanh(x @ w) ** 2) + remat.sum(remat.exp(x * 0.3)))
    return g


def test_differentiate_extend_and_differentiate_again_gives_hessian_vector_products(any_client):
    rng = np.random.default_rng(SEED)
    feeds = {"x": rng.standard_normal(4), "w": rng.standard_normal((4, 3))}
    v = rng.standard_normal(4)
    g = hvp_graph()
    joint = any_client.differentiate(g, wrt=["x"], loss="loss")
    assert isinstance(joint, remat.Graph)
    assert joint.output_names == ["loss", "grad/x"] and joint.grad_outputs == {"x": "grad/x"}
    # Extend the joint graph: gv = <grad f(x), v>; its gradient in x is H v.
    grad_x = joint[joint.outputs["grad/x"]]
    vec = joint.input("v", (4,), "float64")
    joint.output("gv", remat.sum(grad_x * vec, name="gv"))
    hvp = any_client.run(joint, {**feeds, "v": v}, wrt=["x"], loss="gv").grads["x"]
    # The same by differentiating the extended graph symbolically.
    second = any_client.differentiate(joint, wrt=["x"], loss="gv")
    assert second.grad_outputs == {"x": "grad2/x"}
    assert second.output_names == ["loss", "grad/x", "gv", "grad2/x"]
    symbolic = any_client.run(second, {**feeds, "v": v}, fetch=["grad2/x"]).outputs["grad2/x"]
    np.testing.assert_allclose(symbolic, hvp, rtol=1e-12)
    # Against centered differences of the gradient, in float64.
    h = 1e-5

    def grad_at(x):
        return any_client.run(g, {**feeds, "x": x}, wrt=["x"], loss="loss").grads["x"]

    numeric = (grad_at(feeds["x"] + h * v) - grad_at(feeds["x"] - h * v)) / (2 * h)
    relative = np.max(np.abs(hvp - numeric)) / np.max(np.abs(numeric))
    assert relative <= 1e-6, relative


def tanh_layer(n: int = 5, d: int = 4, k: int = 3):
    """loss = sum(tanh(x @ w)): grad_w = x^T (1 - t^2), and H v = x^T (-2 t (1 - t^2) (x v))
    with t = tanh(x w)."""
    g = remat.Graph("tanh_layer")
    x = g.input("x", (n, d), "float64")
    w = g.input("w", (d, k), "float64")
    g.output("loss", remat.sum(remat.tanh(x @ w)))
    rng = np.random.default_rng(SEED)
    feeds = {"x": rng.standard_normal((n, d)), "w": rng.standard_normal((d, k)) / 2}

    def expected(f, v):
        t = np.tanh(f["x"] @ f["w"])
        return (np.sum(t), f["x"].T @ (1 - t * t), f["x"].T @ (-2 * t * (1 - t * t) * (f["x"] @ v)))

    return g, feeds, rng.standard_normal((d, k)), expected


def quadratic_form(d: int = 5):
    """loss = sum(w * (A @ w)) = w^T A w: grad_w = (A + A^T) w, H v = (A + A^T) v."""
    g = remat.Graph("quadratic_form")
    a = g.input("A", (d, d), "float64")
    w = g.input("w", (d, 1), "float64")
    g.output("loss", remat.sum(w * (a @ w)))
    rng = np.random.default_rng(SEED + 1)
    feeds = {"A": rng.standard_normal((d, d)), "w": rng.standard_normal((d, 1))}

    def expected(f, v):
        sym = f["A"] + f["A"].T
        return (f["w"].T @ f["A"] @ f["w"]).item(), sym @ f["w"], sym @ v

    return g, feeds, rng.standard_normal((d, 1)), expected


@pytest.mark.parametrize("build", [tanh_layer, quadratic_form], ids=lambda f: f.__name__)
def test_output_names_index_the_joint_graph_and_give_hessian_vector_products(any_client, build):
    """`joint["grad/w"]` is the node the output names; sum(grad_w * v) with v a new
    input, differentiated again in w, is the Hessian-vector product H v (float64,
    against the analytic one)."""
    g, feeds, v, expected = build()
    loss, grad, hvp = expected(feeds, v)
    joint = any_client.differentiate(g, wrt=["w"], loss="loss")
    assert joint.output_names == ["loss", "grad/w"]
    grad_w = joint["grad/w"]  # an output name, resolved to the node it names
    assert isinstance(grad_w, remat.Node) and grad_w is joint[joint.outputs["grad/w"]]
    assert joint["loss"] is joint[joint.outputs["loss"]] and "grad/w" in joint
    vec = joint.input("v", v.shape, "float64")
    joint.output("gv", remat.sum(joint["grad/w"] * vec))
    assert joint["gv"].op == "sum"
    second = any_client.differentiate(joint, wrt=["w"], loss="gv")
    assert second.grad_outputs == {"w": "grad2/w"}
    assert second.output_names == ["loss", "grad/w", "gv", "grad2/w"]
    feeds = {**feeds, "v": v}
    out = any_client.run(second, feeds, fetch=["loss", "grad/w", "gv", "grad2/w"]).outputs
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-12)
    np.testing.assert_allclose(out["grad/w"], grad, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out["gv"], np.sum(grad * v), rtol=1e-12)
    np.testing.assert_allclose(out["grad2/w"], hvp, rtol=1e-10, atol=1e-13)
    assert out["grad2/w"].dtype == np.float64 and out["grad2/w"].shape == v.shape
    # The same H v as a gradient of the extended joint graph, computed at run time.
    at_run_time = any_client.run(joint, feeds, wrt=["w"], loss="gv").grads["w"]
    np.testing.assert_allclose(at_run_time, hvp, rtol=1e-10, atol=1e-13)


def test_the_wire_form_is_computed_once_per_graph_version(any_client, monkeypatch):
    """A training loop that runs the same graph neither serializes nor hashes it again:
    `wire_form()` returns the same message until the graph changes."""
    made, hashed = [], []
    real_to_proto, real_content_id = proto_wire.graph_to_proto, proto_wire.content_id
    name = f"versions-{id(made)}"  # only this test's graph counts

    def to_proto(spec):
        message = real_to_proto(spec)
        if spec.name == name:
            made.append(message)
        return message

    def content_id(message):
        if any(message is ours for ours in made):  # not the server's copy of it
            hashed.append(message)
        return real_content_id(message)

    monkeypatch.setattr(proto_wire, "graph_to_proto", to_proto)
    monkeypatch.setattr(proto_wire, "content_id", content_id)
    g = remat.Graph(name)
    x = g.input("x", (3,), "float64")
    g.output("y", x * 2.0)
    message, graph_id = g.wire_form()
    assert g.wire_form()[0] is message and g.graph_id == graph_id
    copy = g.to_proto()
    assert copy == message and copy is not message  # to_proto is a copy to change freely
    copy.name = "changed"
    assert g.wire_form()[0].name == name
    feeds = {"x": np.arange(3.0)}
    for _ in range(3):
        np.testing.assert_array_equal(any_client.run(g, feeds).outputs["y"], [0.0, 2.0, 4.0])
    assert any_client.plan(g).peak_bytes > 0
    assert g.wire_form() == (message, graph_id) and g.wire_form()[0] is message
    assert len(made) == 1 and made[0] is message and len(hashed) == 1
    # A change is a new version: a new message and id, computed once.
    g.output("z", remat.exp(x))
    new_message, new_id = g.wire_form()
    assert new_message is not message and new_id != graph_id
    assert g.wire_form()[0] is new_message and len(made) == 2 and len(hashed) == 2
    for _ in range(2):
        out = any_client.run(g, feeds).outputs
        np.testing.assert_allclose(out["z"], np.exp(feeds["x"]), rtol=1e-15)
    assert len(made) == 2 and len(hashed) == 2
    assert [o.name for o in message.outputs] == ["y"]  # the old version's message stands


def test_renaming_a_graph_changes_its_wire_form_and_id():
    """The name is part of the content (two graphs that differ only in name have
    different ids), so renaming a graph is a change like any other, even after the
    graph was sent."""

    def build(name: str) -> remat.Graph:  # one place: the nodes' source lines agree
        g = remat.Graph(name)
        g.output("y", g.input("x", (3,), "float64") * 2.0)
        return g

    g = build("before")
    old_id = g.graph_id
    g.name = "after"
    assert g.wire_form()[0].name == "after"
    assert g.graph_id == build("after").graph_id != old_id


# --- errors ------------------------------------------------------------------------------------
def test_graph_errors_are_remat_exceptions_quoting_the_users_line(any_client):
    g = remat.Graph("bad")
    x = g.input("x", (2, 3), "float64")
    bad, line = remat.matmul(x, x, name="bad_matmul"), here()
    g.output("out", bad)
    with pytest.raises(remat.InvalidArgumentError) as info:
        any_client.run(g, {"x": np.zeros((2, 3))})
    message = str(info.value)
    assert f"test_sdk.py:{line}" in message, message
    assert "'bad_matmul'" in message
    assert info.value.code == "INVALID_ARGUMENT"
    assert isinstance(info.value, remat.RematError) and isinstance(info.value, ValueError)
    with pytest.raises(remat.InvalidArgumentError, match=f"test_sdk.py:{line}"):
        any_client.differentiate(g, wrt=["x"])
    with pytest.raises(remat.InvalidArgumentError, match=f"test_sdk.py:{line}"):
        any_client.register(g)


def test_run_time_errors_quote_the_users_line(any_client):
    g = remat.Graph("gather")
    x = g.input("x", (3,), "float64")
    idx = g.input("idx", (2,), "int64")
    picked, line = remat.take(x, idx, name="picked"), here()
    g.output("out", picked)
    with pytest.raises(remat.InvalidArgumentError) as info:
        any_client.run(g, {"x": np.zeros(3), "idx": np.array([0, 3])})
    assert f"test_sdk.py:{line}" in str(info.value) and "'picked'" in str(info.value)
    fixed = {"x": np.array([1.0, 2.0, 3.0]), "idx": np.array([2, 0])}
    np.testing.assert_array_equal(any_client.run(g, fixed).outputs["out"], [3.0, 1.0])


def test_request_errors_map_to_remat_exceptions(any_client):
    g = quadratic()
    feeds = {"x": np.zeros((2, 3)), "w": np.zeros((3, 2))}
    with pytest.raises(remat.InvalidArgumentError, match="'ghost'"):
        any_client.run(g, feeds, wrt=["ghost"], loss="loss")
    with pytest.raises(remat.InvalidArgumentError, match="'h'"):
        any_client.run(g, feeds, wrt=["x"], loss="h")  # not a scalar
    with pytest.raises(remat.InvalidArgumentError, match="'w'"):
        any_client.run(g, {"x": feeds["x"]})
    # A cotangent makes a non-scalar output differentiable: a vector-Jacobian product.
    ct = np.ones((2, 2))
    vjp = any_client.run(g, feeds, wrt=["w"], cotangents={"h": ct}).grads["w"]
    np.testing.assert_allclose(vjp, feeds["x"].T @ ct, rtol=1e-12)  # tanh'(0) = 1
