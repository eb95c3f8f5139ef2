"""Random ops whose randomness is a pure function of attributes, never of state.

A dropout mask depends only on (seed, key, shape), so recomputing a node under any
checkpointing policy reproduces it bit for bit, and the VJP can regenerate the same
mask instead of storing it.
"""

from __future__ import annotations

import hashlib

import numpy as np

from remat_proto import dtypes

from . import rules
from .registry import NODE_NAME, Attr, elementwise_cost, register


def keep_mask(shape: tuple[int, ...], p: float, seed: int, key: str) -> np.ndarray:
    """Boolean mask, True with probability 1 - p; a pure function of its arguments."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    rng = np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))
    return rng.random(shape) >= p


def _dropout(x, p, seed, key):
    if p == 0.0:
        return x
    return x * keep_mask(x.shape, p, seed, key) / (1.0 - p)


register(
    "dropout",
    family="random",
    infer=rules.unary(dtypes.FLOATS),
    forward=_dropout,
    # Linear in x with the same mask: the VJP is dropout of the gradient.
    vjp=lambda e, g, out, x, p, seed, key: [e.dropout(g, p=p, seed=seed, key=key)],
    residuals="none",
    cost=elementwise_cost(3),
    attrs={
        "p": Attr(
            "float",
            default=0.5,
            check=lambda p: 0.0 <= p < 1.0,
            requirement="must be in [0, 1)",
            doc="Probability of dropping.",
        ),
        "seed": Attr("int", default=0),
        "key": Attr(
            "string", default=NODE_NAME, doc="Names the mask's stream; defaults to the node's name."
        ),
    },
    doc="x * keep / (1 - p), keep ~ Bernoulli(1 - p) from (seed, key, shape) alone.",
)
