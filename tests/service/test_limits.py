"""Every configurable limit, one table row per way of exceeding it, on a real server
whose limits are tiny (so over-limit requests are cheap to build and must be cheap to
refuse): the status code, and a message naming the limit and the server flag that
raises it. Each limit also has a request exactly at it, which must pass; and after
every refusal the server still answers a valid request correctly.

The limits gRPC itself enforces (message size, concurrent RPCs) and the graph cache's
LRU eviction have their own tests below the tables; where a message does not yet name
its flag, a strict xfail says so (it fails once the message is fixed: drop the mark).
Malformed graphs that break no limit are tests/service/test_bad_input.py's; this file
does not repeat them.
"""

from __future__ import annotations

import contextlib
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import support
from support import HANG_SECONDS

import remat
from remat_proto.v1 import executor_pb2, executor_pb2_grpc, graph_pb2, tensor_pb2
from remat_server import Limits, ServerConfig, create_server

F64, I64 = tensor_pb2.FLOAT64, tensor_pb2.INT64
LIMITS = Limits(
    max_nodes=10,
    max_edges=12,
    max_rank=4,
    max_dim=1 << 40,
    max_elements=5000,
    max_request_bytes=64 << 10,
)
# Over 1 MiB: Run keeps 1 MiB of each message for everything but the tensors.
MAX_MESSAGE = 2 << 20
OVERFLOW = [2**40] * 3  # 2**120 elements: overflows int64, and every dim is within max_dim
NAN = float("nan")


# --- servers ---------------------------------------------------------------------------
@contextlib.contextmanager
def serving(config: ServerConfig):
    """A started server and a raw stub on it (sends up to 64 MiB, so that requests over
    the server's message limit leave the client)."""
    server, port = create_server(config)
    server.start()
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
        ],
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=HANG_SECONDS)
        yield executor_pb2_grpc.ExecutorStub(channel), channel
    finally:
        channel.close()
        server.stop(grace=None).wait()


@pytest.fixture(scope="module")
def limited():
    with serving(
        ServerConfig(host="127.0.0.1", port=0, limits=LIMITS, max_message_bytes=MAX_MESSAGE)
    ) as (stub, _):
        yield stub


# --- proto builders --------------------------------------------------------------------
def tensor(array) -> tensor_pb2.Tensor:
    array = np.ascontiguousarray(array)
    dtype = {np.dtype("<f8"): F64, np.dtype("<i8"): I64}[array.dtype]
    return tensor_pb2.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes())


def inp(name, shape, dtype=F64) -> graph_pb2.InputDef:
    return graph_pb2.InputDef(name=name, shape=shape, dtype=dtype, source="model.py:3")


def node(name, op, inputs=(), **attrs) -> graph_pb2.NodeDef:
    message = graph_pb2.NodeDef(name=name, op=op, inputs=list(inputs), source="model.py:7")
    for key, value in attrs.items():
        message.attrs[key].CopyFrom(value)
    return message


def ints(*values):
    return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=values))


def i(value):
    return graph_pb2.AttrValue(i=value)


def f(value):
    return graph_pb2.AttrValue(f=value)


def graph(inputs, nodes, outputs) -> graph_pb2.Graph:
    return graph_pb2.Graph(
        name="limits",
        inputs=inputs,
        nodes=nodes,
        outputs=[graph_pb2.OutputDef(name=o, node=n) for o, n in outputs],
    )


def run(g, feeds=None, **kwargs) -> executor_pb2.RunRequest:
    request = executor_pb2.RunRequest(graph=executor_pb2.GraphRef(graph=g), **kwargs)
    for name, value in (feeds or {}).items():
        request.inputs[name].CopyFrom(
            value if isinstance(value, tensor_pb2.Tensor) else tensor(value)
        )
    return request


def register(g) -> executor_pb2.RegisterGraphRequest:
    return executor_pb2.RegisterGraphRequest(graph=g)


def plan(g, **kwargs) -> executor_pb2.PlanRequest:
    return executor_pb2.PlanRequest(graph=executor_pb2.GraphRef(graph=g), **kwargs)


def chain(length: int) -> graph_pb2.Graph:
    """x -> neg -> neg ... (`length` nodes), 1 + length nodes in all."""
    nodes = [node(f"n{k}", "neg", [f"n{k - 1}" if k else "x"]) for k in range(length)]
    return graph([inp("x", [2])], nodes, [("out", nodes[-1].name)])


def fan_in(count: int) -> graph_pb2.Graph:
    """One concat of `count` copies of x: `count` edges, 2 nodes."""
    return graph([inp("x", [2])], [node("cat", "concat", ["x"] * count)], [("out", "cat")])


def scalar_loss() -> graph_pb2.Graph:
    """loss = sum(tanh(x)) for x of shape (2, 3)."""
    return graph(
        [inp("x", [2, 3])], [node("t", "tanh", ["x"]), node("s", "sum", ["t"])], [("loss", "s")]
    )


def tanh_chain_loss() -> graph_pb2.Graph:
    """loss = sum(tanh^8(x)), x of 64 elements: 10 nodes, and an exact-MILP plan for it
    under half of store_all's peak runs for minutes without a time limit."""
    nodes = [node(f"t{k}", "tanh", [f"t{k - 1}" if k else "x"]) for k in range(8)]
    return graph([inp("x", [64])], nodes + [node("s", "sum", ["t7"])], [("loss", "s")])


def optimal(time_limit: float) -> executor_pb2.PlanRequest:
    return plan(
        tanh_chain_loss(),
        wrt=["x"],
        loss="loss",
        policy=executor_pb2.Policy(
            optimal=executor_pb2.Optimal(fraction=0.5, time_limit_seconds=time_limit)
        ),
    )


X_INPUT = (inp("x", [2, 3]),)


def one_node(n, inputs=X_INPUT) -> graph_pb2.Graph:
    return graph(list(inputs), [n], [("out", n.name)])


X = np.arange(6, dtype=np.float64).reshape(2, 3)
IMAGE = [inp("img", [1, 1, 2, 2])]
IMAGE_FEED = {"img": np.ones((1, 1, 2, 2))}
# Two 4,900-element float64 outputs from one input: 3 x 39,200 bytes live at the end,
# over the 64 KiB request limit under every policy (outputs are live at the end).
BIG = np.zeros((70, 70))
TWO_BIG_OUTPUTS = graph(
    [inp("big", [70, 70])],
    [node("a", "neg", ["big"]), node("b", "exp", ["big"])],
    [("a", "a"), ("b", "b")],
)


# --- the table -------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    make: Callable[[], object]  # the request, built when the case runs
    needles: tuple[str, ...]  # what the message must say: the limit and its flag
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    rpc: str = "Run"
    fast: bool = False  # must be refused before anything runs, without allocating the shape


INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
OVER = [
    # max_nodes: inputs count as nodes; every RPC that takes a graph checks it.
    Case(
        "nodes_run",
        lambda: run(chain(10), {"x": np.zeros(2)}),
        ("11 nodes", "limit is 10", "--max-nodes"),
    ),
    Case(
        "nodes_register",
        lambda: register(chain(10)),
        ("11 nodes", "--max-nodes"),
        rpc="RegisterGraph",
    ),
    Case("nodes_plan", lambda: plan(chain(10)), ("11 nodes", "--max-nodes"), rpc="Plan"),
    Case(
        "nodes_inputs_only",
        lambda: register(graph([inp(f"x{k}", [1]) for k in range(11)], [], [("out", "x0")])),
        ("11 nodes", "--max-nodes"),
        rpc="RegisterGraph",
    ),
    # max_edges: one input per use.
    Case(
        "edges_run",
        lambda: run(fan_in(13), {"x": np.zeros(2)}),
        ("13 edges", "limit is 12", "--max-edges"),
    ),
    Case(
        "edges_register",
        lambda: register(fan_in(13)),
        ("13 edges", "--max-edges"),
        rpc="RegisterGraph",
    ),
    # max_rank: declared inputs, tensors sent, node results and per-axis attribute lists.
    Case(
        "rank_input_def",
        lambda: plan(graph([inp("r5", [1] * 5)], [], [("o", "r5")])),
        ("'r5'", "rank 5", "limit of 4", "--max-rank"),
        rpc="Plan",
    ),
    Case(
        "rank_cotangent",
        lambda: _with_cotangent(
            run(
                graph([inp("x", [2])], [node("n", "neg", ["x"])], [("o", "n")]),
                {"x": np.zeros(2)},
                wrt=["x"],
            ),
            "o",
            np.zeros((1, 1, 1, 1, 2)),
        ),
        ("cotangent 'o'", "rank 5", "--max-rank"),
    ),
    Case(
        "rank_node_result",
        lambda: run(
            one_node(node("up", "one_hot", ["i"], depth=i(2)), [inp("i", [1] * 4, I64)]),
            {"i": np.zeros((1,) * 4, np.int64)},
        ),
        ("'up'", "rank 5", "--max-rank"),
    ),
    Case(
        "rank_attribute_list",
        # Per axis and side (pad's pads) a list may have twice the rank limit; no more.
        lambda: run(one_node(node("t", "transpose", ["x"], axes=ints(*[0, 1] * 4, 0))), {"x": X}),
        ("'t'", "'axes' has 9 entries", "--max-rank"),
    ),
    # max_dim: checked per dimension before any product is formed.
    Case(
        "dim_input_def",
        lambda: register(graph([inp("wide", [2**41])], [], [("o", "wide")])),
        ("'wide'", str(2**41), "--max-dim"),
        rpc="RegisterGraph",
        fast=True,
    ),
    Case(
        "dim_tensor",
        lambda: run(
            graph([inp("x", [2])], [], [("o", "x")]),
            {"x": tensor_pb2.Tensor(dtype=F64, shape=[2**41])},
        ),
        ("'x'", str(2**41), "--max-dim"),
        fast=True,
    ),
    Case(
        "dim_node_result",
        lambda: run(one_node(node("bc", "broadcast_to", ["x"], shape=ints(2**41, 2, 3))), {"x": X}),
        ("'bc'", str(2**41), "--max-dim"),
        fast=True,
    ),
    # max_elements: per tensor, overflow-safe (2**120 must not wrap around to a small number).
    Case(
        "elements_input_def",
        lambda: register(graph([inp("sq", [100, 100])], [], [("o", "sq")])),
        ("'sq'", "more than 5000 elements", "--max-elements"),
        rpc="RegisterGraph",
        fast=True,
    ),
    Case(
        "elements_overflow_input_def",
        lambda: executor_pb2.DifferentiateRequest(
            graph=executor_pb2.GraphRef(
                graph=graph([inp("huge", OVERFLOW)], [node("n", "neg", ["huge"])], [("o", "n")])
            ),
            wrt=["huge"],
        ),
        ("'huge'", "5000 elements", "--max-elements"),
        rpc="Differentiate",
        fast=True,
    ),
    Case(
        "elements_overflow_cotangent",
        lambda: _with_cotangent(
            run(
                graph([inp("x", [2])], [node("n", "neg", ["x"])], [("o", "n")]),
                {"x": np.zeros(2)},
                wrt=["x"],
            ),
            "o",
            tensor_pb2.Tensor(dtype=F64, shape=OVERFLOW),
        ),
        ("cotangent 'o'", "5000 elements", "--max-elements"),
        fast=True,
    ),
    Case(
        "elements_overflow_plan_input_shapes",
        lambda: _with_shapes(
            plan(graph([inp("b", [-1] + OVERFLOW[1:])], [node("n", "neg", ["b"])], [("o", "n")])),
            b=OVERFLOW,
        ),
        ("'b'", "5000 elements", "--max-elements"),
        rpc="Plan",
        fast=True,
    ),
    Case(
        "elements_node_result",
        lambda: run(one_node(node("bc", "broadcast_to", ["x"], shape=ints(1000, 2, 3))), {"x": X}),
        ("'bc'", "more than 5000 elements", "--max-elements"),
        fast=True,
    ),
    Case(
        "elements_one_hot_depth",
        lambda: run(
            one_node(node("oh", "one_hot", ["i"], depth=i(10**6)), [inp("i", [2], I64)]),
            {"i": np.zeros(2, np.int64)},
        ),
        ("'oh'", "5000 elements", "--max-elements"),
        fast=True,
    ),
    # A temporary is a tensor too: the zero-padded copy conv and pooling make. (Found by
    # tests/property: unfold of a 2x2 image with padding 2000 and stride 3000 had a
    # 2x2 result but allocated 4004 x 4004 x 8 bytes first; unfold and fold now write
    # each tap straight into their result and make no such copy.)
    Case(
        "elements_padded_temporary_conv2d",
        lambda: run(
            one_node(
                node(
                    "c", "conv2d", ["img", "k"], stride=ints(3000, 3000), padding=ints(2000, 2000)
                ),
                IMAGE + [inp("k", [1, 1, 1, 1])],
            ),
            {**IMAGE_FEED, "k": np.ones((1, 1, 1, 1))},
        ),
        ("'c'", "temporary", "--max-elements"),
        fast=True,
    ),
    Case(
        "elements_padded_temporary_max_pool2d",
        lambda: run(
            one_node(
                node("p", "max_pool2d", ["img"], kernel=ints(4000, 4000), padding=ints(2000, 2000)),
                IMAGE,
            ),
            IMAGE_FEED,
        ),
        ("'p'", "temporary", "--max-elements"),
        fast=True,
    ),
    Case(
        "elements_padded_temporary_avg_pool2d",
        lambda: run(
            one_node(
                node("p", "avg_pool2d", ["img"], kernel=ints(4000, 4000), padding=ints(2000, 2000)),
                IMAGE,
            ),
            IMAGE_FEED,
        ),
        ("'p'", "temporary", "--max-elements"),
        fast=True,
    ),
    # max_request_bytes: the plan's predicted peak, refused before anything runs.
    Case(
        "request_bytes_auto",
        lambda: run(TWO_BIG_OUTPUTS, {"big": BIG}),
        ("--max-request-bytes",),
        code=EXHAUSTED,
        fast=True,
    ),
    Case(
        "request_bytes_store_all",
        lambda: run(TWO_BIG_OUTPUTS, {"big": BIG}, policy=executor_pb2.Policy(name="store_all")),
        ("predicted peak", "117,600", "65,536", "--max-request-bytes"),
        code=EXHAUSTED,
        fast=True,
    ),
    Case(
        "request_bytes_plan",
        lambda: plan(TWO_BIG_OUTPUTS, policy=executor_pb2.Policy(name="store_all")),
        ("predicted peak", "--max-request-bytes"),
        code=EXHAUSTED,
        rpc="Plan",
        fast=True,
    ),
    Case(
        "request_bytes_recompute_all",
        lambda: run(
            TWO_BIG_OUTPUTS, {"big": BIG}, policy=executor_pb2.Policy(name="recompute_all")
        ),
        ("--max-request-bytes",),
        code=EXHAUSTED,
        fast=True,
    ),
]


def _with_cotangent(request, name, value):
    request.cotangents[name].CopyFrom(
        value if isinstance(value, tensor_pb2.Tensor) else tensor(value)
    )
    return request


def _with_shapes(request, **shapes):
    for name, dims in shapes.items():
        request.input_shapes[name].values.extend(dims)
    return request


# Attribute and policy ranges: not server limits (no flag raises them), so the message
# names the attribute or parameter and the rule instead.
RANGES = [
    Case(
        "stride_zero",
        lambda: run(
            one_node(
                node("c", "conv2d", ["img", "k"], stride=ints(0, 1)),
                IMAGE + [inp("k", [1, 1, 1, 1])],
            ),
            {**IMAGE_FEED, "k": np.ones((1, 1, 1, 1))},
        ),
        ("'c'", "'stride'", "each > 0"),
    ),
    Case(
        "stride_negative",
        lambda: run(
            one_node(
                node("p", "max_pool2d", ["img"], kernel=ints(1, 1), stride=ints(1, -1)), IMAGE
            ),
            IMAGE_FEED,
        ),
        ("'p'", "'stride'", "each > 0"),
    ),
    Case(
        "dilation_zero",
        lambda: run(
            one_node(node("u", "unfold", ["img"], kernel=ints(1, 1), dilation=ints(0, 0)), IMAGE),
            IMAGE_FEED,
        ),
        ("'u'", "'dilation'", "each > 0"),
    ),
    Case(
        "kernel_zero",
        lambda: run(
            one_node(node("p", "avg_pool2d", ["img"], kernel=ints(0, 2)), IMAGE), IMAGE_FEED
        ),
        ("'p'", "'kernel'", "each > 0"),
    ),
    Case(
        "padding_negative",
        lambda: run(
            one_node(node("u", "unfold", ["img"], kernel=ints(1, 1), padding=ints(-1, 0)), IMAGE),
            IMAGE_FEED,
        ),
        ("'u'", "'padding'", "each >= 0"),
    ),
    Case(
        "dropout_p_one",
        lambda: run(one_node(node("d", "dropout", ["x"], p=f(1.0))), {"x": X}),
        ("'d'", "'p' = 1.0", "[0, 1)"),
    ),
    Case(
        "dropout_p_negative",
        lambda: run(one_node(node("d", "dropout", ["x"], p=f(-0.1))), {"x": X}),
        ("'d'", "'p' = -0.1", "[0, 1)"),
    ),
    Case(
        "dropout_p_nan",
        lambda: run(one_node(node("d", "dropout", ["x"], p=f(NAN))), {"x": X}),
        ("'d'", "'p' = nan", "[0, 1)"),
    ),
    Case(
        "one_hot_negative_depth",
        lambda: run(
            one_node(node("oh", "one_hot", ["i"], depth=i(-1)), [inp("i", [2], I64)]),
            {"i": np.zeros(2, np.int64)},
        ),
        ("'oh'", "'depth' = -1", "must be >= 0"),
    ),
    Case(
        "pow_exponent_inf",
        lambda: run(one_node(node("p", "pow", ["x"], exponent=f(float("inf")))), {"x": X}),
        ("'p'", "'exponent'", "must be finite"),
    ),
    Case(
        "layer_norm_eps_negative",
        lambda: run(
            one_node(
                node("ln", "layer_norm", ["x", "g", "b"], eps=f(-1.0)),
                [inp("x", [2, 3]), inp("g", [3]), inp("b", [3])],
            ),
            {"x": X, "g": np.ones(3), "b": np.zeros(3)},
        ),
        ("'ln'", "'eps'", "finite and >= 0"),
    ),
    Case(
        "softmax_axis_out_of_range",
        lambda: run(one_node(node("sm", "softmax", ["x"], axis=i(2))), {"x": X}),
        ("'sm'", "axis 2", "rank 2"),
    ),
    Case(
        "scatter_add_negative_size",
        lambda: run(
            one_node(
                node("sa", "scatter_add", ["x", "i"], axis=i(0), size=i(-3)),
                [inp("x", [2, 3]), inp("i", [2], I64)],
            ),
            {"x": X, "i": np.zeros(2, np.int64)},
        ),
        ("'sa'", "'size' = -3", "must be >= 0"),
    ),
    Case(
        "broadcast_to_negative_size",
        lambda: run(one_node(node("bc", "broadcast_to", ["x"], shape=ints(-2, 3))), {"x": X}),
        ("'bc'", "'shape'", "sizes must be >= 0"),
    ),
    Case(
        "budget_fraction_above_one",
        lambda: run(
            scalar_loss(),
            {"x": X},
            wrt=["x"],
            loss="loss",
            policy=executor_pb2.Policy(budget=executor_pb2.Budget(fraction=1.5)),
        ),
        ("budget", "fraction must be in (0, 1]", "1.5"),
    ),
    Case(
        "budget_fraction_nan",
        lambda: run(
            scalar_loss(),
            {"x": X},
            wrt=["x"],
            loss="loss",
            policy=executor_pb2.Policy(budget=executor_pb2.Budget(fraction=NAN)),
        ),
        ("budget", "fraction must be in (0, 1]"),
    ),
    Case(
        "budget_bytes_negative",
        lambda: plan(
            scalar_loss(),
            wrt=["x"],
            loss="loss",
            policy=executor_pb2.Policy(dtr=executor_pb2.DTR(bytes=-5)),
        ),
        ("dtr", "bytes must be > 0", "-5"),
        rpc="Plan",
    ),
    Case(
        "budget_bytes_and_fraction",
        lambda: plan(
            scalar_loss(),
            wrt=["x"],
            loss="loss",
            policy=executor_pb2.Policy(optimal=executor_pb2.Optimal(bytes=100, fraction=0.5)),
        ),
        ("optimal", "exactly one of bytes and fraction"),
        rpc="Plan",
    ),
    # Found by tests/property (a longer randomized run): with nothing to compute, DTR's
    # replay never compared the inputs with the budget, and its own consistency check
    # answered INTERNAL "planned peak 64 exceeds the budget 1 bytes".
    Case(
        "dtr_budget_below_the_inputs_alone",
        lambda: run(
            graph([inp("x", [4, 2])], [], [("o", "x")]),
            {"x": np.zeros((4, 2))},
            policy=executor_pb2.Policy(dtr=executor_pb2.DTR(bytes=1)),
        ),
        ("dtr", "no schedule fits 1 bytes", "inputs alone exceed it"),
        code=EXHAUSTED,
    ),
    # Found by reviewing what the fuzzed policies reach: HiGHS takes a NaN, infinite or
    # negative time limit as none at all, so these planned for minutes (or hours).
    Case(
        "optimal_time_limit_nan",
        lambda: optimal(NAN),
        ("optimal", "time_limit_seconds must be finite and >= 0", "nan"),
        rpc="Plan",
        fast=True,
    ),
    Case(
        "optimal_time_limit_inf",
        lambda: optimal(float("inf")),
        ("optimal", "time_limit_seconds", "inf"),
        rpc="Plan",
        fast=True,
    ),
    Case(
        "optimal_time_limit_negative",
        lambda: optimal(-1.0),
        ("optimal", "time_limit_seconds", "-1.0"),
        rpc="Plan",
        fast=True,
    ),
]


def assert_still_serving(stub) -> None:
    response = stub.Run(run(scalar_loss(), {"x": X}, wrt=["x"], loss="loss"), timeout=HANG_SECONDS)
    grad = np.frombuffer(response.grads["x"].data, np.float64).reshape(2, 3)
    np.testing.assert_allclose(grad, 1 - np.tanh(X) ** 2, rtol=1e-12)


@pytest.mark.parametrize("case", OVER + RANGES, ids=[c.id for c in OVER + RANGES])
def test_over_a_limit_is_refused_naming_it(limited, case):
    request = case.make()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with support.evaluated_nodes() as evaluated, pytest.raises(grpc.RpcError) as info:
        getattr(limited, case.rpc)(request, timeout=HANG_SECONDS)
    assert info.value.code() == case.code, info.value.details()
    details = info.value.details()
    for needle in case.needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    if case.fast:
        # Refused before anything ran (the server runs in this process; no wall-clock
        # bound: on a loaded machine that is scheduling luck). Work that never ends, such
        # as HiGHS with no time limit, would have met the deadline, and answered
        # DEADLINE_EXCEEDED rather than case.code.
        assert evaluated == [], f"the server evaluated {evaluated} before refusing"
        # Nothing big may have been allocated either.
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert grown_mib < 16, f"peak RSS grew by {grown_mib:.0f} MiB"
    assert_still_serving(limited)


# --- exactly at each limit: accepted ---------------------------------------------------
AT = [
    Case("nodes", lambda: run(chain(9), {"x": np.zeros(2)}), ()),
    Case("edges", lambda: run(fan_in(12), {"x": np.zeros(2)}), ()),
    Case(
        "rank",
        lambda: run(
            one_node(node("oh", "one_hot", ["i"], depth=i(2)), [inp("i", [1] * 3, I64)]),
            {"i": np.zeros((1,) * 3, np.int64)},
        ),
        (),
    ),
    Case(
        "elements",
        lambda: run(
            one_node(node("bc", "broadcast_to", ["x"], shape=ints(2, 2500)), [inp("x", [1])]),
            {"x": np.ones(1)},
        ),
        (),
    ),
    Case(
        "padded_temporary",
        lambda: run(
            one_node(
                node(
                    "u",
                    "unfold",
                    ["img"],
                    kernel=ints(1, 1),
                    stride=ints(100, 100),
                    padding=ints(34, 34),
                ),
                IMAGE,
            ),
            IMAGE_FEED,
        ),
        (),
    ),
    # 3 x 21,800 bytes = 65,400 <= 65,536: inputs and both outputs live at the end.
    Case(
        "request_bytes",
        lambda: run(
            graph(
                [inp("big", [2725])],
                [node("a", "neg", ["big"]), node("b", "exp", ["big"])],
                [("a", "a"), ("b", "b")],
            ),
            {"big": np.zeros(2725)},
            policy=executor_pb2.Policy(name="store_all"),
        ),
        (),
    ),
]


@pytest.mark.parametrize("case", AT, ids=[c.id for c in AT])
def test_exactly_at_a_limit_is_accepted(limited, case):
    response = limited.Run(case.make(), timeout=HANG_SECONDS)
    assert response.outputs


# --- limits gRPC enforces ----------------------------------------------------------------
def test_request_over_the_message_size_is_resource_exhausted(limited):
    """Bigger than max_message_bytes: gRPC refuses it before remat sees a byte."""
    request = run(graph([inp("x", [300_000])], [], [("o", "x")]), {"x": np.zeros(300_000)})
    assert request.ByteSize() > MAX_MESSAGE
    with pytest.raises(grpc.RpcError) as info:
        limited.Run(request, timeout=HANG_SECONDS)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_MESSAGE) in info.value.details()  # "...larger than max (N vs. 2097152)"
    assert_still_serving(limited)


def _held_run_stream(channel, release: threading.Event):
    """A RunStream whose upload never ends until `release`: it holds an RPC slot
    without using a thread's CPU. Returns once the server has accepted its header (so
    it holds the slot), with the thread reading its responses and their list."""
    call = channel.stream_stream(
        "/remat.v1.Executor/RunStream",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=executor_pb2.RunStreamResponse.FromString,
    )
    header = run(graph([inp("x", [2, 3])], [node("n", "neg", ["x"])], [("o", "n")]), {"x": X})

    def messages():
        yield executor_pb2.RunStreamRequest(header=header)
        release.wait(HANG_SECONDS)

    results = []
    responses = call(messages(), timeout=HANG_SECONDS)
    responses.initial_metadata()  # the server accepted the header: its handler runs
    thread = threading.Thread(target=lambda: results.append(list(responses)))
    thread.start()
    return thread, results


def _refused_while_one_call_is_held() -> grpc.RpcError:
    """On a server with max_concurrent_rpcs=1, the error of a call made while another
    call holds the slot; checks the held call then completes and the slot frees."""
    config = ServerConfig(host="127.0.0.1", port=0, max_concurrent_rpcs=1, max_workers=2)
    with serving(config) as (stub, channel):
        release = threading.Event()
        thread, results = _held_run_stream(channel, release)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListOps(executor_pb2.ListOpsRequest(), timeout=HANG_SECONDS)
        finally:
            release.set()
            thread.join(HANG_SECONDS)
        refused = refused.value
        # The held call completes normally, and the slot is free again.
        assert results and len(results[0]) == 1
        out = results[0][0].header.outputs["o"]
        np.testing.assert_array_equal(np.frombuffer(out.data, np.float64).reshape(2, 3), -X)
        assert_still_serving(stub)
    return refused


def test_over_max_concurrent_rpcs_is_resource_exhausted():
    refused = _refused_while_one_call_is_held()
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
    assert "--max-concurrent-rpcs" in refused.details()  # the server's work slots refuse it


def test_concurrent_rpcs_refusal_names_the_flag_in_the_sdk():
    """The refusal reaches the SDK's exception naming the flag (the server's own words,
    or the SDK's when gRPC's limit refuses first)."""
    from remat.errors import from_rpc_error

    error = from_rpc_error(_refused_while_one_call_is_held())
    assert isinstance(error, remat.ResourceExhaustedError)
    assert "--max-concurrent-rpcs" in str(error)


# --- the graph cache ---------------------------------------------------------------------
def _named(name: str) -> graph_pb2.Graph:
    """Graphs of equal size and different content ids."""
    return graph(
        [inp("x", [2, 3])], [node("t", "tanh", ["x"]), node("s", "sum", ["t"])], [(name, "s")]
    )


def _run_by_id(stub, graph_id: str, output: str) -> float:
    request = executor_pb2.RunRequest(graph=executor_pb2.GraphRef(graph_id=graph_id))
    request.inputs["x"].CopyFrom(tensor(X))
    response = stub.Run(request, timeout=HANG_SECONDS)
    return float(np.frombuffer(response.outputs[output].data, np.float64)[0])


@pytest.fixture
def cache_of_two():
    """A server whose graph cache holds two of `_named`'s graphs but not three."""
    size = support.stored_bytes(_named("a"))
    config = ServerConfig(host="127.0.0.1", port=0, graph_cache_bytes=2 * size + size // 2)
    with serving(config) as (stub, _):
        yield stub


def test_graph_cache_evicts_the_least_recently_used(cache_of_two):
    stub = cache_of_two
    ids = {
        name: stub.RegisterGraph(register(_named(name)), timeout=HANG_SECONDS).graph_id
        for name in ("a", "b")
    }
    assert _run_by_id(stub, ids["a"], "a") == pytest.approx(np.tanh(X).sum())  # a is recent
    ids["c"] = stub.RegisterGraph(register(_named("c")), timeout=HANG_SECONDS).graph_id  # evicts b
    with pytest.raises(grpc.RpcError) as info:
        _run_by_id(stub, ids["b"], "b")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert ids["b"] in info.value.details() and "evicted" in info.value.details()
    for name in ("a", "c"):  # nothing else was lost
        assert _run_by_id(stub, ids[name], name) == pytest.approx(np.tanh(X).sum())
    # Registering b again brings it back (and evicts a, now the least recently used).
    assert stub.RegisterGraph(register(_named("b")), timeout=HANG_SECONDS).graph_id == ids["b"]
    assert _run_by_id(stub, ids["b"], "b") == pytest.approx(np.tanh(X).sum())


def test_eviction_message_names_the_flag(cache_of_two):
    stub = cache_of_two
    first = stub.RegisterGraph(register(_named("a")), timeout=HANG_SECONDS).graph_id
    for name in ("b", "c"):
        stub.RegisterGraph(register(_named(name)), timeout=HANG_SECONDS)
    with pytest.raises(grpc.RpcError) as info:
        _run_by_id(stub, first, "a")
    assert "--graph-cache-bytes" in info.value.details()
