"""Every ONNX op the importer knows, in one table: `CONVERT` maps an op type to its
converter (ops_math, ops_shape, ops_conv, ops_nn), `FOLD` to its constant evaluator
(fold.py), `CHECKS` to a check of its attribute values run before conversion.

An op only in `FOLD` (Range, CumSum, Sin, Floor...) imports when its inputs are
constants, which is how exporters use them for shapes and masks.

    >>> "Conv" in CONVERT and "ConstantOfShape" in FOLD
    True
"""

from __future__ import annotations

from . import ops_conv, ops_math, ops_nn, ops_shape
from .fold import FOLD

CONVERT = {**ops_math.OPS, **ops_shape.OPS, **ops_conv.OPS, **ops_nn.OPS}
CHECKS = {**ops_math.CHECKS, **ops_shape.CHECKS, **ops_conv.CHECKS, **ops_nn.CHECKS}
KNOWN = frozenset(CONVERT) | frozenset(FOLD)
# Never folded, even on constant inputs: their training behaviour (or randomness) is
# the point, and they must stay nodes.
NEVER_FOLD = frozenset({"BatchNormalization", "Dropout"})

__all__ = ["CONVERT", "FOLD", "CHECKS", "KNOWN", "NEVER_FOLD"]
