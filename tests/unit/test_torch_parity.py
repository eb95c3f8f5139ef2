"""remat's losses and gradients equal torch.autograd's, in float64, for whole models.

Each case builds a model with `remat.models` in float64, runs it through a real
in-process server with every float input in `wrt` (the parameters, and the data
too: it costs nothing and checks more paths), then evaluates the same function in
torch from the same arrays. The torch forwards below mirror the builders line by
line. Parameters are perturbed away from their init (unit layer-norm weights, zero
biases) so no gradient term can hide behind a 1 or a 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import remat
from remat import models

torch = pytest.importorskip("torch")
F = torch.nn.functional

RTOL, ATOL = 1e-9, 1e-12


# --- torch mirrors of the builders ------------------------------------------------------
def torch_mlp(t, widths, l2):
    h, penalty = t["x"], 0.0
    for i in range(len(widths) - 1):
        w = t[f"w{i}"]
        h = h @ w + t[f"b{i}"]
        if i < len(widths) - 2:
            h = torch.tanh(h)
        penalty = penalty + torch.sum(w * w)
    return F.cross_entropy(h, t["labels"]) + penalty * l2


def torch_logistic_regression(t, l2):
    z = t["x"] @ t["w"] + t["b"]
    relu_z = torch.maximum(z, torch.zeros_like(z))
    bce = relu_z - z * t["y"] + torch.log(1.0 + torch.exp(-torch.abs(z)))
    return torch.mean(bce) + torch.sum(t["w"] * t["w"]) * l2


def torch_svm(t, classes, l2, margin, variant):
    scores = t["x"] @ t["w"] + t["b"]
    correct = torch.take_along_dim(scores, t["labels"][:, None], dim=1)
    others = 1.0 - F.one_hot(t["labels"], classes).to(scores.dtype)
    if variant == "weston_watkins":
        hinge = torch.sum(torch.relu(scores - correct + margin) * others, dim=1)
    else:
        best = torch.amax(scores + others * margin, dim=1, keepdim=True)
        hinge = (best - correct).reshape(-1)
        hinge = torch.maximum(hinge, torch.zeros_like(hinge))
    return torch.mean(hinge) + torch.sum(t["w"] * t["w"]) * l2


def torch_transformer_block(t, heads):
    x = t["x"]
    batch, seq, d_model = x.shape
    d_head = d_model // heads

    def split_heads(u):
        return u.reshape(batch, seq, heads, d_head).permute(0, 2, 1, 3)

    h = F.layer_norm(x, (d_model,), t["ln1_w"], t["ln1_b"], eps=1e-5)
    q, k, v = (split_heads(h @ t[w]) for w in ("wq", "wk", "wv"))
    attn = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(d_head)), dim=-1)
    context = (attn @ v).permute(0, 2, 1, 3).reshape(batch, seq, d_model)
    h = x + context @ t["wo"]
    m = F.gelu(
        F.layer_norm(h, (d_model,), t["ln2_w"], t["ln2_b"], eps=1e-5) @ t["w1"] + t["b1"],
        approximate="tanh",
    )
    y = h + (m @ t["w2"] + t["b2"])
    return torch.mean(y * y)


def torch_cnn(t, blocks):
    h = t["x"]
    for i in range(blocks):
        h = F.conv2d(h, t[f"conv{i}_w"], padding=1) + t[f"conv{i}_b"].reshape(1, -1, 1, 1)
        h = F.max_pool2d(torch.relu(h), 2)
    return F.cross_entropy(h.reshape(h.shape[0], -1) @ t["fc_w"] + t["fc_b"], t["labels"])


CASES = {
    "mlp_l2": (
        lambda: models.mlp(batch=16, widths=(12, 20, 16, 5), dtype="float64", l2=0.05),
        lambda t: torch_mlp(t, (12, 20, 16, 5), 0.05),
    ),
    "logistic_regression": (
        lambda: models.logistic_regression(batch=32, features=6, dtype="float64", l2=0.01),
        lambda t: torch_logistic_regression(t, 0.01),
    ),
    "svm_weston_watkins": (
        lambda: models.svm(batch=32, features=6, classes=5, dtype="float64", l2=0.01, margin=1.0),
        lambda t: torch_svm(t, 5, 0.01, 1.0, "weston_watkins"),
    ),
    "svm_crammer_singer": (
        lambda: models.svm(
            batch=32,
            features=6,
            classes=5,
            dtype="float64",
            l2=0.01,
            margin=0.5,
            variant="crammer_singer",
        ),
        lambda t: torch_svm(t, 5, 0.01, 0.5, "crammer_singer"),
    ),
    "transformer_block": (
        lambda: models.transformer_block(
            batch=2, seq=8, d_model=16, heads=4, d_ff=32, dtype="float64"
        ),
        lambda t: torch_transformer_block(t, 4),
    ),
    "cnn": (
        lambda: models.cnn(batch=4, channels=(3, 4, 6), image=8, classes=5, dtype="float64"),
        lambda t: torch_cnn(t, 2),
    ),
}


@pytest.fixture(scope="module")
def client():
    with remat.Client.in_process() as client:
        yield client


def perturbed(model: models.Model, seed: int = 1) -> dict[str, np.ndarray]:
    """The model's inputs with every parameter moved off its init by N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    return {
        name: value + 0.1 * rng.standard_normal(value.shape) if name in model.wrt else value
        for name, value in model.inputs.items()
    }


def float_inputs(inputs: dict[str, np.ndarray]) -> list[str]:
    return [name for name, value in inputs.items() if value.dtype == np.float64]


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_match_torch(client, case):
    build, torch_loss = CASES[case]
    model = build()
    inputs = perturbed(model)
    wrt = float_inputs(inputs)
    assert set(model.wrt) <= set(wrt)

    result = client.run(model.graph, inputs, wrt=wrt, loss=model.loss)

    tensors = {
        name: torch.tensor(value, requires_grad=name in wrt) for name, value in inputs.items()
    }
    loss = torch_loss(tensors)
    grads = torch.autograd.grad(loss, [tensors[name] for name in wrt])
    np.testing.assert_allclose(result.outputs[model.loss], loss.item(), rtol=RTOL, atol=ATOL)
    for name, expected in zip(wrt, grads):
        actual = result.grads[name]
        assert actual.dtype == np.float64 and actual.shape == inputs[name].shape, name
        assert np.any(expected.numpy() != 0), f"{name}: torch's gradient is all zero"
        np.testing.assert_allclose(
            actual, expected.numpy(), rtol=RTOL, atol=ATOL, err_msg=f"{case}: gradient of {name}"
        )


def test_cases_cover_every_builder():
    built = {CASES[case][0]().graph.name.split("_")[0] for case in CASES}
    assert built >= {"mlp", "logistic", "svm", "transformer", "cnn"}
