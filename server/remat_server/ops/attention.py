"""Fused scaled dot-product attention (mask, causal, scale, dropout).

    out = drop(P) @ v,   P = softmax(scale * q @ k^T  [+ float mask | where bool mask]
                                     [where causal], axis=-1)

with torch.nn.functional.scaled_dot_product_attention's semantics: a bool mask says
where a query may attend (True), a float mask is added to the scores, `causal` lets
query i see keys j <= i (top-left aligned when L != S), scale 0 means 1 / sqrt(E), and
dropout (inverted, p = dropout_p) acts on the attention weights. Unlike torch, `causal`
and a mask may be combined (both apply); torch refuses the pair, so no import has it.
A fully masked row (every score -inf) attends to nothing: its weights, output and
gradients are 0, as torch's math path gives on CPU (torch 2.13, its `_safe_softmax`;
older torch gave NaN). A float mask has q's dtype (insert a cast) and gets the
gradient of the scores.

Memory model. The point of fusing is that nothing of size (..., L, S) outlives the op:
- Forward: the scores, then in place the probabilities and their dropped-out version,
  live in one (..., L, S) buffer of the input dtype (`workspace`), freed when the op
  returns. Besides it, one stage at a time, all before the output exists (`_scratch`,
  exact): the negated bool mask, or NumPy's buffers adding a float mask; the (L, S)
  bool causal mask; the softmax's per-row maxima and sums; with dropout the (..., L, S)
  bool keep mask and the float64 uniforms `keep_mask` draws it from (as `dropout`;
  drawing them in chunks would need random.py's generator). Only the (..., L, Ev)
  output is kept.
- Residuals are the inputs (q, k, v, mask), which a model keeps anyway. The VJP
  re-emits P from q, k (and the mask) as ordinary graph nodes, once, shared by the
  three gradients; the dropout mask is regenerated from (seed, key, shape), never
  stored. The (..., L, S) values of the backward (P, dP, dS) live only there, and
  a checkpointing policy plans them like any other node.
- The VJP is made of graph ops (matmul, transpose, softmax, where, dropout, ...), so
  it differentiates again.
"""

from __future__ import annotations

import math

import numpy as np

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .conv_taps import ufunc_buffers, virtual
from .random import keep_mask
from .registry import NODE_NAME, Attr, register

FLOAT = dtypes.FLOATS
SOFTMAX_FLOPS = 14  # per score, as the softmax op counts


def _scale(scale: float, e_dim: int) -> float:
    return scale if scale != 0.0 else 1.0 / math.sqrt(e_dim)


def _scores_shape(q, k) -> tuple[int, ...]:
    return tuple(q.shape[:-2]) + (q.shape[-2], k.shape[-2])


# --- shape rule ------------------------------------------------------------------------
def _infer(q, k, v, mask=None, *, causal, scale, dropout_p, seed, key):
    for name, t in (("q", q), ("k", k), ("v", v)):
        rules.require_dtype(t, FLOAT, name)
        if len(t.shape) < 2:
            raise ShapeError(f"{name} must have rank >= 2 (..., length, features), got {t.shape}")
    rules.same_dtype(q, k, v)
    if not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        raise ShapeError(
            f"q {q.shape}, k {k.shape} and v {v.shape} must have equal leading dimensions"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ShapeError(f"k {k.shape} must have q's feature size {q.shape[-1]} (last axis)")
    if v.shape[-2] != k.shape[-2]:
        raise ShapeError(f"v {v.shape} must have k's length {k.shape[-2]} (axis -2)")
    if scale == 0.0 and q.shape[-1] == 0:
        raise ShapeError("the default scale 1 / sqrt(E) needs a feature size E > 0")
    if mask is not None:
        _check_mask(mask, q.dtype, _scores_shape(q, k))
    return TensorType(tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype)


def _check_mask(mask, dtype: str, scores: tuple[int, ...]) -> None:
    if mask.dtype not in ("bool", dtype):
        raise ShapeError(f"mask has dtype {mask.dtype}; expected bool or q's dtype {dtype}")
    tail = scores[len(scores) - len(mask.shape) :]
    if len(mask.shape) > len(scores) or any(m not in (1, s) for m, s in zip(mask.shape, tail)):
        raise ShapeError(
            f"mask {mask.shape} does not broadcast to the scores' shape {scores} (..., L, S)"
        )


# --- forward ---------------------------------------------------------------------------
def _causal_blocked(length: int, keys: int) -> np.ndarray:
    """(L, S) bool: query i may not see key j > i. One array (not a mask and its
    negation)."""
    return np.less(np.arange(length)[:, None], np.arange(keys)[None, :])


def _forward(q, k, v, mask=None, *, causal, scale, dropout_p, seed, key):
    s = q @ np.swapaxes(k, -1, -2)  # the one (..., L, S) buffer: the workspace
    s *= _scale(scale, q.shape[-1])
    if mask is not None and mask.dtype == np.bool_:
        np.copyto(s, -np.inf, where=~mask)
    elif mask is not None:
        s += mask
    if causal:
        np.copyto(s, -np.inf, where=_causal_blocked(*s.shape[-2:]))
    _safe_softmax_(s)
    if dropout_p:  # the dropout op's arithmetic, so the VJP's drop(P) is bit-identical
        s *= keep_mask(s.shape, dropout_p, seed, key)
        s /= 1.0 - dropout_p
    return s @ v


def _safe_softmax_(s: np.ndarray) -> None:
    """Softmax over the last axis in place; an all -inf row becomes 0, not NaN."""
    top = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    dead = top == -np.inf
    top[dead] = 0.0
    s -= top
    np.exp(s, out=s)
    total = np.sum(s, axis=-1, keepdims=True)
    total[dead] = 1.0  # 0 / 1: the row stays 0
    s /= total


# --- VJP -------------------------------------------------------------------------------
def _swap(e, x):
    """x^T over the last two axes (a view)."""
    axes = tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)
    return e.transpose(x, axes=axes)


def _probabilities(e, q, k, mask, causal, scale):
    """P as graph nodes: the forward's masked, scaled softmax, fully masked rows 0."""
    neg_inf = e.const(-math.inf, q.dtype)
    s = (q * scale) @ _swap(e, k)  # scaling q, not the scores: one (..., L, S) value less
    if mask is not None:
        s = e.where(mask, s, neg_inf) if mask.dtype == "bool" else s + mask
    if causal:
        rows = e.constant(value=np.arange(q.shape[-2], dtype=np.int64)[:, None])
        cols = e.constant(value=np.arange(k.shape[-2], dtype=np.int64)[None, :])
        s = e.where(e.ge(rows, cols), s, neg_inf)
    if mask is None or k.shape[-2] == 0:  # causal alone always leaves key 0 visible
        return e.softmax(s, axis=-1)
    # Zero the dead rows before the softmax too, so no NaN reaches any gradient.
    dead = e.eq(e.max(s, axes=(s.ndim - 1,), keepdims=True), neg_inf)
    zero = e.const(0.0, q.dtype)
    return e.where(dead, zero, e.softmax(e.where(dead, zero, s), axis=-1))


def _vjp(e, g, out, q, k, v, mask=None, *, causal, scale, dropout_p, seed, key):
    scale = _scale(scale, q.shape[-1])
    p = _probabilities(e, q, k, mask, causal, scale)  # emitted once, used three times

    def drop(x):  # diagonal, so its own adjoint; the mask comes from (seed, key, shape)
        return e.dropout(x, p=dropout_p, seed=seed, key=key) if dropout_p else x

    dv = _swap(e, drop(p)) @ g
    dp = drop(g @ _swap(e, v))
    ds = e.softmax_grad(p, dp, axis=-1)  # one (..., L, S) value, not three (nn_grad.py)
    dq = (ds @ k) * scale
    dk = (_swap(e, ds) @ q) * scale
    if mask is None:
        return [dq, dk, dv]
    return [dq, dk, dv, None if mask.dtype == "bool" else ds]  # autodiff un-broadcasts


# --- cost, workspace -------------------------------------------------------------------
def _cost(out, q, k, v, mask=None, *, dropout_p, **attrs) -> int:
    scores = math.prod(_scores_shape(q, k))
    per_score = 2 * q.shape[-1] + 2 * v.shape[-1] + SOFTMAX_FLOPS + 2 + (2 if dropout_p else 0)
    return scores * per_score


def _scratch(out, q, k, v, mask=None, *, causal, dropout_p, **attrs) -> int:
    """The scores, and the largest stage's temporaries (module doc). The stages run
    before the output exists, so they count only past the output's bytes."""
    itemsize, scores = dtypes.itemsize(q.dtype), _scores_shape(q, k)
    count, rows = math.prod(scores), math.prod(scores[:-1])
    s, per_row = virtual(scores, q.dtype), virtual(scores[:-1] + (1,), q.dtype)
    # softmax: maxima, dead rows, sums, and NumPy's buffers of a per-row broadcast
    stages = [rows * (2 * itemsize + 1) + ufunc_buffers(s, per_row, s)]
    if mask is not None and mask.dtype == "bool":
        stages.append(math.prod(mask.shape))  # ~mask
    elif mask is not None:  # s += mask: NumPy's buffers of the broadcast mask
        stages.append(ufunc_buffers(s, virtual(mask.shape, mask.dtype), s))
    if causal:  # the (L, S) bool mask, the aranges it compares, NumPy's buffers of both
        (length, keys), index = scores[-2:], np.dtype(np.intp).itemsize
        compare = ufunc_buffers(virtual((length, 1), "int64"), virtual((1, keys), "int64"))
        stages.append(length * keys + index * (length + keys) + compare)
    if dropout_p:  # keep_mask's float64 uniforms and its bool result
        stages.append(9 * count)
    return count * itemsize + max(0, max(stages) - out.nbytes)


def _workspace(q, k, v, mask=None, **attrs) -> tuple[int, ...]:
    """The (..., L, S) scores buffer (probabilities, dropped-out, in place)."""
    return _scores_shape(q, k)


register(
    "scaled_dot_product_attention",
    family="attention",
    inputs=(3, 4),
    infer=_infer,
    forward=_forward,
    vjp=_vjp,
    residuals="inputs",
    cost=_cost,
    workspace=_workspace,
    scratch=_scratch,
    attrs={
        "causal": Attr(
            "bool", default=False, doc="Query i attends keys j <= i (torch's is_causal)."
        ),
        "scale": Attr(
            "float",
            default=0.0,
            check=math.isfinite,
            requirement="must be finite (0 means 1 / sqrt(E))",
            doc="Multiplies q @ k^T; 0 means 1 / sqrt(E).",
        ),
        "dropout_p": Attr(
            "float",
            default=0.0,
            check=lambda p: 0.0 <= p < 1.0,
            requirement="must be in [0, 1)",
            doc="Dropout probability on the attention weights.",
        ),
        "seed": Attr("int", default=0, doc="Seed of the dropout mask."),
        "key": Attr(
            "string",
            default=NODE_NAME,
            doc="Names the dropout mask's stream; defaults to the node's name.",
        ),
    },
    doc="softmax(scale * q @ k^T, masked) @ v, with optional bool/float mask, causal "
    "masking and dropout on the weights (torch's scaled_dot_product_attention).",
)
