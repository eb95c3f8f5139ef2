"""A scalar loss over a zoo model's outputs, in remat and in torch (tests and
bench/models.py share it): sum(output * R) per output, with a fixed random R per output
(seeded), summed over the outputs. A random R, not mean(out ** 2), so every output
element gets a different, nonzero cotangent and the backward pass has no shortcut.

    >>> import numpy as np, remat
    >>> g = remat.Graph("y")
    >>> _ = g.output("output", remat.relu(g.input("x", (2, 3), "float32")))
    >>> feeds = add_loss(g, {"output": (2, 3)}, dtype="float32")
    >>> sorted(feeds), feeds["R/output"].dtype, "loss" in g.output_names
    (['R/output'], dtype('float32'), True)
"""

from __future__ import annotations

import numpy as np

import remat


def loss_weights(
    outputs: dict[str, tuple[int, ...]], seed: int = 0, dtype: str = "float64"
) -> dict[str, np.ndarray]:
    """The R feed of each output (by name, in order): uniform(0.5, 1.5) with a random sign."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape in outputs.items():
        weight = np.asarray(rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape))
        feeds[f"R/{name}"] = weight.astype(dtype)
    return feeds


def add_loss(
    graph: remat.Graph, outputs: dict[str, tuple[int, ...]], seed: int = 0, dtype: str = "float64"
) -> dict[str, np.ndarray]:
    """Add output "loss" = sum over `outputs` (name -> shape) of sum(output * R) to
    `graph`, each R a new graph input "R/<name>"; returns the R feeds."""
    feeds, total = loss_weights(outputs, seed, dtype), None
    for name, shape in outputs.items():
        term = remat.sum(graph[name] * graph.input(f"R/{name}", shape, dtype))
        total = term if total is None else total + term
    graph.output("loss", total)
    return feeds


def named_outputs(out) -> dict:
    """A torch module's outputs under from_torch's names: one tensor is "output", a
    tuple "output_0", "output_1"..., a dict keeps its keys (None values dropped)."""
    import torch

    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": o for i, o in enumerate(out)}
    return {k: v for k, v in out.items() if v is not None}


def torch_loss(outputs: dict, feeds: dict):
    """The same loss of torch outputs (name -> tensor), given add_loss's feeds as
    tensors (name -> tensor)."""
    return sum((value * feeds[f"R/{name}"]).sum() for name, value in outputs.items())


def remat_workload(name: str, batch: int) -> tuple[remat.Graph, dict[str, np.ndarray], list[str]]:
    """A zoo model (tests/zoo.py) through `remat.from_torch` with this loss, float32:
    (graph, feeds: parameters, inputs and R, wrt: parameters and float inputs)."""
    import copy

    import torch
    import zoo

    module, args, kwargs = zoo.MODELS[name](torch.float32, batch=batch)
    graph, params = remat.from_torch(module, args, kwargs)
    with torch.no_grad():
        outputs = named_outputs(copy.deepcopy(module)(*args, **kwargs))
    floats = {k: tuple(v.shape) for k, v in outputs.items() if v.is_floating_point()}
    feeds = add_loss(graph, floats, dtype="float32")
    feeds.update(params)
    feeds.update({k: v.numpy() for k, v in zoo.inputs(name, torch.float32, batch).items()})
    wrt = [n for n, _ in module.named_parameters()] + list(zoo.float_inputs(name))
    return graph, feeds, wrt
