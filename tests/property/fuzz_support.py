"""Shared pieces of the property tests: the one place their Hypothesis settings and
example counts live, the check every answer must pass, the known-good request the
server must still answer after a batch of hostile ones, and the proto builders and
strategies the fuzz tests draw from.

An answer passes when it is OK, or a status whose code says what went wrong
(INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND...) with a non-empty message.
UNKNOWN and INTERNAL are server bugs; DEADLINE_EXCEEDED is a hang; UNAVAILABLE or
CANCELLED mean the server stopped answering.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from remat.v1 import executor_pb2, graph_pb2, tensor_pb2
from remat_server.ops import REGISTRY

# --- settings: the only place they are set -------------------------------------------------
# Example counts per test (parametrized tests multiply them); together they make the
# >= 10,000 cases a plain `python -m pytest tests/property` runs (see test_case_budget).
EXAMPLES = {
    "raw_bytes": 420,          # x 6 RPCs
    "mutated_bytes": 420,      # x 6 RPCs
    "hostile_graphs": 1500,    # x 2 (Run, Plan / Differentiate / RegisterGraph mixed)
    "op_templates": 2000,
    "policies": 500,
    "graph_mutations": 1400,
    "graph_refs": 300,
}
CALL_TIMEOUT = 10.0   # seconds; a call that needs longer counts as a hang
SLOW_CALL = 5.0       # no single hostile request may take this long (limits keep them small)
CHECK_EVERY = 250     # examples between two known-good Runs


def fuzz_settings(kind: str) -> settings:
    """Deterministic (derandomized, no example database written) and free of the health
    checks that would make a CI run flaky on a slow shared machine."""
    return settings(max_examples=EXAMPLES[kind], deadline=None, derandomize=True,
                    database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))


ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.OUT_OF_RANGE}


# --- the check every answer passes -------------------------------------------------------
@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    response: object = None
    seconds: float = 0.0


@dataclass
class Tally:
    """Counts answers by status code (printed with -s; kept to spot a strategy that
    never gets past the first check)."""
    codes: dict = field(default_factory=dict)
    calls: int = 0

    def add(self, outcome: Outcome) -> None:
        self.calls += 1
        self.codes[outcome.code.name] = self.codes.get(outcome.code.name, 0) + 1


def check_answer(callable_, request, *, stream: bool = False, what: str = "") -> Outcome:
    """Send `request`, and assert the answer is OK or a clear, expected status."""
    start = time.perf_counter()
    try:
        response = callable_(request, timeout=CALL_TIMEOUT)
        if stream:
            response = list(response)
        outcome = Outcome(grpc.StatusCode.OK, "", response)
    except grpc.RpcError as error:
        outcome = Outcome(error.code(), error.details() or "")
    outcome.seconds = time.perf_counter() - start
    label = f"{what}: {outcome.code.name}: {outcome.details!r}"
    assert outcome.code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"hang ({label})"
    assert outcome.code in ALLOWED, f"a server bug or crash ({label})"
    if outcome.code is not grpc.StatusCode.OK:
        assert outcome.details.strip(), f"no message ({label})"
        assert "internal error" not in outcome.details, label
    assert outcome.seconds < SLOW_CALL, f"took {outcome.seconds:.1f} s ({label})"
    return outcome


# --- the known-good request --------------------------------------------------------------
X = np.arange(6, dtype=np.float64).reshape(2, 3) / 10
W = np.linspace(-1, 1, 12, dtype=np.float64).reshape(3, 4)


def tensor(array) -> tensor_pb2.Tensor:
    array = np.ascontiguousarray(array)
    return tensor_pb2.Tensor(dtype=ENUM[array.dtype], shape=array.shape, data=array.tobytes())


def inp(name, shape, dtype=tensor_pb2.FLOAT64, source="") -> graph_pb2.InputDef:
    return graph_pb2.InputDef(name=name, shape=shape, dtype=dtype, source=source)


def node(name, op, inputs=(), **attrs) -> graph_pb2.NodeDef:
    message = graph_pb2.NodeDef(name=name, op=op, inputs=list(inputs))
    for key, value in attrs.items():
        message.attrs[key].CopyFrom(value)
    return message


def graph(inputs, nodes, outputs, name="g") -> graph_pb2.Graph:
    return graph_pb2.Graph(name=name, inputs=inputs, nodes=nodes,
                           outputs=[graph_pb2.OutputDef(name=o, node=n) for o, n in outputs])


def ints(*values) -> graph_pb2.AttrValue:
    return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=values))


def mlp_graph() -> graph_pb2.Graph:
    """h = x @ w; loss = sum(h * h)."""
    return graph([inp("x", [2, 3]), inp("w", [3, 4])],
                 [node("h", "matmul", ["x", "w"]), node("hh", "mul", ["h", "h"]),
                  node("s", "sum", ["hh"])], [("loss", "s"), ("h", "h")])


def array_of(message: tensor_pb2.Tensor) -> np.ndarray:
    return np.frombuffer(message.data, NUMPY[message.dtype]).reshape(tuple(message.shape))


def assert_still_serving(stub) -> None:
    """A valid Run on the same server still gives the right numbers."""
    request = executor_pb2.RunRequest(graph=executor_pb2.GraphRef(graph=mlp_graph()),
                                      wrt=["x", "w"], loss="loss")
    request.inputs["x"].CopyFrom(tensor(X))
    request.inputs["w"].CopyFrom(tensor(W))
    response = stub.Run(request, timeout=CALL_TIMEOUT)
    h = X @ W
    np.testing.assert_allclose(array_of(response.outputs["loss"]), np.sum(h * h), rtol=1e-12)
    np.testing.assert_allclose(array_of(response.outputs["h"]), h, rtol=1e-12)
    np.testing.assert_allclose(array_of(response.grads["x"]), 2 * h @ W.T, rtol=1e-12)
    np.testing.assert_allclose(array_of(response.grads["w"]), X.T @ (2 * h), rtol=1e-12)


class Checkpointed:
    """Runs `assert_still_serving` every CHECK_EVERY calls of `tick`."""

    def __init__(self, stub):
        self.stub, self.count = stub, 0

    def tick(self) -> None:
        self.count += 1
        if self.count % CHECK_EVERY == 0:
            assert_still_serving(self.stub)


# --- dtypes ------------------------------------------------------------------------------
NUMPY = {tensor_pb2.FLOAT32: np.dtype("<f4"), tensor_pb2.FLOAT64: np.dtype("<f8"),
         tensor_pb2.INT32: np.dtype("<i4"), tensor_pb2.INT64: np.dtype("<i8"),
         tensor_pb2.BOOL: np.dtype("bool")}
ENUM = {v: k for k, v in NUMPY.items()}
DTYPES = list(NUMPY)

# --- hostile scalars ---------------------------------------------------------------------
INT64_MAX, INT64_MIN = 2 ** 63 - 1, -2 ** 63
EDGE_INTS = [0, 1, -1, 2, -2, 3, 7, 2 ** 31 - 1, 2 ** 31, -2 ** 31, 2 ** 32, 2 ** 40, 2 ** 62,
             INT64_MAX, INT64_MIN, INT64_MIN + 1]
hostile_ints = st.one_of(st.integers(-4, 8), st.sampled_from(EDGE_INTS),
                         st.integers(INT64_MIN, INT64_MAX))
hostile_floats = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 0.999999, 1.0, 1.5, 1e-300, 1e300,
                     math.inf, -math.inf, math.nan, 2.0 ** 63, -2.0 ** 63]),
    st.floats(allow_nan=True, allow_infinity=True))
hostile_dims = st.one_of(st.integers(0, 5), st.sampled_from(
    [-1, -2, 0, 2 ** 16, 2 ** 16 + 1, 2 ** 31, 2 ** 40, 2 ** 62, INT64_MAX, INT64_MIN]))
hostile_shapes = st.lists(hostile_dims, max_size=7)
small_shapes = st.lists(st.integers(0, 4), max_size=4)
# Names collide on purpose: dangling, duplicate, self and cyclic references follow.
NAMES = ["x", "w", "y", "a", "b", "h", "s", "loss", "out", "", "grad/x", "cotangent/out",
         "x\x00", "é", "a" * 300]
names = st.sampled_from(NAMES)
texts = st.text(max_size=12)
dtype_enums = st.one_of(st.sampled_from(DTYPES), st.integers(-3, 9),
                        st.integers(-2 ** 31, 2 ** 31 - 1))
OP_NAMES = sorted(REGISTRY)
op_names = st.one_of(st.sampled_from(OP_NAMES), st.sampled_from(["", "input", "frobnicate",
                                                                 "MatMul", "relu "]), texts)
ATTR_NAMES = sorted({a for op in REGISTRY.values() for a in op.attrs}) + ["alpha", ""]


@st.composite
def hostile_tensors(draw, shape=None, dtype=None) -> tensor_pb2.Tensor:
    """Usually a consistent tensor of small shape; sometimes a lie about its size."""
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    shape = list(draw(small_shapes)) if shape is None else list(shape)
    kind = draw(st.sampled_from(["honest"] * 6 + ["short", "long", "dtype", "shape"]))
    if kind == "shape":
        shape = draw(hostile_shapes)
    count = math.prod(shape) if all(0 <= d <= 4096 for d in shape) else 0
    if count > 4096:
        count = 0
    np_dtype = NUMPY.get(dtype, np.dtype("<f8"))
    if np_dtype.kind == "f":
        values = draw(st.lists(hostile_floats, min_size=min(count, 4), max_size=min(count, 4)))
        array = np.resize(np.array(values or [0.0], np_dtype), count)
    elif np_dtype.kind == "b":
        array = np.resize(np.array(draw(st.lists(st.booleans(), min_size=1, max_size=4))), count)
    else:
        info = np.iinfo(np_dtype)
        values = draw(st.lists(st.one_of(st.integers(-3, 5), st.integers(info.min, info.max)),
                               min_size=1, max_size=4))
        array = np.resize(np.array(values, np_dtype), count)
    data = array.astype(np_dtype).tobytes()
    if kind == "short":
        data = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    elif kind == "long":
        data += draw(st.binary(min_size=1, max_size=9))
    if kind == "dtype":
        dtype = draw(dtype_enums)
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def hostile_attrs(draw, type_hint: str | None = None) -> graph_pb2.AttrValue:
    """An AttrValue of the hinted type (usually) or of any type, with edge values."""
    kind = draw(st.sampled_from(["int", "float", "string", "bool", "ints", "floats",
                                 "tensor", "none"]))
    if type_hint is not None and draw(st.integers(0, 3)):
        kind = type_hint
    if kind == "int":
        return graph_pb2.AttrValue(i=draw(hostile_ints))
    if kind == "float":
        return graph_pb2.AttrValue(f=draw(hostile_floats))
    if kind == "string":
        return graph_pb2.AttrValue(s=draw(st.one_of(
            st.sampled_from(["float32", "float64", "int64", "bool", "complex64", ""]), texts)))
    if kind == "bool":
        return graph_pb2.AttrValue(b=draw(st.booleans()))
    if kind == "ints":
        return ints(*draw(st.lists(hostile_ints, max_size=9)))
    if kind == "floats":
        return graph_pb2.AttrValue(floats=graph_pb2.FloatList(
            values=draw(st.lists(hostile_floats, max_size=5))))
    if kind == "tensor":
        return graph_pb2.AttrValue(tensor=draw(hostile_tensors()))
    return graph_pb2.AttrValue()


@st.composite
def hostile_policies(draw) -> executor_pb2.Policy:
    P = executor_pb2
    budget = dict(bytes=draw(st.one_of(st.sampled_from([0, -1, 1, 2 ** 20, INT64_MAX,
                                                        INT64_MIN]), st.integers(0, 10 ** 6))),
                  fraction=draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), hostile_floats)))
    kind = draw(st.sampled_from(["unset", "name", "store_all", "recompute_all", "sqrt",
                                 "every_k", "checkpoints", "save_ops", "revolve", "budget",
                                 "optimal", "dtr", "auto"]))
    if kind == "unset":
        return P.Policy()
    if kind == "name":
        return P.Policy(name=draw(st.one_of(st.sampled_from(
            ["store_all", "recompute_all", "sqrt", "auto", "every_k", "", "STORE_ALL"]), texts)))
    if kind in ("store_all", "recompute_all", "sqrt"):
        return P.Policy(**{kind: getattr(P, {"store_all": "StoreAll", "sqrt": "Sqrt",
                                             "recompute_all": "RecomputeAll"}[kind])()})
    int32 = st.one_of(st.integers(-3, 6), st.sampled_from([2 ** 31 - 1, -2 ** 31]))
    if kind == "every_k":
        return P.Policy(every_k=P.EveryK(k=draw(int32)))
    if kind == "revolve":
        return P.Policy(revolve=P.Revolve(slots=draw(int32)))
    if kind == "checkpoints":
        return P.Policy(checkpoints=P.Checkpoints(names=draw(st.lists(names, max_size=3))))
    if kind == "save_ops":
        return P.Policy(save_ops=P.SaveOps(ops=draw(st.lists(op_names, max_size=3))))
    if kind == "budget":
        return P.Policy(budget=P.Budget(profile=draw(st.booleans()), **budget))
    if kind == "optimal":
        # Time limits stay small: a long one is a slow request, not a bug (the server
        # caps its own default; see the report on client-chosen limits).
        return P.Policy(optimal=P.Optimal(time_limit_seconds=draw(st.one_of(
            st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 0.2]))), **budget))
    if kind == "dtr":
        return P.Policy(dtr=P.DTR(**budget))
    return P.Policy(auto=P.Auto(bytes=budget["bytes"]))


# --- hostile graphs ------------------------------------------------------------------------
@st.composite
def hostile_nodes(draw) -> graph_pb2.NodeDef:
    op = draw(op_names)
    known = REGISTRY.get(op)
    arity = known.min_inputs if known is not None else 1
    count = draw(st.one_of(st.just(arity), st.integers(0, 4)))
    message = graph_pb2.NodeDef(name=draw(names), op=op,
                                inputs=draw(st.lists(names, min_size=count, max_size=count)),
                                source=draw(st.sampled_from(["", "model.py:12"])))
    attr_names = list(known.attrs) if known is not None else []
    for key in draw(st.lists(st.sampled_from(attr_names + ATTR_NAMES), max_size=3,
                             unique=True)):
        hint = known.attrs[key].type if known is not None and key in known.attrs else None
        message.attrs[key].CopyFrom(draw(hostile_attrs(hint)))
    return message


@st.composite
def hostile_graphs(draw) -> graph_pb2.Graph:
    inputs = [graph_pb2.InputDef(name=draw(names),
                                 shape=draw(st.one_of(small_shapes, hostile_shapes)),
                                 dtype=draw(st.one_of(st.sampled_from(DTYPES), dtype_enums)),
                                 source=draw(st.sampled_from(["", "m.py:1"])))
              for _ in range(draw(st.integers(0, 3)))]
    nodes = draw(st.lists(hostile_nodes(), max_size=5))
    defined = [i.name for i in inputs] + [n.name for n in nodes]
    outputs = [graph_pb2.OutputDef(name=draw(names),
                                   node=draw(st.sampled_from(defined) if defined and
                                             draw(st.booleans()) else names))
               for _ in range(draw(st.integers(0, 3)))]
    return graph_pb2.Graph(name=draw(st.one_of(st.just("g"), texts)), inputs=inputs,
                           nodes=nodes, outputs=outputs)


@st.composite
def feeds_for(draw, message: graph_pb2.Graph, request) -> None:
    """Tensors for the graph's declared inputs into `request.inputs`: mostly ones that
    fit the declaration (so requests get past decoding), sometimes hostile ones."""
    for item in message.inputs:
        if draw(st.integers(0, 9)) == 0:
            continue  # missing input
        shape = [2 if d == -1 else d for d in item.shape]
        fits = item.dtype in NUMPY and all(0 <= d <= 64 for d in shape) \
            and math.prod(shape) <= 4096 and draw(st.integers(0, 5))
        value = draw(hostile_tensors(shape, item.dtype) if fits else hostile_tensors())
        request.inputs[item.name].CopyFrom(value)
    if draw(st.integers(0, 9)) == 0:
        request.inputs[draw(names)].CopyFrom(draw(hostile_tensors()))  # extra input


@st.composite
def requests_for(draw, message: graph_pb2.Graph, rpc: str):
    """A request of `rpc` around the graph `message`, with hostile extras."""
    P = executor_pb2
    ref = P.GraphRef(graph=message)
    defined = [i.name for i in message.inputs] + [o.name for o in message.outputs] \
        + [n.name for n in message.nodes]
    pick = st.sampled_from(defined) if defined else names
    wrt = draw(st.lists(st.one_of(pick, names), max_size=3))
    loss = draw(st.one_of(st.just(""), pick, names))
    if rpc == "RegisterGraph":
        return P.RegisterGraphRequest(graph=message)
    if rpc == "Differentiate":
        request = P.DifferentiateRequest(graph=ref, wrt=wrt, loss=loss)
        for name in draw(st.lists(names, max_size=2)):
            request.input_shapes[name].values.extend(draw(hostile_shapes))
        return request
    if rpc == "Plan":
        request = P.PlanRequest(graph=ref, wrt=wrt, loss=loss, policy=draw(hostile_policies()),
                                cotangent_outputs=draw(st.lists(pick, max_size=2)),
                                fetch=draw(st.lists(pick, max_size=2)),
                                include_schedule=draw(st.booleans()))
        for name in draw(st.lists(pick, max_size=2)):
            request.input_shapes[name].values.extend(draw(st.one_of(small_shapes,
                                                                    hostile_shapes)))
        return request
    request = P.RunRequest(graph=ref, wrt=wrt, loss=loss, policy=draw(hostile_policies()),
                           fetch=draw(st.lists(pick, max_size=2)), timeline=draw(st.booleans()),
                           trace=draw(st.booleans()))
    draw(feeds_for(message, request))
    for name in draw(st.lists(pick, max_size=2)):
        request.cotangents[name].CopyFrom(draw(hostile_tensors()))
    return request
