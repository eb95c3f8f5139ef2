"""Declared op temporaries (`scratch`) of the conv, pooling, resize and attention ops
against what their forwards really hold (tracemalloc), on realistic sizes: inputs of
256 KiB - 4 MiB, float32 and float64, and the attrs that change the allocation pattern
(padding, strides, dilation, groups, depthwise and 1x1 kernels, bias, output_padding,
several image chunks, masks, dropout)."""

from __future__ import annotations

import numpy as np
import pytest
import support

from remat_server.ops import REGISTRY

_RNG = np.random.default_rng(20240)


def normal(*shape, dtype=np.float32):
    return _RNG.standard_normal(shape).astype(dtype)


F64 = np.float64
X = normal(64, 8, 16, 16)  # 512 KiB: the known case, three image chunks in conv_taps
POOL = normal(64, 16, 32, 32)  # 4 MiB
POOL64 = normal(16, 16, 32, 32, dtype=F64)  # 2 MiB
G_POOLED = normal(64, 16, 16, 16)  # POOL's 2 x 2 (and 3 x 3, stride 2, padding 1) windows
IMAGE = normal(16, 16, 32, 32)  # 1 MiB
Q, K, V = (normal(8, 4, 128, 32) for _ in range(3))

# (id, op, inputs, attrs): every op registered in conv.py, conv_transpose.py,
# conv_grad.py, pool.py, pool_grad.py, resize.py and attention.py.
SCRATCH_CASES = [
    # conv2d: blocked GEMMs over the taps, 1x1, depthwise; bias; groups; float64.
    ("conv2d-3x3-pad1", "conv2d", {"x": X, "w": normal(16, 8, 3, 3)}, {"padding": (1, 1)}),
    (
        "conv2d-3x3-bias",
        "conv2d",
        {"x": X, "w": normal(16, 8, 3, 3), "b": normal(16)},
        {"padding": (1, 1)},
    ),
    (
        "conv2d-stride2-f64",
        "conv2d",
        {"x": normal(16, 8, 32, 32, dtype=F64), "w": normal(16, 8, 3, 3, dtype=F64)},
        {"padding": (1, 1), "stride": (2, 2)},
    ),
    (
        "conv2d-groups-dilation",
        "conv2d",
        {"x": normal(32, 8, 24, 24), "w": normal(8, 4, 3, 3)},
        {"padding": (2, 2), "dilation": (2, 2), "groups": 2},
    ),
    ("conv2d-5x5", "conv2d", {"x": normal(32, 8, 20, 20), "w": normal(16, 8, 5, 5)}, {}),
    ("conv2d-1x1", "conv2d", {"x": IMAGE, "w": normal(32, 16, 1, 1)}, {}),
    (
        "conv2d-1x1-stride-pad",
        "conv2d",
        {"x": IMAGE, "w": normal(32, 16, 1, 1)},
        {"stride": (2, 2), "padding": (1, 1)},
    ),
    (
        "conv2d-1x1-groups-bias",
        "conv2d",
        {"x": IMAGE, "w": normal(32, 4, 1, 1), "b": normal(32)},
        {"groups": 4},
    ),
    (
        "conv2d-depthwise",
        "conv2d",
        {"x": normal(32, 16, 16, 16), "w": normal(16, 1, 3, 3)},
        {"padding": (1, 1), "groups": 16},
    ),
    (
        "conv2d-depthwise-chunks",
        "conv2d",
        {"x": normal(128, 16, 16, 16), "w": normal(32, 1, 3, 3)},
        {"padding": (1, 1), "stride": (2, 2), "groups": 16},
    ),
    # conv_transpose2d: blocked GEMMs scattered onto a chunk's canvas; depthwise.
    (
        "conv_transpose2d-3x3",
        "conv_transpose2d",
        {"x": normal(64, 16, 16, 16), "w": normal(16, 8, 3, 3)},
        {"padding": (1, 1)},
    ),
    (
        "conv_transpose2d-stride2-output-padding",
        "conv_transpose2d",
        {"x": normal(32, 16, 16, 16), "w": normal(16, 8, 3, 3)},
        {"padding": (1, 1), "stride": (2, 2), "output_padding": (1, 1)},
    ),
    (
        "conv_transpose2d-f64-bias",
        "conv_transpose2d",
        {
            "x": normal(16, 8, 16, 16, dtype=F64),
            "w": normal(8, 8, 3, 3, dtype=F64),
            "b": normal(8, dtype=F64),
        },
        {},
    ),
    (
        "conv_transpose2d-depthwise",
        "conv_transpose2d",
        {"x": normal(32, 16, 16, 16), "w": normal(16, 1, 3, 3)},
        {"padding": (1, 1), "groups": 16},
    ),
    (
        "conv_transpose2d-depthwise-stride2-bias",
        "conv_transpose2d",
        {"x": normal(32, 16, 16, 16), "w": normal(16, 2, 3, 3), "b": normal(32)},
        {"padding": (1, 1), "stride": (2, 2), "output_padding": (1, 1), "groups": 16},
    ),
    # conv2d_weight_grad.
    (
        "conv2d_weight_grad-3x3",
        "conv2d_weight_grad",
        {"x": X, "g": normal(64, 16, 16, 16)},
        {"kernel": (3, 3), "padding": (1, 1)},
    ),
    (
        "conv2d_weight_grad-stride2-groups-f64",
        "conv2d_weight_grad",
        {"x": normal(16, 8, 32, 32, dtype=F64), "g": normal(16, 16, 16, 16, dtype=F64)},
        {"kernel": (3, 3), "padding": (1, 1), "stride": (2, 2), "groups": 2},
    ),
    # unfold, fold: straight into the result.
    ("unfold-pad", "unfold", {"x": normal(16, 8, 16, 16)}, {"kernel": (3, 3), "padding": (1, 1)}),
    ("unfold-stride", "unfold", {"x": IMAGE}, {"kernel": (2, 2), "stride": (2, 2)}),
    (
        "fold-pad",
        "fold",
        {"cols": normal(16, 72, 256)},
        {"output_size": (16, 16), "kernel": (3, 3), "padding": (1, 1)},
    ),
    (
        "fold-f64",
        "fold",
        {"cols": normal(16, 72, 196, dtype=F64)},
        {"output_size": (16, 16), "kernel": (3, 3)},
    ),
    # Pooling and its gradients.
    ("max_pool2d-2x2", "max_pool2d", {"x": POOL}, {"kernel": (2, 2)}),
    (
        "max_pool2d-3x3-pad-f64",
        "max_pool2d",
        {"x": POOL64},
        {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1)},
    ),
    (
        "max_pool2d-dilation",
        "max_pool2d",
        {"x": POOL},
        {"kernel": (3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (2, 2)},
    ),
    ("avg_pool2d-2x2", "avg_pool2d", {"x": POOL}, {"kernel": (2, 2)}),
    (
        "avg_pool2d-exclude-pad",
        "avg_pool2d",
        {"x": POOL},
        {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1), "count_include_pad": False},
    ),
    ("max_pool2d_grad-2x2", "max_pool2d_grad", {"x": POOL, "g": G_POOLED}, {"kernel": (2, 2)}),
    (
        "max_pool2d_grad-3x3-pad",
        "max_pool2d_grad",
        {"x": POOL, "g": G_POOLED},
        {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1)},
    ),
    (
        "max_pool2d_grad-f64",
        "max_pool2d_grad",
        {"x": POOL64, "g": normal(16, 16, 16, 16, dtype=F64)},
        {"kernel": (2, 2)},
    ),
    ("max_pool2d_gather-2x2", "max_pool2d_gather", {"x": POOL, "v": POOL}, {"kernel": (2, 2)}),
    (
        "max_pool2d_gather-3x3-pad",
        "max_pool2d_gather",
        {"x": POOL, "v": POOL},
        {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1)},
    ),
    (
        "avg_pool2d_grad-2x2",
        "avg_pool2d_grad",
        {"g": G_POOLED},
        {"kernel": (2, 2), "output_size": (32, 32)},
    ),
    (
        "avg_pool2d_grad-exclude-pad",
        "avg_pool2d_grad",
        {"g": G_POOLED},
        {
            "kernel": (3, 3),
            "stride": (2, 2),
            "padding": (1, 1),
            "output_size": (32, 32),
            "count_include_pad": False,
        },
    ),
    # Resizing and padding.
    ("upsample_nearest2d-x2", "upsample_nearest2d", {"x": IMAGE}, {"size": (64, 64)}),
    ("upsample_nearest2d-one-axis", "upsample_nearest2d", {"x": IMAGE}, {"size": (64, 32)}),
    ("upsample_nearest2d-kept", "upsample_nearest2d", {"x": IMAGE}, {"size": (32, 32)}),
    ("upsample_bilinear2d-x2", "upsample_bilinear2d", {"x": IMAGE}, {"size": (64, 64)}),
    (
        "upsample_bilinear2d-down-f64",
        "upsample_bilinear2d",
        {"x": normal(16, 16, 64, 64, dtype=F64)},
        {"size": (20, 30), "align_corners": True},
    ),
    ("upsample_bilinear2d-kept", "upsample_bilinear2d", {"x": IMAGE}, {"size": (32, 32)}),
    ("pad-constant", "pad", {"x": IMAGE}, {"pads": (0, 0, 1, 2, 0, 0, 3, 4), "value": 1.5}),
    ("pad-reflect", "pad", {"x": IMAGE}, {"pads": (0, 1, 1, 2, 0, 0, 3, 4), "mode": "reflect"}),
    (
        "pad-edge-f64",
        "pad",
        {"x": POOL64},
        {"pads": (0, 0, 2, 2, 0, 0, 5, 1), "mode": "edge"},
    ),
    # Attention: the scores, and stages that outgrow a small output.
    ("attention", "scaled_dot_product_attention", {"q": Q, "k": K, "v": V}, {"key": "a"}),
    (
        "attention-dropout",
        "scaled_dot_product_attention",
        {"q": Q, "k": K, "v": V},
        {"dropout_p": 0.1, "key": "a"},
    ),
    (
        "attention-bool-mask-narrow-v",
        "scaled_dot_product_attention",
        {
            "q": normal(2, 2, 512, 16),
            "k": normal(2, 2, 512, 16),
            "v": normal(2, 2, 512, 1),
            "mask": _RNG.random((512, 512)) > 0.3,
        },
        {"key": "a"},
    ),
    (
        "attention-float-mask-causal-f64",
        "scaled_dot_product_attention",
        {
            "q": normal(2, 2, 512, 16, dtype=F64),
            "k": normal(2, 2, 512, 16, dtype=F64),
            "v": normal(2, 2, 512, 1, dtype=F64),
            "mask": normal(2, 1, 512, dtype=F64),
        },
        {"causal": True, "key": "a"},
    ),
]


def test_the_table_covers_every_op_of_the_files():
    families = {"conv", "resize", "attention"}
    ops = {name for name, op in REGISTRY.items() if op.family in families}
    assert ops == {case[1] for case in SCRATCH_CASES}


@pytest.mark.parametrize(
    "op, inputs, attrs", [c[1:] for c in SCRATCH_CASES], ids=[c[0] for c in SCRATCH_CASES]
)
def test_declared_scratch_is_what_the_forward_holds(op, inputs, attrs):
    measured, declared = support.measured_scratch(op, inputs, attrs)
    assert abs(measured - declared) <= max(0.05 * declared, 16384), (measured, declared)
