"""ONNX normalization, Dropout and Resize -> remat ops, training behaviour kept:
BatchNormalization with training_mode=1 normalizes with the batch's statistics and its
running_mean/running_var outputs follow ONNX's update rule; Dropout with
training_mode=true drops, with a seed and mask key derived from the node."""

from __future__ import annotations

import hashlib

import numpy as np

from .context import Missing, NodeCtx
from .emit import Sym, norm_axis
from .errors import OnnxImportError, Unsupported


def _batch_norm(c: NodeCtx):
    x, scale, bias, mean, var = (c.sym(i) for i in range(5))
    if x.ndim < 2:
        raise OnnxImportError(f"{c.label}: input of rank {x.ndim} (N, C, ...) expected")
    eps, momentum = float(c.attr("epsilon", 1e-5)), float(c.attr("momentum", 0.9))
    # Opset 14 added training_mode; before, extra outputs meant training (BN-9).
    training = bool(c.attr("training_mode", 0)) if c.opset >= 14 else c.n_outputs > 1
    attrs = {"training": training, "eps": eps}
    y = c.b.emit("batch_norm", (x, scale, bias, mean, var), attrs, x.shape, x.dtype)
    outs: list = [y] + [Missing("a BatchNormalization output outside training mode")] * 4
    if training and any(c.used(k) for k in range(1, 5)):
        # The batch's mean and biased variance in one (2, C) value, no x-sized one.
        channels = x.shape[1]
        stats = c.b.emit("batch_norm_stats", (x,), {"unbiased": False}, (2, channels), x.dtype)
        current, variance = (
            c.b.reshape(c.b.slice(stats, (row, 0), (row + 1, channels), (1, 1)), (channels,))
            for row in (0, 1)
        )
        outs[1] = _momentum(c, mean, current, momentum)
        outs[2] = _momentum(c, var, variance, momentum)
        outs[3] = current  # BN-9's saved_mean
        outs[4] = Missing("BatchNormalization-9's saved_var output")
    return outs[: c.n_outputs]


def _momentum(c: NodeCtx, running: Sym, current: Sym, momentum: float) -> Sym:
    """running * momentum + current * (1 - momentum), ONNX's rule."""
    kept = c.b.binary("mul", running, c.b.scalar(momentum, running.dtype))
    new = c.b.binary("mul", current, c.b.scalar(1.0 - momentum, current.dtype))
    return c.b.binary("add", kept, new)


def _layer_norm(c: NodeCtx):
    x, scale = c.sym(0), c.sym(1)
    axis = norm_axis(int(c.attr("axis", -1)), x.ndim)
    eps = float(c.attr("epsilon", 1e-5))
    normalized = x.shape[axis:]
    scale = c.b.broadcast_to(scale, normalized)
    if c.has(2):
        bias = c.b.broadcast_to(c.sym(2), normalized)
    else:
        c.check_size(normalized)
        bias = c.b.constant(np.zeros(normalized, dtype=x.dtype))
    y = c.b.emit("layer_norm", (x, scale, bias), {"eps": eps}, x.shape, x.dtype)
    outs: list = [y]
    if c.used(1) or c.used(2):  # Mean and InvStdDev, kept dims
        axes = tuple(range(axis, x.ndim))
        mean = c.b.reduce("mean", x, axes, True)
        centered = c.b.binary("sub", x, mean)
        var = c.b.reduce("mean", c.b.unary("square", centered), axes, True)
        std = c.b.unary("sqrt", c.b.binary("add", var, c.b.scalar(eps, x.dtype)))
        outs += [mean, c.b.binary("div", c.b.scalar(1.0, x.dtype), std)]
    return outs + [Missing()] * (c.n_outputs - len(outs))


def _instance_norm(c: NodeCtx):
    """layer_norm over each (n, c) plane, then the per-channel scale and bias."""
    x, scale, bias = c.sym(0), c.sym(1), c.sym(2)
    if x.ndim < 3:
        raise OnnxImportError(f"{c.label}: input of rank {x.ndim} (N, C, D1, ...) expected")
    eps = float(c.attr("epsilon", 1e-5))
    plane = c.check_size(x.shape[2:])
    flat = c.b.reshape(x, x.shape[:2] + (plane,))
    ones = c.b.constant(np.ones(plane, dtype=x.dtype))
    zeros = c.b.constant(np.zeros(plane, dtype=x.dtype))
    y = c.b.emit("layer_norm", (flat, ones, zeros), {"eps": eps}, flat.shape, x.dtype)
    y = c.b.reshape(y, x.shape)
    channel = (x.shape[1],) + (1,) * (x.ndim - 2)
    y = c.b.binary("mul", y, c.b.reshape(scale, channel))
    return c.b.binary("add", y, c.b.reshape(bias, channel))


def _seed(c: NodeCtx) -> int:
    if "seed" in c.attrs:
        return int(c.attr("seed"))
    text = f"{c.node.name}\x00{c.node.output[0]}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") & 0x7FFFFFFF


def _dropout(c: NodeCtx):
    x = c.sym(0)
    ratio = float(c.scalar(1, "ratio", 0.5))
    training = bool(c.scalar(2, "training_mode", False))
    if not training or ratio == 0.0:
        mask = c.b.broadcast_to(c.b.scalar(True, "bool"), x.shape) if c.used(1) else Missing()
        return [x, mask][: c.n_outputs]
    if not 0.0 < ratio < 1.0:
        raise Unsupported(f"ratio {ratio} (remat's dropout takes [0, 1))")
    attrs = {"p": ratio, "seed": _seed(c), "key": c.node.output[0]}
    y = c.b.emit("dropout", (x,), attrs, x.shape, x.dtype)
    mask = Missing()
    if c.used(1):  # the same (seed, key, shape) gives the same mask: dropout a ones tensor
        ones = c.b.broadcast_to(c.b.scalar(1.0, x.dtype), x.shape)
        kept = c.b.emit("dropout", (ones,), dict(attrs), x.shape, x.dtype)
        mask = c.b.binary("gt", kept, c.b.scalar(0.0, x.dtype))
    return [y, mask][: c.n_outputs]


RESIZE_MODES = {
    "nearest": ("asymmetric",),
    "linear": ("half_pixel", "pytorch_half_pixel", "align_corners"),
}


def _resize(c: NodeCtx):
    x = c.sym(0)
    if x.ndim != 4:
        raise Unsupported(f"Resize of a rank-{x.ndim} input (remat upsamples (N, C, H, W))")
    axes = [norm_axis(a, 4) for a in c.attr("axes", range(4))]
    scales = sizes = None
    if c.has(3) and c.const(3, "sizes").size:
        sizes = dict(zip(axes, c.ints(3, "sizes")))
    elif c.has(2) and c.const(2, "scales").size:
        scales = dict(zip(axes, (float(s) for s in c.const(2, "scales").reshape(-1))))
    else:
        raise OnnxImportError(f"{c.label}: neither scales nor sizes is given")
    out = list(x.shape)
    for axis in axes:
        out[axis] = sizes[axis] if sizes else int(np.floor(x.shape[axis] * scales[axis]))
    if out[:2] != list(x.shape[:2]) or min(out) < 1:
        raise Unsupported(f"Resize from {x.shape} to {tuple(out)} (only H and W may change)")
    mode = c.attr("mode", "nearest")
    coords = c.attr("coordinate_transformation_mode", "half_pixel")
    c.check_size(out[2:3])  # the coordinate checks allocate one row and one column
    c.check_size(out[3:])
    for axis in (2, 3):
        n_in, n_out = x.shape[axis], out[axis]
        scale = scales[axis] if scales else n_out / n_in
        if not _matches_torch(mode, coords, n_in, n_out, scale):
            raise Unsupported(
                f"scale {scale} on axis {axis}: PyTorch's size-based {mode} resize "
                "samples other source positions"
            )
    if mode == "nearest":
        return c.b.emit("upsample_nearest2d", (x,), {"size": tuple(out[2:])}, out, x.dtype)
    attrs = {"size": tuple(out[2:]), "align_corners": coords == "align_corners"}
    return c.b.emit("upsample_bilinear2d", (x,), attrs, out, x.dtype)


def _matches_torch(mode: str, coords: str, n_in: int, n_out: int, scale: float) -> bool:
    """Whether ONNX's source coordinates equal torch's for output size n_out."""
    dst = np.arange(n_out, dtype=np.float64)
    ratio = n_in / n_out
    if mode == "nearest":  # asymmetric + floor
        onnx_src = np.minimum(np.floor(dst / scale), n_in - 1)
        torch_src = np.minimum(np.floor(dst * ratio), n_in - 1)
        return bool(np.array_equal(onnx_src, torch_src))
    if coords == "align_corners":
        return True  # both: dst * (in - 1) / (out - 1), 0 when out == 1
    onnx_src = (dst + 0.5) / scale - 0.5
    if coords == "pytorch_half_pixel" and n_out == 1:
        onnx_src = np.zeros(1)
    torch_src = np.maximum((dst + 0.5) * ratio - 0.5, 0.0)
    return bool(
        np.allclose(
            np.clip(onnx_src, 0, n_in - 1), np.clip(torch_src, 0, n_in - 1), rtol=0, atol=1e-9
        )
    )


def _check_resize(attrs, opset):
    problems = []
    mode = attrs.get("mode", "nearest")
    coords = attrs.get("coordinate_transformation_mode", "half_pixel")
    if mode not in RESIZE_MODES:
        problems.append(f"mode '{mode}'")
    elif coords not in RESIZE_MODES[mode]:
        problems.append(f"{mode} mode with coordinate_transformation_mode '{coords}'")
    if mode == "nearest" and attrs.get("nearest_mode", "round_prefer_floor") != "floor":
        problems.append(f"nearest_mode '{attrs.get('nearest_mode', 'round_prefer_floor')}'")
    if attrs.get("antialias", 0):
        problems.append("antialias=1")
    if attrs.get("exclude_outside", 0):
        problems.append("exclude_outside=1")
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        problems.append(f"keep_aspect_ratio_policy '{attrs['keep_aspect_ratio_policy']}'")
    return problems


OPS = {
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "Dropout": _dropout,
    "Resize": _resize,
}
CHECKS = {"Resize": _check_resize}
