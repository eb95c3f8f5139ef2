"""ONNX Conv, ConvTranspose and pooling -> remat's 2-D ops (1-D ones run as 2-D with a
height of 1). Padding remat's ops cannot express (asymmetric, SAME, ceil mode, more than
half a pooling kernel) becomes an explicit `pad` (zeros, or -inf for MaxPool) or a
crop, so the result is exactly ONNX's."""

from __future__ import annotations

import math

import numpy as np

from .context import Missing, NodeCtx
from .emit import Sym, window_out
from .errors import Unsupported

AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


def _same(size: int, kernel: int, stride: int, dilation: int, out: int, upper: bool):
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    begin = total // 2 if upper else total - total // 2
    return begin, total - begin


def _geometry(c: NodeCtx, sizes, kernel):
    """strides, dilations, pad begins, pad ends (lists, one entry per spatial axis)."""
    n = len(kernel)
    strides = list(c.attr("strides", (1,) * n))
    dilations = list(c.attr("dilations", (1,) * n))
    auto = c.attr("auto_pad", "NOTSET")
    if auto.startswith("SAME"):
        pairs = [
            _same(size, k, s, d, -(-size // s), auto == "SAME_UPPER")
            for size, k, s, d in zip(sizes, kernel, strides, dilations)
        ]
        begins, ends = [p[0] for p in pairs], [p[1] for p in pairs]
    elif auto == "VALID":
        begins, ends = [0] * n, [0] * n
    else:
        pads = c.attr("pads", (0,) * (2 * n))
        begins, ends = list(pads[:n]), list(pads[n:])
    if not len(strides) == len(dilations) == len(begins) == len(ends) == n:
        raise Unsupported("strides, dilations or pads of the wrong length")
    return strides, dilations, begins, ends


def _lift(c: NodeCtx, x: Sym) -> Sym:
    """(N, C, L) -> (N, C, 1, L): a 1-D op runs as a 2-D one."""
    if x.ndim == 4:
        return x
    if x.ndim != 3:
        raise Unsupported(f"{c.op} over {x.ndim - 2} spatial dimensions (remat's ops are 2-D)")
    return c.b.reshape(x, x.shape[:2] + (1,) + x.shape[2:])


def _lower(c: NodeCtx, y: Sym, rank: int) -> Sym:
    return y if rank == 4 else c.b.reshape(y, y.shape[:2] + y.shape[3:])


def _pad_extra(c: NodeCtx, x: Sym, begins, ends, keep, value: float):
    """Pad explicitly what remat's symmetric `padding` (at most `keep`) cannot; returns
    the input to use and that symmetric padding."""
    sym = [min(b, e, k) for b, e, k in zip(begins, ends, keep)]
    extra_b = [b - s for b, s in zip(begins, sym)]
    extra_e = [e - s for e, s in zip(ends, sym)]
    if any(extra_b) or any(extra_e):
        pads = (0, 0, *extra_b, 0, 0, *extra_e)
        shape = x.shape[:2] + tuple(d + b + e for d, b, e in zip(x.shape[2:], extra_b, extra_e))
        attrs = {"pads": pads, "mode": "constant", "value": value}
        x = c.b.emit("pad", (x,), attrs, shape, x.dtype)
    return x, tuple(sym)


def _conv(c: NodeCtx):
    x, w = c.sym(0), c.sym(1)
    rank = x.ndim
    strides, dilations, begins, ends = _geometry(c, x.shape[2:], w.shape[2:])
    x, w = _lift(c, x), _lift(c, w)
    kernel = w.shape[2:]
    if rank == 3:
        strides, dilations, begins, ends = [1, *strides], [1, *dilations], [0, *begins], [0, *ends]
    x, padding = _pad_extra(c, x, begins, ends, (math.inf, math.inf), 0.0)
    groups = int(c.attr("group", 1))
    inputs = (x, w, c.sym(2)) if c.has(2) else (x, w)
    shape = (
        x.shape[:1]
        + w.shape[:1]
        + tuple(
            window_out(size, k, s, 2 * p, d)
            for size, k, s, p, d in zip(x.shape[2:], kernel, strides, padding, dilations)
        )
    )
    attrs = {
        "stride": tuple(strides),
        "padding": padding,
        "dilation": tuple(dilations),
        "groups": groups,
    }
    return _lower(c, c.b.emit("conv2d", inputs, attrs, shape, x.dtype), rank)


def _conv_transpose(c: NodeCtx):
    x, w = c.sym(0), c.sym(1)
    rank = x.ndim
    x, w = _lift(c, x), _lift(c, w)
    kernel, sizes, n = w.shape[2:], x.shape[2:], rank - 2
    groups = int(c.attr("group", 1))
    strides = list(c.attr("strides", (1,) * n))
    dilations = list(c.attr("dilations", (1,) * n))
    extra = list(c.attr("output_padding", (0,) * n))
    if not len(strides) == len(dilations) == len(extra) == n:
        raise Unsupported("strides, dilations or output_padding of the wrong length")
    if rank == 3:
        strides, dilations, extra = [1, *strides], [1, *dilations], [0, *extra]
    full = [
        s * (size - 1) + (k - 1) * d + 1 + e
        for size, k, s, d, e in zip(sizes, kernel, strides, dilations, extra)
    ]
    auto, wanted = c.attr("auto_pad", "NOTSET"), c.attr("output_shape", None)
    if wanted is not None or auto.startswith("SAME"):
        if wanted is not None:
            wanted = list(wanted[-n:])
            wanted = [1, *wanted] if rank == 3 else wanted
        else:
            wanted = [size * s for size, s in zip(sizes, strides)]
        totals = [f - o for f, o in zip(full, wanted)]
        if any(t < 0 for t in totals):
            raise Unsupported(f"output_shape {wanted} larger than the full output {full}")
        upper = auto == "SAME_UPPER"
        begins = [t // 2 if upper else t - t // 2 for t in totals]
        ends = [t - b for t, b in zip(totals, begins)]
    elif auto == "VALID":
        begins, ends = [0, 0], [0, 0]
    else:
        pads = c.attr("pads", (0,) * (2 * n))
        if len(pads) != 2 * n:
            raise Unsupported(f"pads {pads} for {n} spatial axes")
        begins, ends = list(pads[:n]), list(pads[n:])
        if rank == 3:
            begins, ends = [0, *begins], [0, *ends]
    padding = tuple(min(b, e) for b, e in zip(begins, ends))
    inputs = (x, w, c.sym(2)) if c.has(2) else (x, w)
    shape = (x.shape[0], w.shape[1] * groups) + tuple(f - 2 * p for f, p in zip(full, padding))
    attrs = {
        "stride": tuple(strides),
        "padding": padding,
        "output_padding": tuple(extra),
        "dilation": tuple(dilations),
        "groups": groups,
    }
    y = c.b.emit("conv_transpose2d", inputs, attrs, shape, x.dtype)
    if begins != list(padding) or ends != list(padding):  # asymmetric: crop the rest
        starts = [0, 0] + [b - p for b, p in zip(begins, padding)]
        stops = list(y.shape[:2]) + [
            f - b - e + s for f, b, e, s in zip(full, begins, ends, starts[2:])
        ]
        y = c.b.slice(y, starts, stops, [1] * 4)
    return _lower(c, y, rank)


def _pool(c: NodeCtx):
    x = c.sym(0)
    rank = x.ndim
    kernel = list(c.attr("kernel_shape"))
    if len(kernel) != rank - 2:
        raise Unsupported(f"a {len(kernel)}-D kernel for a rank-{rank} input")
    strides, dilations, begins, ends = _geometry(c, x.shape[2:], kernel)
    x = _lift(c, x)
    if rank == 3:
        kernel, strides, dilations = [1, *kernel], [1, *strides], [1, *dilations]
        begins, ends = [0, *begins], [0, *ends]
    floor_out = [
        window_out(size, k, s, b + e, d)
        for size, k, s, b, e, d in zip(x.shape[2:], kernel, strides, begins, ends, dilations)
    ]
    if c.attr("ceil_mode", 0):
        for i, (size, k, s, b, e, d) in enumerate(
            zip(x.shape[2:], kernel, strides, begins, ends, dilations)
        ):
            out = -(-(size + b + e - d * (k - 1) - 1) // s) + 1
            if (out - 1) * s >= size + b:  # the last window must start inside
                out -= 1
            if out > floor_out[i]:  # a partial last window: pad the rest of it
                ends[i] += (out - 1) * s + d * (k - 1) + 1 - (size + b + e)
                if c.op == "AveragePool" and c.attr("count_include_pad", 0):
                    raise Unsupported("ceil_mode=1 adding a partial window, count_include_pad=1")
    if c.op == "MaxPool":
        x, padding = _pad_extra(c, x, begins, ends, [k // 2 for k in kernel], -math.inf)
        attrs = {"kernel": tuple(kernel), "stride": tuple(strides), "padding": padding}
        y = c.b.emit(
            "max_pool2d",
            (x,),
            {**attrs, "dilation": tuple(dilations)},
            _pooled(x, kernel, strides, padding, dilations),
            x.dtype,
        )
        return [_lower(c, y, rank), Missing("MaxPool's Indices output is not supported")][
            : max(c.n_outputs, 1)
        ]
    return _lower(c, _average(c, x, kernel, strides, dilations, begins, ends), rank)


def _pooled(x: Sym, kernel, strides, padding, dilations) -> tuple:
    return x.shape[:2] + tuple(
        window_out(size, k, s, 2 * p, d)
        for size, k, s, p, d in zip(x.shape[2:], kernel, strides, padding, dilations)
    )


def _average(c: NodeCtx, x: Sym, kernel, strides, dilations, begins, ends) -> Sym:
    if any(d != 1 for d in dilations):
        raise Unsupported("AveragePool with dilations (remat's avg_pool2d has none)")
    include_pad = bool(c.attr("count_include_pad", 0))
    native = all(b == e <= k // 2 for b, e, k in zip(begins, ends, kernel))
    if native or include_pad:  # explicit zero padding counts like remat's own
        keep = [k // 2 for k in kernel]
        x, padding = _pad_extra(c, x, begins, ends, keep, 0.0)
        attrs = {"kernel": tuple(kernel), "stride": tuple(strides), "padding": padding}
        attrs["count_include_pad"] = include_pad
        return c.b.emit(
            "avg_pool2d", (x,), attrs, _pooled(x, kernel, strides, padding, dilations), x.dtype
        )
    # Pads remat cannot place, excluded from the count: average over the zero-padded
    # windows, then rescale each by kernel size / the real elements it covers.
    sizes = x.shape[2:]
    x, _ = _pad_extra(c, x, begins, ends, (0, 0), 0.0)
    attrs = {"kernel": tuple(kernel), "stride": tuple(strides), "padding": (0, 0)}
    attrs["count_include_pad"] = True
    shape = _pooled(x, kernel, strides, (0, 0), dilations)
    y = c.b.emit("avg_pool2d", (x,), attrs, shape, x.dtype)
    counts = [
        np.array([max(min(o * s + k, b + n) - max(o * s, b), 0) for o in range(out)], np.float64)
        for out, s, k, b, n in zip(shape[2:], strides, kernel, begins, sizes)
    ]
    c.check_size(shape[2:])
    factor = kernel[0] * kernel[1] / np.maximum(np.outer(counts[0], counts[1]), 1.0)
    return c.b.binary("mul", y, c.b.constant(factor.astype(x.dtype)))


def _global_pool(c: NodeCtx):
    x = c.sym(0)
    op = "mean" if c.op == "GlobalAveragePool" else "max"
    return c.b.reduce(op, x, tuple(range(2, x.ndim)), True)


def _check_window(attrs, opset):
    problems = []
    auto = attrs.get("auto_pad", "NOTSET")
    if auto not in AUTO_PADS:
        problems.append(f"auto_pad '{auto}'")
    kernel = attrs.get("kernel_shape")
    if kernel is not None and len(kernel) not in (1, 2):
        problems.append(f"a {len(kernel)}-D kernel (remat's ops are 1-D and 2-D)")
    return problems


OPS = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _global_pool,
    "GlobalMaxPool": _global_pool,
}
CHECKS = {op: _check_window for op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool")}
