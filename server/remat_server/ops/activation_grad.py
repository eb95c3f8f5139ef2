"""Native gradient ops of the activations: `<act>_grad(x, g) = g * act'(x)`.

The composite VJPs emitted three to eight graph values of x's size each (gelu's tanh
form: x*x, x*x*x, the tanh, 1 - t*t, ...), and the planner accounts every graph value.
Each op here computes act'(x) in its result buffer and multiplies by g in place: one
value. Where act'(x) needs a temporary (a mask, or gelu's tanh), arrays over
CHUNKED_FROM_BYTES are processed in 8 blocks of their longest axis, so the temporary is
an eighth of x (`workspace`, the op's scratch): a transformer block's gelu_grad held a
second d_ff-wide array at the backward pass's peak.

One table defines each derivative once: the NumPy first derivative (the op's forward)
and the second derivative as graph ops (its VJP in x). The op is linear in g, so its
VJP in g is the same op again. tanh_grad and sigmoid_grad take the forward's OUTPUT y
(their derivatives are 1 - y^2 and y (1 - y)), as the tanh and sigmoid VJPs keep it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import special

from remat_proto import dtypes

from ..errors import ShapeError
from . import elementwise, rules  # noqa: F401  (elementwise: tanh, sigmoid are registered)
from .activations import _GELU_C, _SQRT_HALF
from .registry import REGISTRY, elementwise_cost, register

FLOAT = dtypes.FLOATS
_A = 0.044715  # the cubic coefficient of gelu's tanh form
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Derivative:
    first: Callable  # (x, out, **attrs): f'(x) into out (x's shape, the result buffer)
    second: Callable | None  # (e, x, **attrs) -> f''(x) as graph ops; None: 0 a.e.
    flops: int
    temporary: bool = False  # `first` allocates one more array of x's size
    mask: bool = False  # `first` allocates a bool mask of x's size
    # (for arrays over CHUNKED_FROM_BYTES `first` sees one block at a time: an eighth)
    on_output: bool = False  # the first input is the forward's output y, not x


# --- first derivatives, in place in the result --------------------------------------------
def _erf_d(x, out):
    np.multiply(x, x, out=out)
    np.negative(out, out=out)
    np.exp(out, out=out)
    out *= _TWO_OVER_SQRT_PI
    return out


def _silu_d(x, out):
    # sigmoid as 1 / (1 + exp(-x)) (torch's): the tanh form loses the far tail to
    # cancellation in 1 + tanh. The temporary.
    s = special.expit(x)
    np.subtract(1.0, s, out=out)  # s (1 + x (1 - s))
    out *= x
    out += 1.0
    out *= s
    return out


def _gelu_exact_d(x, out):
    pdf = np.multiply(x, x)  # x phi(x): the temporary
    pdf *= -0.5
    np.exp(pdf, out=pdf)
    pdf *= _INV_SQRT_2PI
    pdf *= x
    np.multiply(x, _SQRT_HALF, out=out)  # Phi(x) + x phi(x)
    special.erf(out, out=out)
    out += 1.0
    out *= 0.5
    out += pdf
    return out


def _gelu_tanh_d(x, out):
    t = np.multiply(x, x)  # t = tanh(c (x + a x^3)): the temporary
    t *= x
    t *= _A
    t += x
    t *= _GELU_C
    np.tanh(t, out=t)
    np.multiply(x, x, out=out)  # 0.5 x u', u' = c (1 + 3 a x^2)
    out *= 3 * _A
    out += 1.0
    out *= _GELU_C
    out *= x
    out *= 0.5
    # 0.5 (1 + t) + 0.5 x u' (1 - t^2) = (1 + t) (0.5 x u' (1 - t) + 0.5), with t reused.
    np.subtract(1.0, t, out=t)
    out *= t
    out += 0.5
    np.subtract(2.0, t, out=t)
    out *= t
    return out


def _leaky_relu_d(x, out, negative_slope):
    out.fill(negative_slope)
    out[x > 0] = 1.0  # the mask; NaN is not > 0: it gets negative_slope, as torch
    return out


def _tanh_d(y, out):
    np.multiply(y, y, out=out)
    return np.subtract(1.0, out, out=out)


def _sigmoid_d(y, out):
    np.subtract(1.0, y, out=out)
    out *= y
    return out


# --- second derivatives, as graph ops -------------------------------------------------------
def _silu_dd(e, x):
    s = e.sigmoid(x)
    return (s * (1.0 - s)) * (2.0 + x * (1.0 - 2.0 * s))


def _gelu_dd(e, x, approximate):
    if approximate == "none":  # (x Phi)'' = phi (2 - x^2)
        return (_INV_SQRT_2PI * e.exp(-0.5 * (x * x))) * (2.0 - x * x)
    # (1 - t^2) (u' + 0.5 x (u'' - 2 t u'^2)), u = c (x + a x^3)
    t = e.tanh(_GELU_C * (x + _A * (x * x * x)))
    du = _GELU_C * (1.0 + (3 * _A) * (x * x))
    return (1.0 - t * t) * (du + (0.5 * x) * ((6 * _A * _GELU_C) * x - 2.0 * (t * (du * du))))


TABLE: dict[str, Derivative] = {
    "erf": Derivative(_erf_d, lambda e, x: (-2.0 * _TWO_OVER_SQRT_PI) * (x * e.exp(-(x * x))), 5),
    "silu": Derivative(_silu_d, lambda e, x: _silu_dd(e, x), 9, temporary=True),
    "gelu": Derivative(
        lambda x, out, approximate: (_gelu_exact_d if approximate == "none" else _gelu_tanh_d)(
            x, out
        ),
        _gelu_dd,
        20,
        temporary=True,
    ),
    "leaky_relu": Derivative(_leaky_relu_d, None, 2, mask=True),
    "tanh": Derivative(_tanh_d, lambda e, y: -2.0 * y, 3, on_output=True),
    "sigmoid": Derivative(_sigmoid_d, lambda e, y: 1.0 - 2.0 * y, 3, on_output=True),
}


# --- blocks: the temporaries an eighth of x -------------------------------------------------
CHUNKED_FROM_BYTES = 1 << 16  # smaller arrays in one go: 8 passes cost more than they save
_PARTS = 8


def _split_axis(shape) -> int | None:
    """The axis `forward` splits an array of `shape` along, or None: the first with at
    least 8 entries (blocks of a C-contiguous array stay contiguous, so the ufuncs need
    no buffers), else the longest."""
    if not shape or max(shape) < 2:
        return None
    wide = [a for a, n in enumerate(shape) if n >= _PARTS]
    return wide[0] if wide else max(range(len(shape)), key=lambda a: shape[a])


def _blocks(x: np.ndarray) -> list[tuple]:
    """Index tuples of the blocks `forward` processes x in (x itself if small)."""
    axis = _split_axis(x.shape)
    if x.nbytes <= CHUNKED_FROM_BYTES or axis is None:
        return [(...,)]
    n = x.shape[axis]
    step = -(-n // _PARTS)
    return [(slice(None),) * axis + (slice(i, i + step),) for i in range(0, n, step)]


def _block_shape(x) -> tuple[int, ...]:
    """The shape of `_blocks`' largest block for an array of x's type."""
    shape = tuple(x.shape)
    axis = _split_axis(shape)
    if x.nbytes <= CHUNKED_FROM_BYTES or axis is None:
        return shape
    return (*shape[:axis], -(-shape[axis] // _PARTS), *shape[axis + 1 :])


# --- one registration for every row ---------------------------------------------------------
def _infer(x, g, **attrs):
    rules.require_dtype(x, FLOAT, "x")
    rules.same_dtype(x, g)
    if g.shape != x.shape:
        raise ShapeError(f"g {g.shape} must have x's shape {x.shape}")
    return x


def _register(name: str, d: Derivative) -> None:
    op_name = f"{name}_grad"

    def forward(x, g, **attrs):
        x1 = np.atleast_1d(x)  # 0-d: in-place ufuncs need an array
        out = np.empty(x1.shape, x1.dtype)
        if d.temporary or d.mask:  # the temporary, a block at a time
            for block in _blocks(x1):
                d.first(x1[block], out[block], **attrs)
        else:
            d.first(x1, out, **attrs)
        out *= np.atleast_1d(g)
        return out.reshape(x.shape)

    def vjp(e, c, out, x, g, **attrs):
        dx = None if d.second is None else (c * g) * d.second(e, x, **attrs)
        return [dx, e.op(op_name, x, c, **attrs)]

    def scratch(out, x, g, **attrs) -> int:
        block = math.prod(_block_shape(x))
        itemsize = x.nbytes // x.size if x.size else 0
        return (block * itemsize if d.temporary else 0) + (block if d.mask else 0)

    forward_op = REGISTRY[name]  # its attrs (gelu's approximate, ...) are defined there
    register(
        op_name,
        family="activation",
        inputs=2,
        infer=_infer,
        forward=forward,
        vjp=vjp,
        residuals="inputs",
        cost=elementwise_cost(d.flops),
        attrs=dict(forward_op.attrs),
        workspace=(lambda x, g, **attrs: _block_shape(x)) if d.temporary else None,
        scratch=scratch,
        doc=f"{name}'s VJP: g * {name}'(x) for the cotangent g"
        + (f", from {name}'s output y = {name}(x)." if d.on_output else "."),
    )


for _name, _derivative in TABLE.items():
    _register(_name, _derivative)
