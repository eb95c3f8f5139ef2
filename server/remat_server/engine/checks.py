"""What the engine checks in a run's arrays: that they are the graph's inputs (names,
dtypes) and cotangents (shapes, dtypes), NaN and Inf (a warning per array, exact and
allocation-free on big ones) and, for Compare, how far two runs' gradients are apart."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from remat_proto import dtypes
from remat_proto.spec import GraphSpec

from ..autodiff import JointGraph
from ..errors import InvalidArgument


def nonfinite_warnings(**arrays_by_kind: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """A warning for each array holding NaN or Inf, by kind ("input", "output", ...).

    >>> nonfinite_warnings(output={"y": np.array([np.nan, 1.0])})
    ("output 'y' has 1 NaN or Inf values",)
    """
    found: list[str] = []
    for kind, arrays in arrays_by_kind.items():
        for name, array in arrays.items():
            if array.dtype.kind == "f" and not _finite(array):
                bad = int(array.size - np.count_nonzero(np.isfinite(array)))
                if bad:  # else a sum of finite values overflowed
                    found.append(f"{kind} '{name}' has {bad} NaN or Inf values")
    return tuple(found)


# Arrays up to this many elements are checked with isfinite (a small bool array, and no
# floating-point state to set up: 3 us a request); bigger ones with a sum. Up to
# _TINY_ELEMENTS, in Python: a NumPy call costs more than reading a few floats, read as
# Python floats in one call (`tolist`; iterating makes a NumPy scalar of each).
_SMALL_ELEMENTS = 4096
_TINY_ELEMENTS = 8


def _finite(array: np.ndarray) -> bool:
    """Whether every value of a float array is finite (False may also mean that a sum
    of finite values overflowed: the caller counts)."""
    size = array.size
    if size == 1:  # a scalar, a loss: the commonest tiny array
        return math.isfinite(array.item())
    if size <= _TINY_ELEMENTS:
        return all(map(math.isfinite, array.ravel().tolist()))
    if size <= _SMALL_ELEMENTS:
        return bool(np.isfinite(array).all())
    # A sum propagates NaN and infinities in one pass without allocating (isfinite
    # would make a bool array the size of a 1 GiB tensor).
    with np.errstate(over="ignore", invalid="ignore"):  # a finite sum may overflow
        return math.isfinite(array.sum())


def max_abs_diff(grads: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """The largest |a - b| over every element of every gradient (equal values, equal
    infinities and NaN against NaN count as 0; a missing gradient or a shape change as
    inf)."""
    worst = 0.0
    for name, ref in reference.items():
        value = grads.get(name)
        if value is None or value.shape != ref.shape:
            return float("inf")
        if value.size == 0:
            continue
        a, b = value.astype(np.float64), ref.astype(np.float64)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        with np.errstate(invalid="ignore"):  # inf - inf where the two differ in sign
            diff = np.where(same, 0.0, np.abs(a - b))
        worst = max(worst, float(np.nan_to_num(diff, nan=np.inf, posinf=np.inf).max()))
    return worst


def input_shapes(spec: GraphSpec, inputs: Mapping[str, np.ndarray]) -> dict:
    """Every input's shape in the graph's order, once the request sends exactly the
    declared inputs (an unknown name is named first), each of its declared dtype."""
    shapes = {}
    for item in spec.inputs:
        array = inputs.get(item.name)
        if array is None:
            break
        expected = dtypes.NUMPY.get(item.dtype)  # an unknown dtype: validation names it
        if expected is not None and array.dtype != expected:
            _refuse_unknown(spec, inputs)
            raise InvalidArgument(
                f"inputs: '{item.name}' is declared {item.dtype} but the tensor is {array.dtype}"
            )
        shapes[item.name] = array.shape
    if len(shapes) != len(spec.inputs) or len(shapes) != len(inputs):
        _refuse_unknown(spec, inputs)
        missing = next(item.name for item in spec.inputs if item.name not in inputs)
        raise InvalidArgument(f"inputs: no tensor given for input '{missing}'")
    return shapes


def _refuse_unknown(spec: GraphSpec, inputs: Mapping[str, np.ndarray]) -> None:
    extra = sorted(set(inputs) - {item.name for item in spec.inputs})
    if extra:
        raise InvalidArgument(f"inputs: '{extra[0]}' is not an input of the graph")


def cotangent_feeds(joint: JointGraph, cotangents: Mapping[str, np.ndarray]) -> dict:
    """The joint graph's cotangent inputs fed from a request's cotangents, each of its
    output's shape and dtype."""
    feeds = {}
    for out_name, input_name in joint.cotangent_inputs.items():  # names checked by autodiff
        array, node = cotangents[out_name], joint.graph[input_name]
        if array.shape != node.shape or array.dtype != dtypes.NUMPY[node.dtype]:
            raise InvalidArgument(
                f"cotangents: '{out_name}' must be {node.dtype}{list(node.shape)}"
                f" like its output, got {array.dtype}{list(array.shape)}"
            )
        feeds[input_name] = array
    return feeds
