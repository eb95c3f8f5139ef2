"""Malformed requests, hand-built as protos and sent with the raw stub.

Every case must be rejected with the right status and a message that names the
offending node, input or argument (and quotes the NodeDef's source, "model.py:12",
when it carries one); then the same server must still answer a valid Run correctly.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from support import HANG_SECONDS, evaluated_nodes

from remat_proto.v1 import executor_pb2, graph_pb2, tensor_pb2

SRC = "model.py:12"
F32, F64, I64 = tensor_pb2.FLOAT32, tensor_pb2.FLOAT64, tensor_pb2.INT64
_NP = {
    F32: np.float32,
    F64: np.float64,
    I64: np.int64,
    tensor_pb2.INT32: np.int32,
    tensor_pb2.BOOL: np.bool_,
}
_ENUM = {np.dtype(v): k for k, v in _NP.items()}


# --- proto builders ----------------------------------------------------------------------
def tensor(array) -> tensor_pb2.Tensor:
    array = np.asarray(array)
    return tensor_pb2.Tensor(
        dtype=_ENUM[array.dtype],
        shape=array.shape,
        data=np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes(),
    )


def raw_tensor(dtype, shape, data: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def inp(name, shape, dtype=F64, source="") -> graph_pb2.InputDef:
    return graph_pb2.InputDef(name=name, shape=shape, dtype=dtype, source=source)


def node(name, op, inputs=(), source=SRC, **attrs) -> graph_pb2.NodeDef:
    """A NodeDef; attrs are AttrValue messages (so they can be wrong on purpose)."""
    message = graph_pb2.NodeDef(name=name, op=op, inputs=list(inputs), source=source)
    for key, value in attrs.items():
        message.attrs[key].CopyFrom(value)
    return message


def ints(*values):
    return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=values))


def i(value):
    return graph_pb2.AttrValue(i=value)


def graph(inputs, nodes, outputs) -> graph_pb2.Graph:
    return graph_pb2.Graph(
        name="bad",
        inputs=inputs,
        nodes=nodes,
        outputs=[graph_pb2.OutputDef(name=o, node=n) for o, n in outputs.items()],
    )


def run(g, inputs=None, **kwargs) -> executor_pb2.RunRequest:
    request = executor_pb2.RunRequest(graph=executor_pb2.GraphRef(graph=g), **kwargs)
    for name, value in (inputs or {}).items():
        request.inputs[name].CopyFrom(
            value if isinstance(value, tensor_pb2.Tensor) else tensor(value)
        )
    return request


# A small valid graph most cases perturb: h = x @ w; loss = sum(h * h).
X = np.arange(6, dtype=np.float64).reshape(2, 3) / 10
W = np.linspace(-1, 1, 12, dtype=np.float64).reshape(3, 4)
XW_INPUTS = [inp("x", [2, 3]), inp("w", [3, 4])]
XW_FEEDS = {"x": X, "w": W}


def mlp_graph() -> graph_pb2.Graph:
    return graph(
        XW_INPUTS,
        [node("h", "matmul", ["x", "w"]), node("hh", "mul", ["h", "h"]), node("s", "sum", ["hh"])],
        {"loss": "s", "h": "h"},
    )


# --- the table ---------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    request: object
    needles: tuple[str, ...]  # substrings the error details must contain
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    rpc: str = "Run"
    fast: bool = False  # must be refused before anything runs, without allocating the shape


def _one_node(n, inputs=None, outputs=None, feeds=None, **kwargs) -> executor_pb2.RunRequest:
    """Run request for x, w plus the single node `n`, output "out"."""
    return run(
        graph(inputs or XW_INPUTS, [n], outputs or {"out": n.name}),
        XW_FEEDS if feeds is None else feeds,
        **kwargs,
    )


OVERFLOW = [2**40, 2**40, 2**40]  # the product is 2**120: overflows int64

CASES = [
    Case("unknown_op", _one_node(node("h", "frobnicate", ["x"])), ("'h'", "frobnicate", SRC)),
    Case(
        "missing_attribute",
        _one_node(node("r", "reshape", ["x"])),
        ("'r'", "shape", "missing", SRC),
    ),
    Case(
        "extra_attribute",
        _one_node(node("act", "relu", ["x"], alpha=graph_pb2.AttrValue(f=0.1))),
        ("'act'", "alpha", SRC),
    ),
    Case(
        "string_where_int",
        _one_node(node("sm", "softmax", ["x"], axis=graph_pb2.AttrValue(s="1"))),
        ("'sm'", "axis", "expected int", SRC),
    ),
    Case(
        "ints_where_float",
        _one_node(node("p", "pow", ["x"], exponent=ints(2))),
        ("'p'", "exponent", "expected float", SRC),
    ),
    Case(
        "attribute_without_value",
        _one_node(node("sm", "softmax", ["x"], axis=graph_pb2.AttrValue())),
        ("'sm'", "axis", "no value", SRC),
    ),
    Case(
        "dangling_input", _one_node(node("h", "matmul", ["x", "nowhere"])), ("'h'", "nowhere", SRC)
    ),
    Case(
        "cycle",
        run(
            graph(XW_INPUTS, [node("a", "neg", ["b"]), node("b", "neg", ["a"])], {"out": "a"}),
            XW_FEEDS,
        ),
        ("cycle", "->", SRC),
    ),
    Case(
        "duplicate_name",
        run(
            graph(
                XW_INPUTS,
                [node("h", "neg", ["x"], source="model.py:11"), node("h", "exp", ["x"])],
                {"out": "h"},
            ),
            XW_FEEDS,
        ),
        ("'h'", "twice", SRC),
    ),
    Case(
        "duplicate_input_and_node",
        run(graph(XW_INPUTS, [node("w", "neg", ["x"])], {"out": "w"}), XW_FEEDS),
        ("'w'", "twice", SRC),
    ),
    Case("matmul_inner_dims", _one_node(node("h", "matmul", ["x", "x"])), ("'h'", "matmul", SRC)),
    Case(
        "broadcast_failure", _one_node(node("sum_xw", "add", ["x", "w"])), ("'sum_xw'", "add", SRC)
    ),
    Case(
        "reshape_element_count",
        _one_node(node("r", "reshape", ["x"], shape=ints(4, 2))),
        ("'r'", "reshape", SRC),
    ),
    Case(
        "dtype_mismatch_f32_f64",
        _one_node(
            node("mix", "add", ["x", "y"]),
            inputs=[inp("x", [2, 3]), inp("y", [2, 3], F32)],
            feeds={"x": X, "y": X.astype(np.float32)},
        ),
        ("'mix'", "float32", "float64", SRC),
    ),
    Case(
        "rank_over_limit_node",
        _one_node(node("r7", "reshape", ["x"], shape=ints(1, 1, 1, 1, 2, 3, 1))),
        ("'r7'", "rank 7", "max-rank", SRC),
    ),
    # The tensor is decoded (and refused) before the graph is built.
    Case(
        "rank_over_limit_input_tensor",
        run(
            graph([inp("big", [1] * 7, source=SRC)], [], {"out": "big"}), {"big": np.zeros([1] * 7)}
        ),
        ("'big'", "rank 7", "max-rank"),
    ),
    Case(
        "rank_over_limit_input_def",
        executor_pb2.RegisterGraphRequest(
            graph=graph([inp("big", [1] * 7, source=SRC)], [], {"out": "big"})
        ),
        ("'big'", "rank 7", SRC),
        rpc="RegisterGraph",
    ),
    Case(
        "dimension_over_limit",
        run(
            graph([inp("wide", [2**41], source=SRC)], [], {"out": "wide"}),
            {"wide": raw_tensor(F64, [2**41], b"")},
        ),
        ("'wide'", str(2**41), "max-dim"),
        fast=True,
    ),
    Case(
        "element_overflow_input_def",
        executor_pb2.RegisterGraphRequest(
            graph=graph([inp("huge", OVERFLOW, source=SRC)], [], {"out": "huge"})
        ),
        ("'huge'", "elements", "max-elements", SRC),
        fast=True,
        rpc="RegisterGraph",
    ),
    Case(
        "element_overflow_input_def_run",
        run(
            graph([inp("huge", OVERFLOW, source=SRC)], [], {"out": "huge"}),
            {"huge": raw_tensor(F64, [1], b"\0" * 8)},
        ),
        ("'huge'", SRC),
        fast=True,
    ),
    Case(
        "element_overflow_tensor",
        run(
            graph([inp("huge", [-1, 1 << 40, 1 << 40])], [], {"out": "huge"}),
            {"huge": raw_tensor(F64, OVERFLOW, b"")},
        ),
        ("'huge'", "elements", "max-elements"),
        fast=True,
    ),
    Case(
        "element_overflow_broadcast_attr",
        _one_node(node("bc", "broadcast_to", ["x"], shape=ints(*OVERFLOW, 2, 3))),
        ("'bc'", SRC),
        fast=True,
    ),
    Case(
        "tensor_too_few_bytes",
        _one_node(
            node("out", "neg", ["x"]), feeds={"x": raw_tensor(F64, [2, 3], b"\0" * 47), "w": W}
        ),
        ("'x'", "47 bytes", "48"),
    ),
    Case(
        "tensor_too_many_bytes",
        _one_node(
            node("out", "neg", ["x"]), feeds={"x": raw_tensor(F64, [2, 3], b"\0" * 49), "w": W}
        ),
        ("'x'", "49 bytes", "48"),
    ),
    Case(
        "tensor_unknown_dtype",
        _one_node(
            node("out", "neg", ["x"]), feeds={"x": raw_tensor(99, [2, 3], b"\0" * 48), "w": W}
        ),
        ("'x'", "99"),
    ),
    Case(
        "input_def_unknown_dtype",
        run(
            graph([inp("odd", [2], dtype=99, source=SRC)], [], {"out": "odd"}), {"odd": np.zeros(2)}
        ),
        ("'odd'", "99", SRC),
    ),
    Case(
        "tensor_negative_dimension",
        _one_node(node("out", "neg", ["x"]), feeds={"x": raw_tensor(F64, [-2, -3], b""), "w": W}),
        ("'x'", "negative"),
    ),
    Case(
        "input_def_negative_leading_dimension",
        run(graph([inp("neg_dim", [-2, 3], source=SRC)], [], {"out": "neg_dim"}), {"neg_dim": X}),
        ("'neg_dim'", SRC),
    ),
    Case(
        "wrt_names_a_node",
        run(mlp_graph(), XW_FEEDS, wrt=["h"], loss="loss"),
        ("'h'", "not an input"),
    ),
    Case(
        "wrt_names_integer_input",
        run(
            graph(
                [inp("x", [2, 3]), inp("idx", [2], I64)],
                [node("t", "take", ["x", "idx"]), node("s", "sum", ["t"])],
                {"loss": "s"},
            ),
            {"x": X, "idx": np.array([0, 1])},
            wrt=["idx"],
            loss="loss",
        ),
        ("'idx'", "int64"),
    ),
    Case("wrt_unknown_name", run(mlp_graph(), XW_FEEDS, wrt=["ghost"], loss="loss"), ("'ghost'",)),
    Case("loss_not_scalar", run(mlp_graph(), XW_FEEDS, wrt=["x"], loss="h"), ("'h'", "loss")),
    Case("loss_unknown", run(mlp_graph(), XW_FEEDS, wrt=["x"], loss="phantom"), ("'phantom'",)),
    Case("fetch_unknown", run(mlp_graph(), XW_FEEDS, fetch=["loss", "nope"]), ("'nope'", "fetch")),
    Case("input_missing", run(mlp_graph(), {"x": X}), ("'w'", "no tensor")),
    Case("input_extra", run(mlp_graph(), {**XW_FEEDS, "stray": X}), ("'stray'",)),
    Case(
        "input_dtype_mismatch",
        run(mlp_graph(), {"x": X.astype(np.float32), "w": W}),
        ("'x'", "float64", "float32"),
    ),
    Case(
        "minus_one_not_leading",
        run(
            graph([inp("v", [2, -1], source=SRC)], [node("n", "neg", ["v"])], {"out": "n"}),
            {"v": X},
        ),
        ("'v'", "-1", SRC),
    ),
    Case(
        "cotangent_wrong_shape",
        run(mlp_graph(), XW_FEEDS, wrt=["x"], cotangents={"h": tensor(np.ones((4, 2)))}),
        ("'h'", "cotangent"),
    ),
    Case(
        "take_index_out_of_range",
        run(
            graph(
                [inp("x", [2, 3]), inp("idx", [2], I64)],
                [node("gather", "take", ["x", "idx"], axis=i(1))],
                {"out": "gather"},
            ),
            {"x": X, "idx": np.array([0, 7])},
        ),
        ("'gather'", "take", SRC),
    ),
    Case("empty_graph_ref", executor_pb2.RunRequest(inputs={"x": tensor(X)}), ("graph",)),
    Case(
        "empty_graph_id",
        executor_pb2.RunRequest(graph=executor_pb2.GraphRef(graph_id="")),
        ("graph_id", "empty"),
    ),
    Case(
        "unknown_graph_id",
        executor_pb2.RunRequest(graph=executor_pb2.GraphRef(graph_id="0" * 64)),
        ("0" * 64,),
        code=grpc.StatusCode.NOT_FOUND,
    ),
    Case(
        "unknown_policy",
        run(mlp_graph(), XW_FEEDS, policy=executor_pb2.Policy(name="telepathy")),
        ("telepathy",),
    ),
    Case(
        "plan_over_request_bytes",
        # Twelve 32 MiB outputs from a 1-element input: 384 MiB predicted, 256 MiB allowed.
        # (broadcast_to alone is a view and costs nothing; neg allocates.)
        run(
            graph(
                [inp("one", [1])],
                [node(f"b{k}", "broadcast_to", ["one"], shape=ints(2048, 2048)) for k in range(12)]
                + [node(f"n{k}", "neg", [f"b{k}"]) for k in range(12)],
                {f"o{k}": f"n{k}" for k in range(12)},
            ),
            {"one": np.ones(1)},
        ),
        ("peak", "max-request-bytes"),
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        fast=True,
    ),
    # The same validation guards RegisterGraph and Differentiate.
    Case(
        "register_unknown_op",
        executor_pb2.RegisterGraphRequest(
            graph=graph(XW_INPUTS, [node("h", "frobnicate", ["x"])], {"out": "h"})
        ),
        ("'h'", "frobnicate", SRC),
        rpc="RegisterGraph",
    ),
    Case(
        "register_cycle",
        executor_pb2.RegisterGraphRequest(
            graph=graph(XW_INPUTS, [node("a", "neg", ["b"]), node("b", "neg", ["a"])], {"out": "a"})
        ),
        ("cycle", SRC),
        rpc="RegisterGraph",
    ),
    Case(
        "register_matmul_inner_dims",
        executor_pb2.RegisterGraphRequest(
            graph=graph(XW_INPUTS, [node("h", "matmul", ["x", "x"])], {"out": "h"})
        ),
        ("'h'", SRC),
        rpc="RegisterGraph",
    ),
    Case(
        "differentiate_wrt_unknown",
        executor_pb2.DifferentiateRequest(
            graph=executor_pb2.GraphRef(graph=mlp_graph()), wrt=["ghost"], loss="loss"
        ),
        ("'ghost'",),
        rpc="Differentiate",
    ),
    Case(
        "differentiate_loss_not_scalar",
        executor_pb2.DifferentiateRequest(
            graph=executor_pb2.GraphRef(graph=mlp_graph()), wrt=["x"], loss="h"
        ),
        ("'h'",),
        rpc="Differentiate",
    ),
    Case(
        "differentiate_bad_attr",
        executor_pb2.DifferentiateRequest(
            graph=executor_pb2.GraphRef(
                graph=graph(
                    XW_INPUTS,
                    [node("sm", "softmax", ["x"], axis=graph_pb2.AttrValue(s="0"))],
                    {"out": "sm"},
                )
            ),
            wrt=["x"],
        ),
        ("'sm'", "axis", SRC),
        rpc="Differentiate",
    ),
    Case(
        "differentiate_unknown_graph_id",
        executor_pb2.DifferentiateRequest(
            graph=executor_pb2.GraphRef(graph_id="f" * 64), wrt=["x"]
        ),
        ("f" * 64,),
        code=grpc.StatusCode.NOT_FOUND,
        rpc="Differentiate",
    ),
]


def assert_still_serving(stub) -> None:
    """A valid Run on the same server gives the right numbers."""
    response = stub.Run(
        run(mlp_graph(), XW_FEEDS, wrt=["x", "w"], loss="loss"), timeout=HANG_SECONDS
    )
    h = X @ W
    out = {
        k: np.frombuffer(v.data, np.float64).reshape(tuple(v.shape))
        for k, v in response.outputs.items()
    }
    grads = {
        k: np.frombuffer(v.data, np.float64).reshape(tuple(v.shape))
        for k, v in response.grads.items()
    }
    np.testing.assert_allclose(out["loss"], np.sum(h * h), rtol=1e-12)
    np.testing.assert_allclose(out["h"], h, rtol=1e-12)
    np.testing.assert_allclose(grads["x"], 2 * h @ W.T, rtol=1e-12)
    np.testing.assert_allclose(grads["w"], X.T @ (2 * h), rtol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_is_rejected_and_server_keeps_serving(stub, case):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with evaluated_nodes() as evaluated, pytest.raises(grpc.RpcError) as info:
        getattr(stub, case.rpc)(case.request, timeout=HANG_SECONDS)
    error = info.value
    assert error.code() == case.code, error.details()
    details = error.details()
    for needle in case.needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    assert "internal error" not in details
    if case.fast:
        # Refused before anything ran (the server runs in this process; no wall-clock
        # bound: on a loaded machine that is scheduling luck). Work that never ends would
        # have met the deadline, and answered DEADLINE_EXCEEDED rather than case.code.
        assert evaluated == [], f"the server evaluated {evaluated} before refusing"
        # The huge shape must not have been allocated either.
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"
    assert_still_serving(stub)


def test_cycle_message_shows_the_path(stub):
    request = run(
        graph(XW_INPUTS, [node("a", "neg", ["b"]), node("b", "neg", ["a"])], {"out": "a"}), XW_FEEDS
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Run(request, timeout=HANG_SECONDS)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a -> b -> a" in info.value.details() or "b -> a -> b" in info.value.details()
    assert_still_serving(stub)


def test_nan_and_inf_inputs_pass_through_with_a_warning(stub):
    bad = X.copy()
    bad[0, 0], bad[1, 2] = np.nan, np.inf
    response = stub.Run(
        run(mlp_graph(), {"x": bad, "w": W}, wrt=["w"], loss="loss"), timeout=HANG_SECONDS
    )
    h = np.frombuffer(response.outputs["h"].data, np.float64).reshape(2, 4)
    assert np.isnan(h[0]).all() or not np.isfinite(h[0]).all()
    assert not np.isfinite(np.frombuffer(response.outputs["loss"].data, np.float64)).all()
    assert np.isnan(np.frombuffer(response.grads["w"].data, np.float64)).any()
    input_warnings = [w for w in response.warnings if "'x'" in w and "input" in w]
    assert input_warnings, list(response.warnings)
    assert "2" in input_warnings[0]  # two non-finite values
    assert not any("'w'" in w and "input" in w for w in response.warnings)
    assert_still_serving(stub)
