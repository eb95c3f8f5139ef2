"""resize family: upsample_nearest2d, upsample_bilinear2d, pad. Gradients against centered
differences (first and second order), float32, forward and gradients against
torch.nn.functional (F.interpolate, F.pad) in float64 and numpy.pad, torch's index and
boundary conventions, the workspace, and validation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import support

from remat_server.engine import Engine, RunRequest
from remat_server.errors import InvalidArgument
from remat_server.graph.limits import Limits


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _resize(kind, shape, size, align_corners=None, seed=0):
    attrs = {"size": size}
    if align_corners is not None:
        attrs["align_corners"] = align_corners
    return (f"upsample_{kind}2d", {"x": normal(*shape, seed=seed)}, attrs, ["x"])


def _pad(shape, pads, mode=None, value=None, seed=0):
    attrs = {"pads": pads}
    if mode is not None:
        attrs["mode"] = mode
    if value is not None:
        attrs["value"] = value
    return ("pad", {"x": normal(*shape, seed=seed)}, attrs, ["x"])


# (id, op, inputs, attrs, wrt). Every float input is <= ~60 elements.
CASES = [
    ("nearest-up-integer", *_resize("nearest", (1, 2, 3, 3), (6, 9))),
    ("nearest-up-fraction", *_resize("nearest", (1, 2, 5, 4), (7, 6))),  # 5 -> 7, 4 -> 6
    ("nearest-down", *_resize("nearest", (1, 1, 7, 6), (3, 4))),  # 7 -> 3 reads 0 2 4
    ("nearest-mixed", *_resize("nearest", (2, 1, 4, 5), (4, 3))),  # H kept, W shrinks
    ("nearest-up-down", *_resize("nearest", (1, 2, 3, 6), (5, 4))),
    ("bilinear-up-integer", *_resize("bilinear", (1, 2, 3, 3), (6, 6))),
    ("bilinear-up-integer-ac", *_resize("bilinear", (1, 2, 3, 3), (6, 6), True)),
    ("bilinear-up-fraction", *_resize("bilinear", (1, 2, 4, 3), (7, 5))),
    ("bilinear-up-fraction-ac", *_resize("bilinear", (1, 2, 4, 3), (7, 5), True)),
    ("bilinear-down", *_resize("bilinear", (1, 1, 7, 8), (3, 5))),
    ("bilinear-down-ac", *_resize("bilinear", (1, 1, 7, 8), (3, 5), True)),
    ("bilinear-up-down", *_resize("bilinear", (2, 1, 3, 6), (5, 4), False)),
    ("bilinear-same-size", *_resize("bilinear", (1, 2, 3, 4), (3, 4))),
    ("bilinear-to-one-ac", *_resize("bilinear", (1, 1, 4, 5), (1, 2), True)),
    ("bilinear-to-one", *_resize("bilinear", (1, 1, 4, 5), (1, 2), False)),
    ("bilinear-from-one", *_resize("bilinear", (1, 2, 1, 3), (3, 5))),
    ("pad-constant-rank1", *_pad((5,), (2, 3), value=1.5)),
    ("pad-constant-rank2", *_pad((3, 4), (1, 0, 0, 2), "constant")),
    ("pad-constant-rank3", *_pad((2, 3, 4), (0, 1, 2, 1, 0, 0), value=-2.0)),
    ("pad-constant-rank4", *_pad((1, 2, 3, 4), (0, 0, 1, 2, 0, 1, 2, 0))),
    ("pad-constant-none", *_pad((2, 3), (0, 0, 0, 0))),
    ("pad-reflect-rank1", *_pad((6,), (3, 5), "reflect")),
    ("pad-reflect-rank2", *_pad((3, 5), (2, 1, 0, 4), "reflect")),
    ("pad-reflect-rank3", *_pad((2, 3, 4), (0, 2, 3, 1, 0, 1), "reflect")),
    ("pad-reflect-rank4", *_pad((2, 2, 3, 4), (1, 0, 2, 3, 0, 1, 1, 2), "reflect")),
    ("pad-reflect-rank4-trailing", *_pad((1, 2, 3, 4), (0, 1, 2, 3, 0, 0, 1, 2), "reflect")),
    ("pad-reflect-batch-axis", *_pad((3, 2, 4), (2, 0, 0, 1, 0, 0), "reflect")),
    ("pad-edge-rank1", *_pad((4,), (3, 6), "edge")),  # pads wider than the axis
    ("pad-edge-rank2", *_pad((1, 3), (2, 0, 0, 3), "edge")),  # a size-1 axis
    ("pad-edge-rank3", *_pad((2, 3, 4), (1, 0, 2, 0, 3, 1), "edge")),
    ("pad-edge-rank4", *_pad((1, 2, 2, 3), (1, 0, 1, 4, 0, 1, 2, 0), "edge")),
    ("pad-edge-rank4-trailing", *_pad((1, 2, 2, 3), (0, 0, 1, 4, 0, 1, 2, 0), "edge")),
]
IDS = [case[0] for case in CASES]


# --- first-order gradients, float32 --------------------------------------------------------
@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_gradients_match_centered_differences(case_id, op, inputs, attrs, wrt):
    spec, feeds = support.op_graph(op, inputs, attrs)
    support.check_grads(spec, feeds, wrt, tol=1e-6)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_float32_keeps_dtype(case_id, op, inputs, attrs, wrt):
    result, expected = support.run_float32(op, inputs, attrs, wrt)
    np.testing.assert_allclose(result.outputs["out"], expected, rtol=1e-5, atol=1e-6)
    reference = support.ENGINE.run(
        RunRequest(*support.op_graph(op, inputs, attrs), wrt=tuple(wrt), loss="loss")
    ).grads
    for name in wrt:
        np.testing.assert_allclose(result.grads[name], reference[name], rtol=1e-5, atol=1e-5)


# --- second order: differentiate the joint graph again -------------------------------------
SECOND_ORDER = [
    "nearest-up-fraction",
    "nearest-up-down",
    "bilinear-up-fraction",
    "bilinear-down-ac",
    "bilinear-up-down",
    "pad-constant-rank3",
    "pad-reflect-rank3",
    "pad-edge-rank2",
]


@pytest.mark.parametrize(
    "case_id, op, inputs, attrs, wrt",
    [c for c in CASES if c[0] in SECOND_ORDER],
    ids=[c[0] for c in CASES if c[0] in SECOND_ORDER],
)
def test_second_order_hessian_vector_products(case_id, op, inputs, attrs, wrt):
    support.check_hvp(op, inputs, attrs, wrt, seed=11)


# --- against torch.nn.functional and numpy.pad ----------------------------------------------
TORCH_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


def _torch_pad(torch, t, pads, mode, value):
    """F.pad of t with ONNX-order pads, or None where torch has no such padding. torch
    lists (begin, end) pairs from the last axis backwards; reflect and replicate pad
    only the last 1 to 3 axes after 1 or 2 leading ones, so the untouched leading axes
    are folded into one batch axis and restored afterwards."""
    rank = t.ndim
    pairs = list(zip(pads[:rank], pads[rank:]))
    if mode == "constant":
        flat = [p for pair in reversed(pairs) for p in pair]
        return torch.nn.functional.pad(t, flat, mode="constant", value=value)
    padded = [a for a, pair in enumerate(pairs) if any(pair)]
    first = padded[0] if padded else rank
    if rank - first > 3:
        return None
    lead, tail = t.shape[:first], t.shape[first:]
    flat = [p for pair in reversed(pairs[first:]) for p in pair]
    out = torch.nn.functional.pad(
        t.reshape((math.prod(lead),) + tuple(tail)), flat, mode=TORCH_PAD_MODES[mode]
    )
    return out.reshape(tuple(lead) + tuple(out.shape[1:]))


def _torch_call(torch, op, t, attrs):
    F = torch.nn.functional
    if op == "pad":
        mode, value = attrs.get("mode", "constant"), attrs.get("value", 0.0)
        return _torch_pad(torch, t["x"], attrs["pads"], mode, value)
    mode = "nearest" if op == "upsample_nearest2d" else "bilinear"
    extra = {} if mode == "nearest" else {"align_corners": attrs.get("align_corners", False)}
    return F.interpolate(t["x"], size=attrs["size"], mode=mode, **extra)


def _numpy_pad(x, attrs):
    rank, pads, mode = x.ndim, attrs["pads"], attrs.get("mode", "constant")
    widths = list(zip(pads[:rank], pads[rank:]))
    if mode == "constant":
        return np.pad(x, widths, constant_values=attrs.get("value", 0.0))
    return np.pad(x, widths, mode=mode)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_matches_torch(case_id, op, inputs, attrs, wrt):
    torch = pytest.importorskip("torch")
    spec, feeds = support.op_graph(op, inputs, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=tuple(wrt), loss="loss"))
    tensors = {k: torch.tensor(a, requires_grad=k in wrt) for k, a in inputs.items()}
    expected = _torch_call(torch, op, tensors, attrs)
    if expected is None:  # a padding torch cannot express: numpy.pad's forward instead
        assert op == "pad" and attrs["mode"] in ("reflect", "edge")
        np.testing.assert_array_equal(result.outputs["out"], _numpy_pad(inputs["x"], attrs))
        return
    (expected * torch.tensor(feeds["__weight"])).sum().backward()
    assert support.rel(result.outputs["out"], expected.detach().numpy()) <= 1e-9
    for name in wrt:
        assert support.rel(result.grads[name], tensors[name].grad.numpy()) <= 1e-9, name


def test_torch_cannot_express_only_the_rank4_reflect_and_edge_cases():
    torch = pytest.importorskip("torch")
    missing = [
        c[0]
        for c in CASES
        if c[1] == "pad" and _torch_call(torch, "pad", {"x": torch.tensor(c[2]["x"])}, c[3]) is None
    ]
    assert missing == ["pad-reflect-rank4", "pad-edge-rank4"]


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", [c for c in CASES if c[1] == "pad"])
def test_pad_matches_numpy_pad(case_id, op, inputs, attrs, wrt):
    np.testing.assert_array_equal(support.run_op(op, inputs, attrs), _numpy_pad(inputs["x"], attrs))


# --- torch's conventions -------------------------------------------------------------------
# (in, out) pairs where floor(dst * in / out) in exact arithmetic and torch's float32
# evaluation disagree (2 -> 82 reads row 0 at dst 41, not 1), and ordinary ratios.
NEAREST_SIZES = [(5, 7), (7, 3), (3, 7), (2, 82), (6, 74), (3, 123), (14, 46), (1, 4), (4, 8)]


@pytest.mark.parametrize("n_in, n_out", NEAREST_SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nearest_source_rows_follow_torch(n_in, n_out, dtype):
    """Forward rows and backward sums equal torch's on both axes, in both dtypes."""
    torch = pytest.importorskip("torch")
    for shape, size in (((1, 1, 2, n_in), (2, n_out)), ((1, 1, n_in, 2), (n_out, 2))):
        x = np.arange(math.prod(shape), dtype=dtype).reshape(shape)
        spec, feeds = support.op_graph("upsample_nearest2d", {"x": x}, {"size": size})
        result = support.ENGINE.run(RunRequest(spec, feeds, wrt=("x",), loss="loss"))
        t = torch.tensor(x, requires_grad=True)
        expected = torch.nn.functional.interpolate(t, size=size, mode="nearest")
        (expected * torch.tensor(feeds["__weight"])).sum().backward()
        np.testing.assert_array_equal(result.outputs["out"], expected.detach().numpy())
        np.testing.assert_allclose(result.grads["x"], t.grad.numpy(), rtol=1e-6)
    if (n_in, n_out) == (2, 82):
        assert result.outputs["out"][0, 0, 41, 0] == 0  # torch's float32 rounding


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [(3, 4), (5, 7), (2, 3), (6, 2), (1, 9)])
def test_bilinear_non_finite_samples_spread_like_torch(size, align_corners):
    """Both taps are always read, even at weight 0: 0 * inf makes NaN where torch's does
    (same-size resizes included)."""
    torch = pytest.importorskip("torch")
    x = normal(1, 1, 3, 4)
    x[0, 0, 1, 1], x[0, 0, 2, 3] = np.inf, -np.inf
    attrs = {"size": size, "align_corners": align_corners}
    out = support.run_op("upsample_bilinear2d", {"x": x}, attrs)
    expected = torch.nn.functional.interpolate(
        torch.tensor(x), size=size, mode="bilinear", align_corners=align_corners
    ).numpy()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isinf(out), np.isinf(expected))
    assert support.rel(out[finite], expected[finite]) <= 1e-12


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(
    "hw, size", [((13, 37), (29, 51)), ((37, 13), (51, 5)), ((3, 17), (7, 200))]
)
def test_bilinear_float32_rounds_like_torch(hw, size, align_corners):
    """float32 source coordinates as torch's kernel computes them (a fused multiply-add):
    within a few float32 ulps of torch, not merely of the float64 result."""
    torch = pytest.importorskip("torch")
    x = normal(1, 2, *hw).astype(np.float32)
    attrs = {"size": size, "align_corners": align_corners}
    out = support.run_op("upsample_bilinear2d", {"x": x}, attrs)
    expected = torch.nn.functional.interpolate(
        torch.tensor(x), size=size, mode="bilinear", align_corners=align_corners
    ).numpy()
    assert out.dtype == np.float32
    assert support.rel(out, expected) <= 4e-7


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_pad_adjoint_identity(mode):
    """<pad(x), y> = <x, pad^T(y)>: the VJP adds every copied row back onto its source."""
    x = normal(2, 3, 4)
    attrs = {"pads": (1, 2, 3, 1, 0, 2), "mode": mode}
    spec, feeds = support.op_graph("pad", {"x": x}, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=("x",), loss="loss"))
    assert np.isclose(
        np.sum(result.outputs["out"] * feeds["__weight"]), np.sum(x * result.grads["x"])
    )


def test_pad_int_input_and_constant_value():
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = support.run_op("pad", {"x": x}, {"pads": (1, 0, 0, 1), "value": -3.0})
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[-3, -3, -3, -3], [0, 1, 2, -3], [3, 4, 5, -3]])
    labels = support.run_op("upsample_nearest2d", {"x": x.reshape(1, 1, 2, 3)}, {"size": (4, 2)})
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels[0, 0], [[0, 1], [0, 1], [3, 4], [3, 4]])


def test_workspace_is_the_smaller_intermediate():
    """The first axis pass is chosen to leave the smaller intermediate: H_out * W or
    H * W_out elements per image, whose product is in * out, so the smaller never exceeds
    max(input, output) and needs no limit of its own beyond theirs."""
    from remat_server.graph.ir import TensorType
    from remat_server.ops import resize

    assert resize._intermediate(TensorType((1, 2, 40, 2), "float64"), (2, 40)) == (1, 2, 2, 2)
    assert resize._intermediate(TensorType((1, 2, 2, 40), "float64"), (40, 2)) == (1, 2, 2, 2)
    for h, w, ho, wo in itertools.product((1, 3, 40), repeat=4):
        held = math.prod(resize._intermediate(TensorType((1, 1, h, w), "float64"), (ho, wo)))
        assert held == min(ho * w, h * wo) <= max(h * w, ho * wo)
    engine = Engine(Limits(max_elements=300))  # input 300, output 90: the 900 order is not used
    for op in ("upsample_nearest2d", "upsample_bilinear2d"):
        spec, feeds = support.op_graph(op, {"x": normal(1, 1, 30, 10)}, {"size": (3, 30)})
        out = engine.run(RunRequest(spec, feeds, wrt=("x",), loss="loss"))
        assert out.grads["x"].shape == (1, 1, 30, 10)


# --- validation ----------------------------------------------------------------------------
X4 = normal(1, 2, 3, 3)
BAD = [
    ("upsample_nearest2d", {"x": normal(2, 3, 3)}, {"size": (4, 4)}, "4-D"),
    ("upsample_nearest2d", {"x": X4}, {"size": (0, 4)}, "each > 0"),
    ("upsample_nearest2d", {"x": X4}, {"size": (4,)}, "2 ints"),
    ("upsample_nearest2d", {"x": X4}, {}, "missing required attribute 'size'"),
    ("upsample_nearest2d", {"x": normal(1, 2, 0, 3)}, {"size": (4, 4)}, "empty spatial"),
    ("upsample_bilinear2d", {"x": X4.astype(np.int64)}, {"size": (4, 4)}, "dtype"),
    ("upsample_bilinear2d", {"x": X4}, {"size": (4, -1)}, "each > 0"),
    ("pad", {"x": normal(2, 3)}, {"pads": (1, 1)}, "needs 4"),
    ("pad", {"x": normal(2, 3)}, {"pads": (1, -1, 0, 0)}, ">= 0"),
    ("pad", {"x": normal(2, 3)}, {"pads": (1, 1, 0, 0), "mode": "wrap"}, '"constant"'),
    ("pad", {"x": normal(2, 3)}, {"pads": (0, 3, 0, 0), "mode": "reflect"}, "smaller than"),
    ("pad", {"x": normal(2, 3)}, {"pads": (2, 0, 0, 0), "mode": "reflect"}, "axis 0"),
    ("pad", {"x": normal(0, 3)}, {"pads": (1, 0, 0, 0), "mode": "edge"}, "empty"),
    (
        "pad",
        {"x": np.zeros((2, 3), dtype=np.int64)},
        {"pads": (1, 0, 0, 0), "value": 0.5},
        "not an integer",
    ),
]


@pytest.mark.parametrize("op, inputs, attrs, message", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_invalid_graphs_are_rejected_naming_the_node(op, inputs, attrs, message):
    with pytest.raises(InvalidArgument, match="node 'out'") as info:
        support.run_op(op, inputs, attrs)
    assert message in str(info.value)


def test_reflect_pad_of_size_minus_one_and_constant_pad_of_empty_axes_are_allowed():
    x = normal(3, 2)
    out = support.run_op("pad", {"x": x}, {"pads": (2, 1, 1, 0), "mode": "reflect"})
    np.testing.assert_array_equal(out, np.pad(x, ((2, 1), (1, 0)), mode="reflect"))
    empty = support.run_op("pad", {"x": normal(0, 2)}, {"pads": (1, 0, 0, 1), "value": 7.0})
    np.testing.assert_array_equal(empty, np.full((1, 3), 7.0))


# --- SDK -----------------------------------------------------------------------------------
def test_sdk_wrappers():
    import remat

    g = remat.Graph()
    x = g.input("x", (1, 2, 3, 3))
    near = remat.ops.upsample_nearest2d(x, 6, name="near")
    bil = remat.ops.upsample_bilinear2d(x, (5, 4), True, name="bil")
    padded = remat.ops.pad(x, [0, 0, 1, 2, 0, 0, 2, 1], "edge", name="padded")
    filled = remat.ops.pad(x, (0, 0, 1, 1, 0, 0, 1, 1), value=3, name="filled")
    nodes = {n.name: n for n in g.nodes}
    assert nodes[near.name].attrs == {"size": (6, 6)}
    assert nodes[bil.name].attrs == {"size": (5, 4), "align_corners": True}
    assert dict(nodes[padded.name].attrs) == {
        "pads": (0, 0, 1, 2, 0, 0, 2, 1),
        "mode": "edge",
        "value": 0.0,
    }
    assert nodes[filled.name].attrs["value"] == 3.0
