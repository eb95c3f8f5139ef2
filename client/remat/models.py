"""Sample models for the demo, the benchmarks and the tests.

Each builder returns a `Model`: the graph, seeded inputs, the inputs to
differentiate and the loss output's name.

    >>> import remat
    >>> model = remat.models.mlp(batch=8, widths=(16, 32, 4))
    >>> model.loss, sorted(model.wrt)[:2]
    ('loss', ['b0', 'b1'])
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops
from .graph import Graph


@dataclass
class Model:
    graph: Graph
    inputs: dict[str, np.ndarray]
    wrt: list[str]
    loss: str = "loss"


def mlp(batch: int = 64, widths=(256, 512, 512, 10), dtype: str = "float32",
        seed: int = 0, l2: float = 1e-4) -> Model:
    """Tanh MLP with softmax cross-entropy and an L2 penalty on the weights."""
    rng = np.random.default_rng(seed)
    g = Graph("mlp")
    inputs: dict[str, np.ndarray] = {
        "x": rng.standard_normal((batch, widths[0])).astype(dtype),
        "labels": rng.integers(0, widths[-1], size=batch).astype("int64"),
    }
    h = g.input("x", (batch, widths[0]), dtype)
    labels = g.input("labels", (batch,), "int64")
    penalty = None
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        inputs[f"w{i}"] = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(dtype)
        inputs[f"b{i}"] = np.zeros(fan_out, dtype)
        w, b = g.input(f"w{i}", (fan_in, fan_out), dtype), g.input(f"b{i}", (fan_out,), dtype)
        h = ops.add(h @ w, b, name=f"linear{i}")
        if i < len(widths) - 2:
            h = ops.tanh(h, name=f"act{i}")
        term = ops.sum(w * w)
        penalty = term if penalty is None else penalty + term
    loss = ops.add(ops.cross_entropy(h, labels, name="xent"), penalty * l2, name="loss")
    g.output("loss", loss)
    wrt = [name for name in inputs if name not in ("x", "labels")]
    return Model(g, inputs, wrt)
