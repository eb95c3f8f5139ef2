"""A zoo model (tests/zoo.py) set up for bench/models.py: the same training step in
torch eager, in torch with `torch.utils.checkpoint` around every block, and in remat.

The loss is tests/zoo_loss.py's: sum(output * R) over the model's float outputs. The
step is the gradient of that loss with respect to every parameter and every float input
of the model, in both frameworks (tests/unit/test_from_torch.py's `wrt`).

Which submodules are "blocks" is the one table `BLOCKS`: a function per model giving
the dotted paths of the submodules that `checkpointed` wraps.

Import this after the BLAS thread variables are set (it imports numpy and torch).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import remat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import zoo  # noqa: E402  (tests/zoo.py: plain PyTorch models, no test dependencies)
from zoo_loss import add_loss, loss_weights, named_outputs, torch_loss  # noqa: E402

# The submodules torch.utils.checkpoint wraps, one function per zoo model: ResNet's
# BasicBlocks, U-Net's DoubleConv stages (the up-sampling convs and the 1x1 head stay
# outside, as in the usual per-stage recipe), one transformer layer each for GPT-2,
# BERT and the LLaMA stack ("" would be the root).
BLOCKS: dict[str, Callable[[nn.Module], list[str]]] = {
    "resnet": lambda m: [
        f"{stage}.{i}" for stage in ("layer1", "layer2") for i in range(len(m.get_submodule(stage)))
    ],
    "unet": lambda m: ["enc1", "enc2", "bottleneck", "dec2", "dec1"],
    "gpt2": lambda m: [f"transformer.h.{i}" for i in range(len(m.transformer.h))],
    "bert": lambda m: [f"encoder.layer.{i}" for i in range(len(m.encoder.layer))],
    "llama": lambda m: [f"layers.{i}" for i in range(len(m.layers))],
}


class Checkpointed(nn.Module):
    """`block`, run under torch.utils.checkpoint (non-reentrant): its activations are
    not kept for backward but recomputed from its inputs."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def checkpointed(name: str, module: nn.Module) -> nn.Module:
    """`module` with each of its BLOCKS[name] wrapped in Checkpointed (in place; the
    root itself when a path is "")."""
    for path in BLOCKS[name](module):
        if not path:
            return Checkpointed(module)
        parent, _, child = path.rpartition(".")
        owner = module.get_submodule(parent)
        owner.register_module(child, Checkpointed(owner.get_submodule(child)))
    return module


def describe_blocks(name: str) -> str:
    """What BLOCKS[name] wraps, e.g. "2 BasicBlock"."""
    module, _, _ = zoo.MODELS[name](torch.float32, batch=1)
    kinds: dict[str, int] = {}
    for path in BLOCKS[name](module):
        kind = type(module.get_submodule(path)).__name__
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in kinds.items())


def float_outputs(out) -> dict[str, torch.Tensor]:
    """torch's float outputs under from_torch's names: the loss's terms."""
    return {k: v for k, v in named_outputs(out).items() if v.is_floating_point()}


@dataclass
class Case:
    """One zoo model at one batch: the module, its example inputs and the loss's R."""

    name: str
    batch: int
    module: nn.Module
    args: tuple
    kwargs: dict
    weights: dict[str, np.ndarray]  # the loss's R per output, "R/<output>"
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the loss's outputs

    @classmethod
    def build(cls, name: str, batch: int) -> Case:
        module, args, kwargs = zoo.MODELS[name](torch.float32, batch=batch)
        with torch.no_grad():  # output shapes, on a copy: the buffers stay as built
            shapes = {
                k: tuple(v.shape)
                for k, v in float_outputs(copy.deepcopy(module)(*args, **kwargs)).items()
            }
        return cls(name, batch, module, args, kwargs, loss_weights(shapes, dtype="float32"), shapes)

    def input_bytes(self) -> int:
        """Parameters, buffers, inputs and R: what both frameworks hold throughout."""
        tensors = [*self.module.state_dict().values(), *self.args, *self.kwargs.values()]
        return sum(t.nbytes for t in tensors) + sum(w.nbytes for w in self.weights.values())


def torch_step(case: Case, checkpoint_blocks: bool = False) -> Callable[[], float]:
    """One training step in torch eager on its own copy of the module (wrapped per
    block when `checkpoint_blocks`): loss, then torch.autograd.grad with respect to the
    parameters and the float inputs (no .grad accumulation between steps)."""
    module = copy.deepcopy(case.module)
    if checkpoint_blocks:
        module = checkpointed(case.name, module)
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in case.args]
    wrt = [*module.parameters(), *(a for a in args if a.requires_grad)]
    weights = {k: torch.from_numpy(v) for k, v in case.weights.items()}

    def step() -> float:
        loss = torch_loss(float_outputs(module(*args, **case.kwargs)), weights)
        torch.autograd.grad(loss, wrt)
        return loss.item()

    return step


@dataclass
class RematCase:
    """The same model through remat.from_torch, with the loss added to its graph."""

    graph: remat.Graph
    feeds: dict[str, np.ndarray]
    wrt: list[str]

    @classmethod
    def build(cls, case: Case) -> RematCase:
        graph, params = remat.from_torch(case.module, case.args, case.kwargs)
        feeds = add_loss(graph, case.shapes, dtype="float32")
        assert all(np.array_equal(feeds[k], v) for k, v in case.weights.items())
        feeds.update(params)
        inputs = {**dict(zip(zoo.input_names(case.name), case.args)), **case.kwargs}
        feeds.update({k: v.numpy() for k, v in inputs.items()})
        wrt = [n for n, _ in case.module.named_parameters()] + zoo.float_inputs(case.name)
        return cls(graph, feeds, wrt)

    def input_bytes(self) -> int:
        return sum(v.nbytes for v in self.feeds.values())


def remat_step(client: remat.Client, rc: RematCase, policy) -> Callable[[], remat.RunResult]:
    """One step through the server, as a training loop makes it (bench/engine.py's
    "e2e"): `client.run(..., out=previous_result)`, so outputs and gradients are
    received into the previous step's arrays."""
    last: list = [None]

    def step():
        last[0] = client.run(
            rc.graph, rc.feeds, wrt=rc.wrt, loss="loss", policy=policy, out=last[0]
        )
        return last[0]

    return step
