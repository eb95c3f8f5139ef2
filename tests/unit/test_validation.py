"""Bad graphs and requests at engine level: each must raise InvalidArgument naming the
offending node (and the SDK's file:line when the spec carries one), before anything
big is allocated."""

from __future__ import annotations

import time
import tracemalloc
from typing import NamedTuple

import numpy as np
import pytest
from support import HANG_SECONDS

from remat_server.engine import Engine, RunRequest
from remat_server.errors import InvalidArgument
from remat_server.graph.ir import GraphSpec, InputSpec, NodeSpec
from remat_server.graph.limits import Limits

SRC = "model.py:12"

# The default inputs every table graph may use.
INPUTS = (
    InputSpec("x", (3, 4), "float64"),
    InputSpec("y", (4, 5), "float64"),
    InputSpec("i", (2,), "int64"),
)


def feeds_for(inputs, overrides=None) -> dict[str, np.ndarray]:
    """Zeros for every declared input (a -1 batch becomes 2), then the overrides."""
    feeds = {}
    for item in inputs:
        shape = tuple(2 if d == -1 else d for d in item.shape)
        feeds[item.name] = np.zeros(shape, dtype=item.dtype)
    for name, value in (overrides or {}).items():
        if value is None:
            del feeds[name]  # None in the overrides: send no tensor for that input
        else:
            feeds[name] = value
    return feeds


def bad(op, *inputs, name="bad", **attrs) -> NodeSpec:
    """The offending node: always named 'bad' (unless told) and built at SRC."""
    return NodeSpec(name, op, tuple(inputs), attrs, source=SRC)


def ok(name, op, *inputs, **attrs) -> NodeSpec:
    return NodeSpec(name, op, tuple(inputs), attrs)


class Case(NamedTuple):
    id: str
    nodes: tuple
    expect: tuple  # substrings of the message, besides the node name and SRC
    inputs: tuple = INPUTS
    feeds: dict | None = None
    limits: Limits | None = None
    outputs: tuple = (("out", "bad"),)
    names: tuple = ("'bad'", SRC)  # what identifies the offender in the message


CASES = [
    Case("unknown-op", (bad("frobnicate", "x"),), ("unknown op 'frobnicate'",)),
    Case("missing-attr", (bad("pow", "x"),), ("missing required attribute 'exponent'",)),
    Case("unexpected-attr", (bad("relu", "x", alpha=0.1),), ("unexpected attribute 'alpha'",)),
    Case(
        "mistyped-attr-string-for-int",
        (bad("concat", "x", "x", axis="0"),),
        ("attribute 'axis'", "expected int, got string"),
    ),
    Case(
        "mistyped-attr-bool-for-int",
        (bad("take", "x", "i", axis=True),),
        ("attribute 'axis'", "expected int, got bool"),
    ),
    Case(
        "mistyped-attr-float-for-ints",
        (bad("reshape", "x", shape=(2.0, 6)),),
        ("attribute 'shape'", "expected ints"),
    ),
    # A valid twin first: the builder reuses a checked signature's result, and True
    # and 1 (or 2.0 and 2) are equal keys, so the reuse must tell them apart.
    Case(
        "mistyped-attr-bool-for-int-after-a-valid-twin",
        (ok("twin", "take", "x", "i", axis=1), bad("take", "x", "i", axis=True)),
        ("attribute 'axis'", "expected int, got bool"),
    ),
    Case(
        "mistyped-attr-float-for-ints-after-a-valid-twin",
        (ok("twin", "reshape", "x", shape=(2, 6)), bad("reshape", "x", shape=(2.0, 6))),
        ("attribute 'shape'", "expected ints"),
    ),
    Case(
        "attr-check-fails",
        (bad("pow", "x", exponent=float("inf")),),
        ("attribute 'exponent'", "must be finite"),
    ),
    Case(
        "cast-to-unknown-dtype",
        (bad("cast", "x", dtype="complex64"),),
        ("attribute 'dtype'", "must be one of"),
    ),
    Case("wrong-arity", (bad("add", "x"),), ("takes 2 inputs, got 1",)),
    Case("dangling-input", (bad("add", "x", "nope"),), ("input 'nope' is not defined",)),
    Case(
        "dangling-input-later-node", (ok("t", "tanh", "x"), bad("mul", "t", "ghost")), ("'ghost'",)
    ),
    Case(
        "cycle",
        (bad("tanh", "bad2"), bad("tanh", "bad", name="bad2")),
        ("cycle", "bad2 -> bad"),
        names=(SRC,),
    ),
    Case(
        "cycle-through-valid-prefix",
        (
            ok("t", "tanh", "x"),
            bad("add", "t", "bad3"),
            bad("exp", "bad4", name="bad3"),
            bad("neg", "bad", name="bad4"),
        ),
        ("cycle", "bad3", "bad4"),
        names=(SRC,),
    ),
    Case("duplicate-name", (ok("bad", "tanh", "x"), bad("exp", "x")), ("defined twice",)),
    Case(
        "node-shadows-input",
        (bad("tanh", "y", name="x"),),
        ("defined twice",),
        outputs=(("out", "x"),),
        names=("'x'", SRC),
    ),
    Case(
        "matmul-inner-mismatch",
        (bad("matmul", "x", "x"),),
        ("inner dimensions differ", "(3, 4) @ (3, 4)"),
    ),
    Case("matmul-scalar", (ok("s", "sum", "x"), bad("matmul", "s", "y")), ("rank >= 1",)),
    Case(
        "linear-bias-widens-the-product",
        (bad("linear", "x", "y", "b"),),
        ("bias of shape (2, 1, 5)", "(3, 5)"),
        inputs=INPUTS + (InputSpec("b", (2, 1, 5), "float64"),),
    ),
    Case(
        "linear-bias-dtype",
        (bad("linear", "x", "y", "b"),),
        ("dtype mismatch",),
        inputs=INPUTS + (InputSpec("b", (5,), "float32"),),
    ),
    Case("broadcast-failure", (bad("add", "x", "y"),), ("cannot be broadcast", "(3, 4)", "(4, 5)")),
    Case("broadcast_to-failure", (bad("broadcast_to", "x", shape=(4, 3)),), ("cannot broadcast",)),
    Case(
        "reshape-count-mismatch",
        (bad("reshape", "x", shape=(5, 2)),),
        ("cannot reshape", "12 elements"),
    ),
    Case("reshape-minus1-indivisible", (bad("reshape", "x", shape=(5, -1)),), ("cannot reshape",)),
    Case("reshape-two-minus1", (bad("reshape", "x", shape=(-1, -1)),), ("at most one -1",)),
    Case(
        "dtype-mismatch",
        (bad("add", "x", "x32"),),
        ("dtype mismatch", "float64", "float32"),
        inputs=INPUTS + (InputSpec("x32", (3, 4), "float32"),),
    ),
    Case("float-op-on-int", (bad("exp", "i"),), ("int64",)),
    Case("where-condition-not-bool", (bad("where", "x", "x", "x"),), ("condition",)),
    Case("take-float-indices", (bad("take", "x", "x"),), ("indices",)),
    Case("concat-dtype-mismatch", (bad("concat", "x", "i"),), ("dtype mismatch",)),
    Case(
        "concat-rank-mismatch",
        (bad("concat", "x", "v"),),
        ("share one rank",),
        inputs=INPUTS + (InputSpec("v", (4,), "float64"),),
    ),
    Case("concat-off-axis-mismatch", (bad("concat", "x", "y", axis=1),), ("differ off that axis",)),
    Case("axis-out-of-range", (bad("sum", "x", axes=(2,)),), ("axis 2 is out of range",)),
    Case("repeated-axes", (bad("sum", "x", axes=(1, -1)),), ("repeat an axis",)),
    Case(
        "slice-step-zero",
        (bad("slice", "x", starts=(0,), stops=(3,), steps=(0,)),),
        ("must be positive",),
    ),
    Case("slice-negative-step", (bad("slice", "x", steps=(1, -1)),), ("must be positive",)),
    Case("slice-too-many-entries", (bad("slice", "x", starts=(0, 0, 0)),), ("rank 2",)),
    Case(
        "transpose-not-permutation", (bad("transpose", "x", axes=(0, 0)),), ("not a permutation",)
    ),
    Case("transpose-wrong-length", (bad("transpose", "x", axes=(1, 0, 2)),), ("out of range",)),
    Case(
        "max-over-empty-axis",
        (bad("max", "e", axes=(0,)),),
        ("empty axis",),
        inputs=(InputSpec("e", (0, 3), "float64"),),
    ),
    Case(
        "max-all-of-empty",
        (bad("max", "e"),),
        ("empty axis",),
        inputs=(InputSpec("e", (2, 0), "float64"),),
    ),
    # --- size limits --------------------------------------------------------------------
    Case(
        "node-rank-over-limit",
        (bad("reshape", "x", shape=(1, 3, 1, 4)),),
        ("rank", "3", "--max-rank"),
        limits=Limits(max_rank=3),
    ),
    Case(
        "input-rank-over-limit",
        (ok("bad", "tanh", "r"),),
        ("rank 4 exceeds the limit of 3",),
        inputs=(InputSpec("r", (1, 1, 1, 2), "float64", source=SRC),),
        limits=Limits(max_rank=3),
        names=("'r'", SRC),
    ),
    Case(
        "node-dim-over-limit",
        (bad("broadcast_to", "x", shape=(101, 3, 4)),),
        ("dimension 101 exceeds the limit of 100",),
        limits=Limits(max_dim=100),
    ),
    Case(
        "input-dim-over-limit",
        (ok("bad", "tanh", "x"),),
        ("dimension 101 exceeds",),
        inputs=(InputSpec("x", (101,), "float64", source=SRC),),
        limits=Limits(max_dim=100),
        names=("'x'", SRC),
    ),
    Case(
        "node-elements-over-limit",
        (bad("broadcast_to", "x", shape=(10, 3, 4)),),
        ("more than 100 elements",),
        limits=Limits(max_elements=100),
    ),
    Case(
        "matmul-output-over-limit",
        (bad("matmul", "a", "b"),),
        ("more than 100 elements",),
        inputs=(InputSpec("a", (20, 1), "float64"), InputSpec("b", (1, 20), "float64")),
        limits=Limits(max_elements=100),
    ),
    Case(
        "huge-dim-2**62", (bad("broadcast_to", "x", shape=(2**62, 3, 4)),), ("exceeds the limit",)
    ),
    Case(
        "huge-element-count", (bad("broadcast_to", "x", shape=(2**31, 2**31, 3, 4)),), ("elements",)
    ),
    Case(
        "huge-scatter-size",
        (bad("scatter_add", "x", "i2", axis=0, size=2**62),),
        ("exceeds the limit",),
        inputs=INPUTS + (InputSpec("i2", (3,), "int64"),),
    ),
    Case(
        "huge-slice_scatter-shape",
        (bad("slice_scatter", "x", shape=(2**62, 4), starts=(0, 0), stops=(3, 4), steps=(1, 1)),),
        ("exceeds the limit",),
    ),
    Case(
        "max-nodes",
        tuple(ok(f"n{k}", "tanh", "x") for k in range(5)),
        ("limit is 4",),
        inputs=INPUTS[:1],
        limits=Limits(max_nodes=4),
        outputs=(("out", "n0"),),
        names=("graph 'bad-graph'", "6 nodes"),
    ),
    Case(
        "max-edges",
        tuple(ok(f"n{k}", "add", "x", "x") for k in range(3)),
        ("limit is 5",),
        inputs=INPUTS[:1],
        limits=Limits(max_edges=5),
        outputs=(("out", "n0"),),
        names=("graph 'bad-graph'", "6 edges"),
    ),
    # --- outputs -------------------------------------------------------------------------
    Case(
        "output-of-unknown-node",
        (ok("t", "tanh", "x"),),
        ("refers to 'ghost'",),
        outputs=(("out", "ghost"),),
        names=("'out'",),
    ),
    Case(
        "output-declared-twice",
        (ok("t", "tanh", "x"),),
        ("declared twice",),
        outputs=(("out", "t"), ("out", "x")),
        names=("'out'",),
    ),
    # --- inputs ----------------------------------------------------------------------------
    Case(
        "minus1-not-leading",
        (ok("bad", "tanh", "x"),),
        ("only the leading dimension may be -1",),
        inputs=(InputSpec("x", (3, -1), "float64", source=SRC),),
        feeds={"x": np.zeros((3, 2))},
        names=("'x'", SRC),
    ),
    Case(
        "unsupported-input-dtype",
        (ok("bad", "tanh", "x"),),
        ("unsupported dtype 'complex64'",),
        inputs=(InputSpec("x", (2,), "complex64", source=SRC),),
        feeds={"x": np.zeros(2)},
        names=("'x'", SRC),
    ),
    Case(
        "missing-input-tensor",
        (ok("bad", "add", "x", "y"),),
        ("no tensor given",),
        inputs=(InputSpec("x", (2,), "float64"), InputSpec("y", (2,), "float64")),
        feeds={"y": None},
        names=("'y'",),
    ),
    Case(
        "extra-input-tensor",
        (ok("bad", "tanh", "x"),),
        ("not an input of the graph",),
        inputs=(InputSpec("x", (2,), "float64"),),
        feeds={"stray": np.zeros(2)},
        names=("'stray'",),
    ),
    Case(
        "input-dtype-mismatch",
        (ok("bad", "tanh", "x"),),
        ("declared float64", "float32"),
        inputs=(InputSpec("x", (2,), "float64"),),
        feeds={"x": np.zeros(2, np.float32)},
        names=("'x'",),
    ),
    Case(
        "input-shape-mismatch",
        (ok("bad", "tanh", "x"),),
        ("does not match", "(2, 4)"),
        inputs=(InputSpec("x", (2, 3), "float64", source=SRC),),
        feeds={"x": np.zeros((2, 4))},
        names=("'x'", SRC),
    ),
    Case(
        "batch-rank-mismatch",
        (ok("bad", "tanh", "x"),),
        ("does not match",),
        inputs=(InputSpec("x", (-1, 3), "float64"),),
        feeds={"x": np.zeros(3)},
        names=("'x'",),
    ),
    # --- data-dependent, found at run time ---------------------------------------------------
    Case(
        "take-index-out-of-range",
        (bad("take", "x", "i"),),
        ("out of bounds",),
        feeds={"i": np.array([0, 3])},
    ),
    Case(
        "take-negative-index-out-of-range",
        (bad("take", "x", "i", axis=1),),
        ("out of bounds",),
        feeds={"i": np.array([-5, 0])},
    ),
    Case(
        "take_along_axis-out-of-range",
        (bad("take_along_axis", "x", "j", axis=1),),
        ("out of bounds",),
        inputs=INPUTS + (InputSpec("j", (3, 1), "int64"),),
        feeds={"j": np.array([[0], [4], [1]])},
    ),
    Case(
        "scatter_add-out-of-range",
        (bad("scatter_add", "x", "k", axis=0, size=2),),
        ("out of bounds",),
        inputs=INPUTS + (InputSpec("k", (3,), "int64"),),
        feeds={"k": np.array([0, 1, 2])},
    ),
    Case(
        "scatter_add_along_axis-out-of-range",
        (bad("scatter_add_along_axis", "x", "m", axis=1, size=4),),
        ("out of bounds",),
        inputs=INPUTS + (InputSpec("m", (3, 4), "int64"),),
        feeds={"m": np.array([[0, 1, 2, 3], [0, 1, 2, 3], [0, 9, 2, 3]])},
    ),
]


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_graph_is_invalid_argument_naming_the_node(c: Case):
    spec = GraphSpec("bad-graph", c.inputs, c.nodes, c.outputs)
    feeds = feeds_for(c.inputs, c.feeds)
    with pytest.raises(InvalidArgument) as info:
        Engine(c.limits).run(RunRequest(spec, feeds))
    message = str(info.value)
    for part in c.names + c.expect:
        assert part in message, f"{part!r} not in {message!r}"


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


def test_source_is_omitted_when_not_recorded():
    spec = GraphSpec("g", INPUTS, (ok("plain", "frobnicate", "x"),), (("out", "plain"),))
    with pytest.raises(InvalidArgument) as info:
        Engine().run(RunRequest(spec, feeds_for(INPUTS)))
    message = str(info.value)
    assert message.startswith("node 'plain' (frobnicate)") and "built at" not in message


def test_errors_in_differentiate_name_the_node_too():
    spec = GraphSpec(
        "g", INPUTS, (bad("matmul", "x", "x"), ok("loss", "sum", "bad")), (("loss", "loss"),)
    )
    with pytest.raises(InvalidArgument, match=r"node 'bad' \(matmul, built at model.py:12\)"):
        Engine().differentiate(spec, wrt=("x",), loss="loss")


@pytest.mark.parametrize("shape", [(2**62,), (2**62, 2**62), (2**40, 2**40, 2**40), (0, 2**62)])
def test_huge_shapes_are_rejected_fast_without_allocating(shape):
    """A hostile shape costs neither time nor memory: rejected while inferring shapes."""
    inputs = (InputSpec("s", (), "float64"),)
    nodes = (bad("broadcast_to", "s", shape=shape),)
    spec = GraphSpec("huge", inputs, nodes, (("out", "bad"),))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InvalidArgument, match="node 'bad'.*(exceeds the limit|elements)"):
            Engine().run(RunRequest(spec, {"s": np.zeros(())}))
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < HANG_SECONDS  # not a loop over the elements (no tighter bet on time)
    assert peak < 1 << 20  # well under a MiB: nothing shaped like the request was allocated


def test_huge_input_declaration_is_rejected_before_reading_tensors():
    spec = GraphSpec(
        "huge",
        (InputSpec("x", (2**62, 2**62), "float32", source=SRC),),
        (ok("t", "tanh", "x"),),
        (("out", "t"),),
    )
    start = time.perf_counter()
    with pytest.raises(InvalidArgument, match="node 'x' .*model.py:12.*exceeds the limit"):
        Engine().differentiate(spec, wrt=("x",), input_shapes={"x": (2**62, 2**62)})
    assert time.perf_counter() - start < HANG_SECONDS


# --- the -1 batch dimension --------------------------------------------------------------------
def _batch_spec():
    inputs = (InputSpec("x", (-1, 3), "float64"), InputSpec("w", (3, 2), "float64"))
    nodes = (
        ok("xw", "matmul", "x", "w"),
        ok("t", "tanh", "xw"),
        ok("rows", "sum", "t", axes=(1,)),
        ok("loss", "sum", "rows"),
    )
    return GraphSpec("batch", inputs, nodes, (("rows", "rows"), ("loss", "loss")))


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_batch_dimension_is_bound_from_the_input_tensor(batch):
    rng = np.random.default_rng(batch)
    x, w = rng.standard_normal((batch, 3)), rng.standard_normal((3, 2))
    result = Engine().run(RunRequest(_batch_spec(), {"x": x, "w": w}, wrt=("x", "w"), loss="loss"))
    np.testing.assert_allclose(result.outputs["rows"], np.tanh(x @ w).sum(axis=1), rtol=1e-14)
    assert result.grads["x"].shape == (batch, 3) and result.grads["w"].shape == (3, 2)
    d = 1 - np.tanh(x @ w) ** 2
    np.testing.assert_allclose(result.grads["w"], x.T @ d, rtol=1e-12)


def test_batch_dimension_without_a_tensor_or_shape_is_rejected():
    with pytest.raises(InvalidArgument, match="node 'x' .*batch dimension"):
        Engine().differentiate(_batch_spec(), wrt=("w",), loss="loss")
    joint = Engine().differentiate(
        _batch_spec(), wrt=("w",), loss="loss", input_shapes={"x": (5, 3)}
    )
    assert joint.graph["rows"].shape == (5,)


def test_negative_dimension_other_than_leading_minus1_is_rejected():
    spec = GraphSpec(
        "g",
        (InputSpec("x", (-2, 3), "float64", source=SRC),),
        (ok("t", "tanh", "x"),),
        (("out", "t"),),
    )
    with pytest.raises(InvalidArgument, match="node 'x' .*model.py:12.*leading dimension"):
        Engine().run(RunRequest(spec, {"x": np.zeros((2, 3))}))
