"""Check a server's gradients against centered differences, in float64.

>>> import numpy as np, remat
>>> g = remat.Graph()
>>> x = g.input("x", (3,), dtype="float64")
>>> _ = g.output("loss", remat.sum(remat.tanh(x) * x))
>>> with remat.Client.in_process() as client:
...     report = remat.gradcheck(client, g, {"x": np.array([0.1, -0.4, 2.0])},
...                              wrt=["x"], loss="loss")
>>> report["x"] < 1e-6
True
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def numeric_gradient(
    client, graph, inputs: Mapping[str, np.ndarray], name: str, loss: str, h: float = 1e-6
) -> np.ndarray:
    """(f(x + h e_i) - f(x - h e_i)) / 2h for every element i of input `name`."""
    base = np.asarray(inputs[name], dtype=np.float64)
    grad = np.zeros(base.shape)
    for index in np.ndindex(base.shape):
        values = []
        for step in (h, -h):
            bumped = base.copy()
            bumped[index] += step
            result = client.run(graph, {**inputs, name: bumped}, fetch=[loss])
            values.append(float(result.outputs[loss]))
        grad[index] = (values[0] - values[1]) / (2 * h)
    return grad


def gradcheck(
    client, graph, inputs: Mapping[str, np.ndarray], wrt, loss: str, h: float = 1e-6
) -> dict[str, float]:
    """Relative error max|analytic - numeric| / max(max|numeric|, 1e-3) per `wrt` input.

    Inputs in `wrt` must be float64 (finite differences in float32 are too coarse).
    """
    for name in wrt:
        if np.asarray(inputs[name]).dtype != np.float64:
            raise TypeError(
                f"gradcheck needs float64 inputs; '{name}' is {np.asarray(inputs[name]).dtype}"
            )
    analytic = client.run(graph, inputs, wrt=list(wrt), loss=loss).grads
    report = {}
    for name in wrt:
        numeric = numeric_gradient(client, graph, inputs, name, loss, h)
        scale = max(float(np.max(np.abs(numeric), initial=0.0)), 1e-3)
        report[name] = float(np.max(np.abs(analytic[name] - numeric), initial=0.0)) / scale
    return report
