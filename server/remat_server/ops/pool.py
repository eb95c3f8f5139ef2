"""2-D max and average pooling on NCHW tensors (torch.nn.functional's conventions).

Forwards reduce the windows one kernel tap at a time, chunk by chunk of images: the
padded copy the windows are views of holds one chunk, never the batch. The VJPs
are one native gradient op each (pool_grad.py), whose values are the size of x: the
gradient scatters onto the input tap by tap, never through a taps-times-the-output
column matrix or one-hot mask.
"""

from __future__ import annotations

import numpy as np

from remat_proto import dtypes

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import rules
from .conv_taps import ufunc_buffers, virtual
from .registry import Attr, register
from .windows import (
    DILATION,
    KERNEL,
    PADDING,
    POSITIVE,
    _image,
    _out_hw,
    _pair,
    padded_bytes,
    padded_chunk_shape,
    reduce_buffers,
    reduce_bytes,
    reduce_taps,
)


def _pool_normalize(x, *rest, kernel, stride, padding, **attrs) -> dict:
    return {
        "kernel": kernel,
        "stride": kernel if stride is None else stride,
        "padding": padding,
        **attrs,
    }


def _check_padding(kernel, padding) -> None:
    if any(p > k // 2 for p, k in zip(padding, kernel)):
        raise ShapeError(f"padding {padding} must be at most half the kernel {kernel}")


def _pool_infer(x, kernel, stride, padding, dilation=(1, 1), **attrs):
    _image(x)
    _check_padding(kernel, padding)
    ho, wo = _out_hw(x.shape[2:], kernel, stride, padding, dilation)
    return TensorType(x.shape[:2] + (ho, wo), x.dtype)


def window_cost(out, x, *rest, kernel, **attrs) -> int:
    return out.size * kernel[0] * kernel[1]


POOL_ATTRS = {
    "kernel": KERNEL,
    "stride": _pair(rules.all_positive, POSITIVE, default=None),
    "padding": PADDING,
}
MAX_POOL_ATTRS = {**POOL_ATTRS, "dilation": DILATION}
AVG_POOL_ATTRS = {**POOL_ATTRS, "count_include_pad": Attr("bool", default=True)}


# --- max_pool2d ------------------------------------------------------------------------
def _max_pool2d(x, kernel, stride, padding, dilation):
    return reduce_taps(x, kernel, stride, padding, dilation, np.maximum, -np.inf)


def _max_pool2d_vjp(e, g, out, x, kernel, stride, padding, dilation):
    # Each window's gradient goes to its first maximum in row-major tap order, as
    # torch's max_pool2d does (its backward follows the argmax its forward recorded).
    geometry = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation}
    return [e.max_pool2d_grad(x, g, **geometry)]


register(
    "max_pool2d",
    family="conv",
    infer=_pool_infer,
    normalize=_pool_normalize,
    forward=_max_pool2d,
    vjp=_max_pool2d_vjp,
    residuals="inputs",
    workspace=padded_chunk_shape,
    scratch=lambda out, x, **geometry: reduce_bytes(x, **geometry),
    cost=window_cost,
    attrs=MAX_POOL_ATTRS,
    doc="Max over each window of x (N, C, H, W), padded with -inf; stride defaults to "
    "the kernel; padding at most half the kernel (torch's rule). A window's gradient "
    "goes to its first maximum (torch's rule).",
)


# --- avg_pool2d ------------------------------------------------------------------------
def pool_divisor(hw, kernel, stride, padding, count_include_pad, dtype):
    """Per-window divisor: the kernel size, or the number of non-padding elements, an
    (Ho, Wo) array: per axis, how many taps of a window fall inside the image."""
    if count_include_pad:
        return kernel[0] * kernel[1]
    counts = [
        np.array(
            [len(range(max(0, y * s - p), min(n, y * s - p + k))) for y in range(windows)],
            dtype=dtypes.NUMPY[dtype],
        )
        for n, k, s, p, windows in zip(
            hw, kernel, stride, padding, _out_hw(hw, kernel, stride, padding, (1, 1))
        )
    ]
    return np.outer(*counts)


def divisor_bytes(pooled, count_include_pad) -> int:
    """Scratch of `pool_divisor` for windows of the pooled shape: the (Ho, Wo) counts."""
    if count_include_pad:
        return 0
    return pooled.shape[2] * pooled.shape[3] * dtypes.itemsize(pooled.dtype)


def divide_buffers(values, pooled, count_include_pad) -> int:
    """NumPy's buffers dividing values of the pooled shape by the (Ho, Wo) divisor."""
    if count_include_pad:
        return 0
    divisor = virtual(pooled.shape[2:], pooled.dtype)
    return ufunc_buffers(virtual(values.shape, values.dtype), divisor)


def _avg_pool2d_scratch(out, x, kernel, stride, padding, count_include_pad) -> int:
    """The divisor, the padded chunk (freed before the division), and NumPy's buffers
    of the largest tap or of the division."""
    reduce = padded_bytes(x, padding) + reduce_buffers(x, kernel, stride, padding, (1, 1))
    divide = divide_buffers(out, out, count_include_pad)
    return divisor_bytes(out, count_include_pad) + max(reduce, divide)


def _avg_pool2d(x, kernel, stride, padding, count_include_pad):
    divisor = pool_divisor(
        x.shape[2:], kernel, stride, padding, count_include_pad, dtypes.of_array(x)
    )
    total = reduce_taps(x, kernel, stride, padding, (1, 1), np.add, 0.0)
    total /= divisor
    return total


def _avg_pool2d_vjp(e, g, out, x, kernel, stride, padding, count_include_pad):
    return [
        e.avg_pool2d_grad(
            g,
            output_size=x.shape[2:],
            kernel=kernel,
            stride=stride,
            padding=padding,
            count_include_pad=count_include_pad,
        )
    ]


register(
    "avg_pool2d",
    family="conv",
    infer=_pool_infer,
    normalize=_pool_normalize,
    forward=_avg_pool2d,
    vjp=_avg_pool2d_vjp,
    residuals="none",
    cost=window_cost,
    workspace=padded_chunk_shape,
    scratch=_avg_pool2d_scratch,
    attrs=AVG_POOL_ATTRS,
    doc="Mean over each window of x (N, C, H, W), zero-padded; stride defaults to the "
    "kernel; count_include_pad=False divides by the non-padding count (as torch).",
)
