"""nn, conv and random ops: gradients against centered differences (first and second
order), forwards against loop references and, when installed, torch.nn.functional."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import support

from remat_server.engine import RunRequest
from remat_server.errors import InvalidArgument


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def normal(*shape, seed=0):
    return _rng(seed).standard_normal(shape)


def labels(shape, classes, seed=1, dtype=np.int64):
    return _rng(seed).integers(0, classes, size=shape).astype(dtype)


# (id, op, inputs, attrs, wrt). Every float input is <= ~60 elements.
CASES = [
    ("softmax-last", "softmax", {"x": normal(3, 5)}, {}, ["x"]),
    ("softmax-axis0", "softmax", {"x": normal(4, 3, 2)}, {"axis": 0}, ["x"]),
    ("log_softmax-last", "log_softmax", {"x": normal(3, 5)}, {}, ["x"]),
    ("log_softmax-mid", "log_softmax", {"x": normal(2, 4, 3)}, {"axis": -2}, ["x"]),
    (
        "cross_entropy-2d",
        "cross_entropy",
        {"logits": normal(4, 5), "labels": labels((4,), 5)},
        {},
        ["logits"],
    ),
    (
        "cross_entropy-3d",
        "cross_entropy",
        {"logits": normal(2, 3, 4), "labels": labels((2, 3), 4, dtype=np.int32)},
        {},
        ["logits"],
    ),
    (
        "layer_norm-k1",
        "layer_norm",
        {"x": normal(3, 2, 5), "weight": normal(5, seed=1), "bias": normal(5, seed=2)},
        {},
        ["x", "weight", "bias"],
    ),
    (
        "layer_norm-k2",
        "layer_norm",
        {"x": normal(3, 2, 4), "weight": normal(2, 4, seed=1), "bias": normal(2, 4, seed=2)},
        {"eps": 1e-3},
        ["x", "weight", "bias"],
    ),
    (
        "conv2d-plain",
        "conv2d",
        {"x": normal(2, 2, 4, 4), "w": normal(3, 2, 2, 2, seed=1)},
        {},
        ["x", "w"],
    ),
    (
        "conv2d-stride-pad",
        "conv2d",
        {"x": normal(1, 2, 5, 5), "w": normal(2, 2, 3, 3, seed=1)},
        {"stride": (2, 2), "padding": (1, 1)},
        ["x", "w"],
    ),
    (
        "conv2d-dilation-asym",
        "conv2d",
        {"x": normal(1, 2, 5, 6), "w": normal(2, 2, 2, 3, seed=1)},
        {"stride": (1, 2), "padding": (2, 0), "dilation": (2, 1)},
        ["x", "w"],
    ),
    (
        "max_pool2d-default-stride",
        "max_pool2d",
        {"x": normal(1, 2, 4, 6)},
        {"kernel": (2, 2)},
        ["x"],
    ),
    (
        "max_pool2d-overlap-pad",
        "max_pool2d",
        {"x": normal(1, 2, 5, 5)},
        {"kernel": (3, 3), "stride": (2, 1), "padding": (1, 1)},
        ["x"],
    ),
    (
        "max_pool2d-dilation",
        "max_pool2d",
        {"x": normal(2, 1, 5, 5)},
        {"kernel": (2, 2), "stride": (1, 2), "dilation": (2, 2)},
        ["x"],
    ),
    (
        "avg_pool2d-default-stride",
        "avg_pool2d",
        {"x": normal(1, 2, 4, 6)},
        {"kernel": (2, 3)},
        ["x"],
    ),
    (
        "avg_pool2d-overlap-pad",
        "avg_pool2d",
        {"x": normal(1, 2, 5, 5)},
        {"kernel": (3, 3), "stride": (2, 1), "padding": (1, 1)},
        ["x"],
    ),
    (
        "avg_pool2d-exclude-pad",
        "avg_pool2d",
        {"x": normal(1, 2, 5, 5)},
        {"kernel": (3, 2), "stride": (2, 2), "padding": (1, 1), "count_include_pad": False},
        ["x"],
    ),
    (
        "unfold",
        "unfold",
        {"x": normal(1, 2, 4, 5)},
        {"kernel": (2, 3), "stride": (1, 2), "padding": (1, 0), "dilation": (2, 1)},
        ["x"],
    ),
    (
        "fold",
        "fold",
        {"cols": normal(1, 4, 10)},
        {"output_size": (4, 4), "kernel": (2, 2), "stride": (2, 1), "padding": (0, 1)},
        ["cols"],
    ),
    ("dropout", "dropout", {"x": normal(5, 6)}, {"p": 0.4, "seed": 3}, ["x"]),
    ("dropout-p0", "dropout", {"x": normal(2, 3)}, {"p": 0.0}, ["x"]),
]
IDS = [case[0] for case in CASES]


# --- first-order gradients -------------------------------------------------------------
@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_gradients_match_centered_differences(case_id, op, inputs, attrs, wrt):
    spec, feeds = support.op_graph(op, inputs, attrs)
    support.check_grads(spec, feeds, wrt, tol=1e-6)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_float32_keeps_dtype(case_id, op, inputs, attrs, wrt):
    result, expected = support.run_float32(op, inputs, attrs, wrt)
    assert np.allclose(result.outputs["out"], expected, rtol=1e-4, atol=1e-5)


# --- second order: differentiate the joint graph again ------------------------------------
SECOND_ORDER = [
    "conv2d-stride-pad",
    "conv2d-dilation-asym",
    "layer_norm-k1",
    "layer_norm-k2",
    "softmax-axis0",
    "log_softmax-last",
    "cross_entropy-3d",
    "max_pool2d-overlap-pad",
    "avg_pool2d-exclude-pad",
    "unfold",
    "fold",
    "dropout",
]


@pytest.mark.parametrize(
    "case_id, op, inputs, attrs, wrt",
    [c for c in CASES if c[0] in SECOND_ORDER],
    ids=[c[0] for c in CASES if c[0] in SECOND_ORDER],
)
def test_second_order_hessian_vector_products(case_id, op, inputs, attrs, wrt):
    support.check_hvp(op, inputs, attrs, wrt, seed=11)


# --- forward values against loop references ---------------------------------------------
def conv2d_loop(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    (n, c, h, wd), (o, _, kh, kw) = x.shape, w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, o, ho, wo))
    for b, f, i, j in itertools.product(range(n), range(o), range(ho), range(wo)):
        for ch, p, q in itertools.product(range(c), range(kh), range(kw)):
            out[b, f, i, j] += (
                w[f, ch, p, q]
                * xp[b, ch, i * stride[0] + p * dilation[0], j * stride[1] + q * dilation[1]]
            )
    return out


def unfold_loop(x, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1), pad_value=0.0):
    n, c, h, w = x.shape
    xp = np.pad(
        x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2), constant_values=pad_value
    )
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    cols = np.zeros((n, c * kernel[0] * kernel[1], ho * wo))
    for b, ch, p, q, i, j in itertools.product(
        range(n), range(c), range(kernel[0]), range(kernel[1]), range(ho), range(wo)
    ):
        row = (ch * kernel[0] + p) * kernel[1] + q  # channel-major, as torch
        cols[b, row, i * wo + j] = xp[
            b, ch, i * stride[0] + p * dilation[0], j * stride[1] + q * dilation[1]
        ]
    return cols


def pool_loop(x, kernel, stride, padding, reduce, pad_value):
    cols = unfold_loop(x, kernel, stride, padding, pad_value=pad_value)
    n, c = x.shape[:2]
    ho = (x.shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    return reduce(cols.reshape(n, c, kernel[0] * kernel[1], -1), axis=2).reshape(n, c, ho, -1)


GEOMETRIES = [
    {},
    {"stride": (2, 2)},
    {"padding": (1, 2)},
    {"dilation": (2, 1)},
    {"stride": (2, 1), "padding": (1, 1), "dilation": (1, 2)},
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv2d_forward_matches_loop_reference(geometry):
    x, w = normal(2, 3, 6, 5), normal(4, 3, 3, 2, seed=1)
    out = support.run_op("conv2d", {"x": x, "w": w}, geometry)
    np.testing.assert_allclose(out, conv2d_loop(x, w, **geometry), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_unfold_layout_matches_loop_reference_and_fold_is_its_adjoint(geometry):
    x = normal(2, 3, 5, 6)
    attrs = {"kernel": (2, 3), **geometry}
    cols = support.run_op("unfold", {"x": x}, attrs)
    np.testing.assert_array_equal(cols, unfold_loop(x, **attrs))
    y = normal(*cols.shape, seed=5)
    back = support.run_op("fold", {"cols": y}, {"output_size": (5, 6), **attrs})
    assert back.shape == x.shape
    assert np.isclose(np.sum(cols * y), np.sum(x * back), rtol=1e-12)


def test_unfold_pad_value():
    x = normal(1, 1, 2, 2)
    cols = support.run_op(
        "unfold", {"x": x}, {"kernel": (2, 2), "padding": (1, 1), "pad_value": -7.0}
    )
    np.testing.assert_array_equal(cols, unfold_loop(x, (2, 2), padding=(1, 1), pad_value=-7.0))


@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel": (2, 2)},
        {"kernel": (3, 3), "stride": (1, 2), "padding": (1, 1)},
        {"kernel": (3, 2), "stride": (2, 2), "padding": (1, 0)},
    ],
)
def test_pools_match_loop_reference(attrs):
    x = normal(2, 3, 6, 7)
    full = {"stride": attrs["kernel"], "padding": (0, 0), **attrs}
    np.testing.assert_array_equal(
        support.run_op("max_pool2d", {"x": x}, attrs),
        pool_loop(x, **full, reduce=np.max, pad_value=-np.inf),
    )
    np.testing.assert_allclose(
        support.run_op("avg_pool2d", {"x": x}, attrs),
        pool_loop(x, **full, reduce=np.mean, pad_value=0.0),
        rtol=1e-12,
    )


@pytest.mark.parametrize(
    "x, attrs",
    [
        (np.ones((1, 1, 2, 2)), {"kernel": (2, 2)}),  # all tied: the first tap takes it
        # Overlapping windows with ties inside and across them, and padding.
        (
            np.array([[[[1.0, 3.0, 3.0], [3.0, 2.0, 3.0], [0.0, 3.0, 1.0]]]]),
            {"kernel": (2, 2), "stride": (1, 1)},
        ),
        (
            np.array([[[[2.0, 2.0, 1.0, 2.0], [2.0, 0.0, 2.0, 2.0]]]]),
            {"kernel": (2, 2), "stride": (1, 2), "padding": (1, 1)},
        ),
    ],
)
def test_max_pool2d_ties_give_the_gradient_to_the_first_maximum_like_torch(x, attrs):
    torch = pytest.importorskip("torch")
    spec, feeds = support.op_graph("max_pool2d", {"x": x}, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=("x",), loss="loss"))
    t = torch.tensor(x, requires_grad=True)
    pooled = torch.nn.functional.max_pool2d(
        t, attrs["kernel"], attrs.get("stride"), attrs.get("padding", 0)
    )
    (pooled * torch.tensor(feeds["__weight"])).sum().backward()
    np.testing.assert_array_equal(result.grads["x"], t.grad.numpy())


def test_softmax_family_is_stable_and_matches_formula():
    x = normal(3, 4) + np.array([[1000.0], [-1000.0], [0.0]])
    sm, lsm = support.run_op("softmax", {"x": x}), support.run_op("log_softmax", {"x": x})
    shifted = x - x.max(axis=1, keepdims=True)
    expected = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(sm, expected, rtol=1e-13)
    np.testing.assert_allclose(lsm, np.log(expected), rtol=1e-12)
    assert np.all(np.isfinite(lsm))


def test_cross_entropy_matches_formula():
    logits, y = normal(2, 3, 4), labels((2, 3), 4)
    picked = np.take_along_axis(logits, y[..., None], -1)[..., 0]
    expected = np.mean(np.log(np.exp(logits).sum(-1)) - picked)
    assert np.isclose(
        support.run_op("cross_entropy", {"logits": logits, "labels": y}), expected, rtol=1e-13
    )


def test_layer_norm_matches_formula():
    x, w, b = normal(3, 2, 4), normal(2, 4, seed=1), normal(2, 4, seed=2)
    mu = x.mean(axis=(1, 2), keepdims=True)
    var = x.var(axis=(1, 2), keepdims=True)
    expected = (x - mu) / np.sqrt(var + 1e-5) * w + b
    out = support.run_op("layer_norm", {"x": x, "weight": w, "bias": b})
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_one_hot():
    out = support.run_op(
        "one_hot",
        {"i": np.array([[2, 0], [1, 2]], dtype=np.int32)},
        {"depth": 3, "dtype": "float64"},
    )
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, np.eye(3)[[[2, 0], [1, 2]]])


# --- against torch.nn.functional ---------------------------------------------------------
def _ours(op, inputs, attrs, wrt):
    spec, feeds = support.op_graph(op, inputs, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=tuple(wrt), loss="loss"))
    return result.outputs["out"], result.grads, feeds["__weight"]


def _torch_call(torch, op, tensors, attrs):
    F = torch.nn.functional
    if op == "conv2d":
        return F.conv2d(
            tensors["x"],
            tensors["w"],
            stride=attrs.get("stride", 1),
            padding=attrs.get("padding", 0),
            dilation=attrs.get("dilation", 1),
        )
    if op == "max_pool2d":
        return F.max_pool2d(
            tensors["x"],
            attrs["kernel"],
            attrs.get("stride"),
            attrs.get("padding", 0),
            attrs.get("dilation", 1),
        )
    if op == "avg_pool2d":
        return F.avg_pool2d(
            tensors["x"],
            attrs["kernel"],
            attrs.get("stride"),
            attrs.get("padding", 0),
            count_include_pad=attrs.get("count_include_pad", True),
        )
    if op == "layer_norm":
        w = tensors["weight"]
        return F.layer_norm(
            tensors["x"], tuple(w.shape), w, tensors["bias"], attrs.get("eps", 1e-5)
        )
    if op == "cross_entropy":
        logits = tensors["logits"]  # torch wants the class axis at 1
        return F.cross_entropy(
            logits.movedim(-1, 1) if logits.ndim > 2 else logits, tensors["labels"].long()
        )
    if op in ("softmax", "log_softmax"):
        return getattr(F, op)(tensors["x"], dim=attrs.get("axis", -1))
    if op == "unfold":
        return F.unfold(
            tensors["x"],
            attrs["kernel"],
            dilation=attrs.get("dilation", 1),
            padding=attrs.get("padding", 0),
            stride=attrs.get("stride", 1),
        )
    raise AssertionError(op)


TORCH_OPS = (
    "conv2d",
    "max_pool2d",
    "avg_pool2d",
    "layer_norm",
    "cross_entropy",
    "softmax",
    "log_softmax",
    "unfold",
)


@pytest.mark.parametrize(
    "case_id, op, inputs, attrs, wrt",
    [c for c in CASES if c[1] in TORCH_OPS],
    ids=[c[0] for c in CASES if c[1] in TORCH_OPS],
)
def test_matches_torch(case_id, op, inputs, attrs, wrt):
    torch = pytest.importorskip("torch")
    out, grads, weight = _ours(op, inputs, attrs, wrt)
    tensors = {k: torch.tensor(a, requires_grad=k in wrt) for k, a in inputs.items()}
    expected = _torch_call(torch, op, tensors, attrs)
    (expected * torch.tensor(weight)).sum().backward()
    assert support.rel(out, expected.detach().numpy()) <= 1e-9
    for name in wrt:
        assert support.rel(grads[name], tensors[name].grad.numpy()) <= 1e-9, name


# --- dropout -------------------------------------------------------------------------------
def test_dropout_mask_is_a_pure_function_of_seed_and_key():
    x = np.ones((50, 40))
    first = support.run_op("dropout", {"x": x}, {"p": 0.5, "seed": 1, "key": "k"})
    again = support.run_op("dropout", {"x": x}, {"p": 0.5, "seed": 1, "key": "k"}, name="other")
    other_seed = support.run_op("dropout", {"x": x}, {"p": 0.5, "seed": 2, "key": "k"})
    other_key = support.run_op("dropout", {"x": x}, {"p": 0.5, "seed": 1, "key": "k2"})
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_seed)
    assert not np.array_equal(first, other_key)
    assert set(np.unique(first)) <= {0.0, 2.0}


def test_dropout_key_defaults_to_the_node_name():
    x = np.ones((30, 30))
    a = support.run_op("dropout", {"x": x}, {"seed": 4}, name="drop1")
    b = support.run_op("dropout", {"x": x}, {"seed": 4}, name="drop2")
    c = support.run_op("dropout", {"x": x}, {"seed": 4, "key": "drop1"}, name="drop2")
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.75])
def test_dropout_keep_fraction_and_scaling(p):
    x = np.full((200, 500), 2.0, dtype=np.float32)
    out = support.run_op("dropout", {"x": x}, {"p": p, "seed": 9})
    assert out.dtype == np.float32
    kept = out != 0
    assert abs(kept.mean() - (1 - p)) < 0.01
    np.testing.assert_allclose(out[kept], 2.0 / (1 - p), rtol=1e-6)


def test_dropout_p0_is_identity():
    x = normal(3, 4)
    np.testing.assert_array_equal(support.run_op("dropout", {"x": x}, {"p": 0.0}), x)


# --- validation ----------------------------------------------------------------------------
X4 = normal(1, 2, 4, 4)
BAD = [
    ("conv2d", {"x": X4, "w": normal(2, 3, 2, 2)}, {}, "input channels"),
    ("conv2d", {"x": normal(2, 4, 4), "w": normal(2, 2, 2, 2)}, {}, "4-D"),
    ("conv2d", {"x": X4, "w": normal(2, 2, 5, 5)}, {}, "output size"),
    ("conv2d", {"x": X4, "w": normal(2, 2, 2, 2)}, {"stride": (0, 1)}, "each > 0"),
    ("conv2d", {"x": X4, "w": normal(2, 2, 2, 2)}, {"padding": (-1, 0)}, "each >= 0"),
    ("conv2d", {"x": X4, "w": normal(2, 2, 2, 2)}, {"dilation": (1, 1, 1)}, "2 ints"),
    ("unfold", {"x": X4}, {"kernel": (2, 0)}, "each > 0"),
    ("fold", {"c": normal(1, 8, 5)}, {"output_size": (4, 4), "kernel": (2, 2)}, "windows"),
    ("fold", {"c": normal(1, 7, 9)}, {"output_size": (4, 4), "kernel": (2, 2)}, "multiple"),
    ("max_pool2d", {"x": X4}, {"kernel": (2, 2), "padding": (2, 0)}, "half the kernel"),
    ("avg_pool2d", {"x": X4}, {"kernel": (5, 1)}, "output size"),
    ("layer_norm", {"x": normal(2, 3), "w": normal(2), "b": normal(2)}, {}, "trailing shape"),
    ("layer_norm", {"x": normal(2, 3), "w": normal(3), "b": normal(2)}, {}, "bias"),
    ("layer_norm", {"x": normal(2, 3), "w": normal(3), "b": normal(3)}, {"eps": -1.0}, ">= 0"),
    ("cross_entropy", {"l": normal(2, 3), "y": labels((3,), 3)}, {}, "leading shape"),
    ("cross_entropy", {"l": normal(2, 3), "y": normal(2)}, {}, "dtype"),
    ("softmax", {"x": normal(2, 3)}, {"axis": 2}, "out of range"),
    ("dropout", {"x": normal(2, 3)}, {"p": 1.0}, "[0, 1)"),
]


@pytest.mark.parametrize("op, inputs, attrs, message", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_invalid_graphs_are_rejected_naming_the_node(op, inputs, attrs, message):
    with pytest.raises(InvalidArgument, match="node 'out'") as info:
        support.run_op(op, inputs, attrs)
    assert message in str(info.value)


def test_out_of_range_labels_are_invalid_argument():
    with pytest.raises(InvalidArgument, match=r"node 'out'.*out of range"):
        support.run_op("cross_entropy", {"l": normal(2, 3), "y": np.array([0, 3])})
    with pytest.raises(InvalidArgument, match="node 'out'"):
        support.run_op("cross_entropy", {"l": normal(2, 3), "y": np.array([-1, 0])})
