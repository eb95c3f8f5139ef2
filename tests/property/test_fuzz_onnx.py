"""An ONNX model is a program from a stranger: whatever model bytes a client sends in
GraphRef.onnx or RegisterGraphRequest.onnx get a clear answer (OK, or a status with a
message), never a crash, a hang or a huge allocation (the session's RSS guard).

Two sources: a valid model with its bytes flipped, cut, inserted or repeated, and
generated models: chains of importer ops whose attributes and constant inputs (the
shapes of Reshape, Expand, Tile, ConstantOfShape, Range, Slice, Pad...) are hostile.
"""

from __future__ import annotations

import random

import numpy as np
from fuzz_support import (
    EDGE_INTS,
    Checkpointed,
    Hostile,
    Tally,
    check_answer,
    fuzz_settings,
    mutated,
    tensor,
)
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from remat_proto.v1 import executor_pb2

X = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)


def _seed_model() -> bytes:
    """x -> MatMul -> Add -> Relu -> a shape subgraph (Shape, Gather, Concat) feeding a
    Reshape -> Softmax -> ReduceSum: folding, broadcasting and an initializer each."""
    w = numpy_helper.from_array(np.full((6, 4), 0.25, np.float32), "w")
    b = numpy_helper.from_array(np.arange(4, dtype=np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["shape"], name="shape"),
        helper.make_node("Constant", [], ["zero"], name="zero", value_ints=[0]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
        helper.make_node("Constant", [], ["rest"], name="rest", value_ints=[2, 2]),
        helper.make_node("Concat", ["batch", "rest"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["r", "target"], ["r3"], name="reshape"),
        helper.make_node("Softmax", ["r3"], ["y"], name="softmax", axis=-1),
        helper.make_node("ReduceSum", ["y"], ["loss"], name="sum", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "seed",
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 6])],
        [
            helper.make_tensor_value_info("y", T.FLOAT, None),
            helper.make_tensor_value_info("loss", T.FLOAT, []),
        ],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


SEED = _seed_model()


def _requests(model: bytes, rpc: str):
    onnx = executor_pb2.OnnxModel(model=model, dtype="" if rpc != "Run64" else "float64")
    ref = executor_pb2.GraphRef(onnx=onnx)
    if rpc == "RegisterGraph":
        return executor_pb2.RegisterGraphRequest(onnx=onnx)
    if rpc == "Plan":
        return executor_pb2.PlanRequest(graph=ref, wrt=["w"], loss="loss")
    request = executor_pb2.RunRequest(graph=ref, wrt=["w", "b"], loss="loss")
    request.inputs["x"].CopyFrom(tensor(X.astype(np.float64) if rpc == "Run64" else X))
    return request


RPCS = ("Run", "Run64", "Plan", "RegisterGraph")


def _call(stub, rpc: str):
    return {"Run": stub.Run, "Run64": stub.Run, "Plan": stub.Plan}.get(rpc, stub.RegisterGraph)


def test_the_seed_model_runs(fuzz_stub):
    """The mutations start from a model the server accepts."""
    outcome = check_answer(fuzz_stub.Run, _requests(SEED, "Run"), what="Run")
    assert outcome.response is not None and "w" in outcome.response.grads


def test_mutated_models_get_a_clear_status(fuzz_stub):
    tally, check = Tally(), Checkpointed(fuzz_stub)

    @fuzz_settings("onnx_mutated")
    @given(data=mutated(SEED), rpc=st.sampled_from(RPCS))
    def fuzz(data, rpc):
        tally.add(check_answer(_call(fuzz_stub, rpc), _requests(data, rpc), what=rpc))
        check.tick()

    fuzz()
    print(tally.codes)


# --- generated models ----------------------------------------------------------------------
# op -> (data inputs, constant int64 inputs (their lengths), attributes). A constant
# input's values are hostile ints, so the importer's folding and shape checks meet
# negative, zero and 2**62-sized dimensions.
OPS = {
    "Relu": (1, (), {}),
    "Add": (2, (), {}),
    "MatMul": (2, (), {}),
    "Softmax": (1, (), {"axis": "int"}),
    "Transpose": (1, (), {"perm": "ints"}),
    "Reshape": (1, ("shape",), {"allowzero": "int"}),
    "Expand": (1, ("shape",), {}),
    "Tile": (1, ("shape",), {}),
    "Slice": (1, ("axes", "axes", "axes"), {}),
    "Pad": (1, ("pads",), {"mode": "mode"}),
    "ConstantOfShape": (0, ("shape",), {}),
    "Range": (0, ("scalar", "scalar", "scalar"), {}),
    "Gather": (1, ("axes",), {"axis": "int"}),
    "Concat": (2, (), {"axis": "int"}),
    "ReduceSum": (1, ("axes",), {"keepdims": "int"}),
    "Unsqueeze": (1, ("axes",), {}),
    "Squeeze": (1, ("axes",), {}),
    "Conv": (2, (), {"kernel_shape": "ints", "strides": "ints", "pads": "ints", "group": "int"}),
    "MaxPool": (1, (), {"kernel_shape": "ints", "strides": "ints", "dilations": "ints"}),
    "Resize": (1, ("", "floats", "shape"), {"mode": "mode"}),
    "Split": (1, ("axes",), {"axis": "int"}),
    "CumSum": (1, ("scalar",), {}),
    "BatchNormalization": (5, (), {"training_mode": "int", "epsilon": "float"}),
    "Dropout": (1, ("ratio", "bool"), {"seed": "int"}),
}
MODES = ["constant", "reflect", "edge", "nearest", "linear", "cubic", "wrap", "", "\x00"]


def _constant(h: Hostile, kind: str, name: str):
    """A Constant node producing a hostile tensor of `kind`, or None for an omitted
    optional input ("")."""
    if kind == "":
        return None
    if kind == "floats":
        with np.errstate(over="ignore"):  # float64 extremes become float32 infinities
            value = np.array([h.float_() for _ in range(h.r.randint(0, 4))]).astype(np.float32)
    elif kind == "bool":
        value = np.array(h.chance(0.5))
    elif kind == "ratio":
        value = np.array(h.pick([0.0, 0.5, 1.0, -1.0, float("nan")]), np.float32)
    elif kind == "scalar":
        value = np.array(h.int_(), np.int64)
    else:
        length = h.r.randint(0, 5) if kind != "pads" else h.pick([0, 2, 4, 8, 9])
        value = np.array([h.int_() for _ in range(length)], np.int64)
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value))


def _attribute(h: Hostile, kind: str):
    if kind == "int":
        return h.int_() if h.chance(0.5) else h.r.randint(-2, 3)
    if kind == "ints":
        return [h.pick(EDGE_INTS) if h.chance(0.2) else h.r.randint(-1, 4) for _ in range(2)]
    if kind == "float":
        return h.float_()
    return h.pick(MODES)


def generated_model(seed: int, length: int, opset: int) -> bytes:
    """A chain of `length` ops from OPS, each reading earlier values (x of shape (2, 6)
    first), with hostile constants and attributes, all drawn from `seed`."""
    h = Hostile(random.Random(seed))
    values, nodes = ["x"], []
    for index in range(length):
        op = h.pick(sorted(OPS))
        data, constants, attributes = OPS[op]
        inputs = [h.pick(values) for _ in range(data)]
        for position, kind in enumerate(constants):
            constant = _constant(h, kind, f"c{index}_{position}")
            if constant is not None:
                nodes.append(constant)
            inputs.append("" if constant is None else constant.output[0])
        attrs = {k: _attribute(h, kind) for k, kind in attributes.items() if h.chance(0.6)}
        name = f"v{index}"
        nodes.append(helper.make_node(op, inputs, [name], name=f"{op}_{index}", **attrs))
        values.append(name)
    graph = helper.make_graph(
        nodes,
        "generated",
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 6])],
        [helper.make_tensor_value_info(values[-1], T.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model.SerializeToString()


def test_generated_models_get_a_clear_status(fuzz_stub):
    tally, check = Tally(), Checkpointed(fuzz_stub)

    @fuzz_settings("onnx_models")
    @given(
        seed=st.integers(0, 2**32 - 1),
        length=st.integers(1, 6),
        opset=st.sampled_from([12, 13, 15, 17, 17, 18, 19, 21, 22]),  # 12, 22: refused
        rpc=st.sampled_from(("Run", "RegisterGraph")),
    )
    def fuzz(seed, length, opset, rpc):
        model = generated_model(seed, length, opset)
        request = executor_pb2.RunRequest(
            graph=executor_pb2.GraphRef(onnx=executor_pb2.OnnxModel(model=model))
        )
        request.inputs["x"].CopyFrom(tensor(X))
        if rpc == "RegisterGraph":
            request = executor_pb2.RegisterGraphRequest(onnx=request.graph.onnx)
        tally.add(check_answer(_call(fuzz_stub, rpc), request, what=rpc))
        check.tick()

    fuzz()
    print(tally.codes)
    assert tally.codes.get("OK", 0) > 0, "no generated model ever ran: the generator is off"
