"""The VJPs of the normalizations, softmax family, cross_entropy and activations emit ONE
graph value of the activation's size each (their native gradient ops), where the
composites emitted 3-8 (batch_norm training: 5; gelu tanh form: 8; softmax: 3). The
planner accounts every graph value, so each one is memory at a recompute_all peak
(issue 13: the floors of the zoo models). Counted deterministically on joint graphs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import support

from remat_server.graph.ir import GraphSpec, InputSpec, NodeSpec
from remat_server.ops import REGISTRY


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _joint(nodes, inputs, wrt):
    """The joint graph of `nodes` (the last one is the scalar loss)."""
    specs = tuple(InputSpec(k, a.shape, a.dtype.name) for k, a in inputs.items())
    spec = GraphSpec("lean", specs, tuple(NodeSpec(*n) for n in nodes), (("loss", nodes[-1][0]),))
    return support.ENGINE.differentiate(spec, wrt=tuple(wrt), loss="loss").graph


def _allocated(joint, forward_node: str, size: int) -> list[str]:
    """Backward values of at least `size` elements that `forward_node`'s VJP allocates."""
    prefix = f"bwd/{forward_node}/"
    return [
        n.name
        for n in joint
        if n.name.startswith(prefix)
        and REGISTRY[n.op].memory == "new"
        and math.prod(n.shape) >= size
    ]


B, T, D = 4, 6, 8
CHAIN = [  # (name, op, inputs, attrs): a row-wise model of every changed op
    ("ln", "layer_norm", ("x", "w", "b"), {}),
    ("gelu_t", "gelu", ("ln",), {}),
    ("gelu_n", "gelu", ("gelu_t",), {"approximate": "none"}),
    ("silu", "silu", ("gelu_n",), {}),
    ("erf", "erf", ("silu",), {}),
    ("leaky", "leaky_relu", ("erf",), {"negative_slope": 0.1}),
    ("rms", "rms_norm", ("leaky", "w"), {}),
    ("sm", "softmax", ("rms",), {}),
    ("lsm", "log_softmax", ("sm",), {"axis": 1}),
    ("ce", "cross_entropy", ("lsm", "labels"), {}),
]


def test_row_model_backward_keeps_one_activation_per_op():
    inputs = {
        "x": normal(B, T, D),
        "w": normal(D, seed=1),
        "b": normal(D, seed=2),
        "labels": np.zeros((B, T), np.int64),
    }
    joint = _joint(CHAIN, inputs, ["x", "w", "b"])
    counts = {name: _allocated(joint, name, B * T * D) for name, *_ in CHAIN}
    assert all(len(values) == 1 for values in counts.values()), counts


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_backward_keeps_one_activation(training):
    c = 3
    inputs = {
        "x": normal(4, c, 5, 5),
        "w": normal(c, seed=1),
        "b": normal(c, seed=2),
        "rm": normal(c, seed=3),
        "rv": np.full(c, 1.5),
    }
    nodes = [
        ("bn", "batch_norm", ("x", "w", "b", "rm", "rv"), {"training": training}),
        ("t", "tanh", ("bn",), {}),
        ("loss", "sum", ("t",), {}),
    ]
    joint = _joint(nodes, inputs, ["x", "w", "b"])
    values = _allocated(joint, "bn", inputs["x"].size)
    assert len(values) == 1, values  # dx; the (C,) gradients are reductions


def test_attention_backward_keeps_four_score_sized_values():
    """The scores (of q * scale), P, dP = g @ v^T and dS: softmax's VJP no longer adds
    dP * P, the difference and the product, nor the scaled scores (7 before)."""
    q, k, v = normal(2, 5, 4), normal(2, 7, 4, seed=1), normal(2, 7, 3, seed=2)
    nodes = [
        ("att", "scaled_dot_product_attention", ("q", "k", "v"), {}),
        ("loss", "sum", ("att",), {}),
    ]
    joint = _joint(nodes, {"q": q, "k": k, "v": v}, ["q", "k", "v"])
    values = _allocated(joint, "att", 2 * 5 * 7)
    assert len(values) == 4, values
