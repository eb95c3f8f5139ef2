"""Logical ops, NaN tests and the min / argmax / argmin reductions: `min`'s gradients
against centered differences (first and second order) and torch.amin (ties shared);
forwards of the rest against NumPy and torch, with ties, NaN, keepdims and
broadcasting; their rejections; and the SDK's dtype rule for them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import support

from remat_server.engine import RunRequest
from remat_server.errors import InvalidArgument
from remat_server.graph.ir import GraphSpec, InputSpec, NodeSpec


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# (id, op, inputs, attrs, wrt): the differentiable op of this file is `min` (random
# inputs: no ties, where the derivative is a convention rather than a limit).
CASES = [
    (
        f"min-{tag}-keep{keep}",
        "min",
        {"x": normal(2, 3, 4, seed=k)},
        {**attrs, "keepdims": keep},
        ["x"],
    )
    for k, ((tag, attrs), keep) in enumerate(
        itertools.product(
            [
                ("all", {}),
                ("axis1", {"axes": (1,)}),
                ("axis-1", {"axes": (-1,)}),
                ("axes0-2", {"axes": (0, 2)}),
                ("axes-neg-tuple", {"axes": (-3, -2)}),
            ],
            (False, True),
        )
    )
] + [
    ("min-1d", "min", {"x": normal(6, seed=20)}, {}, ["x"]),
    ("min-scalar", "min", {"x": np.array(0.7)}, {}, ["x"]),
]
IDS = [case[0] for case in CASES]


# --- min: gradients -------------------------------------------------------------------------
@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_gradients_match_centered_differences(case_id, op, inputs, attrs, wrt):
    spec, feeds = support.op_graph(op, inputs, attrs)
    support.check_grads(spec, feeds, wrt, tol=1e-6)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_float32_keeps_dtype(case_id, op, inputs, attrs, wrt):
    result, expected = support.run_float32(op, inputs, attrs, wrt)
    np.testing.assert_array_equal(result.outputs["out"], expected.astype(np.float32))


@pytest.mark.parametrize(
    "case_id, op, inputs, attrs, wrt",
    [
        c
        for c in CASES
        if c[0] in ("min-axis1-keepFalse", "min-axes0-2-keepTrue", "min-all-keepFalse")
    ],
)
def test_second_order_hessian_vector_products(case_id, op, inputs, attrs, wrt):
    spec, feeds = support.nonlinear_probe(op, inputs, attrs)
    spec2 = support.joint_hvp_spec(spec, wrt)
    feeds2 = {**feeds, "v/x": normal(*inputs["x"].shape, seed=11)}
    support.check_grads(spec2, feeds2, wrt, loss="loss2", tol=1e-6)
    hvp = support.ENGINE.run(RunRequest(spec2, feeds2, wrt=tuple(wrt), loss="loss2")).grads
    assert np.max(np.abs(hvp["x"])) > 1e-2


def _min_against_torch(x, attrs):
    torch = pytest.importorskip("torch")
    spec, feeds = support.op_graph("min", {"x": x}, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=("x",), loss="loss"))
    t = torch.tensor(x, requires_grad=True)
    axes = attrs.get("axes")
    dim = tuple(range(x.ndim)) if axes is None else tuple(axes)
    expected = torch.amin(t, dim=dim, keepdim=attrs.get("keepdims", False))
    (expected * torch.tensor(feeds["__weight"])).sum().backward()
    return result, expected.detach().numpy(), t.grad.numpy()


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_min_matches_torch_amin(case_id, op, inputs, attrs, wrt):
    result, out, grad = _min_against_torch(inputs["x"], attrs)
    assert support.rel(result.outputs["out"], out) <= 1e-9
    assert support.rel(result.grads["x"], grad) <= 1e-9


@pytest.mark.parametrize(
    "attrs",
    [{}, {"axes": (1,)}, {"axes": (0,), "keepdims": True}, {"axes": (-1, 0)}],
    ids=["all", "axis1", "axis0-keep", "both-axes"],
)
def test_min_ties_share_the_gradient_like_torch_amin(attrs):
    x = np.array([[1.0, -2.0, -2.0, 3.0], [0.5, 0.5, 0.5, 7.0], [-2.0, 4.0, 0.5, -2.0]])
    result, out, grad = _min_against_torch(x, attrs)
    np.testing.assert_array_equal(result.outputs["out"], out)
    np.testing.assert_allclose(result.grads["x"], grad, rtol=1e-15, atol=0)


def test_min_ties_split_evenly():
    x = np.array([[1.0, -2.0, -2.0], [0.5, 0.5, 0.5]])
    spec = GraphSpec(
        "ties",
        (InputSpec("x", x.shape, "float64"),),
        (NodeSpec("m", "min", ("x",), {"axes": (1,)}), NodeSpec("s", "sum", ("m",))),
        (("loss", "s"),),
    )
    grads = support.ENGINE.run(RunRequest(spec, {"x": x}, wrt=("x",), loss="loss")).grads
    np.testing.assert_allclose(grads["x"], [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]], atol=1e-15)


def test_min_of_integers_and_nan():
    ints = np.array([[3, -1, 7], [2, 2, 9]], dtype=np.int32)
    out = support.run_op("min", {"x": ints}, {"axes": (1,)})
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [-1, 2])
    with_nan = np.array([[1.0, np.nan, -3.0], [2.0, 0.0, 1.0]])
    np.testing.assert_array_equal(
        support.run_op("min", {"x": with_nan}, {"axes": (1,)}), [np.nan, 0.0]
    )  # NaN propagates, as torch.amin


# --- logical ops ------------------------------------------------------------------------------
BOOLS = np.array([False, True])


@pytest.mark.parametrize(
    "op, reference",
    [
        ("logical_and", np.logical_and),
        ("logical_or", np.logical_or),
        ("logical_xor", np.logical_xor),
    ],
)
@pytest.mark.parametrize(
    "shape_a, shape_b", [((2, 1), (2,)), ((3, 4), (3, 4)), ((), (2, 3)), ((2, 1, 3), (4, 1))]
)
def test_binary_logical_ops_broadcast_like_numpy_and_torch(op, reference, shape_a, shape_b):
    rng = np.random.default_rng(3)
    if shape_a == (2, 1) and shape_b == (2,):  # the whole truth table
        a, b = BOOLS[:, None], BOOLS
    else:
        a, b = rng.random(shape_a) < 0.5, rng.random(shape_b) < 0.5
    out = support.run_op(op, {"a": a, "b": b})
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, reference(a, b))
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(out, getattr(torch, op)(torch.tensor(a), torch.tensor(b)).numpy())


def test_logical_not():
    x = np.array([[True, False], [False, False]])
    out = support.run_op("logical_not", {"x": x})
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, ~x)
    assert support.run_op("logical_not", {"x": np.array(True)}).item() is False


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_isnan_isinf_match_torch(dtype):
    big = np.finfo(dtype).max
    x = np.array([[np.nan, np.inf, -np.inf], [0.0, -0.0, big], [-2.5, np.nan, -big]], dtype)
    for op in ("isnan", "isinf"):
        out = support.run_op(op, {"x": x})
        assert out.dtype == np.bool_ and out.shape == x.shape
        np.testing.assert_array_equal(out, getattr(np, op)(x))
    torch = pytest.importorskip("torch")
    for op in ("isnan", "isinf"):
        expected = getattr(torch, op)(torch.tensor(x)).numpy()
        np.testing.assert_array_equal(support.run_op(op, {"x": x}), expected)


def test_where_isnan_masks_nan_and_differentiates():
    """The NaN-masking pattern: where(isnan(x), 0, x) * w; the gradient skips the NaNs."""
    x = np.array([1.5, np.nan, -2.0, np.nan])
    w = np.array([2.0, 3.0, 4.0, 5.0])
    spec = GraphSpec(
        "mask",
        (InputSpec("x", (4,), "float64"), InputSpec("w", (4,), "float64")),
        (
            NodeSpec("nan", "isnan", ("x",)),
            NodeSpec("zero", "constant", (), {"value": np.zeros(())}),
            NodeSpec("clean", "where", ("nan", "zero", "x")),
            NodeSpec("cw", "mul", ("clean", "w")),
            NodeSpec("s", "sum", ("cw",)),
        ),
        (("loss", "s"),),
    )
    result = support.ENGINE.run(RunRequest(spec, {"x": x, "w": w}, wrt=("x", "w"), loss="loss"))
    assert result.outputs["loss"] == 1.5 * 2.0 - 2.0 * 4.0
    np.testing.assert_array_equal(result.grads["x"], [2.0, 0.0, 4.0, 0.0])
    np.testing.assert_array_equal(result.grads["w"], [1.5, 0.0, -2.0, 0.0])


# --- argmax, argmin -------------------------------------------------------------------------
TIES = np.array(
    [
        [[1.0, 3.0, 3.0, -1.0], [2.0, 2.0, 2.0, 2.0], [5.0, -4.0, 5.0, -4.0]],
        [[0.0, 0.0, -0.0, 1.0], [7.0, 1.0, 1.0, 7.0], [-1.0, -1.0, 8.0, 8.0]],
    ]
)
WITH_NAN = np.array([[1.0, np.nan, 3.0, np.nan], [4.0, 2.0, 9.0, 1.0], [np.nan, 1.0, 1.0, 0.0]])
ARG_INPUTS = {
    "ties": TIES,
    "nan": WITH_NAN,
    "random": normal(3, 4, 5, seed=9),
    "int32": np.array([[3, 9, 9], [-4, -4, 0]], dtype=np.int32),
    "inf": np.array([[np.inf, 1.0, np.inf], [-np.inf, -np.inf, 0.0]]),
    "float32": TIES.astype(np.float32),
}


@pytest.mark.parametrize("op", ["argmax", "argmin"])
@pytest.mark.parametrize("name", list(ARG_INPUTS))
@pytest.mark.parametrize("keepdims", [False, True])
def test_argmax_argmin_match_numpy_and_torch(op, name, keepdims):
    """Ties -> the first index. NaN: torch and NumPy agree that the first NaN wins for
    both argmax and argmin (NaN counts as the extreme, as max/min propagate it)."""
    x = ARG_INPUTS[name]
    for axis in range(-x.ndim, x.ndim):
        out = support.run_op(op, {"x": x}, {"axis": axis, "keepdims": keepdims})
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, getattr(np, op)(x, axis=axis, keepdims=keepdims))
        torch = pytest.importorskip("torch")
        expected = getattr(torch, op)(torch.tensor(x), dim=axis, keepdim=keepdims).numpy()
        np.testing.assert_array_equal(out, expected)


def test_arg_conventions_explicitly():
    out = support.run_op("argmax", {"x": TIES}, {"axis": -1})
    np.testing.assert_array_equal(out, [[1, 0, 0], [3, 0, 2]])  # first of the tied maxima
    out = support.run_op("argmin", {"x": TIES}, {"axis": 2, "keepdims": True})
    assert out.shape == (2, 3, 1)
    np.testing.assert_array_equal(out[..., 0], [[3, 0, 1], [0, 1, 0]])  # -0.0 ties 0.0
    np.testing.assert_array_equal(support.run_op("argmax", {"x": WITH_NAN}, {"axis": 1}), [1, 2, 0])
    np.testing.assert_array_equal(support.run_op("argmin", {"x": WITH_NAN}, {"axis": 1}), [1, 3, 0])


def test_argmax_of_a_scalar_is_zero_like_torch():
    for axis in (0, -1):
        for keepdims in (False, True):
            out = support.run_op(
                "argmax", {"x": np.array(2.5)}, {"axis": axis, "keepdims": keepdims}
            )
            assert out.shape == () and out.dtype == np.int64 and out == 0


def test_argmax_empty_non_reduced_axis():
    out = support.run_op("argmax", {"x": np.zeros((0, 3))}, {"axis": 1, "keepdims": True})
    assert out.shape == (0, 1) and out.dtype == np.int64


def test_argmax_feeds_a_gather_and_the_gradient_flows_around_it():
    """x[argmax] via take_along_axis: argmax has no gradient, the gather does: the
    gradient of torch's max(dim) values."""
    x = normal(3, 5, seed=4)
    spec = GraphSpec(
        "gather",
        (InputSpec("x", x.shape, "float64"),),
        (
            NodeSpec("i", "argmax", ("x",), {"axis": 1, "keepdims": True}),
            NodeSpec("top", "take_along_axis", ("x", "i"), {"axis": 1}),
            NodeSpec("s", "sum", ("top",)),
        ),
        (("loss", "s"),),
    )
    grads = support.ENGINE.run(RunRequest(spec, {"x": x}, wrt=("x",), loss="loss")).grads
    expected = np.zeros_like(x)
    expected[np.arange(3), np.argmax(x, axis=1)] = 1.0
    np.testing.assert_array_equal(grads["x"], expected)


# --- validation ----------------------------------------------------------------------------
F = normal(2, 3)
B = np.array([[True, False, True]])
BAD = [
    ("logical_and", {"a": F, "b": F}, {}, "dtype float64"),
    ("logical_or", {"a": B, "b": np.ones(3, np.int64)}, {}, "dtype mismatch"),
    ("logical_xor", {"a": B, "b": np.ones((2, 2), bool)}, {}, "cannot be broadcast"),
    ("logical_not", {"x": F}, {}, "dtype float64"),
    ("logical_and", {"a": B}, {}, "takes 2 inputs"),
    ("isnan", {"x": np.arange(3)}, {}, "dtype int64"),
    ("isinf", {"x": B}, {}, "dtype bool"),
    ("argmax", {"x": F}, {}, "missing required attribute 'axis'"),
    ("argmax", {"x": F}, {"axis": 2}, "out of range"),
    ("argmin", {"x": F}, {"axis": -3}, "out of range"),
    ("argmax", {"x": np.array(1.0)}, {"axis": 1}, "out of range"),
    ("argmin", {"x": np.zeros((2, 0))}, {"axis": 1}, "empty axis"),
    ("argmax", {"x": B}, {"axis": 0}, "dtype bool"),
    ("argmax", {"x": F}, {"axis": 0, "keepdims": 1}, "expected bool"),
    ("min", {"x": np.zeros((2, 0))}, {"axes": (1,)}, "empty axis"),
    ("min", {"x": F}, {"axes": (0, 0)}, "repeat"),
    ("min", {"x": B}, {}, "dtype bool"),
]


@pytest.mark.parametrize("op, inputs, attrs, message", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_invalid_graphs_are_rejected_naming_the_node(op, inputs, attrs, message):
    with pytest.raises(InvalidArgument, match="node 'out'") as info:
        support.run_op(op, inputs, attrs)
    assert message in str(info.value)


# --- SDK ---------------------------------------------------------------------------------------
def test_sdk_dtypes_match_the_server():
    """client/remat/graph.py's result_dtype: bool for the logical ops and NaN tests,
    int64 for argmax/argmin, the input's dtype for min."""
    import remat
    from remat import ops

    g = remat.Graph()
    x = g.input("x", (2, 3), dtype="float32")
    m = g.input("m", (2, 3), dtype="bool")
    nodes = {
        "isnan": ops.isnan(x),
        "isinf": ops.isinf(x),
        "not": ops.logical_not(m),
        "and": ops.logical_and(m, ops.isnan(x)),
        "or": ops.logical_or(m, m),
        "xor": ops.logical_xor(m, ops.isinf(x)),
        "min": ops.min(x, axis=1),
        "min_all": ops.min(x),
        "min_keep": ops.min(x, axis=(0, 1), keepdims=True),
        "argmax": ops.argmax(x, 1),
        "argmin": ops.argmin(x, axis=0, keepdims=True),
        "shifted": ops.min(x, axis=0) + 1.0,  # a scalar constant takes min's dtype
    }
    for name, node in nodes.items():
        g.output(name, node)
    xv = np.array([[1.0, np.nan, -3.0], [np.inf, 2.0, 0.5]], np.float32)
    mv = np.array([[True, False, True], [False, False, True]])
    outs = support.ENGINE.run(RunRequest(g.spec(), {"x": xv, "m": mv})).outputs
    for name, node in nodes.items():
        assert node.dtype == outs[name].dtype.name, name
    assert {nodes[k].dtype for k in ("isnan", "isinf", "not", "and", "or", "xor")} == {"bool"}
    assert nodes["argmax"].dtype == nodes["argmin"].dtype == "int64"
    assert nodes["min"].dtype == nodes["shifted"].dtype == "float32"
    np.testing.assert_array_equal(outs["argmax"], [1, 0])
    np.testing.assert_array_equal(outs["argmin"], [[0, 0, 0]])  # the NaN wins column 1
    np.testing.assert_array_equal(outs["min_keep"], [[np.nan]])
    np.testing.assert_array_equal(outs["xor"], mv ^ np.isinf(xv))


# --- where: a branch-free bitwise select, bit-identical to np.where ----------------------
WHERE_SHAPES = [
    ((64, 64), (64, 64), ()),  # a VJP's zero branch
    ((64, 64), (64, 1), (1, 64)),  # every operand broadcast
    ((64, 1), (64, 64), (64, 64)),
    ((40, 40), (), (40, 40)),
    ((2, 3), (2, 3), (2, 3)),  # below SELECT_MIN_ELEMENTS: np.where itself
]


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
@pytest.mark.parametrize("shapes", WHERE_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_where_is_bit_identical_to_numpy(dtype, shapes):
    from remat_server.ops import REGISTRY

    rng = np.random.default_rng(1)
    cond = rng.random(shapes[0]) < 0.5
    a = (rng.standard_normal(shapes[1]) * 10).astype(dtype)
    b = (rng.standard_normal(shapes[2]) * 10).astype(dtype)
    if a.dtype.kind == "f" and a.size > 3:
        a.flat[:3] = [np.nan, -0.0, np.inf]  # bits, not values, are selected
    zeros = [np.zeros((), dtype)] + ([np.array(-0.0, dtype)] if a.dtype.kind == "f" else [])
    for other in [b, *zeros]:
        got, want = REGISTRY["where"].forward(cond, a, other), np.where(cond, a, other)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()
