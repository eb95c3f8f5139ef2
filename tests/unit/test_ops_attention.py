"""scaled_dot_product_attention: gradients against centered differences (first and
second order), forward and gradients against torch, dropout by its properties (torch's
mask cannot match ours), the memory model (what the VJP re-emits), validation, and a
small transformer whose gradients are the same under store_all and sqrt."""

from __future__ import annotations

import math

import numpy as np
import pytest
import support

from remat_proto import policies
from remat_server.engine import RunRequest
from remat_server.errors import InvalidArgument
from remat_server.graph.ir import GraphSpec, InputSpec, NodeSpec
from remat_server.graph.limits import Limits
from remat_server.graph.validate import build_graph
from remat_server.ops import REGISTRY
from remat_server.ops.random import keep_mask

OP = "scaled_dot_product_attention"


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def qkv(lead, length, keys, e_dim=4, ev_dim=3, seed=0):
    return {
        "q": normal(*lead, length, e_dim, seed=seed),
        "k": normal(*lead, keys, e_dim, seed=seed + 1),
        "v": normal(*lead, keys, ev_dim, seed=seed + 2),
    }


def float_mask(*shape, seed=3):
    """Random additive mask with some -inf entries and row 1 fully masked."""
    mask = normal(*shape, seed=seed)
    mask[..., 0, 2] = -np.inf
    mask[..., 1, :] = -np.inf
    return mask


def bool_mask(*shape, seed=4):
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask[..., 0, 0] = True
    mask[..., 1, :] = False  # a fully masked row
    return mask


def head_bias():
    """A float mask (H, 1, S): one key bias per head, broadcast over queries."""
    mask = normal(2, 1, 4, seed=6)
    mask[1, 0, 3] = -np.inf
    return mask


QKV = ["q", "k", "v"]
# (id, op, inputs, attrs, wrt). Every float input is <= ~60 elements.
CASES = [
    ("sdpa-3d", OP, qkv((2,), 3, 5), {}, QKV),
    ("sdpa-4d", OP, qkv((1, 2), 3, 4, ev_dim=2), {}, QKV),
    ("sdpa-rank2", OP, qkv((), 3, 5), {}, QKV),
    ("sdpa-scale", OP, qkv((2,), 3, 5, seed=5), {"scale": 0.7}, QKV),
    ("sdpa-causal-L<S", OP, qkv((2,), 3, 5), {"causal": True}, QKV),
    ("sdpa-causal-L>S", OP, qkv((2,), 5, 3, e_dim=3, ev_dim=2), {"causal": True}, QKV),
    ("sdpa-float-mask", OP, {**qkv((2,), 3, 5), "mask": float_mask(3, 5)}, {}, QKV + ["mask"]),
    (
        "sdpa-float-mask-4d",
        OP,
        {**qkv((1, 2), 3, 4, ev_dim=2), "mask": head_bias()},
        {"scale": -0.4},
        QKV + ["mask"],
    ),
    ("sdpa-bool-mask", OP, {**qkv((2,), 3, 5), "mask": bool_mask(1, 3, 5)}, {}, QKV),
    (
        "sdpa-bool-mask-causal",
        OP,
        {**qkv((2,), 4, 5), "mask": bool_mask(4, 5)},
        {"causal": True},
        QKV,
    ),
    ("sdpa-dropout", OP, qkv((2,), 3, 5), {"dropout_p": 0.3, "seed": 5}, QKV),
    (
        "sdpa-dropout-causal-mask",
        OP,
        {**qkv((2,), 4, 5, seed=7), "mask": float_mask(4, 5)},
        {"dropout_p": 0.5, "seed": 1, "causal": True},
        QKV + ["mask"],
    ),
]
IDS = [case[0] for case in CASES]


# --- first-order gradients, dtype ---------------------------------------------------------
@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_gradients_match_centered_differences(case_id, op, inputs, attrs, wrt):
    spec, feeds = support.op_graph(op, inputs, attrs)
    support.check_grads(spec, feeds, wrt, tol=1e-6)


@pytest.mark.parametrize("case_id, op, inputs, attrs, wrt", CASES, ids=IDS)
def test_float32_keeps_dtype(case_id, op, inputs, attrs, wrt):
    result, expected = support.run_float32(op, inputs, attrs, wrt)
    assert np.allclose(result.outputs["out"], expected, rtol=1e-4, atol=1e-5)
    for name in wrt:
        assert np.all(np.isfinite(result.grads[name]))


# --- second order -------------------------------------------------------------------------
SECOND_ORDER = [
    "sdpa-3d",
    "sdpa-4d",
    "sdpa-causal-L>S",
    "sdpa-float-mask",
    "sdpa-bool-mask-causal",
    "sdpa-dropout",
]


@pytest.mark.parametrize(
    "case_id, op, inputs, attrs, wrt",
    [c for c in CASES if c[0] in SECOND_ORDER],
    ids=[c[0] for c in CASES if c[0] in SECOND_ORDER],
)
def test_second_order_hessian_vector_products(case_id, op, inputs, attrs, wrt):
    support.check_hvp(op, inputs, attrs, wrt, seed=11)


# --- against torch ------------------------------------------------------------------------
def _torch_sdpa(torch, tensors, attrs):
    """torch's call for our attrs; causal with a mask has no torch form, so it becomes
    one bool mask (torch refuses is_causal with attn_mask; ours applies both)."""
    mask = tensors.get("mask")
    causal = attrs.get("causal", False)
    if causal and mask is not None:
        length, keys = tensors["q"].shape[-2], tensors["k"].shape[-2]
        mask = mask & torch.ones(length, keys, dtype=torch.bool).tril()
        causal = False
    return torch.nn.functional.scaled_dot_product_attention(
        tensors["q"],
        tensors["k"],
        tensors["v"],
        attn_mask=mask,
        is_causal=causal,
        scale=attrs.get("scale") or None,
    )


NO_DROPOUT = [c for c in CASES if not c[3].get("dropout_p")]


@pytest.mark.parametrize(
    "case_id, op, inputs, attrs, wrt", NO_DROPOUT, ids=[c[0] for c in NO_DROPOUT]
)
def test_matches_torch(case_id, op, inputs, attrs, wrt):
    torch = pytest.importorskip("torch")
    spec, feeds = support.op_graph(op, inputs, attrs)
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=tuple(wrt), loss="loss"))
    tensors = {k: torch.tensor(a, requires_grad=k in wrt) for k, a in inputs.items()}
    expected = _torch_sdpa(torch, tensors, attrs)
    (expected * torch.tensor(feeds["__weight"])).sum().backward()
    assert support.rel(result.outputs["out"], expected.detach().numpy()) <= 1e-9
    for name in wrt:
        assert support.rel(result.grads[name], tensors[name].grad.numpy()) <= 1e-9, name


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_row_is_zero_with_zero_gradient_like_torch(kind):
    """torch's math path on CPU (torch 2.13, its _safe_softmax) gives 0, not NaN, for a
    row whose scores are all -inf; so do we, and its gradients are 0 too."""
    torch = pytest.importorskip("torch")
    inputs = qkv((2,), 3, 5)
    inputs["mask"] = bool_mask(3, 5) if kind == "bool" else float_mask(3, 5)
    wrt = QKV + ([] if kind == "bool" else ["mask"])
    spec, feeds = support.op_graph(OP, inputs, {})
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=tuple(wrt), loss="loss"))
    assert np.all(result.outputs["out"][:, 1] == 0.0)
    assert np.all(result.grads["q"][:, 1] == 0.0)
    if kind == "float":
        assert np.all(result.grads["mask"][1] == 0.0)
    for name in wrt:
        assert np.all(np.isfinite(result.grads[name]))
    tensors = {k: torch.tensor(a) for k, a in inputs.items()}
    expected = _torch_sdpa(torch, tensors, {}).numpy()
    np.testing.assert_array_equal(expected[:, 1], 0.0)  # torch agrees


def test_nan_scores_stay_nan():
    inputs = qkv((1,), 2, 3)
    inputs["q"][0, 0, 0] = np.nan
    out = support.run_op(OP, inputs)
    assert np.all(np.isnan(out[0, 0])) and np.all(np.isfinite(out[0, 1]))


# --- dropout: properties (torch's mask is its own) ----------------------------------------
def _composite_spec(inputs, scale, p, seed, key):
    """softmax(scale q k^T) -> dropout(p, seed, key) -> @ v, with existing ops."""
    specs = tuple(InputSpec(n, a.shape, "float64") for n, a in inputs.items())
    nodes = (
        NodeSpec("kt", "transpose", ("k",), {"axes": (0, 2, 1)}),
        NodeSpec("qk", "matmul", ("q", "kt")),
        NodeSpec("c", "constant", (), {"value": np.array(scale)}),
        NodeSpec("s", "mul", ("qk", "c")),
        NodeSpec("pr", "softmax", ("s",)),
        NodeSpec("d", "dropout", ("pr",), {"p": p, "seed": seed, "key": key}),
        NodeSpec("o", "matmul", ("d", "v")),
    )
    return GraphSpec("composite", specs, nodes, (("out", "o"),))


def test_dropout_is_the_dropout_op_on_the_weights():
    """Same (seed, key, shape) -> the same mask as the dropout op on the (..., L, S)
    weights: the fused op equals the composite graph."""
    inputs = qkv((2,), 6, 7)
    ours = support.run_op(OP, inputs, {"dropout_p": 0.4, "seed": 3, "key": "kk"})
    composite = _composite_spec(inputs, 0.5, 0.4, 3, "kk")
    expected = support.ENGINE.run(RunRequest(composite, inputs)).outputs["out"]
    np.testing.assert_allclose(ours, expected, rtol=1e-13, atol=1e-14)


def test_dropout_mask_is_a_pure_function_of_seed_and_key():
    inputs = qkv((2,), 4, 6)
    first = support.run_op(OP, inputs, {"dropout_p": 0.5, "seed": 1})
    again = support.run_op(OP, inputs, {"dropout_p": 0.5, "seed": 1})
    same_key = support.run_op(OP, inputs, {"dropout_p": 0.5, "seed": 1, "key": "out"}, "n2")
    other_name = support.run_op(OP, inputs, {"dropout_p": 0.5, "seed": 1}, name="n2")
    other_seed = support.run_op(OP, inputs, {"dropout_p": 0.5, "seed": 2})
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, same_key)  # the key defaults to the node name
    assert not np.array_equal(first, other_name)
    assert not np.array_equal(first, other_seed)


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_keeps_a_fraction_and_rescales(p):
    """v = identity makes the output the dropped-out weights themselves: each is 0 or
    P / (1 - p), about 1 - p of them are kept, and the row sums average 1."""
    length, keys = 400, 20
    inputs = {
        "q": normal(length, 4, seed=1),
        "k": normal(keys, 4, seed=2),
        "v": np.eye(keys),
    }
    weights = support.run_op(OP, inputs, {"dropout_p": p, "seed": 9})
    plain = support.run_op(OP, inputs, {})
    kept = weights != 0
    np.testing.assert_array_equal(kept, keep_mask((length, keys), p, 9, "out"))
    np.testing.assert_allclose(weights[kept], plain[kept] / (1 - p), rtol=1e-14)
    assert abs(kept.mean() - (1 - p)) < 0.02
    assert abs(weights.sum(axis=1).mean() - 1.0) < 0.03


def test_dropout_p0_is_plain_attention():
    inputs = qkv((2,), 3, 5)
    np.testing.assert_array_equal(
        support.run_op(OP, inputs, {"dropout_p": 0.0, "seed": 4}), support.run_op(OP, inputs)
    )


# --- memory model -------------------------------------------------------------------------
def test_memory_model_declares_the_scores_temporary_and_keeps_only_inputs():
    op = REGISTRY[OP]
    assert op.residuals == "inputs" and op.memory == "new"
    spec, _ = support.op_graph(OP, qkv((2, 3), 5, 7), {})
    graph = support.ENGINE.differentiate(spec, wrt=tuple(QKV), loss="loss").graph
    node = graph["out"]
    assert op.workspace(*(graph[n].type for n in node.inputs), **node.attrs) == (2, 3, 5, 7)


def test_the_scores_temporary_is_held_to_the_tensor_limits():
    """q, k, v and the output are small; the (1, 10, 20) scores are not."""
    inputs = {"q": normal(1, 10, 2), "k": normal(1, 20, 2), "v": normal(1, 20, 1)}
    spec = GraphSpec(
        "big",
        tuple(InputSpec(n, a.shape, "float64") for n, a in inputs.items()),
        (NodeSpec("out", OP, tuple(inputs)),),
        (("out", "out"),),
    )
    build_graph(spec, Limits(max_elements=200))
    with pytest.raises(InvalidArgument, match=r"node 'out'.*temporary.*\(1, 10, 20\)"):
        build_graph(spec, Limits(max_elements=199))


def _backward_nodes(graph, forward_node="out"):
    return [n for n in graph if n.name.startswith(f"bwd/{forward_node}/")]


@pytest.mark.parametrize(
    "attrs, with_mask",
    [({}, False), ({"causal": True}, True), ({"dropout_p": 0.3}, True)],
)
def test_vjp_re_emits_the_weights_once_and_never_reads_the_output(attrs, with_mask):
    inputs = qkv((2,), 3, 5)
    wrt = list(QKV)
    if with_mask:
        inputs["mask"], wrt = float_mask(3, 5), wrt + ["mask"]
    spec, _ = support.op_graph(OP, inputs, attrs)
    graph = support.ENGINE.differentiate(spec, wrt=tuple(wrt), loss="loss").graph
    backward = _backward_nodes(graph)
    assert sum(n.op == "softmax" for n in backward) == 1  # P once, shared
    assert sum(n.op == "matmul" for n in backward) == 5  # q k^T, dV, dP, dq, dk
    assert sum(n.op == "dropout" for n in backward) == (2 if attrs.get("dropout_p") else 0)
    assert all("out" not in n.inputs for n in backward)  # residuals: the inputs only
    assert not any(n.op == OP for n in backward)


# --- validation ---------------------------------------------------------------------------
Q, K, V = normal(2, 3, 4), normal(2, 5, 4), normal(2, 5, 3)
BAD = [
    ({"q": normal(4), "k": K, "v": V}, {}, "rank >= 2"),
    ({"q": Q, "k": normal(3, 5, 4), "v": V}, {}, "equal leading dimensions"),
    ({"q": Q, "k": normal(2, 5, 3), "v": V}, {}, "feature size"),
    ({"q": Q, "k": K, "v": normal(2, 4, 3)}, {}, "k's length"),
    ({"q": Q, "k": K.astype(np.float32), "v": V}, {}, "dtype mismatch"),
    ({"q": Q.astype(np.int64), "k": K, "v": V}, {}, "dtype"),
    ({"q": Q, "k": K, "v": V, "m": normal(3, 4)}, {}, "does not broadcast"),
    ({"q": Q, "k": K, "v": V, "m": normal(3, 2, 3, 5)}, {}, "does not broadcast"),
    ({"q": Q, "k": K, "v": V, "m": np.zeros((3, 5), np.int64)}, {}, "expected bool"),
    ({"q": Q, "k": K, "v": V, "m": np.zeros((3, 5), np.float32)}, {}, "q's dtype"),
    ({"q": Q, "k": K, "v": V}, {"dropout_p": 1.0}, "[0, 1)"),
    ({"q": Q, "k": K, "v": V}, {"dropout_p": -0.1}, "[0, 1)"),
    ({"q": Q, "k": K, "v": V}, {"scale": math.inf}, "finite"),
    ({"q": normal(2, 3, 0), "k": normal(2, 5, 0), "v": V}, {}, "E > 0"),
]


@pytest.mark.parametrize("inputs, attrs, message", BAD, ids=[b[2] for b in BAD])
def test_invalid_graphs_are_rejected_naming_the_node(inputs, attrs, message):
    with pytest.raises(InvalidArgument, match="node 'out'") as info:
        support.run_op(OP, inputs, attrs)
    assert message in str(info.value)


# --- a small transformer block under two policies -----------------------------------------
B, T, D, H = 2, 6, 8, 2
HD = D // H


def _block(nodes, x, i, causal, dropout_p):
    """Multi-head self-attention with projections, a residual add and a tanh."""

    def n(name, op, *inputs, **attrs):
        nodes.append(NodeSpec(f"{name}{i}", op, tuple(inputs), attrs))
        return f"{name}{i}"

    heads = []
    for w in ("wq", "wk", "wv"):
        proj = n(f"{w}_x", "matmul", x, f"{w}{i}")
        split = n(f"{w}_split", "reshape", proj, shape=(B, T, H, HD))
        heads.append(n(f"{w}_heads", "transpose", split, axes=(0, 2, 1, 3)))
    attn = n("attn", OP, *heads, causal=causal, dropout_p=dropout_p, seed=i)
    merged = n(
        "merge", "reshape", n("unheads", "transpose", attn, axes=(0, 2, 1, 3)), shape=(B, T, D)
    )
    out = n("wo_x", "matmul", merged, f"wo{i}")
    return n("act", "tanh", n("res", "add", x, out))


def _transformer(blocks=(True, False), dropout=(0.0, 0.25)):
    rng = np.random.default_rng(42)
    feeds = {"x": rng.standard_normal((B, T, D))}
    nodes: list[NodeSpec] = []
    h = "x"
    for i, causal in enumerate(blocks):
        for w in ("wq", "wk", "wv", "wo"):
            feeds[f"{w}{i}"] = rng.standard_normal((D, D)) / np.sqrt(D)
        h = _block(nodes, h, i, causal, dropout[i])
    feeds["R"] = rng.standard_normal((B, T, D))
    nodes += [NodeSpec("weighted", "mul", (h, "R")), NodeSpec("loss", "sum", ("weighted",))]
    specs = tuple(InputSpec(k, a.shape, "float64") for k, a in feeds.items())
    return GraphSpec("transformer", specs, tuple(nodes), (("loss", "loss"),)), feeds


def test_transformer_gradients_are_the_same_under_store_all_and_sqrt():
    spec, feeds = _transformer()
    wrt = tuple(k for k in feeds if k != "R")
    results = {
        label: support.ENGINE.run(RunRequest(spec, feeds, wrt=wrt, loss="loss", policy=policy))
        for label, policy in (("store_all", policies.StoreAll()), ("sqrt", policies.Sqrt()))
    }
    assert results["sqrt"].metrics.recomputed_nodes > 0  # sqrt did recompute something
    for name in wrt:
        # The same joint graph, so bit-identical, dropout included (its mask is replayed).
        np.testing.assert_array_equal(results["sqrt"].grads[name], results["store_all"].grads[name])
    assert results["sqrt"].outputs["loss"] == results["store_all"].outputs["loss"]


def test_transformer_without_dropout_matches_centered_differences_for_a_weight():
    spec, feeds = _transformer(dropout=(0.0, 0.0))
    result = support.ENGINE.run(RunRequest(spec, feeds, wrt=("wq0", "x"), loss="loss"))
    for name in ("wq0", "x"):
        numeric = support.numeric_grad(spec, feeds, name)
        assert support.relative_error(result.grads[name], numeric) <= 1e-6, name


# --- SDK ----------------------------------------------------------------------------------
def test_sdk_wrapper_builds_the_node_and_keeps_a_literal_bool_mask_bool():
    import remat
    from remat.ops import scaled_dot_product_attention

    g = remat.Graph("sdk")
    q, k = g.input("q", (2, 3, 4), "float64"), g.input("k", (2, 5, 4), "float64")
    v = g.input("v", (2, 5, 3), "float64")
    mask = bool_mask(3, 5)
    out = scaled_dot_product_attention(q, k, v, mask=mask, causal=True, name="attn")
    g.output("out", out)
    node = next(n for n in g.spec().nodes if n.name == "attn")
    assert node.attrs == {"causal": True, "scale": 0.0, "dropout_p": 0.0, "seed": 0}
    feeds = qkv((2,), 3, 5)
    ours = support.ENGINE.run(RunRequest(g.spec(), feeds)).outputs["out"]
    expected = support.run_op(OP, {**feeds, "mask": mask}, {"causal": True})
    np.testing.assert_array_equal(ours, expected)
