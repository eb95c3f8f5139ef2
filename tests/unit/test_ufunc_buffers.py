"""The two models of what NumPy's ufunc iterator buffers during one call, against
tracemalloc: `elementwise.ufunc_buffers` (C-contiguous operands, from shapes) and
`conv_taps.ufunc_buffers` (any views, from their strides). They must agree with each
other and with NumPy, around the threshold of buffered inner runs (1, 2, 3 and more
rows of the inner run fit in NumPy's buffer)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from remat_server.graph.ir import TensorType
from remat_server.ops import conv_taps, elementwise

# The iterator object itself (about 1.2 KB, freed with the call) is not modelled.
ITERATOR_BYTES = 2048


def measured(call) -> int:
    call()  # warm: NumPy's first call of a loop may cache things
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - result.nbytes


# (rows, columns): 8192 // columns inner runs fit in the buffer: 1, 2, 2, 3, 4, 8.
SHAPES = [(5, 5000), (5, 3000), (4, 4096), (3, 2730), (5, 2000), (8, 1000)]


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_broadcast_row_buffers_match_numpy(rows, cols):
    a = np.ones((rows, cols), np.float32)
    b = np.ones((1, cols), np.float32)
    real = measured(lambda: np.add(a, b))
    from_shapes = elementwise.ufunc_buffers(
        (rows, cols), TensorType((rows, cols), "float32"), TensorType((1, cols), "float32")
    )
    from_views = conv_taps.ufunc_buffers(a, b, np.empty((rows, cols), np.float32))
    assert from_shapes == from_views
    assert 0 <= real - from_shapes <= ITERATOR_BYTES, (real, from_shapes)


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_a_box_of_a_bigger_array_is_buffered_like_numpy(rows, cols):
    box = np.ones((rows, cols + 7), np.float32)[:, :cols]  # rows of a wider array
    b = np.ones((rows, cols), np.float32)
    real = measured(lambda: np.add(box, b))
    declared = conv_taps.ufunc_buffers(box, b, np.empty((rows, cols), np.float32))
    assert 0 <= real - declared <= ITERATOR_BYTES, (real, declared)
