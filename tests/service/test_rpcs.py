"""Each RPC through the real server: RegisterGraph, Run, Differentiate, ListOps, plus
health checking, reflection, batch dimensions, big messages and deadlines."""

from __future__ import annotations

import hashlib
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import HANG_SECONDS

import remat
from remat_proto import wire
from remat_proto.v1 import executor_pb2, graph_pb2
from remat_server.ops import REGISTRY
from remat_server.ops.registry import ATTR_TYPES

RNG_SEED = 1234


def array(tensor) -> np.ndarray:
    return wire.tensor_to_array(tensor)


def to_tensor(value):
    return wire.array_to_tensor(value)


def tanh_mlp() -> remat.Graph:
    """loss = sum(tanh(x @ w + b) ** 2), float64, with a batch dimension of -1."""
    g = remat.Graph("tanh_mlp")
    x = g.input("x", (-1, 3), "float64")
    w = g.input("w", (3, 4), "float64")
    b = g.input("b", (4,), "float64")
    h = remat.tanh(x @ w + b, name="h")
    g.output("h", h)
    g.output("loss", remat.sum(h * h, name="s"))
    return g


def feeds(batch: int, seed: int = RNG_SEED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, 3)),
        "w": rng.standard_normal((3, 4)),
        "b": rng.standard_normal(4),
    }


def reference(values) -> tuple[float, dict[str, np.ndarray]]:
    """NumPy loss and gradients of tanh_mlp."""
    x, w, b = values["x"], values["w"], values["b"]
    h = np.tanh(x @ w + b)
    dz = 2 * h * (1 - h * h)
    return float(np.sum(h * h)), {"x": dz @ w.T, "w": x.T @ dz, "b": dz.sum(0)}


def run_request(ref: executor_pb2.GraphRef, values, **kwargs) -> executor_pb2.RunRequest:
    request = executor_pb2.RunRequest(graph=ref, **kwargs)
    for name, value in values.items():
        request.inputs[name].CopyFrom(to_tensor(value))
    return request


# --- RegisterGraph -------------------------------------------------------------------------
def test_register_returns_the_sha256_of_the_canonical_bytes(stub):
    message = tanh_mlp().to_proto()
    graph_id = stub.RegisterGraph(executor_pb2.RegisterGraphRequest(graph=message)).graph_id
    assert graph_id == hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()
    # The same graph, rebuilt from scratch, gets the same id; a different one does not.
    again = stub.RegisterGraph(executor_pb2.RegisterGraphRequest(graph=tanh_mlp().to_proto()))
    assert again.graph_id == graph_id
    other = tanh_mlp().to_proto()
    other.name = "renamed"
    assert stub.RegisterGraph(executor_pb2.RegisterGraphRequest(graph=other)).graph_id != graph_id


def test_run_by_graph_id_matches_numpy_for_batch_2_and_5(stub):
    graph_id = stub.RegisterGraph(
        executor_pb2.RegisterGraphRequest(graph=tanh_mlp().to_proto())
    ).graph_id
    for batch in (2, 5):
        values = feeds(batch, seed=batch)
        response = stub.Run(
            run_request(
                executor_pb2.GraphRef(graph_id=graph_id), values, wrt=["x", "w", "b"], loss="loss"
            ),
            timeout=HANG_SECONDS,
        )
        loss, grads = reference(values)
        assert array(response.outputs["h"]).shape == (batch, 4)
        np.testing.assert_allclose(array(response.outputs["loss"]), loss, rtol=1e-12)
        assert set(response.grads) == {"x", "w", "b"}
        for name, expected in grads.items():
            got = array(response.grads[name])
            assert got.shape == values[name].shape
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
        assert response.metrics.nodes_computed > 0
        assert response.metrics.peak_bytes == response.metrics.predicted_peak_bytes > 0


def test_client_register_matches_the_raw_rpc(client, stub):
    g = tanh_mlp()
    assert (
        client.register(g)
        == stub.RegisterGraph(executor_pb2.RegisterGraphRequest(graph=g.to_proto())).graph_id
    )


# --- Differentiate -----------------------------------------------------------------------
def differentiate(stub, graph: graph_pb2.Graph, wrt, loss="loss", shapes=None):
    request = executor_pb2.DifferentiateRequest(
        graph=executor_pb2.GraphRef(graph=graph), wrt=wrt, loss=loss
    )
    for name, shape in (shapes or {}).items():
        request.input_shapes[name].values.extend(shape)
    return stub.Differentiate(request, timeout=HANG_SECONDS)


def test_differentiate_returns_a_runnable_joint_graph(stub):
    values = feeds(3)
    joint = differentiate(stub, tanh_mlp().to_proto(), ["x", "w"], shapes={"x": [3, 3]})
    outputs = [o.name for o in joint.graph.outputs]
    assert outputs == ["h", "loss", "grad/x", "grad/w"]
    assert dict(joint.grad_outputs) == {"x": "grad/x", "w": "grad/w"}
    # The joint graph is made of ordinary ops: run it forward only, as any graph.
    response = stub.Run(
        run_request(executor_pb2.GraphRef(graph=joint.graph), values), timeout=HANG_SECONDS
    )
    with_wrt = stub.Run(
        run_request(
            executor_pb2.GraphRef(graph=tanh_mlp().to_proto()), values, wrt=["x", "w"], loss="loss"
        ),
        timeout=HANG_SECONDS,
    )
    for name in ("x", "w"):
        np.testing.assert_array_equal(
            array(response.outputs[f"grad/{name}"]), array(with_wrt.grads[name])
        )
    np.testing.assert_array_equal(array(response.outputs["loss"]), array(with_wrt.outputs["loss"]))
    np.testing.assert_allclose(
        array(response.outputs["grad/w"]), reference(values)[1]["w"], rtol=1e-10
    )


def test_differentiating_twice_names_grad2(stub):
    joint = differentiate(stub, tanh_mlp().to_proto(), ["x"], shapes={"x": [2, 3]}).graph
    # A scalar that depends on grad/x: sum(grad/x); its gradient is a Hessian row sum.
    grad_node = next(o.node for o in joint.outputs if o.name == "grad/x")
    joint.nodes.add(name="gsum", op="sum", inputs=[grad_node])
    joint.outputs.add(name="gsum", node="gsum")
    second = differentiate(stub, joint, ["x"], loss="gsum")
    names = [o.name for o in second.graph.outputs]
    assert names == ["h", "loss", "grad/x", "gsum", "grad2/x"]
    assert dict(second.grad_outputs) == {"x": "grad2/x"}


def test_differentiate_without_loss_adds_cotangent_inputs(stub):
    joint = differentiate(stub, tanh_mlp().to_proto(), ["w"], loss="", shapes={"x": [2, 3]})
    inputs = [i.name for i in joint.graph.inputs]
    assert "cotangent/h" in inputs and "cotangent/loss" in inputs
    assert dict(joint.grad_outputs) == {"w": "grad/w"}


# --- ListOps -----------------------------------------------------------------------------
def test_list_ops_describes_every_op(stub):
    ops = {
        op.name: op for op in stub.ListOps(executor_pb2.ListOpsRequest(), timeout=HANG_SECONDS).ops
    }
    assert set(ops) == set(REGISTRY)
    for name, op in ops.items():
        assert op.family, name
        assert op.residuals in ("none", "inputs", "output", "inputs+output"), name
        for attr in op.attrs:
            assert attr.type in ATTR_TYPES, (name, attr.name, attr.type)
        if op.max_inputs >= 0:
            assert op.min_inputs <= op.max_inputs
            assert len(op.differentiable) == op.max_inputs, name
    matmul = ops["matmul"]
    assert (matmul.family, matmul.min_inputs, matmul.max_inputs) == ("linalg", 2, 2)
    assert list(matmul.differentiable) == [True, True]
    assert list(ops["take"].differentiable) == [True, False]
    assert not any(ops["gt"].differentiable)
    assert ops["concat"].max_inputs == -1
    reshape_attrs = {a.name: (a.type, a.required) for a in ops["reshape"].attrs}
    assert reshape_attrs == {"shape": ("ints", True)}
    sum_attrs = {a.name: (a.type, a.required) for a in ops["sum"].attrs}
    assert sum_attrs == {"axes": ("ints", False), "keepdims": ("bool", False)}
    assert {a.name: a.type for a in ops["pow"].attrs} == {"exponent": "float"}
    assert {a.name: a.type for a in ops["constant"].attrs} == {"value": "tensor"}


def test_sdk_list_ops_agrees(client, stub):
    raw = stub.ListOps(executor_pb2.ListOpsRequest(), timeout=HANG_SECONDS).ops
    infos = {op.name: op for op in client.list_ops()}
    assert set(infos) == {op.name for op in raw}
    assert infos["take"].differentiable == (True, False)
    assert isinstance(infos["conv2d"], remat.OpInfo)


# --- health and reflection ------------------------------------------------------------------
def test_health_check_reports_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "remat.v1.Executor"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_executor(channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="remat.v1.Executor"),
    ]
    responses = list(reflection.ServerReflectionInfo(iter(requests), timeout=5))
    services = {s.name for s in responses[0].list_services_response.service}
    assert {"remat.v1.Executor", "grpc.health.v1.Health"} <= services
    files = responses[1].file_descriptor_response.file_descriptor_proto
    assert files, responses[1]
    from google.protobuf import descriptor_pb2

    names = {descriptor_pb2.FileDescriptorProto.FromString(f).name for f in files}
    assert "remat/v1/executor.proto" in names


# --- big messages and deadlines -----------------------------------------------------------
def test_twenty_mib_round_trip_with_default_client_options(server_port):
    n = (20 << 20) // 8  # 20 MiB of float64: 5x gRPC's 4 MiB default
    g = remat.Graph("big")
    x = g.input("x", (n,), "float64")
    g.output("y", x * 2.0)
    values = np.random.default_rng(RNG_SEED).standard_normal(n)
    with remat.Client(f"127.0.0.1:{server_port}") as client:  # default options only
        result = client.run(g, {"x": values})
    assert result.outputs["y"].shape == (n,)
    np.testing.assert_array_equal(result.outputs["y"], values * 2.0)


def heavy_graph(depth: int = 80, width: int = 384) -> remat.Graph:
    g = remat.Graph("heavy")
    h = g.input("x", (width, width), "float64")
    w = g.input("w", (width, width), "float64")
    for _ in range(depth):
        h = remat.tanh(h @ w)
    g.output("loss", remat.sum(h))
    return g


def test_deadline_exceeded_then_the_server_serves_the_next_request(client, stub):
    rng = np.random.default_rng(RNG_SEED)
    width = 384
    values = {
        "x": rng.standard_normal((width, width)),
        "w": rng.standard_normal((width, width)) / np.sqrt(width),
    }
    start = time.perf_counter()
    with pytest.raises(remat.DeadlineExceededError):
        # Forward and backward through 80 matmuls of 384x384 take far longer than 50 ms.
        client.run(heavy_graph(), values, wrt=["w"], loss="loss", timeout=0.05)
    assert time.perf_counter() - start < 2.0
    # The server stops the cancelled run at its next step (the full run takes seconds of
    # CPU); it is in this process, so a run still going would show in our CPU time.
    time.sleep(0.3)
    cpu = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - cpu < 0.1, "the cancelled run kept computing"
    # And the server keeps serving.
    small = feeds(2)
    response = stub.Run(
        run_request(
            executor_pb2.GraphRef(graph=tanh_mlp().to_proto()), small, wrt=["b"], loss="loss"
        ),
        timeout=HANG_SECONDS,
    )
    np.testing.assert_allclose(array(response.grads["b"]), reference(small)[1]["b"], rtol=1e-10)
