"""from_torch imports GELU's tanh formula, written out as transformers' GPT-2 does, as one
`gelu(approximate="tanh")` op (importers/torch_fusions.py): the same values and
gradients as torch's (float64), a lower store_all peak, and no fusion where another op
reads one of the formula's intermediate values."""

from __future__ import annotations

import math

import numpy as np
import pytest

import remat

torch = pytest.importorskip("torch")


def new_gelu(x):
    """transformers' NewGELUActivation.forward, and the tanh it computes."""
    t = torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))
    return 0.5 * x * (1.0 + t), t


class Mlp(torch.nn.Module):
    """fc -> GELU formula -> fc; with `leak`, the formula's tanh is also an output (read
    outside the formula, so it must stay)."""

    def __init__(self, leak: bool = False):
        super().__init__()
        self.up, self.down, self.leak = torch.nn.Linear(6, 16), torch.nn.Linear(16, 6), leak

    def forward(self, x):
        activation, t = new_gelu(self.up(x))
        y = self.down(activation)
        return (y, t) if self.leak else y


def imported(leak: bool = False, fuse: bool = True):
    torch.manual_seed(0)
    module = Mlp(leak).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    graph, params = remat.from_torch(module, (x,), fuse=fuse)
    return module, x, graph, params


def ops(graph) -> list[str]:
    return [node.op for node in graph.to_proto().nodes]


@pytest.fixture(scope="module")
def client():
    with remat.Client.in_process() as client:
        yield client


def test_the_formula_becomes_one_gelu_op():
    _, _, fused, _ = imported()
    _, _, plain, _ = imported(fuse=False)
    assert ops(fused).count("gelu") == 1
    assert {"tanh", "pow"}.isdisjoint(ops(fused))
    gelu = next(n for n in fused.to_proto().nodes if n.op == "gelu")
    assert gelu.attrs["approximate"].s == "tanh"
    assert "gelu" not in ops(plain) and {"tanh", "pow"} <= set(ops(plain))


def test_an_intermediate_read_elsewhere_keeps_the_formula():
    _, _, graph, _ = imported(leak=True)
    assert "gelu" not in ops(graph) and "tanh" in ops(graph)


@pytest.mark.parametrize("leak", [False, True])
def test_values_and_gradients_match_torch(client, leak):
    module, x, graph, params = imported(leak)
    outputs = graph.output_names
    loss = graph.output("loss", sum(remat.sum(graph[name]) for name in outputs))
    wrt = ["x", *params]
    result = client.run(graph, {**params, "x": x.numpy()}, wrt=wrt, loss=loss.name)
    x_ref = x.clone().requires_grad_(True)
    reference = module(x_ref)
    reference = reference if isinstance(reference, tuple) else (reference,)
    sum(r.sum() for r in reference).backward()
    np.testing.assert_allclose(
        result.outputs["loss"], sum(r.sum() for r in reference).item(), rtol=1e-12
    )
    np.testing.assert_allclose(result.grads["x"], x_ref.grad.numpy(), rtol=1e-10, atol=1e-12)
    for name, parameter in module.named_parameters():
        np.testing.assert_allclose(
            result.grads[name], parameter.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name
        )


def test_the_fused_graph_holds_less(client):
    """Its backward reads x alone, where the formula's reads four values of x's size."""
    peaks = {}
    for fuse in (True, False):
        _, x, graph, params = imported(fuse=fuse)
        loss = graph.output("loss", remat.sum(graph["output"]))
        result = client.run(
            graph, {**params, "x": x.numpy()}, wrt=list(params), loss=loss.name, policy="store_all"
        )
        peaks[fuse] = result.metrics.peak_bytes
    assert peaks[True] < peaks[False], peaks
