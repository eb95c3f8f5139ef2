"""conv family: conv2d with groups and bias, conv_transpose2d. Gradients against centered
differences (first and second order), float32, forward and gradients against
torch.nn.functional in float64, the adjoint identity, and validation."""

from __future__ import annotations

import numpy as np
import pytest
import support

from remat_server.engine import Engine, RunRequest
from remat_server.errors import InvalidArgument
from remat_server.graph.limits import Limits
from remat_server.ops import windows


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _conv(x, w, b=None):
    return {"x": x, "w": w, **({} if b is None else {"b": b})}


# (id, op, inputs, attrs, wrt). Every float input is <= ~60 elements.
CASES = [
    (
        "conv2d-bias",
        "conv2d",
        _conv(normal(1, 2, 4, 4), normal(3, 2, 2, 2, seed=1), normal(3, seed=2)),
        {"padding": (1, 0)},
        ["x", "w", "b"],
    ),
    (
        "conv2d-groups2-bias",
        "conv2d",
        _conv(normal(1, 4, 4, 3), normal(4, 2, 2, 2, seed=1), normal(4, seed=2)),
        {"groups": 2, "stride": (2, 1), "padding": (1, 1)},
        ["x", "w", "b"],
    ),
    (
        "conv2d-groups3-dilation-asym",
        "conv2d",
        _conv(normal(1, 6, 3, 3), normal(3, 2, 2, 3, seed=1)),
        {"groups": 3, "padding": (1, 1), "dilation": (2, 1)},
        ["x", "w"],
    ),
    (
        "conv2d-depthwise",
        "conv2d",
        _conv(normal(1, 3, 5, 4), normal(3, 1, 3, 3, seed=1), normal(3, seed=2)),
        {"groups": 3, "stride": (2, 1), "padding": (1, 1)},
        ["x", "w", "b"],
    ),
    (
        "conv2d-depthwise-multiplier",
        "conv2d",
        _conv(normal(1, 2, 4, 4), normal(4, 1, 2, 2, seed=1)),
        {"groups": 2, "padding": (0, 1), "dilation": (1, 2)},
        ["x", "w"],
    ),
    (
        "conv2d-depthwise-batch",
        "conv2d",
        _conv(normal(2, 2, 3, 3), normal(2, 1, 2, 2, seed=1), normal(2, seed=2)),
        {"groups": 2},
        ["x", "w", "b"],
    ),
    (
        "conv_transpose2d-plain",
        "conv_transpose2d",
        _conv(normal(1, 2, 3, 3), normal(2, 3, 2, 2, seed=1)),
        {},
        ["x", "w"],
    ),
    (
        "conv_transpose2d-stride-pad-bias",
        "conv_transpose2d",
        _conv(normal(1, 2, 3, 3), normal(2, 2, 3, 3, seed=1), normal(2, seed=2)),
        {"stride": (2, 2), "padding": (1, 1)},
        ["x", "w", "b"],
    ),
    (
        # output_padding beyond padding on axis 1: zero columns past the canvas.
        "conv_transpose2d-output-padding-asym",
        "conv_transpose2d",
        _conv(normal(1, 2, 3, 2), normal(2, 2, 3, 2, seed=1)),
        {"stride": (2, 3), "padding": (1, 0), "output_padding": (1, 2)},
        ["x", "w"],
    ),
    (
        # output_padding >= stride (allowed since < dilation): g has extra windows.
        "conv_transpose2d-dilation-output-padding",
        "conv_transpose2d",
        _conv(normal(1, 2, 3, 3), normal(2, 2, 2, 2, seed=1), normal(2, seed=2)),
        {"dilation": (2, 3), "padding": (1, 0), "output_padding": (1, 2)},
        ["x", "w", "b"],
    ),
    (
        "conv_transpose2d-groups-bias",
        "conv_transpose2d",
        _conv(normal(1, 4, 3, 3), normal(4, 2, 2, 2, seed=1), normal(4, seed=2)),
        {"groups": 2, "stride": (2, 1)},
        ["x", "w", "b"],
    ),
    (
        "conv_transpose2d-depthwise",
        "conv_transpose2d",
        _conv(normal(2, 3, 2, 3), normal(3, 1, 3, 2, seed=1), normal(3, seed=2)),
        {"groups": 3, "stride": (2, 2), "padding": (1, 0), "output_padding": (1, 1)},
        ["x", "w", "b"],
    ),
    (
        "conv_transpose2d-one-channel-asym-kernel",
        "conv_transpose2d",
        _conv(normal(1, 1, 3, 4), normal(1, 2, 3, 1, seed=1)),
        {"stride": (1, 2), "padding": (1, 0), "dilation": (2, 1)},
        ["x", "w"],
    ),
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
    np.testing.assert_allclose(result.outputs["out"], expected, rtol=1e-4, atol=1e-5)
    reference = support.ENGINE.run(
        RunRequest(*support.op_graph(op, inputs, attrs), wrt=tuple(wrt), loss="loss")
    ).grads
    for name in wrt:
        np.testing.assert_allclose(result.grads[name], reference[name], rtol=1e-4, atol=1e-4)


# --- second order: differentiate the joint graph again -------------------------------------
SECOND_ORDER = [
    "conv2d-groups2-bias",
    "conv2d-depthwise",
    "conv_transpose2d-stride-pad-bias",
    "conv_transpose2d-dilation-output-padding",
    "conv_transpose2d-groups-bias",
    "conv_transpose2d-depthwise",
]


@pytest.mark.parametrize(
    "case_id, op, inputs, attrs, wrt",
    [c for c in CASES if c[0] in SECOND_ORDER],
    ids=[c[0] for c in CASES if c[0] in SECOND_ORDER],
)
def test_second_order_hessian_vector_products(case_id, op, inputs, attrs, wrt):
    support.check_hvp(op, inputs, attrs, wrt, seed=11)


# --- against torch.nn.functional -----------------------------------------------------------
def _torch_call(torch, op, t, attrs):
    F = torch.nn.functional
    common = {
        "stride": attrs.get("stride", 1),
        "padding": attrs.get("padding", 0),
        "dilation": attrs.get("dilation", 1),
        "groups": attrs.get("groups", 1),
    }
    if op == "conv2d":
        return F.conv2d(t["x"], t["w"], t.get("b"), **common)
    output_padding = attrs.get("output_padding", 0)
    return F.conv_transpose2d(t["x"], t["w"], t.get("b"), output_padding=output_padding, **common)


def _against_torch(op, inputs, attrs, wrt):
    torch = pytest.importorskip("torch")
    spec, feeds = support.op_graph(op, inputs, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=tuple(wrt), loss="loss"))
    tensors = {k: torch.tensor(a, requires_grad=k in wrt) for k, a in inputs.items()}
    expected = _torch_call(torch, op, tensors, attrs)
    (expected * torch.tensor(feeds["__weight"])).sum().backward()
    assert support.rel(result.outputs["out"], expected.detach().numpy()) <= 1e-9
    for name in wrt:
        assert support.rel(result.grads[name], tensors[name].grad.numpy()) <= 1e-9, name


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_matches_torch(case_id, op, inputs, attrs, wrt):
    _against_torch(op, inputs, attrs, wrt)


@pytest.mark.parametrize(
    "op, x, w, attrs",
    [
        ("conv2d", (2, 8, 9, 7), (8, 1, 3, 3), {"groups": 8, "stride": (2, 2), "padding": (1, 1)}),
        ("conv2d", (3, 4, 6, 6), (8, 1, 3, 2), {"groups": 4, "dilation": (2, 1)}),
        (
            "conv_transpose2d",
            (3, 4, 5, 4),
            (4, 2, 3, 3),
            {"groups": 4, "stride": (2, 2), "padding": (1, 1), "output_padding": (1, 0)},
        ),
    ],
    ids=["depthwise", "depthwise-multiplier", "transposed-depthwise"],
)
def test_depthwise_tap_loops_over_several_batch_chunks(monkeypatch, op, x, w, attrs):
    monkeypatch.setattr(windows, "_CHUNK_ELEMENTS", 64)  # one image per chunk
    out_channels = w[0] if op == "conv2d" else w[1] * attrs["groups"]
    inputs = _conv(normal(*x), normal(*w, seed=1), normal(out_channels, seed=2))
    _against_torch(op, inputs, attrs, ["x", "w", "b"])


def test_output_padding_equal_to_stride_is_allowed_below_dilation():
    """torch's rule is output_padding < max(stride, dilation), per axis."""
    inputs = _conv(normal(1, 1, 2, 2), normal(1, 1, 2, 2, seed=1))
    _against_torch(
        "conv_transpose2d", inputs, {"dilation": (3, 2), "output_padding": (2, 1)}, ["x", "w"]
    )


# --- structure ---------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_vjp_is_two_native_gradient_ops(groups):
    """dx is conv_transpose2d, dw is conv2d_weight_grad, for every groups value: no
    im2col column matrix (kh*kw times the input) enters the backward graph."""
    x, w, b = normal(2, 4, 6, 5), normal(4, 4 // groups, 3, 2, seed=1), normal(4, seed=2)
    attrs = {"stride": (2, 1), "padding": (1, 1), "dilation": (1, 2), "groups": groups}
    spec, _ = support.op_graph("conv2d", {"x": x, "w": w, "b": b}, attrs)
    joint = support.ENGINE.differentiate(spec, wrt=("x", "w", "b"), loss="loss").graph
    emitted = sorted(n.op for n in joint if n.name.startswith("bwd/out/"))
    assert emitted == ["conv2d_weight_grad", "conv_transpose2d", "sum"]


@pytest.mark.parametrize(
    "attrs",
    [
        {"stride": (2, 2), "padding": (1, 0), "groups": 2},
        {"stride": (3, 2), "dilation": (1, 2), "padding": (2, 1), "groups": 1},
        {"stride": (1, 1), "groups": 4},
    ],
)
def test_conv_transpose2d_is_the_adjoint_of_conv2d(attrs):
    """<conv2d(x, w), y> == <x, conv_transpose2d(y, w)>, output_padding restoring x's size."""
    x, w = normal(2, 4, 7, 6), normal(4, 4 // attrs["groups"], 3, 2, seed=1)
    y = support.run_op("conv2d", {"x": x, "w": w}, attrs)
    dual = normal(*y.shape, seed=3)
    kernel, stride = (3, 2), attrs["stride"]
    padding, dilation = attrs.get("padding", (0, 0)), attrs.get("dilation", (1, 1))
    extra = tuple(
        (n + 2 * p - d * (k - 1) - 1) % s
        for n, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation)
    )
    back = support.run_op(
        "conv_transpose2d", {"y": dual, "w": w}, {**attrs, "output_padding": extra}
    )
    assert back.shape == x.shape
    assert np.isclose(np.sum(y * dual), np.sum(x * back), rtol=1e-12)


def test_workspace_counts_the_largest_temporary():
    """A temporary is a tensor too: conv2d's and conv_transpose2d's tap columns are held
    to the per-tensor limit even when the result is small."""
    engine = Engine(Limits(max_elements=500))
    cases = [
        # A block of the 64 tap rows over the 33 grid columns the 3 x 3 windows span.
        ("conv2d", _conv(normal(1, 1, 10, 10), normal(1, 1, 8, 8)), {}),
        # A block of the 64 tap rows over the 163 grid columns of the 10 x 10 input.
        ("conv_transpose2d", _conv(normal(1, 2, 10, 10), normal(2, 1, 8, 8)), {}),
    ]
    for op, inputs, attrs in cases:
        spec, feeds = support.op_graph(op, inputs, attrs)
        with pytest.raises(InvalidArgument, match=r"node 'out'.*temporary.*500 elements"):
            engine.run(RunRequest(spec, feeds))


# --- validation ----------------------------------------------------------------------------
X4 = normal(1, 4, 4, 4)
BAD = [
    ("conv2d", _conv(X4, normal(3, 2, 2, 2)), {"groups": 2}, "must divide the output channels"),
    ("conv2d", _conv(normal(1, 3, 4, 4), normal(2, 1, 2, 2)), {"groups": 2}, "input channels"),
    ("conv2d", _conv(X4, normal(4, 4, 2, 2)), {"groups": 2}, "expects 8 input channels"),
    ("conv2d", _conv(X4, normal(4, 1, 2, 2)), {"groups": 0}, "must be >= 1"),
    ("conv2d", _conv(X4, normal(2, 4, 2, 2), normal(3)), {}, "bias must have shape (2,)"),
    ("conv2d", _conv(X4, normal(2, 4, 2, 2), normal(2, 1)), {}, "bias must have shape"),
    (
        "conv2d",
        _conv(X4, normal(2, 4, 2, 2), normal(2).astype(np.float32)),
        {},
        "dtype mismatch",
    ),
    (
        "conv_transpose2d",
        _conv(normal(1, 3, 3, 3), normal(3, 1, 2, 2)),
        {"groups": 2},
        "must divide the input channels",
    ),
    ("conv_transpose2d", _conv(X4, normal(2, 1, 2, 2)), {}, "input channels"),
    ("conv_transpose2d", _conv(X4, normal(4, 1, 2)), {}, "4-D"),
    (
        "conv_transpose2d",
        _conv(X4, normal(4, 1, 2, 2)),
        {"stride": (2, 2), "output_padding": (2, 0)},
        "output padding must be smaller than either stride or dilation",
    ),
    (
        "conv_transpose2d",
        _conv(X4, normal(4, 1, 2, 2)),
        {"output_padding": (0, 1)},
        "output padding must be smaller than either stride or dilation",
    ),
    ("conv_transpose2d", _conv(X4, normal(4, 1, 2, 2)), {"output_padding": (-1, 0)}, ">= 0"),
    ("conv_transpose2d", _conv(X4, normal(4, 1, 1, 1)), {"padding": (2, 0)}, "output size"),
    ("conv_transpose2d", _conv(X4, normal(4, 1, 2, 2), normal(4)), {}, "bias must have shape"),
]


@pytest.mark.parametrize("op, inputs, attrs, message", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_invalid_graphs_are_rejected_naming_the_node(op, inputs, attrs, message):
    with pytest.raises(InvalidArgument, match="node 'out'") as info:
        support.run_op(op, inputs, attrs)
    assert message in str(info.value)


# --- SDK -----------------------------------------------------------------------------------
def test_sdk_wrappers_follow_torch_argument_order():
    import remat

    g = remat.Graph()
    x, w, b = g.input("x", (1, 4, 5, 5)), g.input("w", (4, 2, 3, 3)), g.input("b", (4,))
    plain = remat.ops.conv2d(x, g.input("w1", (4, 4, 3, 3)), padding=1, name="plain")
    grouped = remat.ops.conv2d(x, w, b, 2, 1, 1, 2, name="grouped")
    up = remat.ops.conv_transpose2d(x, w, None, 2, 1, 1, groups=2, name="up")
    nodes = {n.name: n for n in g.nodes}
    assert nodes[plain.name].inputs == ("x", "w1")
    assert "groups" not in nodes[plain.name].attrs  # ungrouped graphs are unchanged
    assert nodes[grouped.name].inputs == ("x", "w", "b")
    assert nodes[grouped.name].attrs["groups"] == 2
    assert nodes[grouped.name].attrs["stride"] == (2, 2)
    assert nodes[up.name].attrs == {
        "stride": (2, 2),
        "padding": (1, 1),
        "output_padding": (1, 1),
        "dilation": (1, 1),
        "groups": 2,
    }
