"""ONNX models over the wire (`remat.OnnxModel`, GraphRef.onnx): the server converts
the bytes with the same importer as `remat.from_onnx`, so every zoo model gives the
client-side import's outputs and gradients bit for bit; initializers are inputs whose
values default to the model's; every RPC that takes a graph takes a model; and a bad
model is INVALID_ARGUMENT naming what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import zoo_onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import remat
from remat import calls
from remat_server import Limits, ServerConfig, create_server

RNG = np.random.default_rng(7)
W = RNG.standard_normal((3, 4)).astype(np.float32)


def small_model(opset: int = 17, extra_nodes=(), domain_opsets=(), rows: int = 2):
    """y = relu(x @ w), loss = sum(y): a scalar to differentiate, w an initializer."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
        helper.make_node("ReduceSum", ["y"], ["loss"], name="sum", keepdims=0),
        *extra_nodes,
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", T.FLOAT, [rows, 3])],
        [
            helper.make_tensor_value_info("y", T.FLOAT, [rows, 4]),
            helper.make_tensor_value_info("loss", T.FLOAT, []),
        ],
        [numpy_helper.from_array(W, "w")],
    )
    opsets = [helper.make_opsetid("", opset), *domain_opsets]
    return helper.make_model(graph, opset_imports=opsets)


X = RNG.standard_normal((2, 3)).astype(np.float32)


def expected_grad_w(x: np.ndarray) -> np.ndarray:
    return x.T.astype(np.float64) @ ((x.astype(np.float64) @ W) > 0).astype(np.float64)


def test_every_rpc_takes_an_onnx_model(client):
    model = remat.OnnxModel(small_model())
    run = client.run(model, {"x": X}, wrt=["w"], loss="loss")
    np.testing.assert_allclose(run.grads["w"], expected_grad_w(X), rtol=1e-6)
    assert run.grads["w"].dtype == np.float32

    graph_id = client.register(model)
    assert graph_id == model.graph_id
    again = client.run(model, {"x": X}, wrt=["w"], loss="loss")  # sent by id now
    assert np.array_equal(again.grads["w"], run.grads["w"])

    plan = client.plan(model, wrt=["w"], loss="loss", policy="sqrt")
    assert plan.peak_bytes > 0

    joint = client.differentiate(model, wrt=["w"], loss="loss")
    assert "grad/w" in joint.output_names

    rows = client.compare(model, {"x": X}, wrt=["w"], loss="loss", policies=["store_all", "sqrt"])
    assert [(row.policy, row.error, row.max_grad_diff) for row in rows] == [
        ("store_all", "", 0.0),
        ("sqrt", "", 0.0),
    ]


def test_run_stream_takes_an_onnx_model(client):
    """Inputs over the SDK's streaming threshold go by RunStream."""
    model = remat.OnnxModel(small_model(rows=1 << 17))
    x = RNG.standard_normal((1 << 17, 3)).astype(np.float32)
    assert x.nbytes > calls.STREAM_THRESHOLD_BYTES
    result = client.run(model, {"x": x}, wrt=["w"], loss="loss")
    np.testing.assert_allclose(result.grads["w"], expected_grad_w(x), rtol=1e-4)


def test_sent_inputs_override_the_initializers(client):
    model = remat.OnnxModel(small_model())
    w = np.ones_like(W)
    out = client.run(model, {"x": X, "w": w}).outputs["y"]
    np.testing.assert_allclose(out, np.maximum(X @ w, 0), rtol=1e-6)


def test_dtype_float64_casts_on_the_server(client):
    model = remat.OnnxModel(small_model(), dtype="float64")
    result = client.run(model, {"x": X.astype(np.float64)}, wrt=["w"], loss="loss")
    assert result.outputs["y"].dtype == np.float64
    np.testing.assert_allclose(result.grads["w"], expected_grad_w(X), rtol=1e-12)


# --- bad models ---------------------------------------------------------------------------
def _custom_domain():
    node = helper.make_node("Secret", ["y"], ["z"], name="secret_node", domain="com.evil")
    return small_model(extra_nodes=[node], domain_opsets=[helper.make_opsetid("com.evil", 1)])


def _external_data():
    model = small_model()
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = 1  # EXTERNAL
    weight.external_data.add(key="location", value="../../etc/passwd")
    return model


BAD_MODELS = [
    ("not a model", lambda: b"\xff\x00 not protobuf", {}, "onnx"),
    ("old opset", lambda: small_model(opset=7), {}, "opset 7"),
    ("custom domain", _custom_domain, {}, "secret_node"),
    ("external data", _external_data, {}, "external data"),
    ("unknown dtype", small_model, {"dtype": "float16"}, "onnx.dtype"),
]


@pytest.mark.parametrize(
    "make, kwargs, message", [row[1:] for row in BAD_MODELS], ids=[row[0] for row in BAD_MODELS]
)
def test_bad_models_are_invalid_argument(client, make, kwargs, message):
    model = remat.OnnxModel(make(), **kwargs)
    with pytest.raises(remat.InvalidArgumentError, match=message):
        client.run(model, {"x": X})
    with pytest.raises(remat.InvalidArgumentError, match=message):
        client.register(model)


@pytest.fixture(scope="module")
def tight_client():
    """A server whose limits a three-node model exceeds."""
    limits = Limits(max_nodes=2)
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0, limits=limits))
    server.start()
    try:
        with remat.Client(f"127.0.0.1:{port}") as client:
            yield client
    finally:
        server.stop(grace=None).wait()


def test_server_limits_apply_to_models(tight_client):
    with pytest.raises(remat.InvalidArgumentError, match="3 nodes.*2"):
        tight_client.run(remat.OnnxModel(small_model()), {"x": X})


# --- the model zoo --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    pytest.importorskip("torch")
    return zoo_onnx.Exports(tmp_path_factory.mktemp("onnx_wire"))


@pytest.mark.parametrize("name", zoo_onnx.ZOO)
def test_zoo_models_over_the_wire_equal_the_client_side_import(client, exports, name):
    """The client-side import matches torch.autograd to 1e-9 (tests/unit/
    test_onnx_import.py); the wire route must give the very same numbers."""
    torch = pytest.importorskip("torch")
    import zoo

    path = exports(name, "float64")
    graph, params = remat.from_onnx(path)
    data = {k: v.numpy() for k, v in zoo.inputs(name, torch.float64).items() if k in graph}
    module = zoo.MODELS[name](torch.float64)[0]
    wrt = [n for n, _ in module.named_parameters()]
    rng = np.random.default_rng(3)
    shapes = {o: client.run(graph, {**data, **params}).outputs[o].shape for o in graph.output_names}
    cotangents = {o: rng.uniform(-1, 1, shape) for o, shape in shapes.items()}

    local = client.run(graph, {**data, **params}, wrt=wrt, cotangents=cotangents)
    wire = client.run(remat.OnnxModel(path), data, wrt=wrt, cotangents=cotangents)
    for out in graph.output_names:
        assert np.array_equal(wire.outputs[out], local.outputs[out]), out
    for key in wrt:
        assert np.array_equal(wire.grads[key], local.grads[key]), key
