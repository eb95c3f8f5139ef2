"""The dtypes remat supports, by their wire names."""
from __future__ import annotations

import numpy as np

NUMPY = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("bool"),
}
FLOATS = frozenset({"float32", "float64"})
INTS = frozenset({"int32", "int64"})


def itemsize(dtype: str) -> int:
    return NUMPY[dtype].itemsize


def is_float(dtype: str) -> bool:
    return dtype in FLOATS


def of_array(array: np.ndarray) -> str:
    """The remat dtype name of a NumPy array (KeyError if unsupported)."""
    for name, np_dtype in NUMPY.items():
        if array.dtype == np_dtype:
            return name
    raise KeyError(str(array.dtype))
