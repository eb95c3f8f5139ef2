"""The ATen op table, continued: convolution, pooling, resizing, padding, normalization,
softmax, attention and losses (registered into `aten_table.HANDLERS` on import).

remat's max_pool2d sends a window's gradient to its first maximum, as torch does (ReLU
before pooling makes ties common); only a pooling whose indices are used is imported
as unfold + argmax + take_along_axis, to compute them.
"""

from __future__ import annotations

import math

from .aten_table import _dim, _out_shape, _reshape, aten
from .torch_values import Tensor, Unsupported, remat_dtype


# --- convolution and pooling ----------------------------------------------------------------
def _pair(value) -> list[int]:
    value = list(value) if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in value] * (2 // len(value))


def _conv_inputs(cx, a):
    inputs = [cx.node(a.input), cx.node(a.weight)]
    if a.bias is not None:
        inputs.append(cx.node(a.bias, cx.out_dtype))
    return inputs


@aten("conv2d", "conv1d", "convolution", "_convolution")
def _conv(cx, a):
    x = a.input
    ndim = x.ndim
    if a.transposed:
        return _conv_transpose(cx, a)
    if ndim not in (3, 4):
        raise Unsupported(f"{ndim - 2}-d convolution (1-d and 2-d only)")
    one_d = ndim == 3
    stride = _pair([1] + list(a.stride) if one_d else a.stride)
    dilation = _pair([1] + list(a.dilation) if one_d else a.dilation)
    kernel = cx.shape_of(a.weight)[2:]
    kernel = (1, *kernel) if one_d else kernel
    inputs = _conv_inputs(cx, a)
    if one_d:
        inputs[0] = _reshape(cx, inputs[0], (x.shape[0], x.shape[1], 1, x.shape[2]))
        w = cx.shape_of(a.weight)
        inputs[1] = _reshape(cx, inputs[1], (w[0], w[1], 1, w[2]))
    pre_pad = None
    if isinstance(a.padding, str):
        if a.padding == "valid":
            padding = [0, 0]
        else:  # "same": torch puts the odd extra pixel at the end
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            begin = [t // 2 for t in total]
            end = [t - b for t, b in zip(total, begin)]
            padding = begin
            if begin != end:
                padding = [0, 0]
                pre_pad = [0, 0, begin[0], begin[1], 0, 0, end[0], end[1]]
    else:
        padding = _pair([0] + list(a.padding) if one_d else a.padding)
    if pre_pad is not None:
        inputs[0] = cx.op("pad", [inputs[0]], pads=pre_pad)
    out = cx.op(
        "conv2d",
        inputs,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=int(a.groups or 1),
    )
    return _reshape(cx, out, _out_shape(cx)) if one_d else out


@aten("conv_transpose2d")
def _conv_transpose(cx, a):
    if a.input.ndim != 4:
        raise Unsupported("transposed convolution other than 2-d")
    return cx.op(
        "conv_transpose2d",
        _conv_inputs(cx, a),
        stride=_pair(a.stride),
        padding=_pair(a.padding),
        output_padding=_pair(a.output_padding),
        dilation=_pair(a.dilation),
        groups=int(a.groups or 1),
    )


def _ceil_extra(out_hw, x, kernel, stride, padding, dilation) -> list[int]:
    """The padding ceil_mode adds at the end of each spatial axis (0: same as floor)."""
    return [
        max((o - 1) * s + d * (k - 1) + 1 - (size + 2 * p), 0)
        for o, size, k, s, p, d in zip(out_hw, x.shape[2:], kernel, stride, padding, dilation)
    ]


@aten("max_pool2d", "max_pool2d_with_indices")
def _max_pool2d(cx, a):
    x = a.self
    if x.ndim != 4:
        raise Unsupported("max_pool2d on an input of rank other than 4")
    kernel = _pair(a.kernel_size)
    stride = _pair(a.stride) if a.stride else kernel
    padding, dilation = _pair(a.padding), _pair(a.dilation)
    n, c = x.shape[:2]
    with_indices = cx.fx.target.overloadpacket.__name__ == "max_pool2d_with_indices"
    ho, wo = (cx.out[0] if with_indices else cx.out).shape[2:]
    node = cx.node(x)
    extra = _ceil_extra((ho, wo), x, kernel, stride, padding, dilation)
    if any(extra):  # ceil_mode's last windows overhang the end: -inf never wins
        pads = [0, 0, 0, 0, 0, 0, *extra]
        node = cx.op("pad", [node], pads=pads, mode="constant", value=-math.inf)
    geometry = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation}
    if not with_indices:
        return cx.op("max_pool2d", [node], **geometry)
    taps = kernel[0] * kernel[1]
    windows = cx.op("unfold", [node], pad_value=-math.inf, **geometry)
    windows = _reshape(cx, windows, (n, c, taps, ho * wo))
    first = cx.op("argmax", [windows], axis=2, keepdims=True)
    out = _reshape(cx, cx.op("take_along_axis", [windows, first], axis=2), (n, c, ho, wo))
    # torch's indices: the flat (h * W + w) position of each maximum in the input.
    torch = cx.torch
    taps_h = torch.arange(kernel[0]).repeat_interleave(kernel[1]) * dilation[0]
    taps_w = torch.arange(kernel[1]).repeat(kernel[0]) * dilation[1]
    rows = torch.arange(ho).repeat_interleave(wo) * stride[0] - padding[0]
    cols = torch.arange(wo).repeat(ho) * stride[1] - padding[1]
    table = (rows[None, :] + taps_h[:, None]) * x.shape[3] + cols[None, :] + taps_w[:, None]
    table = cx.op("broadcast_to", [cx.node(table)], shape=[n, c, taps, ho * wo])
    index = cx.op("take_along_axis", [table, first], axis=2)
    return [out, _reshape(cx, index, (n, c, ho, wo))]


@aten("avg_pool2d")
def _avg_pool2d(cx, a):
    x = a.self
    kernel = _pair(a.kernel_size)
    stride = _pair(a.stride) if a.stride else kernel
    padding = _pair(a.padding)
    if a.divisor_override is not None:
        raise Unsupported("divisor_override")
    if a.ceil_mode and any(_ceil_extra(_out_shape(cx)[2:], x, kernel, stride, padding, (1, 1))):
        raise Unsupported("ceil_mode=True where it changes the output size")
    return cx.op(
        "avg_pool2d",
        [cx.node(x)],
        kernel=kernel,
        stride=stride,
        padding=padding,
        count_include_pad=bool(a.count_include_pad),
    )


@aten("adaptive_avg_pool2d", "_adaptive_avg_pool2d")
def _adaptive_avg_pool2d(cx, a):
    x = a.self
    out_hw = _out_shape(cx)[-2:]
    in_hw = x.shape[-2:]
    if tuple(out_hw) == (1, 1):
        return cx.op("mean", [cx.node(x)], axes=[x.ndim - 2, x.ndim - 1], keepdims=True)
    if any(i % o for i, o in zip(in_hw, out_hw)):
        raise Unsupported(f"adaptive pooling from {tuple(in_hw)} to {tuple(out_hw)}")
    kernel = [i // o for i, o in zip(in_hw, out_hw)]
    return cx.op("avg_pool2d", [cx.node(x)], kernel=kernel, stride=kernel, padding=[0, 0])


def _check_scales(cx, x, scales):
    """torch indexes with 1 / scale when given a scale factor; remat with in / out."""
    if not scales:
        return
    for size, out, scale in zip(x.shape[2:], _out_shape(cx)[2:], scales):
        if scale is not None and 1.0 / float(scale) != size / out:
            raise Unsupported("a scale factor whose output size is not exact (pass size=)")


@aten("upsample_nearest2d")
def _upsample_nearest2d(cx, a):
    x = a.input if a.input is not None else a.self
    _check_scales(cx, x, a.scale_factors or [a.scales_h, a.scales_w])
    return cx.op("upsample_nearest2d", [cx.node(x)], size=list(_out_shape(cx)[2:]))


@aten("upsample_bilinear2d")
def _upsample_bilinear2d(cx, a):
    x = a.input if a.input is not None else a.self
    _check_scales(cx, x, a.scale_factors or [a.scales_h, a.scales_w])
    return cx.op(
        "upsample_bilinear2d",
        [cx.node(x)],
        size=list(_out_shape(cx)[2:]),
        align_corners=bool(a.align_corners),
    )


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


@aten(
    "pad",
    "constant_pad_nd",
    "reflection_pad1d",
    "reflection_pad2d",
    "replication_pad1d",
    "replication_pad2d",
)
def _pad(cx, a):
    x = a.self
    packet = cx.fx.target.overloadpacket.__name__
    mode = a.mode or (
        "reflect"
        if packet.startswith("reflection")
        else "replicate"
        if packet.startswith("replication")
        else "constant"
    )
    if mode not in _PAD_MODES:
        raise Unsupported(f"pad mode {mode!r}")
    widths = [int(p) for p in (a.pad if a.pad is not None else a.padding)]
    if any(p < 0 for p in widths):
        raise Unsupported("negative padding")
    begins, ends = [0] * x.ndim, [0] * x.ndim
    for i in range(len(widths) // 2):
        begins[x.ndim - 1 - i], ends[x.ndim - 1 - i] = widths[2 * i], widths[2 * i + 1]
    attrs = {"pads": begins + ends, "mode": _PAD_MODES[mode]}
    if mode == "constant":
        attrs["value"] = float(a.value or 0.0)
    return cx.op("pad", [cx.node(x)], **attrs)


# --- normalization -----------------------------------------------------------------------
def _param_or(cx, value, shape, fill: float, dtype):
    if value is not None:
        return cx.node(value, dtype)
    return cx.node(cx.torch.full(tuple(shape), fill, dtype=dtype))


@aten("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit")
def _batch_norm(cx, a):
    """Training mode normalizes with the batch's statistics and writes the running
    statistics PyTorch's rule gives (momentum, unbiased variance) into the buffers."""
    from .. import ops

    x = a.input
    dt, channels = x.dtype, x.shape[1]
    packet = cx.fx.target.overloadpacket.__name__
    training = bool(a.training) if packet != "_native_batch_norm_legit_no_training" else False
    weight = _param_or(cx, a.weight, (channels,), 1.0, dt)
    bias = _param_or(cx, a.bias, (channels,), 0.0, dt)
    mean = _param_or(cx, a.running_mean, (channels,), 0.0, dt)
    var = _param_or(cx, a.running_var, (channels,), 1.0, dt)
    out = cx.op(
        "batch_norm",
        [cx.node(x), weight, bias, mean, var],
        training=training,
        eps=float(a.eps),
    )
    if training and isinstance(a.running_mean, Tensor) and isinstance(a.running_var, Tensor):
        name, momentum = cx.fresh("running"), float(a.momentum)
        new_mean, new_var = ops.batch_norm_running_stats(
            cx.node(x), mean, var, momentum, unbiased=True, name=name
        )
        cx.mutate("running_mean", Tensor(new_mean, (channels,), dt))
        cx.mutate("running_var", Tensor(new_var, (channels,), dt))
    if packet == "batch_norm":
        return out
    return [out, None, None]


@aten("layer_norm")
def _layer_norm(cx, a):
    x = a.input
    shape = tuple(a.normalized_shape)
    weight = _param_or(cx, a.weight, shape, 1.0, x.dtype)
    bias = _param_or(cx, a.bias, shape, 0.0, x.dtype)
    return cx.op("layer_norm", [cx.node(x), weight, bias], eps=float(a.eps))


@aten("rms_norm")
def _rms_norm(cx, a):
    torch, x = cx.torch, a.input
    shape = tuple(a.normalized_shape)
    weight = _param_or(cx, a.weight, shape, 1.0, x.dtype)
    eps = a.eps if a.eps is not None else torch.finfo(x.dtype).eps
    return cx.op("rms_norm", [cx.node(x), weight], eps=float(eps))


@aten("group_norm")
def _group_norm(cx, a):
    """layer_norm over each group's (C / G, *spatial) values, then the per-channel affine."""
    torch, x = cx.torch, a.input
    n, c = x.shape[:2]
    groups = int(a.num_groups)
    per_group = math.prod(x.shape[1:]) // groups
    node = _reshape(cx, cx.node(x), (n, groups, per_group), x.shape)
    ones = cx.node(torch.ones(per_group, dtype=x.dtype))
    zeros = cx.node(torch.zeros(per_group, dtype=x.dtype))
    node = cx.op("layer_norm", [node, ones, zeros], eps=float(a.eps))
    node = _reshape(cx, node, x.shape)
    affine = (c,) + (1,) * (x.ndim - 2)
    if a.weight is not None:
        node = cx.op("mul", [node, _reshape(cx, cx.node(a.weight), affine)])
    if a.bias is not None:
        node = cx.op("add", [node, _reshape(cx, cx.node(a.bias), affine)])
    return node


def _softmax(op):
    def handler(cx, a):
        x = a.self
        dt = a.dtype if a.dtype is not None else cx.out_dtype
        return cx.op(op, [cx.node(x, dt)], axis=_dim(a.dim, x.ndim))

    return handler


aten("softmax", "_softmax", "_safe_softmax")(_softmax("softmax"))
aten("log_softmax", "_log_softmax")(_softmax("log_softmax"))


@aten("scaled_dot_product_attention")
def _sdpa(cx, a):
    q, k, v = a.query, a.key, a.value
    nodes = [cx.node(q), cx.node(k), cx.node(v)]
    if a.enable_gqa and k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        for i, t in ((1, k), (2, v)):
            lead, heads, rest = t.shape[:-3], t.shape[-3], t.shape[-2:]
            spread = _reshape(cx, nodes[i], (*lead, heads, 1, *rest))
            spread = cx.op("broadcast_to", [spread], shape=[*lead, heads, repeat, *rest])
            nodes[i] = _reshape(cx, spread, (*lead, heads * repeat, *rest))
    if a.attn_mask is not None:
        mask = a.attn_mask
        dtype = "bool" if cx.dtype_of(mask) == cx.torch.bool else q.dtype
        nodes.append(cx.node(mask, dtype))
    attrs = {"causal": bool(a.is_causal)}
    if a.scale is not None:
        if float(a.scale) == 0.0:
            raise Unsupported("scale=0")
        attrs["scale"] = float(a.scale)
    if a.dropout_p:
        attrs.update(dropout_p=float(a.dropout_p), seed=int(cx.seed))
    return cx.op("scaled_dot_product_attention", nodes, **attrs)


# --- losses -----------------------------------------------------------------------------
_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def _nll(cx, logp, target, weight, reduction: int, ignore_index: int, classes_axis: int = 1):
    """-log_prob[target], ignoring `ignore_index`, reduced like torch's nll_loss."""
    torch = cx.torch
    if weight is not None:
        raise Unsupported("class weights")
    shape = cx.shape_of(target)
    ndim = len(shape) + 1
    axis = classes_axis if ndim > 1 else 0
    labels = cx.node(target, "int64")
    valid = cx.op("logical_not", [cx.op("eq", [labels, cx.node(ignore_index, "int64")])])
    safe = cx.op("where", [valid, labels, cx.node(0, "int64")])
    expanded = shape[:axis] + (1,) + shape[axis:]
    picked = cx.op("take_along_axis", [logp, _reshape(cx, safe, expanded)], axis=axis)
    picked = _reshape(cx, picked, shape)
    dt = cx.out_dtype
    zero = cx.node(torch.zeros((), dtype=dt))
    losses = cx.op("where", [valid, cx.op("neg", [picked]), zero])
    mode = _REDUCTIONS[int(reduction)]
    if mode == "none":
        return losses
    total = cx.op("sum", [losses])
    if mode == "sum":
        return total
    count = cx.op("sum", [cx.op("cast", [valid], dtype=remat_dtype(dt))])
    return cx.op("div", [total, count])


@aten("cross_entropy_loss")
def _cross_entropy(cx, a):
    x = a.self
    if a.label_smoothing:
        raise Unsupported("label_smoothing")
    if cx.dtype_of(a.target).is_floating_point:
        raise Unsupported("class-probability targets")
    logp = cx.op("log_softmax", [cx.node(x)], axis=1 if x.ndim > 1 else 0)
    return _nll(cx, logp, a.target, a.weight, a.reduction, int(a.ignore_index))


@aten("nll_loss", "nll_loss_nd", "nll_loss2d")
def _nll_loss(cx, a):
    return _nll(cx, cx.node(a.self), a.target, a.weight, a.reduction, int(a.ignore_index))


@aten("mse_loss")
def _mse_loss(cx, a):
    dt = cx.out_dtype
    diff = cx.op("sub", [cx.node(a.self, dt), cx.node(a.target, dt)])
    squares = cx.op("square", [diff])
    mode = _REDUCTIONS[int(a.reduction)]
    return squares if mode == "none" else cx.op(mode, [squares])


@aten("one_hot")
def _one_hot(cx, a):
    classes = int(a.num_classes)
    if classes < 0:
        raise Unsupported("num_classes=-1 (the depth would depend on data)")
    return cx.op("one_hot", [cx.node(a.self, "int64")], depth=classes, dtype="int64")
