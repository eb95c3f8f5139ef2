"""conv2d_weight_grad: conv2d's gradient in its weight, as one native op.

The im2col formulation (g @ unfold(x)^T) puts a kh*kw-times-the-input column matrix
into the backward graph; here the forward gathers the taps block by block
(conv_taps), so the graph holds only the weight-sized result. The op is bilinear in
(x, g), and its VJP is conv2d's two other products: to x the transposed convolution
of g with the cotangent (conv2d's input gradient), to g the convolution of x with it.
conv_transpose2d's weight gradient is the same op with the roles of x and g swapped.
"""

from __future__ import annotations

from ..errors import ShapeError
from ..graph.ir import TensorType
from . import conv_taps, rules
from .conv import (
    GROUPS,
    output_padding,
    taps_workspace,
)
from .registry import register
from .windows import (
    KERNEL,
    WINDOW_ATTRS,
    _image,
    _out_hw,
)


def _infer(x, g, kernel, stride, padding, dilation, groups):
    _image(x)
    _image(g, "gradient")
    rules.same_dtype(x, g)
    (n, c), (ng, o) = x.shape[:2], g.shape[:2]
    if ng != n:
        raise ShapeError(f"gradient {g.shape} and input {x.shape} differ in batch size")
    if c % groups or o % groups:
        raise ShapeError(
            f"groups={groups} must divide the input channels ({c}) and the output channels ({o})"
        )
    windows = _out_hw(x.shape[2:], kernel, stride, padding, dilation)
    if tuple(g.shape[2:]) != windows:
        raise ShapeError(
            f"gradient {g.shape} must have the {windows} windows conv2d makes of the "
            f"input {x.shape}"
        )
    return TensorType((o, c // groups) + tuple(kernel), x.dtype)


def _forward(x, g, kernel, stride, padding, dilation, groups):
    return conv_taps.weight_grad(x, g, kernel, stride, padding, dilation, groups)


def _vjp(e, wbar, out, x, g, kernel, stride, padding, dilation, groups):
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    skipped = output_padding(x.shape[2:], kernel, stride, padding, dilation)
    return [
        e.conv_transpose2d(g, wbar, output_padding=skipped, **geometry),
        e.conv2d(x, wbar, **geometry),
    ]


def _scratch(out, x, g, kernel, stride, padding, dilation, groups) -> int:
    return conv_taps.weight_grad_scratch(x, g, kernel, stride, padding, dilation, groups)


def _workspace(x, g, kernel, stride, padding, dilation, groups) -> tuple[int, ...]:
    return taps_workspace(x, kernel, stride, padding, dilation, x.shape[1], g.shape[1])


register(
    "conv2d_weight_grad",
    family="conv",
    inputs=2,
    infer=_infer,
    forward=_forward,
    vjp=_vjp,
    residuals="inputs",
    cost=lambda out, x, g, kernel, groups, **attrs: (
        2 * g.size * (x.shape[1] // groups) * kernel[0] * kernel[1]
    ),
    workspace=_workspace,
    scratch=_scratch,
    attrs={**WINDOW_ATTRS, "kernel": KERNEL, "groups": GROUPS},
    doc="conv2d's gradient in w: dw[o, c, i, j] = sum over n, Y, X of g[n, o, Y, X] * "
    "x_pad[n, g*C/G + c, Y*sh + i*dh, X*sw + j*dw] (o in group g), shape (O, C/groups, kh, kw).",
)
