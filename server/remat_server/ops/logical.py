"""Logical ops on bool tensors and NaN tests; none has a gradient."""

from __future__ import annotations

import numpy as np

from remat_proto import dtypes

from ..graph.ir import TensorType
from . import rules
from .elementwise import broadcast_scratch
from .registry import elementwise_cost, register

BOOL = frozenset({"bool"})


def _float_test(x: TensorType) -> TensorType:
    rules.require_dtype(x, dtypes.FLOATS)
    return TensorType(x.shape, "bool")


for _name, _fn, _doc in (
    ("isnan", np.isnan, "True where x is NaN."),
    ("isinf", np.isinf, "True where x is +inf or -inf."),
):
    register(
        _name,
        family="logical",
        infer=_float_test,
        forward=_fn,
        vjp=None,
        residuals="none",
        cost=elementwise_cost(1),
        doc=_doc,
    )

register(
    "logical_not",
    family="logical",
    infer=rules.unary(BOOL),
    forward=np.logical_not,
    vjp=None,
    residuals="none",
    cost=elementwise_cost(1),
    doc="not x, for a bool x.",
)
for _name, _fn in (
    ("logical_and", np.logical_and),
    ("logical_or", np.logical_or),
    ("logical_xor", np.logical_xor),
):
    register(
        _name,
        family="logical",
        inputs=2,
        infer=rules.binary(BOOL),
        forward=_fn,
        scratch=broadcast_scratch,
        vjp=None,
        residuals="none",
        cost=elementwise_cost(1),
        doc=f"{_name.removeprefix('logical_')} of two bool tensors, broadcasting.",
    )
