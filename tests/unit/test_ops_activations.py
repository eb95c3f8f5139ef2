"""Activation ops (erf, gelu, silu, clip, hardtanh, leaky_relu): gradients against
centered differences (first and second order), float32, and forwards and gradients
against torch, including inputs exactly at the kinks, where the conventions differ:
clip (torch.clamp) passes the gradient at its bounds, hardtanh does not, leaky_relu
takes negative_slope at 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import support

from remat_server.engine import RunRequest
from remat_server.errors import InvalidArgument


def normal(*shape, seed=0, scale=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape)


def away(*shape, kinks, seed=0, scale=2.0):
    """Normal values at least 0.05 from every kink, so centered differences (h = 1e-6)
    never straddle one."""
    x = normal(*shape, seed=seed, scale=scale)
    for kink in kinks:
        near = np.abs(x - kink) < 0.05
        x[near] = kink + np.where(x[near] >= kink, 0.05, -0.05) + 0.01
    assert min(np.abs(x - k).min() for k in kinks) >= 0.04
    return x


# (id, op, inputs, attrs, wrt). Every float input is <= ~60 elements.
CASES = [
    ("erf", "erf", {"x": normal(3, 4, scale=1.5)}, {}, ["x"]),
    ("gelu-default-tanh", "gelu", {"x": normal(3, 4, seed=1, scale=2.0)}, {}, ["x"]),
    ("gelu-tanh", "gelu", {"x": normal(2, 5, seed=2, scale=2.0)}, {"approximate": "tanh"}, ["x"]),
    ("gelu-none", "gelu", {"x": normal(3, 4, seed=3, scale=2.0)}, {"approximate": "none"}, ["x"]),
    ("silu", "silu", {"x": normal(3, 4, seed=4, scale=3.0)}, {}, ["x"]),
    (
        "clip-both",
        "clip",
        {"x": away(4, 5, kinks=(-0.5, 0.7), seed=5)},
        {"min": -0.5, "max": 0.7},
        ["x"],
    ),
    ("clip-min-only", "clip", {"x": away(12, kinks=(0.0,), seed=6)}, {"min": 0.0}, ["x"]),
    ("clip-max-only", "clip", {"x": away(3, 4, kinks=(0.3,), seed=7)}, {"max": 0.3}, ["x"]),
    ("clip-unbounded", "clip", {"x": normal(2, 3, seed=8)}, {}, ["x"]),
    ("hardtanh-default", "hardtanh", {"x": away(3, 4, kinks=(-1, 1), seed=9)}, {}, ["x"]),
    (
        "hardtanh-relu6",
        "hardtanh",
        {"x": away(4, 4, kinks=(0, 6), seed=10, scale=5.0)},
        {"min_val": 0.0, "max_val": 6.0},
        ["x"],
    ),
    ("leaky_relu-default", "leaky_relu", {"x": away(3, 4, kinks=(0,), seed=11)}, {}, ["x"]),
    (
        "leaky_relu-0.2",
        "leaky_relu",
        {"x": away(2, 6, kinks=(0,), seed=12)},
        {"negative_slope": 0.2},
        ["x"],
    ),
    (
        "leaky_relu-negative-slope",
        "leaky_relu",
        {"x": away(5, kinks=(0,), seed=13)},
        {"negative_slope": -0.5},
        ["x"],
    ),
    ("erf-scalar", "erf", {"x": np.array(0.3)}, {}, ["x"]),
]
IDS = [case[0] for case in CASES]


# --- first-order gradients, float32 -------------------------------------------------------
@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_gradients_match_centered_differences(case_id, op, inputs, attrs, wrt):
    spec, feeds = support.op_graph(op, inputs, attrs)
    support.check_grads(spec, feeds, wrt, tol=1e-6)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_float32_keeps_dtype(case_id, op, inputs, attrs, wrt):
    result, expected = support.run_float32(op, inputs, attrs, wrt)
    assert np.allclose(result.outputs["out"], expected, rtol=1e-5, atol=1e-6)


# --- second order: differentiate the joint graph again ------------------------------------
@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_second_order_hessian_vector_products(case_id, op, inputs, attrs, wrt):
    support.check_hvp(op, inputs, attrs, wrt, seed=11)


# --- forwards --------------------------------------------------------------------------------
def test_gelu_default_is_the_tanh_form_bit_for_bit():
    """Graphs written before the `approximate` attr keep their values exactly."""
    x = normal(50, seed=20, scale=3.0)
    c = math.sqrt(2.0 / math.pi)
    old = 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * (x * x * x))))
    np.testing.assert_array_equal(support.run_op("gelu", {"x": x}), old)
    np.testing.assert_array_equal(support.run_op("gelu", {"x": x}, {"approximate": "tanh"}), old)


def test_erf_and_exact_gelu_match_scipy():
    special = pytest.importorskip("scipy.special")
    x = np.linspace(-6.0, 6.0, 49)
    np.testing.assert_array_equal(support.run_op("erf", {"x": x}), special.erf(x))
    exact = support.run_op("gelu", {"x": x}, {"approximate": "none"})
    # Norm-wise: 1 + erf(x / sqrt(2)) cancels in the far negative tail, as in torch's
    # formula, which the op follows (x * ndtr(x) would be more accurate there).
    assert support.rel(exact, x * special.ndtr(x)) <= 1e-15


def test_non_finite_inputs():
    x = np.array([np.nan, np.inf, -np.inf, 0.0])
    with np.errstate(invalid="ignore"):
        expected = {
            ("erf", ()): [np.nan, 1.0, -1.0, 0.0],
            ("silu", ()): [np.nan, np.inf, np.nan, 0.0],  # -inf * 0, as torch
            ("clip", (("min", -1.0), ("max", 1.0))): [np.nan, 1.0, -1.0, 0.0],
            ("hardtanh", ()): [np.nan, 1.0, -1.0, 0.0],
            ("leaky_relu", ()): [np.nan, np.inf, -np.inf, 0.0],
            ("gelu", (("approximate", "none"),)): [np.nan, np.inf, np.nan, 0.0],
        }
        for (op, attrs), values in expected.items():
            out = support.run_op(op, {"x": x}, dict(attrs))
            np.testing.assert_array_equal(out, values, err_msg=op)


# --- against torch ---------------------------------------------------------------------------
def _torch_call(torch, op, x, attrs):
    F = torch.nn.functional
    if op == "erf":
        return torch.erf(x)
    if op == "gelu":
        return F.gelu(x, approximate=attrs.get("approximate", "tanh"))
    if op == "silu":
        return F.silu(x)
    if op == "clip":
        return torch.clamp(x, attrs.get("min"), attrs.get("max"))
    if op == "hardtanh":
        return F.hardtanh(x, attrs.get("min_val", -1.0), attrs.get("max_val", 1.0))
    if op == "leaky_relu":
        return F.leaky_relu(x, attrs.get("negative_slope", 0.01))
    raise AssertionError(op)


def _against_torch(op, x, attrs):
    torch = pytest.importorskip("torch")
    spec, feeds = support.op_graph(op, {"x": x}, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=("x",), loss="loss"))
    t = torch.tensor(x, requires_grad=True)
    if op == "clip" and "min" not in attrs and "max" not in attrs:
        expected = t * 1.0  # torch.clamp needs a bound; unbounded clip is the identity
    else:
        expected = _torch_call(torch, op, t, attrs)
    (expected * torch.tensor(feeds["__weight"])).sum().backward()
    return result, expected.detach().numpy(), t.grad.numpy()


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_matches_torch(case_id, op, inputs, attrs, wrt):
    result, out, grad = _against_torch(op, inputs["x"], attrs)
    assert support.rel(result.outputs["out"], out) <= 1e-9
    assert support.rel(result.grads["x"], grad) <= 1e-9


# Inputs exactly at every kink and at 0, with the gradient torch gives there (times the
# loss weight): the table states each convention explicitly.
KINKS = np.array([-7.0, -6.0, -1.0, -0.5, 0.0, 0.5, 1.0, 6.0, 7.0])
BOUNDARY = [
    # clip is torch.clamp: the gradient passes on the closed interval.
    ("clip", {"min": -1.0, "max": 1.0}, [0, 0, 1, 1, 1, 1, 1, 0, 0]),
    ("clip", {"min": 0.0}, [0, 0, 0, 0, 1, 1, 1, 1, 1]),
    ("clip", {"max": 0.5}, [1, 1, 1, 1, 1, 1, 0, 0, 0]),
    ("clip", {"min": 0.5, "max": 0.5}, [0, 0, 0, 0, 0, 1, 0, 0, 0]),
    ("clip", {"min": 1.0, "max": -1.0}, [0, 0, 0, 0, 0, 0, 0, 0, 0]),  # every value is max
    # hardtanh: only strictly inside (torch's hardtanh_backward); relu6 at 0 and 6 too.
    ("hardtanh", {}, [0, 0, 0, 1, 1, 1, 0, 0, 0]),
    ("hardtanh", {"min_val": 0.0, "max_val": 6.0}, [0, 0, 0, 0, 0, 1, 1, 0, 0]),
    ("hardtanh", {"min_val": 0.5, "max_val": 0.5}, [0, 0, 0, 0, 0, 0, 0, 0, 0]),
    # leaky_relu: negative_slope at 0.
    ("leaky_relu", {}, [0.01, 0.01, 0.01, 0.01, 0.01, 1, 1, 1, 1]),
    ("leaky_relu", {"negative_slope": -0.5}, [-0.5, -0.5, -0.5, -0.5, -0.5, 1, 1, 1, 1]),
    ("leaky_relu", {"negative_slope": 0.0}, [0, 0, 0, 0, 0, 1, 1, 1, 1]),
    # Smooth ones at 0: erf' = 2/sqrt(pi), gelu' = silu' = 1/2 (both forms).
    ("erf", {}, None),
    ("gelu", {"approximate": "none"}, None),
    ("gelu", {"approximate": "tanh"}, None),
    ("silu", {}, None),
]


@pytest.mark.parametrize(
    "op, attrs, slope", BOUNDARY, ids=[f"{b[0]}-{b[1]}".replace(" ", "") for b in BOUNDARY]
)
def test_conventions_at_kinks_match_torch(op, attrs, slope):
    result, out, grad = _against_torch(op, KINKS, attrs)
    assert support.rel(result.outputs["out"], out) <= 1e-9
    assert support.rel(result.grads["x"], grad) <= 1e-9
    weight = support.op_graph(op, {"x": KINKS}, attrs)[1]["__weight"]
    if slope is not None:
        np.testing.assert_array_equal(result.grads["x"], np.array(slope) * weight)
    else:
        at_zero = {"erf": 2.0 / math.sqrt(math.pi)}.get(op, 0.5)
        assert math.isclose(result.grads["x"][4], at_zero * weight[4], rel_tol=1e-15)


@pytest.mark.parametrize(
    "op, attrs",
    [
        ("clip", {"min": -1.0, "max": 1.0}),
        ("hardtanh", {}),
        ("leaky_relu", {"negative_slope": 0.1}),
    ],
)
def test_nan_inputs_get_torchs_gradient(op, attrs):
    """torch's masks decide NaN too: clamp's (min <= x <= max) is false, hardtanh's
    (x <= min or x >= max) is false, leaky_relu's (x > 0) is false."""
    torch = pytest.importorskip("torch")
    x = np.array([np.nan, 0.25, -3.0])
    spec, feeds = support.op_graph(op, {"x": x}, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=("x",), loss="loss", fetch=("out",)))
    t = torch.tensor(x, requires_grad=True)
    expected = _torch_call(torch, op, t, attrs)
    (expected * torch.tensor(feeds["__weight"])).sum().backward()
    np.testing.assert_array_equal(result.outputs["out"], expected.detach().numpy())
    np.testing.assert_array_equal(result.grads["x"], t.grad.numpy())


# --- validation ----------------------------------------------------------------------------
X = normal(2, 3)
BAD = [
    ("gelu", {"x": X}, {"approximate": "exact"}, 'must be "tanh" or "none"'),
    ("gelu", {"x": X}, {"approximate": 1}, "expected string"),
    ("clip", {"x": X}, {"min": math.nan}, "must not be NaN"),
    ("clip", {"x": X}, {"max": "1"}, "expected float"),
    ("hardtanh", {"x": X}, {"min_val": 2.0}, "must not be greater than max_val"),
    ("hardtanh", {"x": X}, {"max_val": math.nan}, "must not be NaN"),
    ("leaky_relu", {"x": X}, {"negative_slope": math.inf}, "must be finite"),
    ("leaky_relu", {"x": X}, {"slope": 0.1}, "unexpected attribute"),
    ("erf", {"x": np.arange(3)}, {}, "dtype int64"),
    ("silu", {"x": np.array([True])}, {}, "dtype bool"),
    ("clip", {"x": np.arange(3)}, {"min": 0.0}, "dtype int64"),
    ("silu", {"x": X, "y": X}, {}, "takes 1 inputs"),
]


@pytest.mark.parametrize("op, inputs, attrs, message", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_invalid_graphs_are_rejected_naming_the_node(op, inputs, attrs, message):
    with pytest.raises(InvalidArgument, match="node 'out'") as info:
        support.run_op(op, inputs, attrs)
    assert message in str(info.value)


# --- SDK -------------------------------------------------------------------------------------
def test_sdk_wrappers_build_the_ops():
    import remat
    from remat import ops

    g = remat.Graph()
    x = g.input("x", (2, 3), dtype="float64")
    nodes = {
        "erf": ops.erf(x),
        "gelu": ops.gelu(x),
        "gelu_exact": ops.gelu(x, "none"),
        "silu": ops.silu(x),
        "clip": ops.clip(x, min=0),
        "clip_none": ops.clip(x),
        "hardtanh": ops.hardtanh(x, 0, 6),
        "leaky": ops.leaky_relu(x, negative_slope=0.2),
    }
    for name, node in nodes.items():
        g.output(name, node)
    attrs = {n.name: dict(n.attrs) for n in g.spec().nodes}
    assert attrs[nodes["gelu"].name] == {}  # the default is not sent: old graphs, same bytes
    assert attrs[nodes["gelu_exact"].name] == {"approximate": "none"}
    assert attrs[nodes["clip"].name] == {"min": 0.0}  # an absent bound is not sent
    assert attrs[nodes["clip_none"].name] == {}
    assert attrs[nodes["hardtanh"].name] == {"min_val": 0.0, "max_val": 6.0}
    feed = normal(2, 3, seed=30, scale=4.0)
    outs = support.ENGINE.run(RunRequest(g.spec(), {"x": feed})).outputs
    np.testing.assert_array_equal(outs["clip"], np.maximum(feed, 0.0))
    np.testing.assert_array_equal(outs["clip_none"], feed)
    np.testing.assert_array_equal(outs["hardtanh"], np.clip(feed, 0.0, 6.0))
    np.testing.assert_array_equal(outs["gelu"], support.run_op("gelu", {"x": feed}))
    exact = support.run_op("gelu", {"x": feed}, {"approximate": "none"})
    np.testing.assert_array_equal(outs["gelu_exact"], exact)
    for name, node in nodes.items():
        assert node.dtype == outs[name].dtype.name == "float64", name
