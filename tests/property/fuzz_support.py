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
from dataclasses import dataclass, field

import grpc
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from support import HANG_SECONDS

from remat_proto.v1 import executor_pb2, graph_pb2, tensor_pb2
from remat_server.ops import REGISTRY

# --- settings: the only place they are set -------------------------------------------------
# Example counts per test (parametrized tests multiply them); together they make the
# >= 10,000 cases a plain `python -m pytest tests/property` runs (test_fuzz_budget.py
# checks the sum; the terminal summary prints how many ran).
EXAMPLES = {
    "raw_bytes": 420,  # x 6 RPCs
    "mutated_bytes": 420,  # x 6 RPCs
    "hostile_graphs": 2000,  # x 2 (Run; Plan, Differentiate, RegisterGraph, Compare)
    "op_templates": 3000,
    "policies": 500,
    "graph_mutations": 2400,
    "graph_refs": 300,
    "raw_streams": 500,
    "hostile_streams": 500,
    "onnx_mutated": 600,
    "onnx_models": 800,
}
# A call that needs longer counts as a hang. There is no wall-clock bound below that:
# on a shared machine a request that answers in 8 ms once took over 10 s, so what
# keeps hostile requests cheap is checked deterministically instead (the limits refuse
# them before work starts, and `no_big_allocation` guards the memory).
CALL_TIMEOUT = HANG_SECONDS
CHECK_EVERY = 250  # examples between two known-good Runs
COUNTS = {"cases": 0, "calls": 0}  # generated cases and calls made, for the summary


def fuzz_settings(kind: str) -> settings:
    """Deterministic (derandomized, no example database written) and free of the health
    checks that would make a CI run flaky on a slow shared machine."""
    return settings(
        max_examples=EXAMPLES[kind],
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )


ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}


# --- the check every answer passes -------------------------------------------------------
@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    response: object = None


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
    """Send `request`, and assert the answer is OK or a clear, expected status. `what`
    names the call; the request itself is printed only when the check fails."""
    COUNTS["calls"] += 1
    try:
        response = callable_(request, timeout=CALL_TIMEOUT)
        if stream:
            response = list(response)
        outcome = Outcome(grpc.StatusCode.OK, "", response)
    except grpc.RpcError as error:
        outcome = Outcome(error.code(), error.details() or "")
    problem = _problem(outcome)
    if problem:
        shown = repr(request)[:2000] if isinstance(request, (bytes, list)) else str(request)
        raise AssertionError(
            f"{problem}: {what} answered {outcome.code.name}: {outcome.details!r}\nrequest: {shown}"
        )
    return outcome


def _problem(outcome: Outcome) -> str:
    if outcome.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "a hang"
    if outcome.code not in ALLOWED:
        return "a server bug or crash"
    if outcome.code is not grpc.StatusCode.OK and not outcome.details.strip():
        return "a status without a message"
    if "internal error" in outcome.details:
        return "an internal error"
    return ""


# --- byte mutations ------------------------------------------------------------------------
@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` with one to four bytes flipped, set, cut, inserted, repeated or deleted:
    most still parse, so they reach the checks behind the parser."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "repeat", "delete"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x1A]))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
        elif kind == "repeat":
            end = draw(st.integers(at, min(len(data), at + 64)))
            data[at:at] = data[at:end]
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


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
    return graph_pb2.Graph(
        name=name,
        inputs=inputs,
        nodes=nodes,
        outputs=[graph_pb2.OutputDef(name=o, node=n) for o, n in outputs],
    )


def ints(*values) -> graph_pb2.AttrValue:
    return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=values))


def mlp_graph() -> graph_pb2.Graph:
    """h = x @ w; loss = sum(h * h)."""
    return graph(
        [inp("x", [2, 3]), inp("w", [3, 4])],
        [node("h", "matmul", ["x", "w"]), node("hh", "mul", ["h", "h"]), node("s", "sum", ["hh"])],
        [("loss", "s"), ("h", "h")],
    )


def array_of(message: tensor_pb2.Tensor) -> np.ndarray:
    return np.frombuffer(message.data, NUMPY[message.dtype]).reshape(tuple(message.shape))


def assert_still_serving(stub) -> None:
    """A valid Run on the same server still gives the right numbers."""
    request = executor_pb2.RunRequest(
        graph=executor_pb2.GraphRef(graph=mlp_graph()), wrt=["x", "w"], loss="loss"
    )
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
        """Call once per generated case."""
        COUNTS["cases"] += 1
        self.count += 1
        if self.count % CHECK_EVERY == 0:
            assert_still_serving(self.stub)


# --- hostile content ---------------------------------------------------------------------
# Hypothesis picks the structure of each case (which RPC, which op, which mutations,
# which policy kind) and a seeded `random.Random`; `Hostile` fills in the leaves from
# it. One draw per leaf would cost ~0.1 ms each and make 10,000 cases take minutes;
# every case is still reproducible (derandomized) and printed in full when it fails.
NUMPY = {
    tensor_pb2.FLOAT32: np.dtype("<f4"),
    tensor_pb2.FLOAT64: np.dtype("<f8"),
    tensor_pb2.INT32: np.dtype("<i4"),
    tensor_pb2.INT64: np.dtype("<i8"),
    tensor_pb2.BOOL: np.dtype("bool"),
}
ENUM = {v: k for k, v in NUMPY.items()}
DTYPES = list(NUMPY)
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
EDGE_INTS = [
    0,
    1,
    -1,
    2,
    -2,
    3,
    7,
    2**31 - 1,
    2**31,
    -(2**31),
    2**32,
    2**40,
    2**62,
    INT64_MAX,
    INT64_MIN,
    INT64_MIN + 1,
]
EDGE_FLOATS = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    0.999999,
    1.5,
    1e-300,
    1e300,
    5e-324,
    math.inf,
    -math.inf,
    math.nan,
    2.0**63,
    -(2.0**63),
]
EDGE_DIMS = [-1, -2, 0, 2**16, 2**16 + 1, 2**31, 2**40, 2**62, INT64_MAX, INT64_MIN]
# Names collide on purpose: dangling, duplicate, self and cyclic references follow.
NAMES = [
    "x",
    "w",
    "y",
    "a",
    "b",
    "h",
    "s",
    "loss",
    "out",
    "",
    "grad/x",
    "cotangent/out",
    "x\x00",
    "\u00e9",
    "a" * 300,
]
OP_NAMES = sorted(REGISTRY)
BAD_OPS = ["", "input", "frobnicate", "MatMul", "relu ", "constant\x00"]
ATTR_NAMES = sorted({a for op in REGISTRY.values() for a in op.attrs}) + ["alpha", ""]
DTYPE_STRINGS = ["float32", "float64", "int32", "int64", "bool", "complex64", "float16", ""]
ATTR_KINDS = ["int", "float", "string", "bool", "ints", "floats", "tensor", "none"]
POLICY_KINDS = [
    "unset",
    "name",
    "store_all",
    "recompute_all",
    "sqrt",
    "every_k",
    "checkpoints",
    "save_ops",
    "revolve",
    "budget",
    "optimal",
    "dtr",
    "auto",
]
RPCS = ["Run", "Plan", "Differentiate", "RegisterGraph"]


class Hostile:
    """Hostile leaves (numbers, names, shapes, tensors, attributes) from one Random."""

    def __init__(self, rnd):
        self.r = rnd
        # How often a request's extras lie (cotangents, wrong feeds, odd names): a few
        # cases lie everywhere, most in one place or none, so they reach deep checks.
        self.level = self.pick([0.0, 0.02, 0.05, 0.1, 0.3])

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def pick(self, items):
        return items[self.r.randrange(len(items))]

    # scalars
    def int_(self) -> int:
        roll = self.r.random()
        if roll < 0.5:
            return self.r.randint(-4, 8)
        if roll < 0.85:
            return self.pick(EDGE_INTS)
        return self.r.randint(INT64_MIN, INT64_MAX)

    def int32(self) -> int:
        return self.r.randint(-3, 6) if self.chance(0.8) else self.pick([2**31 - 1, -(2**31)])

    def float_(self) -> float:
        roll = self.r.random()
        if roll < 0.5:
            return self.pick(EDGE_FLOATS)
        if roll < 0.8:
            return self.r.uniform(-3, 3)
        return struct_double(self.r.getrandbits(64))

    def text(self, size: int = 12) -> str:
        alphabet = "ab/_-. \u00e9\u4e2d\U0001f600\x00\n"
        return "".join(self.pick(alphabet) for _ in range(self.r.randint(0, size)))

    def name(self) -> str:
        return self.pick(NAMES) if self.chance(0.9) else self.text()

    def dim(self) -> int:
        return self.r.randint(0, 5) if self.chance(0.8) else self.pick(EDGE_DIMS)

    def shape(self, hostile: bool = True) -> list[int]:
        if hostile and self.chance(0.3):
            return [self.dim() for _ in range(self.r.randint(0, 7))]
        return [self.r.randint(0, 4) for _ in range(self.r.randint(0, 4))]

    def dtype_enum(self) -> int:
        if self.chance(0.85):
            return self.pick(DTYPES)
        return self.pick([0, -1, 6, 99, 2**31 - 1, -(2**31)])

    # tensors and attributes
    def values(self, dtype: np.dtype, count: int) -> np.ndarray:
        if dtype.kind == "f":
            seed = [
                self.float_() if self.chance(0.3) else self.r.uniform(-3, 3)
                for _ in range(min(count, 4) or 1)
            ]
            with np.errstate(over="ignore"):
                return np.resize(np.array(seed).astype(dtype), count)
        if dtype.kind == "b":
            return np.resize(np.array([self.chance(0.5) for _ in range(3)]), count)
        info = np.iinfo(dtype)
        seed = [
            self.r.randint(-3, 5) if self.chance(0.8) else self.r.randint(info.min, info.max)
            for _ in range(min(count, 4) or 1)
        ]
        return np.resize(np.array(seed, dtype), count)

    def tensor(self, shape=None, dtype=None, lie: float = 0.3) -> tensor_pb2.Tensor:
        """Consistent, unless it lies (short or long data, odd dtype, hostile shape)."""
        dtype = self.pick(DTYPES) if dtype is None else dtype
        shape = self.shape(hostile=False) if shape is None else list(shape)
        kind = self.pick(["short", "long", "dtype", "shape"]) if self.chance(lie) else "honest"
        if kind == "shape":
            shape = [self.dim() for _ in range(self.r.randint(0, 7))]
        sane = all(0 <= d <= 4096 for d in shape) and math.prod(shape) <= 4096
        count = math.prod(shape) if sane else 0
        np_dtype = NUMPY.get(dtype, np.dtype("<f8"))
        data = self.values(np_dtype, count).astype(np_dtype).tobytes()
        if kind == "short":
            data = data[: self.r.randint(0, max(len(data) - 1, 0))]
        elif kind == "long":
            data += bytes(self.r.randint(1, 9))
        elif kind == "dtype":
            dtype = self.dtype_enum()
        return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)

    def attr(self, kind: str | None = None) -> graph_pb2.AttrValue:
        """An AttrValue of `kind` (usually) or of any kind, with edge values."""
        if kind is None or self.chance(0.25):
            kind = self.pick(ATTR_KINDS)
        if kind == "int":
            return graph_pb2.AttrValue(i=self.int_())
        if kind == "float":
            return graph_pb2.AttrValue(f=self.float_())
        if kind == "string":
            return graph_pb2.AttrValue(
                s=self.pick(DTYPE_STRINGS) if self.chance(0.6) else self.text()
            )
        if kind == "bool":
            return graph_pb2.AttrValue(b=self.chance(0.5))
        if kind == "ints":
            if self.chance(0.6):
                values = [self.r.randint(-3, 6) for _ in range(self.r.randint(0, 5))]
            else:
                values = [self.int_() for _ in range(self.r.randint(0, 9))]
            return ints(*values)
        if kind == "floats":
            return graph_pb2.AttrValue(
                floats=graph_pb2.FloatList(
                    values=[self.float_() for _ in range(self.r.randint(0, 5))]
                )
            )
        if kind == "tensor":
            return graph_pb2.AttrValue(tensor=self.tensor())
        return graph_pb2.AttrValue()

    def policy(self, kind: str | None = None) -> executor_pb2.Policy:
        P = executor_pb2
        kind = kind or self.pick(POLICY_KINDS)
        fraction = self.pick([0.0, 0.5, 1.0]) if self.chance(0.5) else self.float_()
        budget = dict(
            bytes=self.pick([0, -1, 1, 2**20, INT64_MAX, INT64_MIN])
            if self.chance(0.5)
            else self.r.randint(0, 10**6),
            fraction=fraction,
        )
        if kind == "unset":
            return P.Policy()
        if kind == "name":
            return P.Policy(
                name=self.pick(
                    ["store_all", "recompute_all", "sqrt", "auto", "every_k", "", "STORE_ALL"]
                )
                if self.chance(0.7)
                else self.text()
            )
        if kind in ("store_all", "recompute_all", "sqrt"):
            return P.Policy(
                **{
                    kind: {
                        "store_all": P.StoreAll,
                        "sqrt": P.Sqrt,
                        "recompute_all": P.RecomputeAll,
                    }[kind]()
                }
            )
        if kind == "every_k":
            return P.Policy(every_k=P.EveryK(k=self.int32()))
        if kind == "revolve":
            return P.Policy(revolve=P.Revolve(slots=self.int32()))
        if kind == "checkpoints":
            return P.Policy(
                checkpoints=P.Checkpoints(names=[self.name() for _ in range(self.r.randint(0, 3))])
            )
        if kind == "save_ops":
            return P.Policy(
                save_ops=P.SaveOps(ops=[self.op_name() for _ in range(self.r.randint(0, 3))])
            )
        if kind == "budget":
            return P.Policy(budget=P.Budget(profile=self.chance(0.3), **budget))
        if kind == "optimal":
            # Time limits stay small: a long one makes a slow request, not a crash (the
            # report discusses client-chosen time limits).
            return P.Policy(
                optimal=P.Optimal(
                    time_limit_seconds=self.pick([0.0, -1.0, math.nan, math.inf, -math.inf, 0.2]),
                    **budget,
                )
            )
        if kind == "dtr":
            return P.Policy(dtr=P.DTR(**budget))
        return P.Policy(auto=P.Auto(bytes=budget["bytes"]))

    # graphs
    def op_name(self) -> str:
        roll = self.r.random()
        return (
            self.pick(OP_NAMES)
            if roll < 0.85
            else self.pick(BAD_OPS)
            if roll < 0.95
            else self.text()
        )

    def node(self, op: str | None = None) -> graph_pb2.NodeDef:
        op = self.op_name() if op is None else op
        known = REGISTRY.get(op)
        count = known.min_inputs if known is not None and self.chance(0.7) else self.r.randint(0, 4)
        message = graph_pb2.NodeDef(
            name=self.name(),
            op=op,
            inputs=[self.name() for _ in range(count)],
            source=self.pick(["", "model.py:12"]),
        )
        attr_names = list(known.attrs) if known is not None else []
        for key in {self.pick(attr_names + ATTR_NAMES) for _ in range(self.r.randint(0, 3))}:
            hint = known.attrs[key].type if known is not None and key in known.attrs else None
            message.attrs[key].CopyFrom(self.attr(hint))
        return message

    def graph(self) -> graph_pb2.Graph:
        """Half the time anything at all; half the time plausible (distinct names, known
        ops on earlier values, small shapes), so that cases get past the name checks
        into arity, attribute and shape checks."""
        if self.chance(0.5):
            return self.plausible_graph()
        inputs = [
            graph_pb2.InputDef(
                name=self.name(),
                shape=self.shape(),
                dtype=self.dtype_enum(),
                source=self.pick(["", "m.py:1"]),
            )
            for _ in range(self.r.randint(0, 3))
        ]
        nodes = [self.node() for _ in range(self.r.randint(0, 5))]
        defined = [i.name for i in inputs] + [n.name for n in nodes]
        outputs = [
            graph_pb2.OutputDef(
                name=self.name(),
                node=self.pick(defined) if defined and self.chance(0.7) else self.name(),
            )
            for _ in range(self.r.randint(0, 3))
        ]
        return graph_pb2.Graph(
            name=self.pick(["g", ""]) if self.chance(0.8) else self.text(),
            inputs=inputs,
            nodes=nodes,
            outputs=outputs,
        )

    def plausible_graph(self) -> graph_pb2.Graph:
        shape = [self.r.randint(1, 3) for _ in range(self.r.randint(0, 3))]
        inputs = [
            graph_pb2.InputDef(
                name=f"x{k}",
                dtype=self.pick([tensor_pb2.FLOAT64] * 8 + DTYPES),
                shape=shape if self.chance(0.7) else self.shape(),
            )
            for k in range(self.r.randint(1, 3))
        ]
        if self.chance(0.3) and inputs[0].shape:
            inputs[0].shape[0] = -1  # a batch dimension, bound by the tensor or input_shapes
        defined = [i.name for i in inputs]
        nodes = []
        for k in range(self.r.randint(1, 5)):
            op = REGISTRY[self.pick(OP_NAMES)]
            count = op.min_inputs if op.max_inputs >= 0 else self.r.randint(op.min_inputs, 3)
            message = graph_pb2.NodeDef(
                name=f"n{k}",
                op=op.name,
                inputs=[
                    self.pick(defined) if not self.chance(self.level) else self.name()
                    for _ in range(count)
                ],
            )
            for attr_name, attr in op.attrs.items():
                if attr.required or self.chance(0.5):
                    message.attrs[attr_name].CopyFrom(self.attr_value(attr.type))
            nodes.append(message)
            defined.append(message.name)
        outputs = [graph_pb2.OutputDef(name="out", node=defined[-1])]
        if self.chance(0.5):
            outputs.append(graph_pb2.OutputDef(name="loss", node=self.pick(defined)))
        return graph_pb2.Graph(name="plausible", inputs=inputs, nodes=nodes, outputs=outputs)

    def attr_value(self, kind: str) -> graph_pb2.AttrValue:
        """A value valid somewhere, or just past a boundary; one in ten of any kind."""
        if self.chance(0.1):
            return self.attr(kind)
        if kind == "int":
            return graph_pb2.AttrValue(
                i=self.r.randint(-6, 6) if self.chance(0.8) else self.pick(EDGE_INTS)
            )
        if kind == "ints":
            small = self.chance(0.8)
            # 100 to 4097: sizes whose products (padded copies, outputs) pass the
            # per-dimension checks but not the per-tensor element limit.
            return ints(
                *[
                    self.r.randint(-3, 6) if small else self.pick(EDGE_INTS + [100, 1000, 4097])
                    for _ in range(self.r.randint(0, 5))
                ]
            )
        if kind == "float":
            return graph_pb2.AttrValue(
                f=self.float_() if self.chance(0.5) else self.r.uniform(-1, 2)
            )
        return self.attr(kind)

    # requests
    def feeds(self, message: graph_pb2.Graph, request) -> None:
        """Tensors for the graph's declared inputs: mostly ones that fit the declaration
        (so requests get past decoding), sometimes missing, extra or hostile ones."""
        for item in message.inputs:
            if self.chance(self.level / 2):
                continue  # missing input
            shape = [2 if d == -1 else d for d in item.shape]
            fits = (
                item.dtype in NUMPY
                and all(0 <= d <= 64 for d in shape)
                and math.prod(shape) <= 4096
            )
            value = self.tensor(shape, item.dtype, self.level) if fits else self.tensor()
            request.inputs[item.name].CopyFrom(value)
        if self.chance(self.level / 2):
            request.inputs[self.name()].CopyFrom(self.tensor())  # an extra input

    def request(self, message: graph_pb2.Graph, rpc: str):
        """A request of `rpc` around the graph `message`, with hostile extras."""
        P = executor_pb2
        ref = P.GraphRef(graph=message)
        inputs = [i.name for i in message.inputs]
        outputs = [o.name for o in message.outputs]
        everything = inputs + outputs + [n.name for n in message.nodes]

        def known(names) -> str:
            return (
                self.pick(names)
                if names and not self.chance(self.level)
                else self.pick(everything)
                if everything and self.chance(0.5)
                else self.name()
            )

        differentiate = self.chance(0.6)
        wrt = [known(inputs) for _ in range(self.r.randint(1, 2))] if differentiate else []
        loss = known(outputs) if differentiate and self.chance(0.8) else ""
        cotangents = (
            [known(outputs) for _ in range(self.r.randint(1, 2))]
            if differentiate and not loss
            else []
        )
        if rpc == "RegisterGraph":
            return P.RegisterGraphRequest(graph=message)
        if rpc == "Differentiate":
            request = P.DifferentiateRequest(graph=ref, wrt=wrt, loss=loss)
            self.input_shapes(message, request, known(inputs))
            return request
        fetch = [known(outputs) for _ in range(self.r.randint(0, 2))] if self.chance(0.3) else []
        policy = self.policy("unset" if self.chance(0.5) else None)
        if rpc == "Plan":
            request = P.PlanRequest(
                graph=ref,
                wrt=wrt,
                loss=loss,
                policy=policy,
                cotangent_outputs=cotangents,
                fetch=fetch,
                include_schedule=self.chance(0.5),
            )
            self.input_shapes(message, request, known(inputs))
            return request
        request = P.RunRequest(
            graph=ref,
            wrt=wrt,
            loss=loss,
            policy=policy,
            fetch=fetch,
            timeline=self.chance(0.5),
            trace=self.chance(0.5),
        )
        self.feeds(message, request)
        for name in cotangents:
            request.cotangents[name].CopyFrom(
                self.tensor(lie=1.0)
                if self.chance(self.level)
                else self.tensor(self.shape(False), lie=0.0)
            )
        return request

    def input_shapes(self, message: graph_pb2.Graph, request, name: str) -> None:
        """Concrete shapes for -1 batch dimensions: the declared shape with a size for
        the -1 (mostly), or any shape for any name."""
        for item in message.inputs:
            if list(item.shape[:1]) == [-1] and not self.chance(self.level):
                request.input_shapes[item.name].values.extend(
                    [self.r.randint(0, 4)] + list(item.shape[1:])
                )
        if self.chance(self.level * 2):
            request.input_shapes[name].values.extend(self.shape())


def struct_double(bits: int) -> float:
    """The float64 whose bit pattern is `bits` (any NaN payload, subnormal, Inf...)."""
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


hostile = st.randoms(use_true_random=True).map(Hostile)
