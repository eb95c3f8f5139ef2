"""2-D max and average pooling on NCHW tensors (torch.nn.functional's conventions).

Forwards reduce the windows of the padded input one kernel tap at a time. The VJPs
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
from .conv import (
    DILATION,
    KERNEL,
    PADDING,
    POSITIVE,
    _image,
    _out_hw,
    _padded,
    _pair,
    _reduce_taps,
    _windows,
)
from .registry import Attr, register


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


def tap_region(i, j, out_hw, stride, dilation) -> tuple[slice, ...]:
    """The padded-input positions tap (i, j) of every window reads: (N, C, Ho, Wo)."""
    (ho, wo), (sh, sw), (dh, dw) = out_hw, stride, dilation
    return (
        slice(None),
        slice(None),
        slice(i * dh, i * dh + sh * (ho - 1) + 1, sh),
        slice(j * dw, j * dw + sw * (wo - 1) + 1, sw),
    )


def crop(canvas, padding, hw):
    """The image inside a padded canvas; a copy, so the canvas is freed."""
    (ph, pw), (h, w) = padding, hw
    return canvas[:, :, ph : ph + h, pw : pw + w].copy() if ph or pw else canvas


POOL_ATTRS = {
    "kernel": KERNEL,
    "stride": _pair(rules.all_positive, POSITIVE, default=None),
    "padding": PADDING,
}
MAX_POOL_ATTRS = {**POOL_ATTRS, "dilation": DILATION}
AVG_POOL_ATTRS = {**POOL_ATTRS, "count_include_pad": Attr("bool", default=True)}


# --- max_pool2d ------------------------------------------------------------------------
def _max_pool2d(x, kernel, stride, padding, dilation):
    return _reduce_taps(_windows(x, kernel, stride, padding, dilation, -np.inf), np.maximum)


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
    workspace=_padded,
    cost=window_cost,
    attrs=MAX_POOL_ATTRS,
    doc="Max over each window of x (N, C, H, W), padded with -inf; stride defaults to "
    "the kernel; padding at most half the kernel (torch's rule). A window's gradient "
    "goes to its first maximum (torch's rule).",
)


# --- avg_pool2d ------------------------------------------------------------------------
def pool_divisor(hw, kernel, stride, padding, count_include_pad, dtype):
    """Per-window divisor: the kernel size, or the number of non-padding elements."""
    if count_include_pad:
        return kernel[0] * kernel[1]
    ones = np.ones((1, 1) + tuple(hw), dtype=dtypes.NUMPY[dtype])
    return _reduce_taps(_windows(ones, kernel, stride, padding, (1, 1)), np.add)


def _avg_pool2d(x, kernel, stride, padding, count_include_pad):
    divisor = pool_divisor(
        x.shape[2:], kernel, stride, padding, count_include_pad, dtypes.of_array(x)
    )
    total = _reduce_taps(_windows(x, kernel, stride, padding, (1, 1)), np.add)
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
    workspace=_padded,
    attrs=AVG_POOL_ATTRS,
    doc="Mean over each window of x (N, C, H, W), zero-padded; stride defaults to the "
    "kernel; count_include_pad=False divides by the non-padding count (as torch).",
)
