"""Native gradient ops of softmax, log_softmax and cross_entropy (softmax_grad,
log_softmax_grad, cross_entropy_grad): their own gradients against centered
differences (second order of the forward ops) and Hessian-vector products, float32,
values against torch.autograd, the forwards' memory (the result only), validation."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import support

from remat_server.errors import InvalidArgument
from remat_server.ops import REGISTRY


def normal(*shape, seed=0):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape))


def labels(shape, classes, seed=1, dtype=np.int64):
    return np.random.default_rng(seed).integers(0, classes, size=shape).astype(dtype)


def softmax(x, axis=-1):
    ex = np.exp(x - x.max(axis=axis, keepdims=True))
    return ex / ex.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    return np.log(softmax(x, axis))


# (id, op, inputs, attrs, wrt). Every float input is <= ~60 elements.
CASES = [
    (
        "softmax_grad-last",
        "softmax_grad",
        {"y": softmax(normal(3, 5)), "g": normal(3, 5, seed=1)},
        {},
        ["y", "g"],
    ),
    (
        "softmax_grad-axis0",
        "softmax_grad",
        {"y": softmax(normal(4, 3, 2, seed=2), 0), "g": normal(4, 3, 2, seed=3)},
        {"axis": 0},
        ["y", "g"],
    ),
    (
        "log_softmax_grad-last",
        "log_softmax_grad",
        {"y": log_softmax(normal(3, 5, seed=4)), "g": normal(3, 5, seed=5)},
        {},
        ["y", "g"],
    ),
    (
        "log_softmax_grad-mid",
        "log_softmax_grad",
        {"y": log_softmax(normal(2, 4, 3, seed=6), 1), "g": normal(2, 4, 3, seed=7)},
        {"axis": -2},
        ["y", "g"],
    ),
    (
        "cross_entropy_grad-2d",
        "cross_entropy_grad",
        {"logits": normal(4, 5, seed=8), "labels": labels((4,), 5), "g": np.array(1.7)},
        {},
        ["logits", "g"],
    ),
    (
        "cross_entropy_grad-3d",
        "cross_entropy_grad",
        {
            "logits": normal(2, 3, 4, seed=9),
            "labels": labels((2, 3), 4, dtype=np.int32),
            "g": np.array(-0.8),
        },
        {},
        ["logits", "g"],
    ),
]
IDS = [case[0] for case in CASES]


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


# --- values: torch.autograd's gradients of the forward ops ---------------------------------
@pytest.mark.parametrize("op", ["softmax_grad", "log_softmax_grad"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_family_matches_torch_autograd(op, axis):
    torch = pytest.importorskip("torch")
    x, g = normal(3, 4, 5, seed=30) * 3, normal(3, 4, 5, seed=31)
    t = torch.tensor(x, requires_grad=True)
    forward = torch.softmax if op == "softmax_grad" else torch.log_softmax
    y = forward(t, axis)
    (expected,) = torch.autograd.grad(y, t, torch.tensor(g))
    got = support.run_op(op, {"y": y.detach().numpy(), "g": g}, {"axis": axis})
    assert support.rel(got, expected.numpy()) <= 1e-9


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4), (1, 1)], ids=str)
def test_cross_entropy_grad_matches_torch_autograd(shape):
    torch = pytest.importorskip("torch")
    logits, y, g = normal(*shape, seed=40) * 4, labels(shape[:-1], shape[-1]), 0.7
    t = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(t.reshape(-1, shape[-1]), torch.tensor(y).reshape(-1))
    (expected,) = torch.autograd.grad(loss, t, torch.tensor(g, dtype=torch.float64))
    got = support.run_op("cross_entropy_grad", {"l": logits, "y": y, "g": np.array(g)})
    assert support.rel(got, expected.numpy()) <= 1e-9


def test_softmax_grad_of_an_all_zero_row_is_zero():
    """scaled_dot_product_attention's fully masked rows have y = 0: no gradient, no NaN."""
    y = np.vstack([np.zeros(4), softmax(normal(4, seed=50))])
    out = support.run_op("softmax_grad", {"y": y, "g": normal(2, 4, seed=51)})
    np.testing.assert_array_equal(out[0], np.zeros(4))


# --- memory: the result only ------------------------------------------------------------------
@pytest.mark.parametrize(
    "op, inputs, attrs",
    [
        ("softmax_grad", {"y": normal(64, 64, 64), "g": normal(64, 64, 64, seed=1)}, {"axis": 2}),
        ("log_softmax_grad", {"y": normal(64, 64, 64), "g": normal(64, 64, 64)}, {"axis": 1}),
        (
            "cross_entropy_grad",
            {"l": normal(64, 64, 64), "y": labels((64, 64), 64), "g": np.array(1.0)},
            {},
        ),
    ],
    ids=["softmax_grad", "log_softmax_grad", "cross_entropy_grad"],
)
def test_forward_allocates_only_its_result(op, inputs, attrs):
    first = next(iter(inputs.values()))
    tracemalloc.start()
    try:
        out = REGISTRY[op].forward(*inputs.values(), **attrs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == first.shape and out.dtype == first.dtype
    assert peak <= 1.05 * first.nbytes  # plus the small per-row sums
    assert REGISTRY[op].workspace is None


# --- validation ----------------------------------------------------------------------------
BAD = [
    ("softmax_grad", {"y": normal(2, 3), "g": normal(3)}, {}, "must have y's shape"),
    ("softmax_grad", {"y": normal(2, 3), "g": normal(2, 3)}, {"axis": 2}, "out of range"),
    ("log_softmax_grad", {"y": normal(2, 3), "g": normal(2, 3).astype(np.float32)}, {}, "dtype"),
    (
        "cross_entropy_grad",
        {"l": normal(2, 3), "y": labels((2,), 3), "g": normal(2)},
        {},
        "must be a scalar",
    ),
    (
        "cross_entropy_grad",
        {"l": normal(2, 3), "y": labels((3,), 3), "g": np.array(1.0)},
        {},
        "leading shape",
    ),
    ("cross_entropy_grad", {"l": normal(2, 3), "y": normal(2), "g": np.array(1.0)}, {}, "dtype"),
]


@pytest.mark.parametrize("op, inputs, attrs, message", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_invalid_graphs_are_rejected_naming_the_node(op, inputs, attrs, message):
    with pytest.raises(InvalidArgument, match="node 'out'") as info:
        support.run_op(op, inputs, attrs)
    assert message in str(info.value)


def test_out_of_range_labels_are_invalid_argument():
    feeds = {"l": normal(2, 3), "y": np.array([0, 3]), "g": np.array(1.0)}
    with pytest.raises(InvalidArgument, match=r"node 'out'.*out of range"):
        support.run_op("cross_entropy_grad", feeds)
