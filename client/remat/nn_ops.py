"""Neural-network op functions (softmax, cross-entropy, normalisation, convolution,
pooling, dropout, resizing); re-exported by `remat.ops` and `remat`, which is where
to call them from.

    >>> import remat
    >>> g = remat.Graph()
    >>> remat.ops.layer_norm(g.input("x", (2, 8)), g.input("w", (8,)), g.input("b", (8,))).op
    'layer_norm'
"""

from __future__ import annotations

from .op_call import _graph_of, _pair, op


# --- neural networks ------------------------------------------------------------------------
def softmax(x, axis: int = -1, *, name=None):
    return op("softmax", x, axis=axis, name=name)


def log_softmax(x, axis: int = -1, *, name=None):
    return op("log_softmax", x, axis=axis, name=name)


def cross_entropy(logits, labels, *, name=None):
    """Mean over the batch of -log softmax(logits)[label]; labels are integers."""
    graph = _graph_of(logits)
    return graph.add("cross_entropy", [logits, graph.lift(labels)], name=name)


def layer_norm(x, weight, bias, eps: float = 1e-5, *, name=None):
    """Normalize over the trailing weight.ndim axes, then scale and shift."""
    return op("layer_norm", x, weight, bias, eps=float(eps), name=name)


def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, *, name=None):
    """2-D convolution, NCHW input and (O, C / groups, kh, kw) weight, optional bias (O,);
    torch.nn.functional.conv2d's argument order."""
    return op(
        "conv2d",
        x,
        w,
        *([] if bias is None else [bias]),
        stride=_pair(stride),
        padding=_pair(padding),
        dilation=_pair(dilation),
        groups=None if groups == 1 else int(groups),  # omitted: ungrouped graphs stay as they were
        name=name,
    )


def max_pool2d(x, kernel, stride=None, padding=0, *, name=None):
    return _pool2d("max_pool2d", x, kernel, stride, padding, name)


def avg_pool2d(x, kernel, stride=None, padding=0, *, name=None):
    """Average pooling; padding counts toward the divisor (torch's default)."""
    return _pool2d("avg_pool2d", x, kernel, stride, padding, name)


def _pool2d(kind: str, x, kernel, stride, padding, name):
    """A pooling op's node: the stride defaults to the kernel, as in torch."""
    return op(
        kind,
        x,
        kernel=_pair(kernel),
        stride=_pair(stride if stride is not None else kernel),
        padding=_pair(padding),
        name=name,
    )


def dropout(x, p: float = 0.5, seed: int = 0, *, name=None):
    """Inverted dropout; the mask depends only on (seed, node name), so recomputing
    the node reproduces it exactly."""
    return op("dropout", x, p=float(p), seed=int(seed), name=name)


# --- normalization ------------------------------------------------------------------------
def batch_norm(x, weight, bias, running_mean, running_var, training=False, eps=1e-5, *, name=None):
    """Per-channel normalization of x (N, C, *), then `* weight + bias` (all (C,)).
    training=True uses the batch's mean and biased variance over every axis but 1 (and
    differentiates through them); False uses running_mean/running_var. The running
    statistics get no gradient and are not updated: see `batch_norm_running_stats`."""
    return op(
        "batch_norm",
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training=bool(training),
        eps=float(eps),
        name=name,
    )


def rms_norm(x, weight, eps=1e-6, *, name=None):
    """x / sqrt(mean(x ** 2) + eps) * weight over the trailing weight.ndim axes."""
    return op("rms_norm", x, weight, eps=float(eps), name=name)


# --- convolution (groups, bias, transposed) -----------------------------------------------
def conv_transpose2d(
    x, w, bias=None, stride=1, padding=0, output_padding=0, dilation=1, groups=1, *, name=None
):
    """Transposed convolution (conv2d's adjoint in x), torch.nn.functional.conv_transpose2d:
    x (N, C_in, H, W), w (C_in, C_out / groups, kh, kw), optional bias (C_out,). Output
    size (H - 1) * stride - 2 * padding + dilation * (kh - 1) + output_padding + 1.

        >>> import remat
        >>> g = remat.Graph()
        >>> x, w = g.input("x", (1, 4, 8, 8)), g.input("w", (4, 2, 3, 3))
        >>> remat.ops.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1).op
        'conv_transpose2d'
    """
    return op(
        "conv_transpose2d",
        x,
        w,
        *([] if bias is None else [bias]),
        stride=_pair(stride),
        padding=_pair(padding),
        output_padding=_pair(output_padding),
        dilation=_pair(dilation),
        groups=int(groups),
        name=name,
    )


# (end of convolution (groups, bias, transposed))


# --- resizing and padding -----------------------------------------------------------------
def upsample_nearest2d(x, size, *, name=None):
    """Resize x (N, C, H, W) to `size` (an int or (H_out, W_out)) by copying the source
    row floor(dst * in / out): F.interpolate(x, size, mode="nearest")."""
    return op("upsample_nearest2d", x, size=_pair(size), name=name)


def upsample_bilinear2d(x, size, align_corners=False, *, name=None):
    """Bilinear resize of x (N, C, H, W) to `size` (an int or (H_out, W_out)), up or
    down: F.interpolate(x, size, mode="bilinear", align_corners=align_corners).

        >>> import remat
        >>> g = remat.Graph()
        >>> up = remat.ops.upsample_bilinear2d(g.input("x", (1, 3, 4, 4)), 8)
        >>> g.nodes[-1].attrs
        {'size': (8, 8), 'align_corners': False}
    """
    return op(
        "upsample_bilinear2d", x, size=_pair(size), align_corners=bool(align_corners), name=name
    )


def pad(x, pads, mode="constant", value=0.0, *, name=None):
    """Pad every axis of x by (begin, end) rows. `pads` is in ONNX order: all begins,
    then all ends (2 * rank ints >= 0). mode "constant" fills with `value`, "reflect"
    mirrors without repeating the edge (pad < size), "edge" repeats the edge row
    (torch's "replicate"). torch's F.pad lists pairs from the last axis backwards:
    F.pad(x, (1, 2)) on a 2-D x is pad(x, (0, 1, 0, 2)).

        >>> import remat
        >>> g = remat.Graph()
        >>> padded = remat.ops.pad(g.input("x", (2, 3)), (0, 1, 0, 2), mode="reflect")
        >>> g.nodes[-1].attrs["pads"]
        (0, 1, 0, 2)
    """
    return op("pad", x, pads=tuple(int(p) for p in pads), mode=mode, value=float(value), name=name)
