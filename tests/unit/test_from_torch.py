"""remat.from_torch: every zoo model imports and matches torch.autograd in float64.

For each model of tests/zoo.py the loss is sum(output * R) over its outputs, with a
fixed random R per output; remat's loss and gradients (every parameter, every float
input) must equal torch's within 1e-9 relative, and the `updated/<buffer>` outputs
must equal the buffers torch leaves after the same training-mode forward (torch runs
on a deep copy, so both start from the same buffers). Then the same graphs run under
several checkpointing policies: bit-identical gradients, predicted peak = accounted.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

import remat
from remat.importers import UnsupportedTorchOpsError

torch = pytest.importorskip("torch")
zoo = pytest.importorskip("zoo")
from zoo_loss import add_loss, named_outputs  # noqa: E402  (after the torch skip)

F = torch.nn.functional

RTOL = 1e-9
NAMES = list(zoo.MODELS)


@pytest.fixture(scope="module")
def client():
    with remat.Client.in_process() as client:
        yield client


class Case:
    """One zoo model imported in float64, with torch's reference results."""

    def __init__(self, name: str, train: bool = True):
        module, args, kwargs = MODELS[name](torch.float64)
        if not train:
            module.eval()
        input_names = INPUT_NAMES.get(name) or zoo.input_names(name)
        self.inputs = {**dict(zip(input_names, args)), **kwargs}
        before = {k: v.clone() for k, v in module.state_dict().items()}
        self.graph, self.params = remat.from_torch(module, args, kwargs)
        for key, value in module.state_dict().items():  # importing changed nothing
            assert torch.equal(value, before[key]), key
        # torch on a copy: the same weights and buffers, its own autograd state.
        ref = copy.deepcopy(module)
        args = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        kwargs = {k: v.clone() for k, v in kwargs.items()}
        outputs = named_outputs(ref(*args, **kwargs))
        self.output_names = list(outputs)
        feeds = add_loss(self.graph, {k: tuple(v.shape) for k, v in outputs.items()})
        loss = sum((v * torch.from_numpy(feeds[f"R/{k}"])).sum() for k, v in outputs.items())
        loss.backward()
        self.loss = loss.item()
        self.grads = {n: p.grad.numpy() for n, p in ref.named_parameters()}
        for input_name, value in zip(input_names, args):
            if value.is_floating_point():
                self.grads[input_name] = value.grad.numpy()
        self.buffers = {n: b.detach().numpy() for n, b in ref.named_buffers()}
        self.feeds = {**self.params, **feeds, **{k: v.numpy() for k, v in self.inputs.items()}}
        self.wrt = list(self.grads)


def transformers_llama(dtype):
    """LLaMA as `transformers` writes it (rotary embeddings computed in forward with
    cos and sin, grouped-query attention), tiny and seeded: outside the zoo, since
    torch's ONNX exporter cannot export it (aten::diff)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=zoo.VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * zoo.SEQ,
        use_cache=False,
    )
    torch.manual_seed(0)
    module = LlamaForCausalLM(config).to(dtype).train()
    ids = torch.randint(0, zoo.VOCAB, (2, zoo.SEQ), generator=torch.Generator().manual_seed(5))
    return module, (ids,), {}


MODELS = {**zoo.MODELS, "transformers_llama": transformers_llama}
# transformers computes the rotary tables in float32 whatever the model's dtype (it
# casts with .float()): NumPy's and torch's float32 cos and sin differ in the last
# bit, which bounds the agreement to float32's precision.
TOLERANCE = {"transformers_llama": 1e-6}
INPUT_NAMES = {"transformers_llama": ("input_ids",)}
_CASES: dict = {}


def case(name: str, train: bool = True) -> Case:
    if (name, train) not in _CASES:
        _CASES[name, train] = Case(name, train)
    return _CASES[name, train]


def assert_grads_close(actual: dict, expected: dict, rtol: float = RTOL) -> None:
    # Structurally zero gradients (a key bias before softmax) are rounding noise in
    # both: they are held to an absolute floor set by the model's largest gradient.
    floor = 1e-3 * rtol * max(float(np.max(np.abs(g))) for g in expected.values())
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape, name
        scale = float(np.max(np.abs(want), initial=0.0))
        error = float(np.max(np.abs(got - want), initial=0.0))
        assert error <= rtol * scale + floor, f"{name}: error {error:.3g}, scale {scale:.3g}"


# --- every zoo model (and transformers' LLaMA) equals torch.autograd -----------------------
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", [*NAMES, "transformers_llama"])
def test_zoo_matches_torch_autograd(client, name, train):
    c, rtol = case(name, train), TOLERANCE.get(name, RTOL)
    result = client.run(c.graph, c.feeds, wrt=c.wrt, loss="loss")
    assert float(result.outputs["loss"]) == pytest.approx(c.loss, rel=rtol, abs=1e-12)
    assert_grads_close(result.grads, c.grads, rtol)
    updated = {n[len("updated/") :] for n in c.graph.output_names if n.startswith("updated/")}
    if train and any(n.endswith("running_mean") for n in c.buffers):
        assert updated == {n for n in c.buffers if "running" in n or "num_batches" in n}
    if not train:
        assert not updated  # inference mutates nothing
    for buffer in updated:
        got, want = result.outputs[f"updated/{buffer}"], c.buffers[buffer]
        assert got.dtype == want.dtype, buffer
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=buffer)


# A batch at which activations, not parameters, dominate the memory (at batch 2 the
# parameters and their gradients alone exceed half of store_all's peak).
POLICY_BATCH = 16


@pytest.mark.parametrize("name", NAMES)
def test_zoo_policies_are_bit_identical_with_exact_peaks(client, name):
    module, args, kwargs = zoo.MODELS[name](torch.float64, batch=POLICY_BATCH)
    graph, params = remat.from_torch(module, args, kwargs)
    with torch.no_grad():
        outputs = named_outputs(copy.deepcopy(module)(*args, **kwargs))
    feeds = add_loss(graph, {k: tuple(v.shape) for k, v in outputs.items()})
    feeds.update(params)
    feeds.update({k: v.numpy() for k, v in zoo.inputs(name, torch.float64, POLICY_BATCH).items()})
    wrt = [n for n, _ in module.named_parameters()]
    wrt += [n for n in zoo.float_inputs(name)]
    base = client.run(graph, feeds, wrt=wrt, loss="loss", policy="store_all")
    results = {
        "sqrt": client.run(graph, feeds, wrt=wrt, loss="loss", policy="sqrt"),
        "budget": client.run(graph, feeds, wrt=wrt, loss="loss", policy="budget:0.5"),
        "dtr": client.run(graph, feeds, wrt=wrt, loss="loss", policy="dtr:0.5"),
    }
    assert base.metrics.peak_bytes == base.metrics.predicted_peak_bytes
    for policy, result in results.items():
        assert result.metrics.peak_bytes == result.metrics.predicted_peak_bytes, policy
        for grad in wrt:
            assert np.array_equal(result.grads[grad], base.grads[grad]), (policy, grad)
    for policy in ("budget", "dtr"):
        assert results[policy].metrics.peak_bytes <= base.metrics.peak_bytes // 2, policy


def test_params_inputs_and_buffers_are_named_as_in_pytorch():
    c = case("resnet")
    module, _, _ = zoo.resnet(torch.float64)
    assert set(c.params) == set(module.state_dict())
    assert c.params["layer1.0.conv1.weight"].shape == (8, 8, 3, 3)
    assert c.params["bn1.num_batches_tracked"].dtype == np.int64
    inputs = {spec.name: spec for spec in c.graph.inputs}
    assert inputs["x"].shape == (2, 3, 16, 16) and inputs["x"].dtype == "float64"
    assert inputs["bn1.running_mean"].dtype == "float64"
    sources = {node.source for node in c.graph.nodes}
    assert "layer1.0.conv1 (aten.conv2d)" in sources


def test_tied_parameters_are_one_input():
    # GPT-2's lm_head.weight is transformer.wte.weight: one input, the gradients add up.
    c = case("gpt2")
    assert "transformer.wte.weight" in c.params and "lm_head.weight" not in c.params
    assert {spec.name for spec in c.graph.inputs} >= {"input_ids", "attention_mask"}
    assert c.graph["input_ids"].dtype == "int64"


def test_output_names():
    class Single(torch.nn.Module):
        def forward(self, x):
            return x * 2

    class Pair(torch.nn.Module):
        def forward(self, x):
            return x + 1, (x * 3, x.sum())

    class Mapping(torch.nn.Module):
        def forward(self, x):
            return {"logits": x * 2, "aux": x - 1}

    x = torch.arange(6.0).reshape(2, 3)
    assert remat.from_torch(Single(), (x,))[0].output_names == ["output"]
    assert remat.from_torch(Pair(), (x,))[0].output_names == [
        "output_0",
        "output_1/0",
        "output_1/1",
    ]
    assert remat.from_torch(Mapping(), (x,))[0].output_names == ["logits", "aux"]
    assert case("gpt2").output_names == ["logits"]  # a transformers ModelOutput
    assert case("bert").output_names == ["output_0", "output_1"]  # return_dict=False


def test_float32_model_runs(client):
    module, args, kwargs = zoo.resnet(torch.float32)
    graph, params = remat.from_torch(module, args, kwargs)
    graph.output("loss", remat.sum(graph["output"]))
    assert graph["x"].dtype == "float32"
    result = client.run(graph, {**params, "x": args[0].numpy()}, wrt=["fc.weight"], loss="loss")
    ref = copy.deepcopy(module)
    ref(*args).sum().backward()
    assert result.outputs["output"].dtype == np.float32
    np.testing.assert_allclose(result.grads["fc.weight"], ref.fc.weight.grad, rtol=1e-4, atol=1e-5)
    running = result.outputs["updated/bn1.running_var"]
    np.testing.assert_allclose(running, ref.bn1.running_var, rtol=1e-5)


def test_train_mode_dropout_is_seeded_and_eval_is_identity(client):
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Dropout(0.5)).double()
    x = torch.ones(3, 4, dtype=torch.float64)
    graph, params = remat.from_torch(model, (x,), seed=7)
    [dropout] = [n for n in graph.nodes if n.op == "dropout"]
    assert dropout.attrs["p"] == 0.5 and dropout.attrs["seed"] == 7
    out = client.run(graph, {**params, "input": x.numpy()}).outputs["output"]
    dense = model[0](x).detach().numpy()
    kept = out != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(out[kept], 2 * dense[kept], rtol=1e-12)
    graph, params = remat.from_torch(model.eval(), (x,))
    assert all(n.op != "dropout" for n in graph.nodes)


def test_undefined_derivatives_follow_pytorch(client):
    """Ties and bounds: max pooling and torch.max(dim) send the gradient to the first
    maximum, amax splits it, clamp passes it at its bounds, hardtanh and ReLU do not."""

    class Ties(torch.nn.Module):
        def forward(self, x):
            pooled = F.max_pool2d(torch.relu(x), 2)
            values, _ = torch.max(x, dim=-1)
            return (
                pooled.sum() * 1.5
                + (values * torch.arange(4.0, dtype=x.dtype)).sum()
                + torch.amax(x, dim=(2, 3)).sum() * 0.5
                + torch.clamp(x, -1.0, 1.0).sum() * 0.25
                + F.hardtanh(x).sum() * 0.125
            )

    x = torch.tensor([[-1.0, 1.0, 1.0, 0.0], [1.0, 0.0, -1.0, 1.0]] * 2, dtype=torch.float64)
    x = x.reshape(1, 4, 4).repeat(2, 1, 1).reshape(2, 1, 4, 4).clone().requires_grad_(True)
    graph, params = remat.from_torch(Ties(), (x.detach(),))
    result = client.run(graph, {"x": x.detach().numpy()}, wrt=["x"], loss="output")
    Ties()(x).backward()
    np.testing.assert_array_equal(result.grads["x"], x.grad.numpy())


def test_padding_embedding_row_gets_no_gradient_from_padding(client):
    embedding = torch.nn.Embedding(5, 3, padding_idx=0).double()
    ids = torch.tensor([[0, 1, 0, 2]])
    graph, params = remat.from_torch(embedding, (ids,))
    graph.output("loss", remat.sum(graph["output"] * 1.0))
    result = client.run(graph, {**params, "input": ids.numpy()}, wrt=["weight"], loss="loss")
    embedding(ids).sum().backward()
    np.testing.assert_array_equal(result.grads["weight"], embedding.weight.grad.numpy())
    assert not result.grads["weight"][0].any()


def test_unsupported_ops_are_listed_together():
    class Wave(torch.nn.Module):
        def forward(self, x):
            return torch.atan(x)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.wave = Wave()

        def forward(self, x):
            h = self.proj(x)
            # sinh's result is unimportable, so the add after it is skipped, not listed.
            return torch.flip(h, dims=[0]) + self.wave(h) + torch.sinh(x)

    with pytest.raises(UnsupportedTorchOpsError) as caught:
        remat.from_torch(Odd(), (torch.randn(2, 4),))
    message = str(caught.value)
    for text in ("aten.atan.default", "aten.flip.default", "aten.sinh.default", "atan (wave)"):
        assert text in message, message
    assert {op for _, op, _, _ in caught.value.problems} == {
        "aten.atan.default",
        "aten.flip.default",
        "aten.sinh.default",
    }


def test_no_grad_region_gets_no_gradient(client):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x):
            with torch.no_grad():
                scale = self.fc(x).sum(-1, keepdim=True)
            return self.fc(x) * scale

    module, x = Scaled().double(), randn(2, 3)
    graph, params = remat.from_torch(module, (x,))
    graph.output("loss", remat.sum(graph["output"]))
    result = client.run(graph, {**params, "x": x.numpy()}, wrt=["fc.weight"], loss="loss")
    module(x).sum().backward()
    np.testing.assert_allclose(result.grads["fc.weight"], module.fc.weight.grad, rtol=1e-12)


def test_buffers_written_in_place_come_out_updated(client):
    class Ema(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("average", torch.zeros(3, dtype=torch.float64))
            self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
            self.register_buffer("untouched", torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            self.average.mul_(0.9).add_(x.mean(0), alpha=0.1)
            self.steps += 1
            return x * self.average + self.untouched

    x = randn(4, 3)
    graph, params = remat.from_torch(Ema(), (x,))
    assert graph.output_names == ["output", "updated/average", "updated/steps"]
    result = client.run(graph, {**params, "x": x.numpy()})
    module = Ema()
    out = module(x)
    np.testing.assert_allclose(result.outputs["output"], out.numpy(), rtol=1e-14)
    np.testing.assert_allclose(result.outputs["updated/average"], module.average, rtol=1e-14)
    assert int(result.outputs["updated/steps"]) == 1


def test_constants_are_folded():
    class Masked(torch.nn.Module):
        def forward(self, x):
            causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)
            angles = torch.arange(4, dtype=x.dtype) * 0.5
            return x.masked_fill(causal, 0.0) + torch.cos(angles)

    graph, _ = remat.from_torch(Masked(), (torch.randn(4, 4, dtype=torch.float64),))
    assert sorted({n.op for n in graph.nodes}) == ["add", "constant", "where"]


@pytest.mark.parametrize(
    "fn, ops",
    [
        (lambda m, x: F.linear(x, m.w, m.b), {"linear", "transpose"}),
        (lambda m, x: torch.addmm(m.b, x, m.w.t()), {"linear", "transpose"}),
        (
            lambda m, x: torch.addmm(m.b, x, m.w.t(), beta=2.0),
            {"matmul", "add", "mul", "transpose"},
        ),
    ],
    ids=["linear", "addmm", "addmm_beta"],
)
def test_an_affine_layer_is_one_linear_op(fn, ops):
    """x @ w + b as one buffer (matmul then add hold the product and the sum at once);
    a scaled bias keeps the ops (gradients: `test_aten_op`'s addmm)."""
    graph, _ = remat.from_torch(Fn(fn, w=randn(6, 4), b=randn(6)), (randn(3, 4),))
    assert {n.op for n in graph.nodes} - {"constant"} == ops


@pytest.mark.parametrize(
    "bias, product, fuses",
    [((4,), (2, 4), True), ((2, 1), (2, 4), True), ((3,), (4,), False), ((2, 1, 4), (3, 4), False)],
)
def test_a_bias_fuses_only_when_it_broadcasts_into_the_product(bias, product, fuses):
    from remat.importers.aten_math import _broadcasts_to

    assert _broadcasts_to(bias, product) is fuses


def test_import_remat_does_not_import_torch():
    code = "import sys, remat; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_torch_is_a_clear_import_error():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import remat\n"
        "try:\n"
        "    remat.from_torch(None, ())\n"
        "except ImportError as e:\n"
        "    assert 'pip install \"remat[torch]\"' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the ATen op table, one small module per mapping ---------------------------------------
class Fn(torch.nn.Module):
    """forward(x[, y]) = fn(self, x[, y]); keyword tensors become parameters."""

    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for name, value in params.items():
            self.register_parameter(name, torch.nn.Parameter(value.double()))

    def forward(self, x):
        return self.fn(self, x)


class Fn2(Fn):
    def forward(self, x, y):
        return self.fn(self, x, y)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


X = randn(2, 3, 4, 5)
M = randn(4, 6, seed=1)
IDS = torch.tensor([[0, 3, 1], [2, 2, 4]])
TIES = torch.tensor([[1.0, 3.0, 3.0, -2.0, 0.0], [0.0, 0.0, -1.0, 2.0, 2.0]], dtype=torch.float64)

OPS = {
    # linear algebra
    "linear": (Fn(lambda m, x: F.linear(x, m.w, m.b), w=randn(6, 5), b=randn(6)), X),
    "addmm": (
        Fn(lambda m, x: torch.addmm(m.b, x, m.w, beta=0.5, alpha=2.0), w=M, b=randn(6)),
        randn(3, 4),
    ),
    "addmm_affine": (Fn(lambda m, x: torch.addmm(m.b, x, m.w), w=M, b=randn(6)), randn(3, 4)),
    "baddbmm_affine": (
        Fn(lambda m, x: torch.baddbmm(m.b, x, m.w), w=randn(2, 5, 3), b=randn(4, 1)),
        randn(2, 4, 5),
    ),
    "linear_no_bias": (Fn(lambda m, x: F.linear(x, m.w), w=randn(6, 5)), X),
    "mm_t": (Fn(lambda m, x: torch.mm(x, m.w.t()), w=randn(6, 4)), randn(3, 4)),
    "bmm": (Fn(lambda m, x: torch.bmm(x, m.w), w=randn(2, 5, 3)), randn(2, 4, 5)),
    "matmul": (Fn(lambda m, x: x @ m.w, w=randn(5, 2)), X),
    # arithmetic with alpha, scalars and broadcasting
    "add_sub_alpha": (
        Fn(lambda m, x: torch.add(x, m.b, alpha=2) - torch.sub(x, m.b, alpha=0.5), b=randn(5)),
        X,
    ),
    "rsub_scalars": (
        Fn(lambda m, x: 1.5 - x + torch.rsub(x, 2.0) * 3 + x / 4 + 2 / (x * x + 1)),
        X,
    ),
    "pow": (Fn(lambda m, x: x**3 + torch.pow(2.0, x) + (x * x + 1) ** 0.5), X),
    "unary": (
        Fn(
            lambda m, x: (
                -x
                + torch.exp(x)
                + torch.log(x * x + 1)
                + torch.tanh(x)
                + torch.sigmoid(x)
                + torch.rsqrt(x * x + 1)
                + torch.reciprocal(x + 10)
                + torch.erf(x)
                + torch.log1p(x * x)
                + torch.expm1(x)
                + torch.square(x)
                + torch.abs(x)
            )
        ),
        X,
    ),
    "activations": (
        Fn(
            lambda m, x: (
                torch.relu(x)
                + F.gelu(x)
                + F.gelu(x, approximate="tanh")
                + F.silu(x)
                + F.leaky_relu(x, 0.2)
                + F.relu6(x * 4)
                + F.hardtanh(x, -0.5, 0.5)
            )
        ),
        X,
    ),
    "hard_activations_at_kinks": (
        Fn(lambda m, x: F.hardswish(x) * 2),
        torch.tensor([-4.0, -3.0, -1.0, 0.0, 2.0, 3.0, 4.5], dtype=torch.float64),
    ),
    "clamp": (
        Fn(lambda m, x: torch.clamp(x, -0.5, 0.7) + torch.clamp(x, min=0.1) + x.clamp_max(0.3)),
        X,
    ),
    "softmax": (
        Fn(lambda m, x: F.softmax(x, dim=1) * F.log_softmax(x, -1, dtype=torch.float64)),
        X,
    ),
    "where_masked_fill": (
        Fn2(lambda m, x, y: torch.where(x > 0, x, y).masked_fill(y < -0.5, 2.0)),
        (X, randn(2, 3, 4, 5, seed=3)),
    ),
    "comparisons": (
        Fn(lambda m, x: torch.where((x >= 0.1) & ~(x == 0) | (x < -1.0), x, x * 2) * (x != 0.3)),
        X,
    ),
    "to_type_as": (
        Fn(lambda m, x: x.float().double() + x.to(torch.float32).type_as(x) + (x > 0).to(x.dtype)),
        X,
    ),
    # normalization
    "layer_norm": (
        Fn(
            lambda m, x: F.layer_norm(x, (4, 5), m.w, m.b) + F.layer_norm(x, (5,)),
            w=randn(4, 5),
            b=randn(4, 5),
        ),
        X,
    ),
    "rms_norm": (
        Fn(lambda m, x: F.rms_norm(x, (5,), m.w, eps=1e-5) + F.rms_norm(x, (5,)), w=randn(5)),
        X,
    ),
    "group_norm": (Fn(lambda m, x: F.group_norm(x, 3, m.w, m.b), w=randn(3), b=randn(3)), X),
    "batch_norm_no_affine": (torch.nn.BatchNorm2d(3, affine=False), X),
    "batch_norm_no_stats": (torch.nn.BatchNorm2d(3, track_running_stats=False), X),
    "batch_norm_eval": (torch.nn.BatchNorm2d(3).eval(), X),
    # shapes
    "views": (
        Fn(
            lambda m, x: (
                x.view(6, 20)
                .reshape(2, 60)
                .flatten()
                .unsqueeze(0)
                .squeeze(0)
                .reshape(2, 3, 4, 5)
                .permute(0, 2, 3, 1)
                .transpose(1, 2)
                .contiguous()
                .sum(-1)
            )
        ),
        X,
    ),
    "expand_repeat": (
        Fn(
            lambda m, x: (
                x[:, :1].expand(2, 3, 4, 5) + x.repeat(1, 1, 1, 1) + x[0].repeat(2, 1, 1, 1)
            )
        ),
        X,
    ),
    "slices": (
        Fn(
            lambda m, x: (
                x[:, 1:, ::2, -3:] * x[1, :2, 1:3, None, 1:4].sum()
                + x.narrow(2, 1, 2).sum()
                + x.select(1, -1).sum()
            )
        ),
        X,
    ),
    "cat_stack": (
        Fn(
            lambda m, x: (
                torch.cat([x, x * 2], dim=1).sum(1, keepdim=True)
                + torch.stack([x, -x], dim=-1).sum(-1)
            )
        ),
        X,
    ),
    "split_chunk_unbind": (
        Fn(
            lambda m, x: (
                sum(p.sum(2) for p in torch.split(x, [1, 3], dim=2))
                * torch.chunk(x, 3, dim=1)[1].sum()
                + sum(torch.unbind(x, dim=1))[0, 0]
            )
        ),
        X,
    ),
    "gather_index": (
        Fn(
            lambda m, x: (
                torch.gather(
                    x, 3, torch.tensor([[[[0, 4], [1, 1], [2, 3]]]]).expand(2, 3, 3, 2)
                ).sum()
                + torch.index_select(x, 2, torch.tensor([3, 0, 3])).sum(2, keepdim=True)
                + x[:, [0, 2]].sum(1, keepdim=True)
            )
        ),
        X,
    ),
    "index_constant_grid": (
        Fn(lambda m, x: x[torch.arange(2)[:, None], torch.tensor([[0, 2, 1]])]),
        X,
    ),
    "embedding_index": (
        Fn2(lambda m, ids, y: F.embedding(ids, m.w) * y + m.w[ids], w=randn(5, 4)),
        (IDS, randn(2, 3, 4, seed=4)),
    ),
    # reductions
    "reductions": (
        Fn(
            lambda m, x: (
                x.sum((1, 3), keepdim=True)
                + x.mean(2, keepdim=True)
                + x.amax(-1, keepdim=True)
                + x.amin(1, keepdim=True)
                + x.sum()
                + x.mean()
                + x.max()
                - x.min()
            )
        ),
        X,
    ),
    "max_dim_ties": (
        Fn(
            lambda m, x: (
                torch.max(x, dim=1)[0] * 2
                + torch.min(x, dim=1, keepdim=True)[0].sum()
                + torch.amax(x, 1)
            )
        ),
        TIES,
    ),
    "var_std_logsumexp": (
        Fn(
            lambda m, x: (
                x.var(1).sum()
                + x.std((2, 3), keepdim=True).sum()
                + torch.var(x, 3, correction=0).sum()
                + torch.logsumexp(x, -1)
            )
        ),
        X,
    ),
    "argmax": (
        Fn(lambda m, x: (x.argmax(-1), torch.argmin(x, dim=1, keepdim=True), x.argmax())),
        X,
    ),
    "cumsum": (Fn(lambda m, x: torch.cumsum(x, dim=2) + torch.cumsum(x, -1)), X),
    "triangles": (
        Fn(
            lambda m, x: (
                torch.triu(x, 1)
                + torch.tril(x, -1) * 2
                + x.masked_fill(torch.ones(4, 5, dtype=torch.bool).triu(), 0.0)
            )
        ),
        X,
    ),
    "constants": (
        Fn(
            lambda m, x: (
                x * torch.arange(5, dtype=x.dtype)
                + torch.full((4, 1), 0.5, dtype=x.dtype)
                + torch.zeros_like(x)
                + torch.ones(5, dtype=x.dtype).cumsum(0)
                + x.new_ones(5)
            )
        ),
        X,
    ),
    "detach": (Fn(lambda m, x: x * x.detach() + m.w * m.w.detach(), w=randn(5)), X),
    # convolution, pooling, resizing
    "conv2d_groups_bias": (
        Fn(
            lambda m, x: F.conv2d(x, m.w, m.b, stride=(2, 1), padding=1, dilation=(1, 2), groups=3),
            w=randn(6, 1, 3, 3),
            b=randn(6),
        ),
        X,
    ),
    "conv2d_same": (
        Fn(
            lambda m, x: F.conv2d(x, m.w, padding="same") + F.conv2d(x, m.v, padding="same"),
            w=randn(2, 3, 3, 3),
            v=randn(2, 3, 2, 4),
        ),
        X,
    ),
    "conv1d": (
        Fn(lambda m, x: F.conv1d(x, m.w, m.b, stride=2, padding=1), w=randn(4, 3, 3), b=randn(4)),
        randn(2, 3, 9),
    ),
    "conv_transpose2d": (
        Fn(
            lambda m, x: F.conv_transpose2d(x, m.w, m.b, stride=2, padding=1, output_padding=1),
            w=randn(3, 2, 3, 3),
            b=randn(2),
        ),
        X,
    ),
    "max_pool2d": (
        Fn(
            lambda m, x: (
                F.max_pool2d(torch.relu(x), 3, 2, 1) + F.max_pool2d(x, (2, 2), ceil_mode=True).sum()
            )
        ),
        X,
    ),
    "max_pool2d_indices": (
        Fn(lambda m, x: F.max_pool2d(x, 3, 2, 1, return_indices=True)),
        X,
    ),
    "bool_mask_input": (
        Fn2(lambda m, x, mask: x.masked_fill(mask, 0.0) * 2),
        (X, X > 0.5),
    ),
    "avg_pool2d": (
        Fn(
            lambda m, x: (
                F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) + F.avg_pool2d(x, 3, 1, 1)
            )
        ),
        X,
    ),
    "adaptive_avg_pool2d": (
        Fn(lambda m, x: F.adaptive_avg_pool2d(x, (2, 1)).sum() + F.adaptive_avg_pool2d(x, 1)),
        randn(2, 3, 4, 6),
    ),
    "upsample": (
        Fn(
            lambda m, x: (
                F.interpolate(x, size=(6, 7), mode="bilinear").sum()
                + F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True).sum()
                + F.interpolate(x, size=(5, 9), mode="nearest")
            )
        ),
        X,
    ),
    "pad": (
        Fn(
            lambda m, x: (
                F.pad(x, (1, 2, 0, 1), value=0.5).sum()
                + F.pad(x, (2, 1, 1, 2), mode="reflect").sum()
                + F.pad(x, (1, 1, 2, 0), mode="replicate")
            )
        ),
        X,
    ),
    # attention and losses
    "sdpa_float_mask_scale": (
        Fn2(
            lambda m, x, y: F.scaled_dot_product_attention(
                x,
                x * 2,
                y,
                attn_mask=torch.triu(torch.full((4, 4), -1e9, dtype=x.dtype), 1),
                scale=0.3,
            )
        ),
        (randn(2, 3, 4, 5), randn(2, 3, 4, 6, seed=5)),
    ),
    "sdpa_gqa_causal": (
        Fn2(
            lambda m, x, y: F.scaled_dot_product_attention(x, y, y, is_causal=True, enable_gqa=True)
        ),
        (randn(2, 4, 5, 8), randn(2, 2, 5, 8, seed=6)),
    ),
    "cross_entropy": (
        Fn2(
            lambda m, x, t: (
                F.cross_entropy(x, t, ignore_index=2)
                + F.cross_entropy(x, t, reduction="sum")
                + F.nll_loss(F.log_softmax(x, 1), t, reduction="none").sum()
            )
        ),
        (randn(6, 5), torch.tensor([0, 2, 4, 1, 2, 3])),
    ),
    "cross_entropy_spatial": (
        Fn2(lambda m, x, t: F.cross_entropy(x, t)),
        (
            randn(2, 4, 3, 3),
            torch.randint(0, 4, (2, 3, 3), generator=torch.Generator().manual_seed(0)),
        ),
    ),
    "mse_loss": (
        Fn2(lambda m, x, y: F.mse_loss(x, y) + F.mse_loss(x, y, reduction="sum")),
        (X, randn(2, 3, 4, 5, seed=7)),
    ),
    "one_hot": (
        Fn2(lambda m, x, t: x * F.one_hot(t, 5)),
        (randn(6, 5), torch.tensor([0, 2, 4, 1, 2, 3])),
    ),
}


@pytest.mark.parametrize("case_name", list(OPS))
def test_aten_op(client, case_name):
    module, inputs = OPS[case_name]
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    module = module.double()
    graph, params = remat.from_torch(module, inputs)
    names = [spec.name for spec in graph.inputs if spec.name not in params]
    ref = copy.deepcopy(module)
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outputs = named_outputs(ref(*leaves))
    floats = {k: tuple(v.shape) for k, v in outputs.items() if v.is_floating_point()}
    feeds = add_loss(graph, floats) if floats else {}
    feeds.update(params)
    feeds.update({name: t.numpy() for name, t in zip(names, inputs)})
    wrt = [n for n, p in ref.named_parameters()] + [
        name for name, t in zip(names, leaves) if t.is_floating_point()
    ]
    result = client.run(graph, feeds, wrt=wrt if floats else [], loss="loss" if floats else None)
    for name, value in outputs.items():
        np.testing.assert_allclose(
            result.outputs[name], value.detach().numpy(), rtol=1e-12, atol=1e-12
        )
    if not floats:
        return
    loss = sum(
        (v * torch.from_numpy(feeds[f"R/{k}"])).sum() for k, v in outputs.items() if k in floats
    )
    loss.backward()
    expected = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    expected.update({n: t.grad.numpy() for n, t in zip(names, leaves) if t.is_floating_point()})
    assert_grads_close(result.grads, expected)
