"""Random ops whose randomness is a pure function of attributes, never of state.

A dropout mask depends only on (seed, key, shape), so recomputing a node under any
checkpointing policy reproduces it bit for bit, and the VJP can regenerate the same
mask instead of storing it.
"""

from __future__ import annotations

import hashlib

import numpy as np

from remat_proto import dtypes

from ..graph.ir import TensorType
from . import rules
from .elementwise import ufunc_buffers
from .registry import NODE_NAME, Attr, elementwise_cost, register


def _generator(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))


def keep_mask(shape: tuple[int, ...], p: float, seed: int, key: str) -> np.ndarray:
    """Boolean mask, True with probability 1 - p; a pure function of its arguments."""
    return _generator(seed, key).random(shape) >= p


# dropout draws keep_mask's float64 uniforms this many at a time (the generator's
# stream does not depend on how it is cut), so its temporaries are bounded: 8 bytes of
# draws and a bool an element, not 9 bytes per element of x (2.25x a float32 x).
DRAWS = 1 << 14  # 128 KiB of draws: within ~4% of drawing all at once


def _dropout(x, p, seed, key):
    if p == 0.0:
        return x
    out = np.empty(x.shape, x.dtype)
    flat = out.reshape(-1)
    if x.flags.c_contiguous:
        source = x.reshape(-1)
    else:  # through the result buffer, not a flattened copy
        np.copyto(out, x)
        source = flat
    rng, size = _generator(seed, key), min(flat.size, DRAWS)
    draws, keep = np.empty(size), np.empty(size, bool)
    for start in range(0, flat.size, DRAWS):
        part = slice(start, min(start + DRAWS, flat.size))
        n = part.stop - part.start
        rng.random(out=draws[:n])
        np.greater_equal(draws[:n], p, out=keep[:n])
        np.multiply(source[part], keep[:n], out=flat[part])  # x * keep / (1 - p)
        flat[part] /= 1.0 - p
    return out


def _dropout_scratch(out, x, p, seed, key) -> int:
    if p == 0.0:
        return 0
    size = min(x.size, DRAWS)  # the draws, the keep mask, the mask cast to x's dtype
    return 9 * size + ufunc_buffers((size,), cast=(TensorType((size,), x.dtype),))


register(
    "dropout",
    family="random",
    infer=rules.unary(dtypes.FLOATS),
    forward=_dropout,
    scratch=_dropout_scratch,
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
