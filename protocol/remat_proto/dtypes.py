"""The dtypes remat supports, by their wire names, and their (little-endian) NumPy types.

>>> NUMPY["float32"].str, itemsize("int64"), is_float("int32")
('<f4', 8, False)
"""

from __future__ import annotations

import numpy as np

NUMPY = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("bool"),
}
NAMES = tuple(NUMPY)
FLOATS = frozenset({"float32", "float64"})
INTS = frozenset({"int32", "int64"})


def itemsize(dtype: str) -> int:
    return NUMPY[dtype].itemsize


def is_float(dtype: str) -> bool:
    return dtype in FLOATS


# NumPy dtype -> name, for the exact types above (a dict lookup; `dtype.name` is slow).
_NAMES_BY_DTYPE = {dtype: name for name, dtype in NUMPY.items()}
_NAMES_BY_DTYPE.update({dtype.newbyteorder("="): name for name, dtype in NUMPY.items()})


def name_of(dtype: np.dtype) -> str | None:
    """The remat name of a NumPy dtype, either byte order; None if unsupported."""
    name = _NAMES_BY_DTYPE.get(dtype)
    if name is None and dtype.name in NUMPY:  # a big-endian twin
        name = dtype.name
    return name


def of_array(array: np.ndarray) -> str:
    """The remat dtype name of a NumPy array, either byte order (KeyError if unsupported)."""
    name = name_of(array.dtype)
    if name is None:
        raise KeyError(str(array.dtype))
    return name
