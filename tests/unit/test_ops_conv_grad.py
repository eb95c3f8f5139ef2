"""Gradient ops of the conv family (conv2d_weight_grad, max_pool2d_grad, max_pool2d_gather,
avg_pool2d_grad): gradients against centered differences (first and second order), float32,
values and gradients against torch.autograd in float64, validation, and the leanness they
exist for: no backward value of a conv or pooling op is bigger than that op's largest input
or output, first and second order."""

from __future__ import annotations

import numpy as np
import pytest
import support

from remat_server.engine import RunRequest
from remat_server.errors import InvalidArgument
from remat_server.graph.ir import GraphSpec, InputSpec, NodeSpec
from remat_server.ops import conv_taps


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _wg(x, g):
    return {"x": normal(*x), "g": normal(*g, seed=1)}


MAX_OVERLAP = {"kernel": (3, 3), "stride": (2, 1), "padding": (1, 1)}
MAX_DILATED = {"kernel": (2, 2), "stride": (1, 2), "dilation": (2, 2)}
AVG_EXCLUDE = {"kernel": (3, 2), "stride": (2, 2), "padding": (1, 1), "count_include_pad": False}

# (id, op, inputs, attrs, wrt). Every float input is <= ~60 elements.
CASES = [
    (
        "weight_grad-plain",
        "conv2d_weight_grad",
        _wg((1, 2, 4, 4), (1, 3, 3, 3)),
        {"kernel": (2, 2)},
        ["x", "g"],
    ),
    (
        "weight_grad-stride-pad-dilation",
        "conv2d_weight_grad",
        _wg((1, 2, 5, 5), (1, 2, 3, 3)),
        {"kernel": (2, 3), "stride": (2, 1), "padding": (1, 1), "dilation": (1, 2)},
        ["x", "g"],
    ),
    (
        "weight_grad-groups",
        "conv2d_weight_grad",
        _wg((1, 4, 4, 3), (1, 4, 3, 4)),
        {"kernel": (2, 2), "stride": (2, 1), "padding": (1, 1), "groups": 2},
        ["x", "g"],
    ),
    (
        "weight_grad-depthwise-multiplier-batch",
        "conv2d_weight_grad",
        _wg((2, 2, 3, 3), (2, 4, 2, 2)),
        {"kernel": (2, 2), "groups": 2},
        ["x", "g"],
    ),
    (
        "max_grad-overlap-pad",
        "max_pool2d_grad",
        _wg((1, 2, 5, 5), (1, 2, 3, 5)),
        MAX_OVERLAP,
        ["x", "g"],
    ),
    (
        "max_grad-dilation",
        "max_pool2d_grad",
        _wg((2, 1, 5, 5), (2, 1, 3, 2)),
        MAX_DILATED,
        ["x", "g"],
    ),
    (
        "max_grad-default-stride",
        "max_pool2d_grad",
        _wg((1, 2, 4, 6), (1, 2, 2, 3)),
        {"kernel": (2, 2)},
        ["g"],
    ),
    (
        "max_gather-overlap-pad",
        "max_pool2d_gather",
        {"x": normal(1, 2, 5, 5), "v": normal(1, 2, 5, 5, seed=1)},
        MAX_OVERLAP,
        ["x", "v"],
    ),
    (
        "max_gather-dilation",
        "max_pool2d_gather",
        {"x": normal(2, 1, 5, 5), "v": normal(2, 1, 5, 5, seed=1)},
        MAX_DILATED,
        ["v"],
    ),
    (
        "avg_grad-default-stride",
        "avg_pool2d_grad",
        {"g": normal(1, 2, 2, 2)},
        {"kernel": (2, 3), "output_size": (4, 6)},
        ["g"],
    ),
    (
        "avg_grad-exclude-pad",
        "avg_pool2d_grad",
        {"g": normal(1, 2, 3, 3)},
        {**AVG_EXCLUDE, "output_size": (5, 5)},
        ["g"],
    ),
    (
        # Stride past the kernel: rows and columns no window reads get zero gradient.
        "avg_grad-gaps",
        "avg_pool2d_grad",
        {"g": normal(2, 1, 2, 2)},
        {"kernel": (2, 2), "stride": (3, 3), "output_size": (6, 5)},
        ["g"],
    ),
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_gradients_match_centered_differences(case_id, op, inputs, attrs, wrt):
    spec, feeds = support.op_graph(op, inputs, attrs)
    support.check_grads(spec, feeds, wrt, tol=1e-6)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_float32_keeps_dtype(case_id, op, inputs, attrs, wrt):
    result, expected = support.run_float32(op, inputs, attrs, wrt)
    np.testing.assert_allclose(result.outputs["out"], expected, rtol=1e-4, atol=1e-5)


SECOND_ORDER = [
    "weight_grad-stride-pad-dilation",
    "weight_grad-groups",
    "weight_grad-depthwise-multiplier-batch",
    "max_grad-overlap-pad",
    "max_gather-overlap-pad",
    "avg_grad-exclude-pad",
]


@pytest.mark.parametrize(
    "case_id, op, inputs, attrs, wrt",
    [c for c in CASES if c[0] in SECOND_ORDER],
    ids=[c[0] for c in CASES if c[0] in SECOND_ORDER],
)
def test_second_order_hessian_vector_products(case_id, op, inputs, attrs, wrt):
    support.check_hvp(op, inputs, attrs, wrt, seed=11)


# --- against torch.autograd ----------------------------------------------------------------
def _torch_value(torch, op, t, attrs):
    """The op's value as torch computes it (a gradient of the torch forward op), built with
    create_graph so it can be differentiated in turn."""
    F = torch.nn.functional
    kernel, stride = attrs["kernel"], attrs.get("stride", attrs["kernel"])
    padding, dilation = attrs.get("padding", (0, 0)), attrs.get("dilation", (1, 1))
    if op == "conv2d_weight_grad":
        groups = attrs.get("groups", 1)
        w = torch.zeros(
            (t["g"].shape[1], t["x"].shape[1] // groups) + tuple(kernel),
            dtype=torch.float64,
            requires_grad=True,
        )
        y = F.conv2d(t["x"], w, None, attrs.get("stride", 1), padding, dilation, groups)
        return torch.autograd.grad(y, w, t["g"], create_graph=True)[0]
    if op == "max_pool2d_grad":
        x = t["x"].detach().requires_grad_(True)
        y = F.max_pool2d(x, kernel, stride, padding, dilation)
        return torch.autograd.grad(y, x, t["g"], create_graph=True)[0]
    if op == "max_pool2d_gather":
        _, index = F.max_pool2d(t["x"], kernel, stride, padding, dilation, return_indices=True)
        return t["v"].flatten(2).gather(2, index.flatten(2)).view_as(index)
    x = torch.zeros(t["g"].shape[:2] + tuple(attrs["output_size"]), dtype=torch.float64)
    x.requires_grad_(True)
    include = attrs.get("count_include_pad", True)
    y = F.avg_pool2d(x, kernel, stride, padding, count_include_pad=include)
    return torch.autograd.grad(y, x, t["g"], create_graph=True)[0]


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_matches_torch_autograd(case_id, op, inputs, attrs, wrt):
    torch = pytest.importorskip("torch")
    spec, feeds = support.op_graph(op, inputs, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=tuple(wrt), loss="loss"))
    tensors = {k: torch.tensor(a, requires_grad=True) for k, a in inputs.items()}
    expected = _torch_value(torch, op, tensors, attrs)
    (expected * torch.tensor(feeds["__weight"])).sum().backward()
    assert support.rel(result.outputs["out"], expected.detach().numpy()) <= 1e-9
    for name in wrt:
        grad = tensors[name].grad
        reference = np.zeros(inputs[name].shape) if grad is None else grad.numpy()
        assert support.rel(result.grads[name], reference) <= 1e-9, name


def test_max_pool2d_grad_gives_ties_to_the_first_maximum_like_torch():
    torch = pytest.importorskip("torch")
    x = np.array([[[[1.0, 3.0, 3.0], [3.0, 2.0, 3.0], [0.0, 3.0, 1.0]]]])
    g = normal(1, 1, 2, 2)
    attrs = {"kernel": (2, 2), "stride": (1, 1)}
    got = support.run_op("max_pool2d_grad", {"x": x, "g": g}, attrs)
    t = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(t, 2, 1).backward(torch.tensor(g))
    np.testing.assert_array_equal(got, t.grad.numpy())
    # Gathering the positions themselves reads back torch's argmax indices.
    positions = np.arange(9.0).reshape(x.shape)
    index = support.run_op("max_pool2d_gather", {"x": x, "v": positions}, attrs)
    _, expected = torch.nn.functional.max_pool2d(torch.tensor(x), 2, 1, return_indices=True)
    np.testing.assert_array_equal(index, expected.numpy())


def test_max_pool2d_nan_windows_give_the_gradient_to_their_last_nan_like_torch():
    """torch's CPU kernel updates its argmax on `val > max || isnan(val)`."""
    torch = pytest.importorskip("torch")
    x = np.array([[[[1.0, np.nan, 3.0, np.nan, 0.0, 1.0], [np.nan, 2.0, 0.0, 1.0, 2.0, 2.0]]]])
    g = np.array([[[[5.0, 7.0, 11.0]]]])
    got = support.run_op("max_pool2d_grad", {"x": x, "g": g}, {"kernel": (2, 2)})
    t = torch.tensor(x, requires_grad=True)
    pooled, index = torch.nn.functional.max_pool2d(t, 2, return_indices=True)
    pooled.backward(torch.tensor(g))
    np.testing.assert_array_equal(got, t.grad.numpy())
    positions = np.arange(12.0).reshape(x.shape)
    gathered = support.run_op("max_pool2d_gather", {"x": x, "v": positions}, {"kernel": (2, 2)})
    np.testing.assert_array_equal(gathered, index.numpy())


@pytest.mark.parametrize(
    "op, x, w, attrs",
    [
        ("conv2d", (2, 3, 7, 6), (4, 3, 3, 2), {"stride": (2, 1), "padding": (1, 1)}),
        ("conv2d", (2, 4, 6, 6), (6, 2, 2, 3), {"groups": 2, "dilation": (2, 1)}),
        ("conv_transpose2d", (2, 4, 4, 3), (4, 3, 3, 3), {"stride": (2, 2), "padding": (1, 0)}),
    ],
    ids=["conv2d", "conv2d-groups", "conv_transpose2d"],
)
def test_tap_blocks_loop_over_many_small_blocks(monkeypatch, op, x, w, attrs):
    """conv_taps' blocks stitch together exactly (forward, dx and dw paths)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(conv_taps, "BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(conv_taps, "MIN_BLOCK_COLUMNS", 5)
    inputs = {"x": normal(*x), "w": normal(*w, seed=1)}
    spec, feeds = support.op_graph(op, inputs, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=("x", "w"), loss="loss"))
    t = {k: torch.tensor(a, requires_grad=True) for k, a in inputs.items()}
    F = torch.nn.functional
    call = F.conv2d if op == "conv2d" else F.conv_transpose2d
    expected = call(t["x"], t["w"], **attrs)
    (expected * torch.tensor(feeds["__weight"])).sum().backward()
    assert support.rel(result.outputs["out"], expected.detach().numpy()) <= 1e-12
    for name in ("x", "w"):
        assert support.rel(result.grads[name], t[name].grad.numpy()) <= 1e-12, name


# --- leanness --------------------------------------------------------------------------------
def _small_cnn():
    """conv+bias, relu, max pool, grouped conv, avg pool excluding padding, transposed
    conv, depthwise conv: every op of the family, with strides and padding."""
    shapes = {
        "x": (4, 3, 12, 12),
        "w1": (8, 3, 3, 3),
        "b1": (8,),
        "w2": (8, 4, 3, 3),
        "wt": (8, 4, 2, 2),
        "wd": (4, 1, 3, 3),
    }
    nodes = (
        NodeSpec("c1", "conv2d", ("x", "w1", "b1"), {"padding": (1, 1)}),
        NodeSpec("r1", "relu", ("c1",)),
        NodeSpec(
            "p1", "max_pool2d", ("r1",), {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1)}
        ),
        NodeSpec("c2", "conv2d", ("p1", "w2"), {"padding": (1, 1), "groups": 2}),
        NodeSpec(
            "a2",
            "avg_pool2d",
            ("c2",),
            {"kernel": (3, 3), "stride": (1, 1), "padding": (1, 1), "count_include_pad": False},
        ),
        NodeSpec("t3", "conv_transpose2d", ("a2", "wt"), {"stride": (2, 2)}),
        NodeSpec("d4", "conv2d", ("t3", "wd"), {"padding": (1, 1), "groups": 4}),
        NodeSpec("s", "tanh", ("d4",)),
        NodeSpec("l", "sum", ("s",)),
    )
    inputs = tuple(InputSpec(k, v, "float64") for k, v in shapes.items())
    spec = GraphSpec("cnn", inputs, nodes, (("loss", "l"),))
    feeds = {k: normal(*v, seed=i) for i, (k, v) in enumerate(shapes.items())}
    return spec, feeds, tuple(shapes)


LAYERS = ("c1", "p1", "c2", "a2", "t3", "d4")
WASTEFUL = {"unfold", "fold", "one_hot", "argmax", "matmul"}


def _size(shape) -> int:
    return int(np.prod(shape))


def test_backward_values_are_no_bigger_than_the_layer_they_differentiate():
    """Each layer's VJP emits at most one value per input (dx, dw, db), none bigger than
    the layer's largest input or output: the planner accounts every backward value, and
    an im2col column matrix (kh*kw times the input) used to dominate the peak."""
    spec, _, wrt = _small_cnn()
    graph = support.ENGINE.differentiate(spec, wrt=wrt, loss="loss").graph
    assert not WASTEFUL & {n.op for n in graph}
    for layer in LAYERS:
        node = graph[layer]
        bound = max([_size(node.shape)] + [_size(graph[i].shape) for i in node.inputs])
        emitted = [n for n in graph if n.name.startswith(f"bwd/{layer}/")]
        big = [n for n in emitted if _size(n.shape) > 64]  # bigger than a bias
        assert 1 <= len(big) <= 2, (layer, [(n.name, n.shape) for n in big])
        for n in emitted:
            assert _size(n.shape) <= bound, (layer, n.name, n.shape, bound)


def test_second_order_graph_has_no_column_matrix():
    """Double backward (Hessian-vector products) stays in the same lean family."""
    spec, feeds, wrt = _small_cnn()
    spec2 = support.joint_hvp_spec(spec, list(wrt))
    graph = support.ENGINE.differentiate(spec2, wrt=wrt, loss="loss2").graph
    assert not WASTEFUL & {n.op for n in graph}
    biggest_forward = max(_size(graph[n.name].shape) for n in spec.nodes)
    assert max(_size(n.shape) for n in graph) <= biggest_forward


def test_small_cnn_gradients_match_torch():
    torch = pytest.importorskip("torch")
    spec, feeds, wrt = _small_cnn()
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=wrt, loss="loss"))
    F = torch.nn.functional
    t = {k: torch.tensor(a, requires_grad=True) for k, a in feeds.items()}
    h = F.max_pool2d(torch.relu(F.conv2d(t["x"], t["w1"], t["b1"], padding=1)), 3, 2, 1)
    h = F.avg_pool2d(F.conv2d(h, t["w2"], padding=1, groups=2), 3, 1, 1, count_include_pad=False)
    h = F.conv2d(F.conv_transpose2d(h, t["wt"], stride=2), t["wd"], padding=1, groups=4)
    loss = torch.tanh(h).sum()
    loss.backward()
    assert support.rel(np.asarray(result.outputs["loss"]), loss.detach().numpy()) <= 1e-12
    for name in wrt:
        assert support.rel(result.grads[name], t[name].grad.numpy()) <= 1e-9, name


# --- validation ----------------------------------------------------------------------------
BAD = [
    (
        "conv2d_weight_grad",
        _wg((1, 2, 4, 4), (1, 3, 2, 2)),
        {"kernel": (2, 2)},
        "must have the (3, 3) windows",
    ),
    ("conv2d_weight_grad", _wg((1, 2, 4, 4), (2, 3, 3, 3)), {"kernel": (2, 2)}, "batch size"),
    (
        "conv2d_weight_grad",
        _wg((1, 2, 4, 4), (1, 3, 3, 3)),
        {"kernel": (2, 2), "groups": 2},
        "must divide",
    ),
    ("conv2d_weight_grad", _wg((1, 2, 4, 4), (1, 3, 3, 3)), {"kernel": (2,)}, "2 ints"),
    ("conv2d_weight_grad", {"x": normal(1, 2, 4), "g": normal(1, 3, 3)}, {"kernel": (2, 2)}, "4-D"),
    (
        "max_pool2d_grad",
        _wg((1, 2, 4, 4), (1, 2, 3, 3)),
        {"kernel": (2, 2)},
        "pooled shape (1, 2, 2, 2)",
    ),
    (
        "max_pool2d_grad",
        _wg((1, 2, 4, 4), (1, 2, 2, 2)),
        {"kernel": (2, 2), "padding": (2, 0)},
        "at most half",
    ),
    (
        "max_pool2d_gather",
        {"x": normal(1, 2, 4, 4), "v": normal(1, 2, 4, 3)},
        {"kernel": (2, 2)},
        "input's shape",
    ),
    (
        "avg_pool2d_grad",
        {"g": normal(1, 2, 2, 2)},
        {"kernel": (2, 2), "output_size": (6, 4)},
        "windows",
    ),
    ("avg_pool2d_grad", {"g": normal(1, 2, 2, 2)}, {"kernel": (2, 2)}, "output_size"),
    (
        "avg_pool2d_grad",
        {"g": normal(1, 2, 2, 2)},
        {"kernel": (2, 2), "output_size": (0, 4)},
        "> 0",
    ),
]


@pytest.mark.parametrize("op, inputs, attrs, message", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_invalid_graphs_are_rejected_naming_the_node(op, inputs, attrs, message):
    with pytest.raises(InvalidArgument, match="node 'out'") as info:
        support.run_op(op, inputs, attrs)
    assert message in str(info.value)


def test_mixed_dtypes_are_rejected():
    inputs = {"x": normal(1, 2, 4, 4), "g": normal(1, 3, 3, 3).astype(np.float32)}
    with pytest.raises(InvalidArgument, match="node 'out'.*dtype mismatch"):
        support.run_op("conv2d_weight_grad", inputs, {"kernel": (2, 2)})


EMPTY = [
    ("conv2d", {"x": np.zeros((0, 2, 4, 4)), "w": normal(3, 2, 2, 2)}, {}),
    ("conv2d", {"x": normal(2, 0, 4, 4), "w": np.zeros((3, 0, 2, 2))}, {}),
    ("conv2d", {"x": normal(2, 2, 4, 4), "w": np.zeros((0, 2, 2, 2))}, {}),
    ("conv2d", {"x": np.zeros((0, 4, 4, 4)), "w": normal(4, 2, 2, 2)}, {"groups": 2}),
    ("conv_transpose2d", {"x": np.zeros((0, 2, 4, 4)), "w": normal(2, 3, 2, 2)}, {}),
    ("conv_transpose2d", {"x": np.zeros((2, 0, 4, 4)), "w": np.zeros((0, 3, 2, 2))}, {}),
    ("conv_transpose2d", {"x": normal(2, 2, 4, 4), "w": np.zeros((2, 0, 2, 2))}, {}),
    ("max_pool2d", {"x": np.zeros((0, 2, 4, 4))}, {"kernel": (2, 2)}),
    ("avg_pool2d", {"x": np.zeros((2, 0, 4, 4))}, {"kernel": (2, 2)}),
]


@pytest.mark.parametrize("op, inputs, attrs", EMPTY)
def test_empty_batch_or_channels_give_empty_sums(op, inputs, attrs):
    """Zero images, channels or filters: zeros where a sum is empty, never an error."""
    spec, feeds = support.op_graph(op, inputs, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=tuple(inputs), loss="loss"))
    if inputs["x"].size == 0 or inputs.get("w", inputs["x"]).size == 0:
        assert not np.any(result.outputs["out"])
    for name, value in inputs.items():
        assert result.grads[name].shape == value.shape
        assert not np.any(result.grads[name])
