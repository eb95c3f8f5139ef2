"""Autodiff at engine level: fan-out, zero gradients, determinism, dtypes, higher order
(Hessian-vector products by differentiating the joint graph again), VJPs with output
cotangents, and the errors for a bad `wrt` or `loss`."""

from __future__ import annotations

import numpy as np
import pytest

from remat_server.engine import Engine, RunRequest
from remat_server.errors import InvalidArgument
from remat_server.graph import ir
from remat_server.graph.ir import GraphSpec, InputSpec, NodeSpec


def spec_of(inputs: dict, nodes, outputs) -> GraphSpec:
    """A GraphSpec from {name: array-or-(shape, dtype)}, NodeSpecs and (output, node) pairs."""
    specs = []
    for name, value in inputs.items():
        shape, dtype = (value.shape, value.dtype.name) if isinstance(value, np.ndarray) else value
        specs.append(InputSpec(name, tuple(shape), dtype))
    return GraphSpec("t", tuple(specs), tuple(nodes), tuple(outputs))


def N(name, op, *inputs, **attrs):
    return NodeSpec(name, op, tuple(inputs), attrs)


def run(spec, feeds, **kwargs):
    return Engine().run(RunRequest(spec, feeds, **kwargs))


def rel_err(actual, expected):
    return float(np.max(np.abs(actual - expected))) / max(float(np.max(np.abs(expected))), 1e-12)


# --- fan-out and zeros ------------------------------------------------------------------
def test_fan_out_sums_every_use():
    x = np.random.default_rng(1).standard_normal((3, 4))
    # x is read three times: twice by mul, once by tanh.
    spec = spec_of(
        {"x": x},
        [
            N("sq", "mul", "x", "x"),
            N("t", "tanh", "x"),
            N("s", "add", "sq", "t"),
            N("loss", "sum", "s"),
        ],
        [("loss", "loss")],
    )
    grads = run(spec, {"x": x}, wrt=("x",), loss="loss").grads
    np.testing.assert_allclose(grads["x"], 2 * x + 1 - np.tanh(x) ** 2, rtol=1e-13, atol=1e-14)


def test_fan_out_across_branches_of_different_depth():
    x = np.random.default_rng(2).standard_normal(5)
    # loss = sum(x) + sum(exp(x)) + sum(x * exp(x)): x has three consumers, e three.
    spec = spec_of(
        {"x": x},
        [
            N("e", "exp", "x"),
            N("xe", "mul", "x", "e"),
            N("a", "add", "x", "e"),
            N("b", "add", "a", "xe"),
            N("loss", "sum", "b"),
        ],
        [("loss", "loss")],
    )
    grads = run(spec, {"x": x}, wrt=("x",), loss="loss").grads
    np.testing.assert_allclose(grads["x"], 1 + np.exp(x) + np.exp(x) * (1 + x), rtol=1e-13)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unreached_input_gets_zeros_of_its_shape_and_dtype(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3)).astype(dtype)
    z = rng.standard_normal((4, 1, 5)).astype(dtype)
    unused = rng.standard_normal(7).astype(dtype)
    # z feeds another output but not the loss; `unused` feeds nothing at all.
    spec = spec_of(
        {"x": x, "z": z, "unused": unused},
        [N("loss", "sum", "x"), N("other", "exp", "z")],
        [("loss", "loss"), ("other", "other")],
    )
    result = run(spec, {"x": x, "z": z, "unused": unused}, wrt=("x", "z", "unused"), loss="loss")
    np.testing.assert_array_equal(result.grads["x"], np.ones_like(x))
    for name, like in (("z", z), ("unused", unused)):
        g = result.grads[name]
        assert g.shape == like.shape and g.dtype == like.dtype, name
        assert not g.any(), name


def test_input_reached_only_through_integer_path_gets_zeros():
    x = np.array([0.3, 1.7, 2.2])
    # cast to int64 cuts the gradient: the loss is piecewise constant in x.
    spec = spec_of(
        {"x": x},
        [
            N("i", "cast", "x", dtype="int64"),
            N("f", "cast", "i", dtype="float64"),
            N("loss", "sum", "f"),
        ],
        [("loss", "loss")],
    )
    grads = run(spec, {"x": x}, wrt=("x",), loss="loss").grads
    assert grads["x"].shape == (3,) and not grads["x"].any()


# --- determinism ---------------------------------------------------------------------
def mlp_spec(dtype="float64", batch=3, d_in=4, d_hidden=5, d_out=2):
    inputs = {
        "x": ((batch, d_in), dtype),
        "w1": ((d_in, d_hidden), dtype),
        "b1": ((d_hidden,), dtype),
        "w2": ((d_hidden, d_out), dtype),
        "y": ((batch, d_out), dtype),
    }
    nodes = [
        N("h1", "matmul", "x", "w1"),
        N("h1b", "add", "h1", "b1"),
        N("a1", "gelu", "h1b"),
        N("h2", "matmul", "a1", "w2"),
        N("p", "sigmoid", "h2"),
        N("d", "sub", "p", "y"),
        N("d2", "square", "d"),
        N("loss", "mean", "d2"),
    ]
    return spec_of(inputs, nodes, [("pred", "p"), ("loss", "loss")])


def mlp_feeds(dtype="float64", seed=0, batch=3, d_in=4, d_hidden=5, d_out=2):
    rng = np.random.default_rng(seed)
    shapes = {
        "x": (batch, d_in),
        "w1": (d_in, d_hidden),
        "b1": (d_hidden,),
        "w2": (d_hidden, d_out),
        "y": (batch, d_out),
    }
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def _signature(graph: ir.Graph):
    rows = []
    for node in graph:
        attrs = tuple(
            sorted(
                (k, v.tobytes() + v.dtype.str.encode() if isinstance(v, np.ndarray) else v)
                for k, v in node.attrs.items()
            )
        )
        rows.append((node.name, node.op, node.inputs, attrs, node.shape, node.dtype))
    return rows


def test_differentiation_is_deterministic():
    spec = mlp_spec()
    first = Engine().differentiate(spec, wrt=("w1", "b1", "w2"), loss="loss")
    second = Engine().differentiate(spec, wrt=("w1", "b1", "w2"), loss="loss")
    assert len(first.graph) > len(spec.nodes) + len(spec.inputs)  # a backward pass was added
    assert _signature(first.graph) == _signature(second.graph)
    assert dict(first.graph.outputs) == dict(second.graph.outputs)
    assert dict(first.grad_outputs) == {"w1": "grad/w1", "b1": "grad/b1", "w2": "grad/w2"}


def test_repeated_runs_give_bit_identical_gradients():
    spec, feeds = mlp_spec(), mlp_feeds()
    a = run(spec, feeds, wrt=("w1", "b1", "w2", "x"), loss="loss")
    b = run(spec, feeds, wrt=("w1", "b1", "w2", "x"), loss="loss")
    for name in a.grads:
        assert a.grads[name].tobytes() == b.grads[name].tobytes(), name


def test_backward_nodes_no_output_reads_are_pruned():
    """A VJP rule emits a gradient for every input (mul's for both x and w), so with
    wrt=x only, w's is dropped; the original nodes (an unread one too) all stay."""
    spec = spec_of(
        {"x": ((3,), "float64"), "w": ((3,), "float64")},
        [N("xw", "mul", "x", "w"), N("unread", "exp", "w"), N("s", "sum", "xw")],
        [("loss", "s")],
    )
    joint = Engine().differentiate(spec, wrt=("x",), loss="loss").graph
    read = joint.ancestors(set(joint.outputs.values()))
    backward = [n.name for n in joint if n.name not in {"x", "w", "xw", "unread", "s"}]
    assert backward and all(name in read for name in backward), backward
    assert {"x", "w", "xw", "unread", "s"} <= set(joint.nodes)
    full = Engine().differentiate(spec, wrt=("x", "w"), loss="loss").graph
    assert len(joint) < len(full)  # w's gradient was emitted for wrt=x too, and pruned


def test_pruning_keeps_every_cotangent_input():
    spec = spec_of(
        {"x": ((2,), "float64"), "y": ((2,), "float64")},
        [N("a", "tanh", "x"), N("b", "tanh", "y")],  # b's cotangent reaches no wrt input
        [("a", "a"), ("b", "b")],
    )
    joint = Engine().differentiate(spec, wrt=("x",)).graph
    assert {"cotangent/a", "cotangent/b"} <= {n.name for n in joint if n.is_input}


# --- dtypes ------------------------------------------------------------------------------
def test_float32_gradients_stay_float32_and_match_float64():
    wrt = ("x", "w1", "b1", "w2")
    r32 = run(mlp_spec("float32"), mlp_feeds("float32"), wrt=wrt, loss="loss")
    feeds64 = {k: v.astype(np.float64) for k, v in mlp_feeds("float32").items()}
    r64 = run(mlp_spec("float64"), feeds64, wrt=wrt, loss="loss")
    assert r32.outputs["loss"].dtype == np.float32
    for name in wrt:
        assert r32.grads[name].dtype == np.float32, name
        np.testing.assert_allclose(r32.grads[name], r64.grads[name], rtol=1e-4, atol=1e-6)


def test_joint_graph_backward_nodes_keep_float32():
    joint = Engine().differentiate(mlp_spec("float32"), wrt=("w1", "w2"), loss="loss")
    backward = [n for n in joint.graph if n.name not in joint.forward_nodes]
    assert backward
    float_nodes = [n for n in backward if n.dtype not in ("bool", "int32", "int64")]
    assert float_nodes and all(n.dtype == "float32" for n in float_nodes)


# --- Hessian-vector products ----------------------------------------------------------------
def to_spec(graph: ir.Graph) -> tuple[list[InputSpec], list[NodeSpec]]:
    """A validated Graph back to spec form (so it can be extended and rebuilt)."""
    inputs, nodes = [], []
    for node in graph:
        if node.is_input:
            inputs.append(InputSpec(node.name, node.shape, node.dtype, node.source))
        else:
            nodes.append(NodeSpec(node.name, node.op, node.inputs, dict(node.attrs), node.source))
    return inputs, nodes


def hvp_spec(spec: GraphSpec, wrt: str, loss: str = "loss") -> GraphSpec:
    """The joint graph of `spec` extended with input v and output hvp_loss = sum(grad * v)."""
    joint = Engine().differentiate(spec, wrt=(wrt,), loss=loss)
    grad_node = joint.graph.outputs[f"grad/{wrt}"]
    inputs, nodes = to_spec(joint.graph)
    x = joint.graph[wrt]
    inputs.append(InputSpec("v", x.shape, x.dtype))
    nodes += [NodeSpec("gv", "mul", (grad_node, "v")), NodeSpec("hvp_loss", "sum", ("gv",))]
    return GraphSpec(
        "hvp",
        tuple(inputs),
        tuple(nodes),
        tuple(joint.graph.outputs.items()) + (("hvp_loss", "hvp_loss"),),
    )


def check_hvp(spec, feeds, wrt, seed=11, h=1e-5):
    extended = hvp_spec(spec, wrt)
    second = Engine().differentiate(extended, wrt=(wrt,), loss="hvp_loss")
    assert second.grad_outputs == {wrt: f"grad2/{wrt}"}  # "grad/<wrt>" is already taken
    v = np.random.default_rng(seed).standard_normal(feeds[wrt].shape)
    result = run(extended, {**feeds, "v": v}, wrt=(wrt,), loss="hvp_loss")
    hvp = result.grads[wrt]
    # The first-order gradient is still an output of the extended graph.
    first = run(spec, feeds, wrt=(wrt,), loss="loss").grads[wrt]
    np.testing.assert_array_equal(result.outputs[f"grad/{wrt}"], first)

    def grad_at(point):
        return run(spec, {**feeds, wrt: point}, wrt=(wrt,), loss="loss").grads[wrt]

    numeric = (grad_at(feeds[wrt] + h * v) - grad_at(feeds[wrt] - h * v)) / (2 * h)
    assert np.abs(numeric).max() > 1e-3  # a non-trivial curvature along v
    error = rel_err(hvp, numeric)
    assert error <= 1e-6, f"HVP relative error {error:.3g}"
    return hvp


def test_hvp_of_sum_tanh_squared():
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal(4), "W": rng.standard_normal((3, 4)) * 0.7}
    spec = spec_of(
        feeds,
        [
            N("wx", "matmul", "W", "x"),
            N("t", "tanh", "wx"),
            N("t2", "square", "t"),
            N("loss", "sum", "t2"),
        ],
        [("loss", "loss")],
    )
    hvp = check_hvp(spec, feeds, "x")
    # Analytic Hessian: W^T diag(2(1 - t^2)(1 - 3 t^2)) W.
    t = np.tanh(feeds["W"] @ feeds["x"])
    hessian = feeds["W"].T @ np.diag(2 * (1 - t**2) * (1 - 3 * t**2)) @ feeds["W"]
    v = np.random.default_rng(11).standard_normal(4)
    np.testing.assert_allclose(hvp, hessian @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("wrt", ["x", "w1", "w2"])
def test_hvp_of_mlp(wrt):
    check_hvp(mlp_spec(), mlp_feeds(seed=4), wrt)


def test_third_order_output_naming():
    """Differentiating a twice-extended graph names outputs grad/, grad2/, grad3/."""
    rng = np.random.default_rng(6)
    feeds = {"x": rng.standard_normal(3)}
    spec = spec_of(
        feeds, [N("c", "pow", "x", exponent=4.0), N("loss", "sum", "c")], [("loss", "loss")]
    )
    extended = hvp_spec(spec, "x")
    joint2 = Engine().differentiate(extended, wrt=("x",), loss="hvp_loss")
    inputs, nodes = to_spec(joint2.graph)
    nodes += [NodeSpec("s3", "sum", (joint2.graph.outputs["grad2/x"],))]
    spec3 = GraphSpec(
        "third", tuple(inputs), tuple(nodes), tuple(joint2.graph.outputs.items()) + (("l3", "s3"),)
    )
    joint3 = Engine().differentiate(spec3, wrt=("x",), loss="l3")
    assert joint3.grad_outputs == {"x": "grad3/x"}
    v = rng.standard_normal(3)
    result = run(spec3, {**feeds, "v": v}, wrt=("x",), loss="l3")
    # f = sum x^4: H v = 12 x^2 v; d/dx sum(12 x^2 v) = 24 x v.
    np.testing.assert_allclose(result.outputs["grad2/x"], 12 * feeds["x"] ** 2 * v, rtol=1e-12)
    np.testing.assert_allclose(result.grads["x"], 24 * feeds["x"] * v, rtol=1e-12)


# --- VJPs with cotangents --------------------------------------------------------------------
def numeric_vjp(spec, feeds, wrt, cotangents, h=1e-6):
    """J^T ct by centered differences of the forward outputs, element by element."""

    def weighted(point):
        outs = run(spec, {**feeds, wrt: point}, fetch=tuple(cotangents)).outputs
        return sum(float(np.sum(outs[name] * ct)) for name, ct in cotangents.items())

    base, grad = feeds[wrt], np.zeros(feeds[wrt].shape)
    for index in np.ndindex(base.shape):
        up, down = base.copy(), base.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (weighted(up) - weighted(down)) / (2 * h)
    return grad


def test_vjp_with_cotangent_for_one_output():
    rng = np.random.default_rng(8)
    feeds = {"x": rng.standard_normal((2, 3)), "W": rng.standard_normal((3, 4))}
    spec = spec_of(feeds, [N("xw", "matmul", "x", "W"), N("out", "tanh", "xw")], [("out", "out")])
    ct = rng.standard_normal((2, 4))
    result = run(spec, feeds, wrt=("x", "W"), cotangents={"out": ct})
    np.testing.assert_allclose(result.outputs["out"], np.tanh(feeds["x"] @ feeds["W"]), rtol=1e-14)
    for name in ("x", "W"):
        assert rel_err(result.grads[name], numeric_vjp(spec, feeds, name, {"out": ct})) <= 1e-6
    # And exactly the analytic J^T ct.
    d = ct * (1 - np.tanh(feeds["x"] @ feeds["W"]) ** 2)
    np.testing.assert_allclose(result.grads["x"], d @ feeds["W"].T, rtol=1e-12)


def test_vjp_with_cotangents_for_two_outputs_sums_them():
    rng = np.random.default_rng(9)
    feeds = {"x": rng.standard_normal((2, 3)), "W": rng.standard_normal((3, 3))}
    spec = spec_of(
        feeds,
        [
            N("xw", "matmul", "x", "W"),
            N("o1", "sigmoid", "xw"),
            N("sq", "square", "x"),
            N("o2", "sum", "sq", axes=(1,)),
        ],
        [("first", "o1"), ("second", "o2")],
    )
    cts = {"first": rng.standard_normal((2, 3)), "second": rng.standard_normal(2)}
    result = run(spec, feeds, wrt=("x", "W"), cotangents=cts)
    for name in ("x", "W"):
        assert rel_err(result.grads[name], numeric_vjp(spec, feeds, name, cts)) <= 1e-6


def test_cotangent_with_wrong_shape_is_rejected():
    feeds = {"x": np.ones((2, 3))}
    spec = spec_of(feeds, [N("out", "tanh", "x")], [("out", "out")])
    with pytest.raises(InvalidArgument, match="out"):
        run(spec, feeds, wrt=("x",), cotangents={"out": np.ones((3, 2))})


def test_cotangent_for_unknown_output_is_rejected():
    feeds = {"x": np.ones(2)}
    spec = spec_of(feeds, [N("out", "tanh", "x")], [("out", "out")])
    with pytest.raises(InvalidArgument, match="not an output"):
        run(spec, feeds, wrt=("x",), cotangents={"nope": np.ones(2)})


# --- wrt and loss errors -------------------------------------------------------------------
def _error_spec():
    inputs = {"x": ((3,), "float64"), "k": ((3,), "int64")}
    nodes = [
        N("t", "tanh", "x"),
        N("kf", "cast", "k", dtype="float64"),
        N("s", "add", "t", "kf"),
        N("loss", "sum", "s"),
    ]
    return spec_of(inputs, nodes, [("vec", "t"), ("loss", "loss")]), {
        "x": np.ones(3),
        "k": np.arange(3, dtype=np.int64),
    }


@pytest.mark.parametrize(
    "wrt, loss, pattern",
    [
        (("t",), "loss", "'t' is a node"),
        (("nope",), "loss", "'nope' is not an input"),
        (("k",), "loss", "dtype int64"),
        (("x", "x"), "loss", "twice"),
        (("x",), "vec", "scalar"),
        (("x",), "t", "scalar"),
        (("x",), "missing", "neither an output nor a node"),
    ],
    ids=[
        "node-not-input",
        "unknown-name",
        "integer-input",
        "duplicate",
        "loss-output-not-scalar",
        "loss-node-not-scalar",
        "loss-unknown",
    ],
)
def test_bad_wrt_or_loss_is_invalid_argument(wrt, loss, pattern):
    spec, feeds = _error_spec()
    with pytest.raises(InvalidArgument, match=pattern):
        run(spec, feeds, wrt=wrt, loss=loss)


def test_wrt_without_loss_or_cotangents_is_invalid_argument():
    spec, feeds = _error_spec()
    with pytest.raises(InvalidArgument, match="neither"):
        run(spec, feeds, wrt=("x",))


def test_loss_and_cotangents_together_is_invalid_argument():
    spec, feeds = _error_spec()
    with pytest.raises(InvalidArgument, match="both"):
        run(spec, feeds, wrt=("x",), loss="loss", cotangents={"vec": np.ones(3)})


def test_engine_differentiate_rejects_bad_wrt_too():
    spec, _ = _error_spec()
    with pytest.raises(InvalidArgument, match="scalar"):
        Engine().differentiate(spec, wrt=("x",), loss="vec")
    with pytest.raises(InvalidArgument, match="only float inputs"):
        Engine().differentiate(spec, wrt=("k",), loss="loss")


def test_differentiate_without_loss_adds_one_cotangent_input_per_float_output():
    joint = Engine().differentiate(mlp_spec(), wrt=("w1",))
    assert dict(joint.cotangent_inputs) == {"pred": "cotangent/pred", "loss": "cotangent/loss"}
    for out_name, input_name in joint.cotangent_inputs.items():
        node = joint.graph[input_name]
        assert node.is_input
        assert node.type == joint.graph[joint.graph.outputs[out_name]].type
    assert joint.graph[joint.graph.outputs["grad/w1"]].shape == (4, 5)
