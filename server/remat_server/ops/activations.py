"""Activations: erf, gelu (exact and tanh forms), silu, clip, hardtanh, leaky_relu.

Values and derivative conventions follow PyTorch, including at the kinks: clip passes
the gradient on its closed interval (torch.clamp), hardtanh only on the open one
(hardtanh_backward), leaky_relu takes negative_slope at 0. A NaN input gets the
gradient torch gives it (0 for clip, 1 for hardtanh, negative_slope for leaky_relu).
The VJPs of erf, gelu, silu and leaky_relu are native gradient ops (activation_grad.py).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from remat_proto import dtypes

from ..errors import ShapeError
from . import rules
from .registry import Attr, elementwise_cost, register

FLOAT = dtypes.FLOATS
_float_unary = rules.unary(FLOAT)
_SQRT_HALF = math.sqrt(0.5)
_GELU_C = math.sqrt(2.0 / math.pi)


def _not_nan(value: float) -> bool:
    return not math.isnan(value)


def _scalar(value: float, dtype: np.dtype):
    """A bound in x's dtype (a float32 tensor compares against float32 bounds, as in
    torch); a bound beyond float32's range becomes +-inf without an overflow warning."""
    with np.errstate(over="ignore"):
        return dtype.type(value)


# --- erf, gelu, silu -----------------------------------------------------------------
# Their VJPs are native ops (activation_grad.py: one value of x's size each, where
# the composites emitted up to eight); the derivatives are defined in its table.
# Each in its result buffer (an array for a 0-d x too), no temporary. The closing
# product is (0.5 (1 + t)) x, not (0.5 x) (1 + t): the same bits, as halving 1 + t (a
# multiple of t's ulp in [0, 2]) is exact, and so is halving x unless x is subnormal,
# where 1 + t is exactly 1.
def _gelu_tanh(x):
    # x * x * x, not x ** 3: NumPy's general power path is ~300x slower.
    out = np.multiply(x, x, out=np.empty_like(x))  # 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
    out *= x
    out *= 0.044715
    out += x
    out *= _GELU_C
    np.tanh(out, out=out)
    return _half_one_plus_times(out, x)


def _gelu_exact(x):
    # torch's order of operations: x * 0.5 * (1 + erf(x / sqrt(2))).
    out = np.multiply(x, _SQRT_HALF, out=np.empty_like(x))
    special.erf(out, out=out)
    return _half_one_plus_times(out, x)


def _half_one_plus_times(t, x):
    t += 1.0
    t *= 0.5
    t *= x
    return t


def _silu(x):
    # sigmoid in its tanh form: one transcendental, no overflow for large |x|.
    out = np.multiply(x, 0.5, out=np.empty_like(x))  # x * (0.5 * (1 + tanh(0.5 x)))
    np.tanh(out, out=out)
    return _half_one_plus_times(out, x)


_GELU_FORWARD = {"tanh": _gelu_tanh, "none": _gelu_exact}


register(
    "erf",
    family="activation",
    infer=rules.unary(FLOAT),
    forward=special.erf,
    vjp=lambda e, g, out, x: [e.erf_grad(x, g)],
    residuals="inputs",
    cost=elementwise_cost(20),
    doc="The error function 2/sqrt(pi) * integral_0^x exp(-t^2) dt.",
)
register(
    "gelu",
    family="activation",
    infer=rules.unary(FLOAT),
    forward=lambda x, approximate: _GELU_FORWARD[approximate](x),
    vjp=lambda e, g, out, x, approximate: [e.gelu_grad(x, g, approximate=approximate)],
    residuals="inputs",
    cost=elementwise_cost(20),
    attrs={
        "approximate": Attr(
            "string",
            default="tanh",
            check=lambda v: v in _GELU_FORWARD,
            requirement='must be "tanh" or "none"',
            doc='"tanh" (the default, for existing graphs) or "none": the exact erf form, '
            "as torch.nn.functional.gelu's `approximate`.",
        )
    },
    doc="GELU: x * Phi(x) exactly (approximate='none') or its tanh approximation.",
)
register(
    "silu",
    family="activation",
    infer=rules.unary(FLOAT),
    forward=_silu,
    vjp=lambda e, g, out, x: [e.silu_grad(x, g)],
    residuals="inputs",
    cost=elementwise_cost(14),
    doc="x * sigmoid(x) (SiLU, swish).",
)


# --- clip, hardtanh, leaky_relu -------------------------------------------------------
def _clamp(x, low: float, high: float):
    """min(max(x, low), high) in x's dtype; NaN stays NaN; low > high gives high (torch)."""
    out = np.maximum(x, _scalar(low, x.dtype), out=np.empty_like(x))  # 0-d too: an array
    return np.minimum(out, _scalar(high, x.dtype), out=out)


def _clip_vjp(e, g, out, x, min, max):
    inside = e.logical_and(e.ge(x, e.const(min, x.dtype)), e.le(x, e.const(max, x.dtype)))
    return [e.where(inside, g, e.const(0.0, g.dtype))]


def _hardtanh_infer(x, min_val, max_val):
    if min_val > max_val:
        raise ShapeError(f"min_val ({min_val}) must not be greater than max_val ({max_val})")
    return _float_unary(x)


def _hardtanh_vjp(e, g, out, x, min_val, max_val):
    # Written as torch writes it (zero where x <= min_val or x >= max_val), so NaN passes.
    outside = e.logical_or(e.le(x, e.const(min_val, x.dtype)), e.ge(x, e.const(max_val, x.dtype)))
    return [e.where(outside, e.const(0.0, g.dtype), g)]


def _leaky_relu(x, negative_slope):
    out = np.multiply(x, _scalar(negative_slope, x.dtype), out=np.empty_like(x))
    np.copyto(out, x, where=x > 0)  # the mask: one bool an element
    return out


def bool_mask_scratch(x, *inputs, **attrs) -> int:
    """`scratch` of a forward holding one bool mask of x's size."""
    return x.size


def _leaky_relu_vjp(e, g, out, x, negative_slope):
    # One native op (activation_grad.py): the where form kept g * slope and the where.
    return [e.leaky_relu_grad(x, g, negative_slope=negative_slope)]


def _bound(default: float, doc: str) -> Attr:
    return Attr("float", default=default, check=_not_nan, requirement="must not be NaN", doc=doc)


register(
    "clip",
    family="activation",
    infer=rules.unary(FLOAT),
    forward=lambda x, min, max: _clamp(x, min, max),
    vjp=_clip_vjp,
    residuals="inputs",
    cost=elementwise_cost(2),
    attrs={
        "min": _bound(-math.inf, "Lower bound (-inf: none)."),
        "max": _bound(math.inf, "Upper bound (+inf: none); below min, every value is max."),
    },
    doc="torch.clamp: the gradient passes where min <= x <= max (bounds included).",
)
register(
    "hardtanh",
    family="activation",
    infer=_hardtanh_infer,
    forward=lambda x, min_val, max_val: _clamp(x, min_val, max_val),
    vjp=_hardtanh_vjp,
    residuals="inputs",
    cost=elementwise_cost(2),
    attrs={
        "min_val": _bound(-1.0, "Lower bound."),
        "max_val": _bound(1.0, "Upper bound (>= min_val)."),
    },
    doc="Clamp to [min_val, max_val]; the gradient passes only strictly inside (torch).",
)
register(
    "leaky_relu",
    family="activation",
    infer=rules.unary(FLOAT),
    forward=_leaky_relu,
    scratch=bool_mask_scratch,
    vjp=_leaky_relu_vjp,
    residuals="inputs",
    cost=elementwise_cost(2),
    attrs={
        "negative_slope": Attr(
            "float",
            default=0.01,
            check=math.isfinite,
            requirement="must be finite",
            doc="The slope for x <= 0.",
        )
    },
    doc="x where x > 0, else negative_slope * x; the gradient at 0 is negative_slope.",
)
