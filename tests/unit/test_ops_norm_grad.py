"""The normalizations' native gradient ops (batch_norm_grad, batch_norm_weight_grad,
layer_norm_grad, layer_norm_weight_grad, rms_norm_grad, rms_norm_weight_grad): their own
gradients against centered differences (the norms' second order) and Hessian-vector
products (third order), float32, the values against torch.autograd's gradients of the
norms (with degenerate groups: a constant channel, a mean of 1e3, a zero weight), the
forwards' memory, and validation."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import support

from remat_server.errors import InvalidArgument
from remat_server.ops import REGISTRY


def normal(*shape, seed=0, scale=1.0, shift=0.0):
    return shift + scale * np.random.default_rng(seed).standard_normal(shape)


def positive(*shape, seed=0):
    return np.random.default_rng(seed).uniform(0.5, 2.0, shape)


def bn_grad(*shape, seed=0, shift=0.0):
    return {
        "x": normal(*shape, seed=seed, scale=1.5, shift=shift),
        "weight": normal(shape[1], seed=seed + 1),
        "g": normal(*shape, seed=seed + 2),
    }


def bn_weight_grad(*shape, seed=0):
    c = shape[1]
    return {
        "x": normal(*shape, seed=seed, scale=1.5, shift=0.3),
        "running_mean": normal(c, seed=seed + 1),
        "running_var": positive(c, seed=seed + 2),
        "g": normal(*shape, seed=seed + 3),
    }


def row_grad(x_shape, w_shape, seed=0):
    return {
        "x": normal(*x_shape, seed=seed, scale=1.5, shift=0.2),
        "weight": normal(*w_shape, seed=seed + 1),
        "g": normal(*x_shape, seed=seed + 2),
    }


def row_weight_grad(*shape, seed=0):
    return {
        "x": normal(*shape, seed=seed, scale=1.5, shift=0.2),
        "g": normal(*shape, seed=seed + 1),
    }


DX_WRT = ["x", "weight", "g"]
DW_WRT = ["x", "g"]

# (id, op, inputs, attrs, wrt). Every float input is <= ~60 elements.
CASES = [
    ("batch_norm_grad-2d", "batch_norm_grad", bn_grad(6, 3), {}, DX_WRT),
    ("batch_norm_grad-4d", "batch_norm_grad", bn_grad(2, 3, 2, 3, seed=10), {"eps": 1e-3}, DX_WRT),
    (
        "batch_norm_weight_grad-train",
        "batch_norm_weight_grad",
        bn_weight_grad(3, 2, 4, seed=20),
        {"training": True},
        DW_WRT,
    ),
    (
        "batch_norm_weight_grad-eval",
        "batch_norm_weight_grad",
        bn_weight_grad(2, 2, 3, 3, seed=30),
        {"eps": 0.1},
        DW_WRT,
    ),
    ("layer_norm_grad-k1", "layer_norm_grad", row_grad((3, 2, 5), (5,), seed=40), {}, DX_WRT),
    (
        "layer_norm_grad-k2",
        "layer_norm_grad",
        row_grad((3, 2, 4), (2, 4), seed=50),
        {"eps": 1e-3},
        DX_WRT,
    ),
    ("layer_norm_grad-1d", "layer_norm_grad", row_grad((7,), (7,), seed=60), {}, DX_WRT),
    ("rms_norm_grad-k1", "rms_norm_grad", row_grad((3, 2, 5), (5,), seed=70), {}, DX_WRT),
    (
        "rms_norm_grad-k2",
        "rms_norm_grad",
        row_grad((3, 2, 4), (2, 4), seed=80),
        {"eps": 1e-3},
        DX_WRT,
    ),
    (
        "layer_norm_weight_grad-k1",
        "layer_norm_weight_grad",
        row_weight_grad(17, 3, seed=90),
        {"normalized_ndim": 1},
        DW_WRT,
    ),
    (
        "layer_norm_weight_grad-no-lead",
        "layer_norm_weight_grad",
        row_weight_grad(2, 5, seed=100),
        {"normalized_ndim": 2, "eps": 1e-3},
        DW_WRT,
    ),
    (
        "rms_norm_weight_grad-k1",
        "rms_norm_weight_grad",
        row_weight_grad(3, 2, 5, seed=110),
        {"normalized_ndim": 1},
        DW_WRT,
    ),
    (
        "rms_norm_weight_grad-k2",
        "rms_norm_weight_grad",
        row_weight_grad(3, 2, 4, seed=120),
        {"normalized_ndim": 2},
        DW_WRT,
    ),
]
IDS = [case[0] for case in CASES]


# --- their own gradients: the norms' second and third order ------------------------------
@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_gradients_match_centered_differences(case_id, op, inputs, attrs, wrt):
    spec, feeds = support.op_graph(op, inputs, attrs)
    support.check_grads(spec, feeds, wrt, tol=1e-6)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_second_order_hessian_vector_products(case_id, op, inputs, attrs, wrt):
    support.check_hvp(op, inputs, attrs, wrt, seed=11)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_float32_keeps_dtype(case_id, op, inputs, attrs, wrt):
    result, expected = support.run_float32(op, inputs, attrs, wrt)
    assert support.rel(result.outputs["out"], expected) <= 1e-5


# --- values: torch.autograd's gradients of the norms ---------------------------------------
def _torch_grads(torch, op, inputs, attrs):
    """What the op computes, from torch.autograd.grad of the norm it differentiates."""
    F = torch.nn.functional
    t = {k: torch.tensor(a, requires_grad=k in ("x", "weight")) for k, a in inputs.items()}
    x, g = t["x"], t["g"]
    training = attrs.get("training", op == "batch_norm_grad")
    if op.startswith("batch_norm"):
        channels = x.shape[1]
        weight = t.get("weight", torch.ones(channels, dtype=x.dtype, requires_grad=True))
        mean = t.get("running_mean", torch.zeros(channels, dtype=x.dtype)).clone()
        var = t.get("running_var", torch.ones(channels, dtype=x.dtype)).clone()
        out = F.batch_norm(x, mean, var, weight, None, training, 0.0, attrs.get("eps", 1e-5))
    else:
        k = t["weight"].ndim if "weight" in t else attrs["normalized_ndim"]
        shape = tuple(x.shape[x.ndim - k :])
        weight = t.get("weight", torch.ones(shape, dtype=x.dtype, requires_grad=True))
        if op.startswith("layer_norm"):
            out = F.layer_norm(x, shape, weight, None, attrs.get("eps", 1e-5))
        else:
            out = F.rms_norm(x, shape, weight, attrs.get("eps", 1e-6))
    dx, dweight = torch.autograd.grad(out, (x, weight), g)
    return (dweight if op.endswith("weight_grad") else dx).numpy()


def _degenerate(op):
    """Channel / row 0 constant (zero variance), 1 far from 0 (mean 1e3, std 1), and a
    zero weight where the op takes one."""
    if op.startswith("batch_norm"):
        make = bn_grad if op == "batch_norm_grad" else bn_weight_grad
        inputs = make(4, 3, 2, seed=130)
        inputs["x"][:, 0] = 0.7
        inputs["x"][:, 1] = normal(4, 2, seed=131, shift=1e3)
    else:
        weighted = not op.endswith("weight_grad")
        inputs = row_grad((3, 5), (5,), seed=140) if weighted else row_weight_grad(3, 5, seed=140)
        inputs["x"][0] = 0.7
        inputs["x"][1] = normal(5, seed=141, shift=1e3)
    if "weight" in inputs:
        inputs["weight"][1] = 0.0
    return inputs


TORCH_CASES = [c[:4] for c in CASES] + [
    (f"{op}-degenerate", op, _degenerate(op), attrs)
    for op, attrs in [
        ("batch_norm_grad", {}),
        ("batch_norm_weight_grad", {"training": True}),
        ("batch_norm_weight_grad", {}),
        ("layer_norm_grad", {}),
        ("layer_norm_weight_grad", {"normalized_ndim": 1}),
        ("rms_norm_grad", {"eps": 1e-3}),
        ("rms_norm_weight_grad", {"normalized_ndim": 1}),
    ]
]


@pytest.mark.parametrize(
    "case_id, op, inputs, attrs",
    TORCH_CASES,
    ids=[f"{c[0]}-{k}" for k, c in enumerate(TORCH_CASES)],
)
def test_values_match_torch_autograd(case_id, op, inputs, attrs):
    torch = pytest.importorskip("torch")
    expected = _torch_grads(torch, op, inputs, attrs)
    assert support.rel(support.run_op(op, inputs, attrs), expected) <= 1e-9


# --- memory: the result, plus at most one chunk of the leading axis ------------------------
def _peak(op, inputs, attrs):
    full = {k: a.default for k, a in REGISTRY[op].attrs.items() if not a.required}
    full.update(attrs)
    tracemalloc.start()
    try:
        out = REGISTRY[op].forward(*inputs.values(), **full)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "op, inputs, attrs, limit",
    [
        ("batch_norm_grad", bn_grad(64, 8, 16, 16), {}, 1.0),
        ("batch_norm_weight_grad", bn_weight_grad(64, 8, 16, 16), {"training": True}, 0.2),
        ("batch_norm_weight_grad", bn_weight_grad(64, 8, 16, 16), {}, 0.2),
        ("layer_norm_grad", row_grad((64, 16, 128), (128,)), {}, 1.2),
        ("rms_norm_grad", row_grad((64, 16, 128), (16, 128)), {}, 1.2),
        ("layer_norm_weight_grad", row_weight_grad(64, 16, 128), {"normalized_ndim": 1}, 0.2),
        ("rms_norm_weight_grad", row_weight_grad(64, 16, 128), {"normalized_ndim": 2}, 0.05),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_forward_allocates_its_result_and_at_most_a_chunk(op, inputs, attrs, limit):
    out, peak = _peak(op, inputs, attrs)
    x = inputs["x"]
    assert out.dtype == x.dtype
    # Plus NumPy's iterator buffers (einsum's: 8192 elements each), whatever x's size.
    assert peak <= limit * x.nbytes + 2**17, f"peak {peak / x.nbytes:.3f} x for {op}"
    workspace = REGISTRY[op].workspace
    if limit > 1.0 or op.startswith(("batch_norm_weight", "layer_norm_weight")):
        assert workspace is not None  # the chunk is declared


# --- validation ----------------------------------------------------------------------------
def _with(inputs, **changes):
    return {**inputs, **changes}


BAD = [
    ("batch_norm_grad", _with(bn_grad(2, 3), g=normal(2, 4)), {}, "must have x's shape"),
    ("batch_norm_grad", _with(bn_grad(2, 3), weight=normal(4)), {}, "weight"),
    ("batch_norm_grad", bn_grad(1, 3), {}, "more than 1 value per channel"),
    ("batch_norm_grad", bn_grad(2, 3), {"eps": 0.0}, "positive when training"),
    ("batch_norm_grad", _with(bn_grad(2, 3), x=normal(3), g=normal(3)), {}, "rank >= 2"),
    (
        "batch_norm_weight_grad",
        _with(bn_weight_grad(2, 3), running_var=normal(2)),
        {},
        "running_var",
    ),
    (
        "batch_norm_weight_grad",
        _with(bn_weight_grad(2, 3), g=normal(2, 3).astype(np.float32)),
        {},
        "dtype mismatch",
    ),
    ("layer_norm_grad", _with(row_grad((2, 3), (3,)), weight=normal(2)), {}, "trailing shape"),
    ("rms_norm_grad", _with(row_grad((2, 3), (3,)), g=normal(3)), {}, "must have x's shape"),
    ("rms_norm_grad", row_grad((2, 3), (3,)), {"eps": -1.0}, ">= 0"),
    ("layer_norm_weight_grad", row_weight_grad(2, 3), {}, "missing required attribute"),
    ("layer_norm_weight_grad", row_weight_grad(2, 3), {"normalized_ndim": 0}, ">= 1"),
    ("rms_norm_weight_grad", row_weight_grad(2, 3), {"normalized_ndim": 3}, "exceeds the rank"),
    (
        "rms_norm_weight_grad",
        {k: a.astype(np.int64) for k, a in row_weight_grad(2, 3).items()},
        {"normalized_ndim": 1},
        "dtype",
    ),
]


@pytest.mark.parametrize(
    "op, inputs, attrs, message", BAD, ids=[f"{b[0]}-{k}-{b[3]}" for k, b in enumerate(BAD)]
)
def test_invalid_graphs_are_rejected_naming_the_node(op, inputs, attrs, message):
    with pytest.raises(InvalidArgument, match="node 'out'") as info:
        support.run_op(op, inputs, attrs)
    assert message in str(info.value)
