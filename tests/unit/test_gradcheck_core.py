"""Gradient checks for every differentiable op of the core families, as one table.

Each case is a one-op graph (support.op_graph: loss = sum(op(...) * R)) whose
autodiff gradient must match centered differences in float64 to 1e-6. Inputs come
from one seeded generator, drawn in table order, so the table is reproducible.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import NamedTuple

import numpy as np
import pytest
from support import check_grads, op_graph

from remat_server.engine import Engine, RunRequest
from remat_server.graph.ir import GraphSpec, InputSpec, NodeSpec
from remat_server.ops.registry import REGISTRY


def _ops_checked_elsewhere() -> set[str]:
    """Ops whose gradient checks live in the other tables: test_gradcheck_nn.py and
    every tests/unit/test_ops_<family>.py, each a `CASES` list of (id, op, inputs,
    attrs, wrt) run against centered differences."""
    found = set()
    here = pathlib.Path(__file__).parent
    for path in [here / "test_gradcheck_nn.py", *sorted(here.glob("test_ops_*.py"))]:
        spec = importlib.util.spec_from_file_location(f"_gradcheck_table_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found |= {case[1] for case in module.CASES}
    return found


_rng = np.random.default_rng(20240611)


def normal(*shape):
    return np.asarray(_rng.standard_normal(shape))


def positive(*shape):
    return np.asarray(_rng.uniform(0.5, 2.0, shape))


def nonzero(*shape):
    """Values with |x| in [0.2, 1.5]: no kinks (abs, relu, sign) and no division by ~0."""
    return np.asarray(_rng.choice([-1.0, 1.0], shape) * _rng.uniform(0.2, 1.5, shape))


def distinct_pair(shape_a, shape_b):
    """Two arrays at least 0.05 apart wherever they meet after broadcasting (no ties)."""
    while True:
        a, b = normal(*shape_a), normal(*shape_b)
        if np.abs(a - b).min() > 0.05:
            return a, b


def idx(*values):
    return np.array(values, dtype=np.int64)


class Case(NamedTuple):
    id: str
    op: str
    inputs: dict
    attrs: dict
    wrt: tuple


CASES: list[Case] = []


def case(id_, op, inputs, attrs=None, wrt=None):
    floats = tuple(n for n, a in inputs.items() if np.issubdtype(a.dtype, np.floating))
    CASES.append(Case(id_, op, inputs, attrs or {}, wrt if wrt is not None else floats))


# --- binary arithmetic, with broadcasting ---------------------------------------------
BROADCASTS = [
    ("same", (3, 4), (3, 4)),
    ("row", (3, 4), (4,)),
    ("row_left", (4,), (3, 4)),
    ("outer", (3, 1), (1, 4)),
    ("scalar_left", (), (2, 3)),
    ("scalar_right", (2, 3), ()),
    ("rank3", (2, 1, 4), (3, 1)),
]
for _op in ("add", "sub", "mul"):
    for _tag, _sa, _sb in BROADCASTS:
        case(f"{_op}-{_tag}", _op, {"a": normal(*_sa), "b": normal(*_sb)})
for _tag, _sa, _sb in BROADCASTS:
    case(f"div-{_tag}", "div", {"a": normal(*_sa), "b": nonzero(*_sb)})
for _op in ("maximum", "minimum"):
    for _tag, _sa, _sb in BROADCASTS:
        _a, _b = distinct_pair(_sa, _sb)
        case(f"{_op}-{_tag}", _op, {"a": _a, "b": _b})

# --- unary ----------------------------------------------------------------------------
case("neg", "neg", {"x": normal(3, 4)})
for _exponent, _data in (
    (0.5, positive),
    (3.0, normal),
    (-2.0, nonzero),
    (2.5, positive),
    (1.0, normal),
    (0.0, positive),
):
    case(f"pow-{_exponent:g}", "pow", {"x": _data(3, 4)}, {"exponent": _exponent})
case("pow-int-exponent", "pow", {"x": normal(5)}, {"exponent": 2})
case("exp", "exp", {"x": normal(3, 4)})
case("log", "log", {"x": positive(3, 4)})
case("sqrt", "sqrt", {"x": positive(3, 4)})
case("square", "square", {"x": normal(3, 4)})
case("abs", "abs", {"x": nonzero(3, 4)})
case("sign", "sign", {"x": nonzero(3, 4)})
case("tanh", "tanh", {"x": normal(3, 4)})
case("sin", "sin", {"x": normal(3, 4)})
case("cos", "cos", {"x": normal(3, 4)})
case("sigmoid", "sigmoid", {"x": 3 * normal(3, 4)})
case("relu", "relu", {"x": nonzero(3, 4)})
# gelu moved to the activation family (tests/unit/test_ops_activations.py); this slot,
# drawing the same numbers, covers `min`, which the core check requires here (reduce).
case("min-axis1", "min", {"x": 2 * normal(3, 4)}, {"axes": (1,)})
case("unary-scalar-tanh", "tanh", {"x": normal()})
case("cast-f64-f64", "cast", {"x": normal(3, 4)}, {"dtype": "float64"})


def _where_case(tag, cond_shape, a_shape, b_shape):
    cond = _rng.random(cond_shape) < 0.5
    case(f"where-{tag}", "where", {"cond": cond, "a": normal(*a_shape), "b": normal(*b_shape)})


_where_case("same", (3, 4), (3, 4), (3, 4))
_where_case("bcast-b", (3, 4), (3, 4), (4,))
_where_case("bcast-cond", (3, 1), (3, 4), (1, 4))
_where_case("scalar-a", (2, 3), (), (2, 3))

# --- reductions -------------------------------------------------------------------------
for _op in ("sum", "mean", "max"):
    for _tag, _axes in (
        ("all", None),
        ("axis1", (1,)),
        ("axis-1", (-1,)),
        ("axes0-2", (0, 2)),
        ("axes-neg-tuple", (-3, -2)),
    ):
        for _keep in (False, True):
            case(
                f"{_op}-{_tag}-keep{_keep}",
                _op,
                {"x": normal(2, 3, 4)},
                {"keepdims": _keep} if _axes is None else {"axes": _axes, "keepdims": _keep},
            )
case("sum-default-attrs", "sum", {"x": normal(3, 2)})
case("max-1d", "max", {"x": normal(6)})

# --- matmul -------------------------------------------------------------------------------
for _tag, _sa, _sb in (
    ("2d", (2, 3), (3, 4)),
    ("batched", (2, 2, 3), (2, 3, 4)),
    ("bcast-batch", (2, 1, 2, 3), (3, 3, 4)),
    ("2d-x-batched", (2, 3), (2, 3, 4)),
    ("batched-x-2d", (2, 2, 3), (3, 4)),
    ("1d-x-2d", (3,), (3, 4)),
    ("2d-x-1d", (2, 3), (3,)),
    ("1d-x-1d", (3,), (3,)),
    ("1d-x-batched", (3,), (2, 3, 4)),
    ("batched-x-1d", (2, 2, 3), (3,)),
):
    case(f"matmul-{_tag}", "matmul", {"a": normal(*_sa), "b": normal(*_sb)})

# linear: x @ w + b, the bias as a row, a full product, a column, a scalar.
for _tag, _sx, _sw, _sbias in (
    ("2d-row", (2, 3), (3, 4), (4,)),
    ("batched-x-2d-row", (2, 2, 3), (3, 4), (4,)),
    ("batched-full", (2, 2, 3), (2, 3, 4), (2, 2, 4)),
    ("2d-column", (2, 3), (3, 4), (2, 1)),
    ("2d-x-1d-scalar", (2, 3), (3,), ()),
    ("1d-x-1d", (3,), (3,), ()),
):
    case(
        f"linear-{_tag}",
        "linear",
        {"x": normal(*_sx), "w": normal(*_sw), "b": normal(*_sbias)},
    )

# --- shape ops ---------------------------------------------------------------------------
case("transpose-default", "transpose", {"x": normal(2, 3, 4)})
case("transpose-explicit", "transpose", {"x": normal(2, 3, 4)}, {"axes": (1, 2, 0)})
case("transpose-negative", "transpose", {"x": normal(2, 3, 4)}, {"axes": (-1, 0, -2)})
case("reshape-minus1", "reshape", {"x": normal(2, 3, 4)}, {"shape": (-1, 4)})
case("reshape-minus1-middle", "reshape", {"x": normal(6, 2)}, {"shape": (2, -1, 2)})
case("reshape-to-scalar", "reshape", {"x": normal(1, 1)}, {"shape": ()})
case("broadcast_to-row", "broadcast_to", {"x": normal(3)}, {"shape": (2, 3)})
case("broadcast_to-col", "broadcast_to", {"x": normal(3, 1)}, {"shape": (2, 3, 4)})
case("broadcast_to-scalar", "broadcast_to", {"x": normal()}, {"shape": (2, 3)})
case("concat-2-axis0", "concat", {"a": normal(2, 3), "b": normal(4, 3)}, {"axis": 0})
case(
    "concat-3-axis-1",
    "concat",
    {"a": normal(2, 1), "b": normal(2, 3), "c": normal(2, 2)},
    {"axis": -1},
)
case(
    "concat-3-axis1-rank3",
    "concat",
    {"a": normal(2, 1, 2), "b": normal(2, 3, 2), "c": normal(2, 2, 2)},
    {"axis": 1},
)
case(
    "slice-steps",
    "slice",
    {"x": normal(5, 6)},
    {"starts": (1, 0), "stops": (5, 6), "steps": (2, 3)},
)
case(
    "slice-negative-starts",
    "slice",
    {"x": normal(5, 6)},
    {"starts": (-4, -5), "stops": (5, -1), "steps": (2, 2)},
)
case("slice-leading-only", "slice", {"x": normal(5, 3)}, {"starts": (-3,)})
case("slice-stop-past-end", "slice", {"x": normal(4, 3)}, {"starts": (1,), "stops": (99,)})
case(
    "slice_scatter",
    "slice_scatter",
    {"src": normal(2, 2)},
    {"shape": (5, 6), "starts": (1, 0), "stops": (5, 6), "steps": (2, 3)},
)
case(
    "slice_scatter-unit-steps",
    "slice_scatter",
    {"src": normal(2, 3)},
    {"shape": (4, 3), "starts": (1, 0), "stops": (3, 3), "steps": (1, 1)},
)
case(
    "take-1d-axis0-repeats", "take", {"x": normal(5, 3), "indices": idx(0, 2, 2, 4, 0)}, {"axis": 0}
)
case(
    "take-2d-axis1-repeats",
    "take",
    {"x": normal(3, 4), "indices": idx([1, 0], [2, 2], [1, 3])},
    {"axis": 1},
)
case("take-2d-axis0", "take", {"x": normal(4, 2), "indices": idx([3, 3], [0, 1])}, {"axis": 0})
case(
    "take-axis-1-negative-index",
    "take",
    {"x": normal(2, 4), "indices": idx(-1, 0, -1)},
    {"axis": -1},
)
case(
    "scatter_add-axis0-repeats",
    "scatter_add",
    {"src": normal(5, 3), "indices": idx(0, 2, 2, 4, 0)},
    {"axis": 0, "size": 6},
)
case(
    "scatter_add-axis1-2d",
    "scatter_add",
    {"src": normal(3, 2, 2), "indices": idx([1, 1], [0, 3])},
    {"axis": 1, "size": 4},
)
case(
    "take_along_axis-axis1",
    "take_along_axis",
    {"x": normal(3, 4), "indices": idx([0, 0], [3, 1], [2, 2])},
    {"axis": 1},
)
case(
    "take_along_axis-axis0",
    "take_along_axis",
    {"x": normal(3, 4), "indices": idx([0, 2, 2, 1], [0, 0, 1, 1])},
    {"axis": 0},
)
case(
    "take_along_axis-default-axis",
    "take_along_axis",
    {"x": normal(2, 3), "indices": idx([2, 2, 0, -1], [1, 0, 1, 1])},
)
case(
    "scatter_add_along_axis-axis1",
    "scatter_add_along_axis",
    {"src": normal(3, 2), "indices": idx([0, 0], [3, 1], [2, 2])},
    {"axis": 1, "size": 4},
)
case(
    "scatter_add_along_axis-axis0",
    "scatter_add_along_axis",
    {"src": normal(2, 3), "indices": idx([0, 2, 2], [0, 0, 1])},
    {"axis": 0, "size": 3},
)

CORE_OPS = {c.op for c in CASES}


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_gradient_matches_centered_differences(c: Case):
    spec, feeds = op_graph(c.op, c.inputs, c.attrs)
    errors = check_grads(spec, feeds, c.wrt, tol=1e-6)
    assert set(errors) == set(c.wrt) and c.wrt


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_every_differentiable_op_has_a_gradient_check():
    """A registered op with a VJP and at least one input must be in this table or in one
    of the others (`_ops_checked_elsewhere`)."""
    differentiable = {
        name for name, op in REGISTRY.items() if op.vjp is not None and op.max_inputs != 0
    }
    assert CORE_OPS <= set(REGISTRY), f"table names unknown ops: {CORE_OPS - set(REGISTRY)}"
    uncovered = differentiable - CORE_OPS - _ops_checked_elsewhere()
    assert not uncovered, f"differentiable ops without a gradient check: {sorted(uncovered)}"
    # The core families must all be covered here, not deferred to the nn table.
    core = {
        n
        for n in differentiable
        if REGISTRY[n].family in ("elementwise", "reduce", "linalg", "shape")
    }
    assert core <= CORE_OPS, sorted(core - CORE_OPS)


# --- tie rules ------------------------------------------------------------------------------
def _grads(nodes, inputs: dict, loss_node: str) -> dict:
    spec = GraphSpec(
        "ties",
        tuple(InputSpec(n, a.shape, a.dtype.name) for n, a in inputs.items()),
        tuple(nodes),
        (("loss", loss_node),),
    )
    return Engine().run(RunRequest(spec, inputs, wrt=tuple(inputs), loss="loss")).grads


def test_max_reduce_splits_gradient_between_ties():
    grads = _grads([NodeSpec("m", "max", ("x",))], {"x": np.array([1.0, 3.0, 3.0])}, "m")
    np.testing.assert_array_equal(grads["x"], [0.0, 0.5, 0.5])  # like torch.amax


def test_max_reduce_ties_per_row_with_keepdims():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [5.0, 1.0, 0.0]])
    grads = _grads(
        [
            NodeSpec("m", "max", ("x",), {"axes": (1,), "keepdims": True}),
            NodeSpec("s", "sum", ("m",)),
        ],
        {"x": x},
        "s",
    )
    np.testing.assert_allclose(
        grads["x"], [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3], [1, 0, 0]], rtol=0, atol=1e-15
    )


@pytest.mark.parametrize(
    "op, b, grad_a, grad_b",
    [
        ("maximum", [1.0, 0.0, 3.0], [0.5, 1.0, 0.5], [0.5, 0.0, 0.5]),
        ("minimum", [1.0, 5.0, 0.0], [0.5, 1.0, 0.0], [0.5, 0.0, 1.0]),
    ],
)
def test_maximum_minimum_ties_split_half_half(op, b, grad_a, grad_b):
    a = np.array([1.0, 2.0, 3.0])
    grads = _grads(
        [NodeSpec("m", op, ("a", "b")), NodeSpec("s", "sum", ("m",))],
        {"a": a, "b": np.array(b)},
        "s",
    )
    np.testing.assert_array_equal(grads["a"], grad_a)
    np.testing.assert_array_equal(grads["b"], grad_b)


def test_maximum_tie_under_broadcasting_accumulates_halves():
    # b (a scalar) ties with two of a's elements: it gets 0.5 from each, plus 1 where it wins.
    a = np.array([2.0, 2.0, 1.0, 4.0])
    grads = _grads(
        [NodeSpec("m", "maximum", ("a", "b")), NodeSpec("s", "sum", ("m",))],
        {"a": a, "b": np.array(2.0)},
        "s",
    )
    np.testing.assert_array_equal(grads["a"], [0.5, 0.5, 0.0, 1.0])
    assert grads["b"].shape == () and grads["b"] == 2.0
