"""The activations' native gradient ops (`<act>_grad(x, g) = g * act'(x)`: erf, gelu in
both forms, silu, leaky_relu, and tanh, sigmoid from their outputs): their own gradients
against centered differences (the activations' second order) and Hessian-vector
products, float32, values against torch.autograd (at kinks and non-finite inputs too),
the forwards' memory, and validation."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import support

from remat_server.errors import InvalidArgument
from remat_server.ops import REGISTRY, activation_grad
from remat_server.ops.activation_grad import TABLE


def normal(*shape, seed=0, scale=1.0):
    return np.asarray(scale * np.random.default_rng(seed).standard_normal(shape))


def pair(x, seed):
    return {"x": x, "g": normal(*np.shape(x), seed=seed)}


def away_from_zero(*shape, seed):
    x = normal(*shape, seed=seed, scale=2.0)
    return np.where(np.abs(x) < 0.05, 0.1, x)


WRT = ["x", "g"]
# (id, op, inputs, attrs, wrt). Every float input is <= ~60 elements.
CASES = [
    ("erf_grad", "erf_grad", pair(normal(3, 4, scale=1.5), 1), {}, WRT),
    ("erf_grad-scalar", "erf_grad", pair(np.array(0.3), 2), {}, WRT),
    ("gelu_grad-tanh", "gelu_grad", pair(normal(3, 4, seed=3, scale=2.0), 4), {}, WRT),
    (
        "gelu_grad-none",
        "gelu_grad",
        pair(normal(3, 4, seed=5, scale=2.0), 6),
        {"approximate": "none"},
        WRT,
    ),
    ("silu_grad", "silu_grad", pair(normal(3, 4, seed=7, scale=3.0), 8), {}, WRT),
    (
        "leaky_relu_grad",
        "leaky_relu_grad",
        pair(away_from_zero(3, 4, seed=9), 10),
        {"negative_slope": 0.2},
        WRT,
    ),
    ("tanh_grad", "tanh_grad", pair(np.tanh(normal(3, 4, seed=11)), 12), {}, WRT),
    ("sigmoid_grad", "sigmoid_grad", pair(1 / (1 + np.exp(-normal(3, 4, seed=13))), 14), {}, WRT),
]
IDS = [case[0] for case in CASES]


def test_every_table_row_has_a_case():
    assert {c[1] for c in CASES} == {f"{name}_grad" for name in TABLE}


# --- their own gradients: the activations' second and third order --------------------------
@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_gradients_match_centered_differences(case_id, op, inputs, attrs, wrt):
    spec, feeds = support.op_graph(op, inputs, attrs)
    support.check_grads(spec, feeds, wrt, tol=1e-6)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_second_order_hessian_vector_products(case_id, op, inputs, attrs, wrt):
    support.check_hvp(op, inputs, attrs, wrt, seed=21)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_float32_keeps_dtype(case_id, op, inputs, attrs, wrt):
    result, expected = support.run_float32(op, inputs, attrs, wrt)
    assert support.rel(result.outputs["out"], expected) <= 1e-5


# --- values: torch.autograd's gradient of the activation -----------------------------------
def _torch_grad(torch, op, x, g, attrs):
    F = torch.nn.functional
    forward = {
        "erf_grad": torch.erf,
        "gelu_grad": lambda t: F.gelu(t, approximate=attrs.get("approximate", "tanh")),
        "silu_grad": F.silu,
        "leaky_relu_grad": lambda t: F.leaky_relu(t, attrs.get("negative_slope", 0.01)),
        "tanh_grad": torch.tanh,
        "sigmoid_grad": torch.sigmoid,
    }[op]
    t = torch.tensor(x, requires_grad=True)
    y = forward(t)
    (dx,) = torch.autograd.grad(y, t, torch.tensor(g))
    # tanh_grad and sigmoid_grad read the forward's output.
    return dx.numpy(), (y.detach().numpy() if op in ("tanh_grad", "sigmoid_grad") else x)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_values_match_torch_autograd(case_id, op, inputs, attrs, wrt):
    torch = pytest.importorskip("torch")
    x = inputs["x"] if op not in ("tanh_grad", "sigmoid_grad") else normal(3, 4, seed=15)
    expected, first = _torch_grad(torch, op, x, inputs["g"], attrs)
    got = support.run_op(op, {"x": first, "g": inputs["g"]}, attrs)
    assert support.rel(got, expected) <= 1e-9


# Kinks, 0, far tails and non-finite values: element for element what torch gives.
SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 30.0, -30.0, -700.0, 1e200])


@pytest.mark.parametrize(
    "op, attrs",
    [
        ("erf_grad", {}),
        ("gelu_grad", {"approximate": "none"}),
        ("gelu_grad", {"approximate": "tanh"}),
        ("silu_grad", {}),
        ("leaky_relu_grad", {}),
        ("leaky_relu_grad", {"negative_slope": -0.5}),
    ],
    ids=str,
)
def test_special_values_match_torch(op, attrs):
    torch = pytest.importorskip("torch")
    g = np.linspace(0.5, 1.5, SPECIAL.size)
    expected, _ = _torch_grad(torch, op, SPECIAL, g, attrs)
    got = support.run_op(op, {"x": SPECIAL, "g": g}, attrs)
    close = np.isclose(got, expected, rtol=1e-12, atol=0.0, equal_nan=True)
    assert close.all(), (SPECIAL[~close], got[~close], expected[~close])


def test_derivatives_at_zero():
    g = np.ones(1)
    at_zero = {"erf": 2 / math.sqrt(math.pi), "gelu": 0.5, "silu": 0.5, "leaky_relu": 0.01}
    for name, value in at_zero.items():
        assert support.run_op(f"{name}_grad", {"x": np.zeros(1), "g": g})[0] == pytest.approx(
            value, rel=1e-15
        )


# --- memory: the result plus the declared temporary -----------------------------------------
@pytest.mark.parametrize("name", sorted(TABLE))
def test_forward_allocates_its_result_and_the_declared_temporary(name):
    op = REGISTRY[f"{name}_grad"]
    x, g = normal(64, 128, 32, seed=30), normal(64, 128, 32, seed=31)
    attrs = {k: a.default for k, a in op.attrs.items()}
    tracemalloc.start()
    try:
        out = op.forward(x, g, **attrs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    temporary = TABLE[name].temporary
    assert out.dtype == x.dtype and out.shape == x.shape
    # The temporary (or leaky_relu's bool mask) is one of 8 blocks of x's leading axis;
    # NumPy's iterator buffers are 8192 elements.
    assert peak <= x.nbytes + temporary * x.nbytes // 8 + x.nbytes // 64 + 2**16
    assert (op.workspace is not None) == temporary


@pytest.mark.parametrize("name", sorted(TABLE))
@pytest.mark.parametrize("shape", [(64, 128, 32), (3, 4, 4096), (70001,)])
def test_blocks_give_the_one_pass_result_bit_for_bit(name, shape, monkeypatch):
    """Big arrays go through act'(x) a block at a time (the temporary an eighth of x);
    elementwise work gives the same bits either way."""
    op = REGISTRY[f"{name}_grad"]
    x, g = normal(*shape, seed=32), normal(*shape, seed=33)
    attrs = {k: a.default for k, a in op.attrs.items()}
    blocked = op.forward(x, g, **attrs)
    monkeypatch.setattr(activation_grad, "CHUNKED_FROM_BYTES", x.nbytes)  # one pass
    assert np.array_equal(op.forward(x, g, **attrs), blocked, equal_nan=True)


# --- validation ----------------------------------------------------------------------------
X = normal(2, 3)
BAD = [
    ("silu_grad", {"x": X, "g": normal(3)}, {}, "must have x's shape"),
    ("erf_grad", {"x": X, "g": X.astype(np.float32)}, {}, "dtype mismatch"),
    ("tanh_grad", {"x": np.arange(3), "g": np.arange(3)}, {}, "dtype int64"),
    ("gelu_grad", {"x": X, "g": X}, {"approximate": "exact"}, 'must be "tanh" or "none"'),
    ("leaky_relu_grad", {"x": X, "g": X}, {"negative_slope": math.inf}, "must be finite"),
    ("sigmoid_grad", {"x": X}, {}, "takes 2 inputs"),
]


@pytest.mark.parametrize("op, inputs, attrs, message", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_invalid_graphs_are_rejected_naming_the_node(op, inputs, attrs, message):
    with pytest.raises(InvalidArgument, match="node 'out'") as info:
        support.run_op(op, inputs, attrs)
    assert message in str(info.value)
