"""Sample models for the demo, the benchmarks and the tests.

Each builder returns a `Model`: the graph, seeded inputs, the inputs to
differentiate (every parameter; never the data) and the loss output's name. All
take `dtype` ("float32" or "float64") and `seed`; the same arguments always give
the same graph and the same input arrays. Builders: `mlp`, `transformer_block`,
`cnn`, `unet`, `logistic_regression`, `svm`.

    >>> import remat
    >>> model = remat.models.mlp(batch=8, widths=(16, 32, 4))
    >>> model.loss, sorted(model.wrt)[:2]
    ('loss', ['b0', 'b1'])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops
from .graph import Graph


@dataclass
class Model:
    graph: Graph
    inputs: dict[str, np.ndarray]
    wrt: list[str]
    loss: str = "loss"


def mlp(
    batch: int = 64,
    widths=(256, 512, 512, 10),
    dtype: str = "float32",
    seed: int = 0,
    l2: float = 1e-4,
) -> Model:
    """Tanh MLP with softmax cross-entropy and an L2 penalty on the weights.

    >>> import remat
    >>> remat.models.mlp(batch=4, widths=(3, 5, 2)).wrt
    ['w0', 'b0', 'w1', 'b1']
    """
    rng = np.random.default_rng(seed)
    g = Graph("mlp")
    inputs: dict[str, np.ndarray] = {
        "x": rng.standard_normal((batch, widths[0])).astype(dtype),
        "labels": rng.integers(0, widths[-1], size=batch).astype("int64"),
    }
    h = g.input("x", (batch, widths[0]), dtype)
    labels = g.input("labels", (batch,), "int64")
    penalty = None
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        inputs[f"w{i}"] = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(dtype)
        inputs[f"b{i}"] = np.zeros(fan_out, dtype)
        w, b = g.input(f"w{i}", (fan_in, fan_out), dtype), g.input(f"b{i}", (fan_out,), dtype)
        h = ops.add(h @ w, b, name=f"linear{i}")
        if i < len(widths) - 2:
            h = ops.tanh(h, name=f"act{i}")
        term = ops.sum(w * w)
        penalty = term if penalty is None else penalty + term
    loss = ops.add(ops.cross_entropy(h, labels, name="xent"), penalty * l2, name="loss")
    g.output("loss", loss)
    wrt = [name for name in inputs if name not in ("x", "labels")]
    return Model(g, inputs, wrt)


def _dense(rng, fan_in: int, fan_out: int, dtype: str) -> np.ndarray:
    """A weight (fan_in, fan_out) scaled by 1/sqrt(fan_in), so activations stay O(1)."""
    return (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(dtype)


def _teacher_labels(rng, x: np.ndarray, classes: int) -> np.ndarray:
    """Labels from a random linear teacher plus noise: learnable, not separable."""
    scores = x @ rng.standard_normal((x.shape[1], classes)) + rng.standard_normal(
        (x.shape[0], classes)
    )
    return np.argmax(scores, axis=1).astype("int64")


def transformer_block(
    batch: int = 4,
    seq: int = 16,
    d_model: int = 32,
    heads: int = 4,
    d_ff: int = 64,
    dtype: str = "float32",
    seed: int = 0,
) -> Model:
    """One pre-LN transformer block; loss = mean(y ** 2) of the block's output y.

        h = x + softmax((LN1(x) Wq)(LN1(x) Wk)^T / sqrt(d_head)) (LN1(x) Wv) Wo   per head
        y = h + gelu(LN2(h) W1 + b1) W2 + b2

    Self-attention is unmasked; gelu is the tanh approximation. Parameters: ln1_w,
    ln1_b, wq, wk, wv, wo, ln2_w, ln2_b, w1, b1, w2, b2 (the input x is not in wrt).

        >>> import remat
        >>> remat.models.transformer_block(seq=8, d_model=16, heads=2).wrt[:3]
        ['ln1_w', 'ln1_b', 'wq']
    """
    if d_model % heads:
        raise ValueError(f"d_model {d_model} must be a multiple of heads {heads}")
    d_head = d_model // heads
    rng = np.random.default_rng(seed)
    g = Graph("transformer_block")
    inputs: dict[str, np.ndarray] = {"x": rng.standard_normal((batch, seq, d_model)).astype(dtype)}
    x = g.input("x", (batch, seq, d_model), dtype)

    def param(name: str, value: np.ndarray):
        inputs[name] = value.astype(dtype)
        return g.input(name, value.shape, dtype)

    ln1_w, ln1_b = param("ln1_w", np.ones(d_model)), param("ln1_b", np.zeros(d_model))
    wq, wk, wv, wo = (
        param(n, _dense(rng, d_model, d_model, dtype)) for n in ("wq", "wk", "wv", "wo")
    )
    ln2_w, ln2_b = param("ln2_w", np.ones(d_model)), param("ln2_b", np.zeros(d_model))
    w1, b1 = param("w1", _dense(rng, d_model, d_ff, dtype)), param("b1", np.zeros(d_ff))
    w2, b2 = param("w2", _dense(rng, d_ff, d_model, dtype)), param("b2", np.zeros(d_model))

    def split_heads(t, name):  # (B, S, D) -> (B, H, S, d_head)
        t = ops.reshape(t, (batch, seq, heads, d_head))
        return ops.transpose(t, (0, 2, 1, 3), name=name)

    h = ops.layer_norm(x, ln1_w, ln1_b, name="ln1")
    q, k, v = (split_heads(h @ w, n) for w, n in ((wq, "q"), (wk, "k"), (wv, "v")))
    scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)), name="scores") * (1.0 / np.sqrt(d_head))
    attn = ops.softmax(scores, axis=-1, name="attn")
    context = ops.transpose(attn @ v, (0, 2, 1, 3))  # (B, S, H, d_head)
    context = ops.reshape(context, (batch, seq, d_model), name="context")
    h = ops.add(x, context @ wo, name="resid1")
    m = ops.gelu(ops.add(ops.layer_norm(h, ln2_w, ln2_b, name="ln2") @ w1, b1), name="ff")
    y = ops.add(h, ops.add(m @ w2, b2), name="resid2")
    g.output("loss", ops.mean(ops.square(y), name="loss"))
    return Model(g, inputs, [name for name in inputs if name != "x"])


def cnn(
    batch: int = 8,
    channels=(3, 8, 16),
    image: int = 16,
    classes: int = 10,
    dtype: str = "float32",
    seed: int = 0,
) -> Model:
    """Conv classifier: per block conv3x3 (padding 1) + bias, relu, 2x2 max-pool; then a
    linear layer on the flattened features and softmax cross-entropy.

    Parameters: conv{i}_w (O, C, 3, 3), conv{i}_b (O,), fc_w, fc_b; inputs x, labels.

        >>> import remat
        >>> remat.models.cnn(batch=2, channels=(1, 4), image=8, classes=3).wrt
        ['conv0_w', 'conv0_b', 'fc_w', 'fc_b']
    """
    if image % (2 ** (len(channels) - 1)):
        raise ValueError(f"image {image} must be divisible by 2**{len(channels) - 1} (pooling)")
    rng = np.random.default_rng(seed)
    g = Graph("cnn")
    inputs: dict[str, np.ndarray] = {
        "x": rng.standard_normal((batch, channels[0], image, image)).astype(dtype),
        "labels": rng.integers(0, classes, size=batch).astype("int64"),
    }
    h = g.input("x", inputs["x"].shape, dtype)
    labels = g.input("labels", (batch,), "int64")
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        inputs[f"conv{i}_w"] = (
            rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)
        ).astype(dtype)
        inputs[f"conv{i}_b"] = np.zeros(c_out, dtype)
        w = g.input(f"conv{i}_w", (c_out, c_in, 3, 3), dtype)
        b = g.input(f"conv{i}_b", (c_out,), dtype)
        h = ops.add(ops.conv2d(h, w, padding=1, name=f"conv{i}"), ops.reshape(b, (1, c_out, 1, 1)))
        h = ops.max_pool2d(ops.relu(h, name=f"relu{i}"), 2, name=f"pool{i}")
    side = image // 2 ** (len(channels) - 1)
    features = channels[-1] * side * side
    inputs["fc_w"], inputs["fc_b"] = _dense(rng, features, classes, dtype), np.zeros(classes, dtype)
    fc_w, fc_b = g.input("fc_w", (features, classes), dtype), g.input("fc_b", (classes,), dtype)
    logits = ops.add(ops.reshape(h, (batch, features)) @ fc_w, fc_b, name="logits")
    g.output("loss", ops.cross_entropy(logits, labels, name="loss"))
    return Model(g, inputs, [name for name in inputs if name not in ("x", "labels")])


def _upsample2(x, shape, name: str):
    """Nearest-neighbour 2x upsampling of NCHW `x` (of `shape`) from existing ops:
    (B, C, H, W) -> (B, C, H, 1, W, 1) -> broadcast (B, C, H, 2, W, 2) -> (B, C, 2H, 2W).
    Its gradient (un-broadcasting: a sum over each 2x2 block) comes for free."""
    b, c, h, w = shape
    x = ops.broadcast_to(ops.reshape(x, (b, c, h, 1, w, 1)), (b, c, h, 2, w, 2))
    return ops.reshape(x, (b, c, 2 * h, 2 * w), name=name)


def unet(
    batch: int = 2,
    channels=(4, 8, 16),
    image: int = 16,
    classes: int = 3,
    in_channels: int = 3,
    dtype: str = "float32",
    seed: int = 0,
) -> Model:
    """A small U-Net (Ronneberger et al. 2015) for per-pixel classification.

    `channels[i]` is the width at resolution image / 2**i; the last level is the
    bottleneck. Every block is two conv3x3 (padding 1) + bias + relu. Encoder: a
    block per level, 2x2 max-pool between levels. Decoder, back up the levels:
    nearest-neighbour 2x upsampling (reshape + broadcast_to + reshape), concat with
    the encoder's output at that resolution along channels (the skip connection),
    then a block. A final 1x1 conv gives `classes` logits per pixel; the loss is the
    per-pixel softmax cross-entropy against seeded labels (the argmax of a random
    1x1 projection of x plus noise: learnable, not trivial).

    The skip connections keep every encoder level's activations alive until the
    decoder reaches it, so its memory profile is unlike a chain's: a good test of
    the checkpoint planners.

    Parameters: enc{i}_w{j}, enc{i}_b{j} (level i, conv j in {0, 1}), dec{i}_w{j},
    dec{i}_b{j}, out_w (classes, channels[0], 1, 1), out_b; inputs x (B, in_channels,
    image, image) and labels (B, image, image), int64.

        >>> import remat
        >>> model = remat.models.unet(batch=1, channels=(2, 4), image=4, classes=2,
        ...                           in_channels=1)
        >>> model.wrt[:4], model.wrt[-2:]
        (['enc0_w0', 'enc0_b0', 'enc0_w1', 'enc0_b1'], ['out_w', 'out_b'])
        >>> with remat.Client.in_process() as client:
        ...     result = client.run(model.graph, model.inputs, wrt=model.wrt, loss=model.loss)
        >>> result.grads["dec0_w0"].shape  # 2 + 4 input channels: upsampled + skip
        (2, 6, 3, 3)
    """
    levels = len(channels)
    if levels < 2:
        raise ValueError(f"a U-Net needs at least 2 levels (channels), got {tuple(channels)}")
    if image % (2 ** (levels - 1)):
        raise ValueError(f"image {image} must be divisible by 2**{levels - 1} (pooling)")
    rng = np.random.default_rng(seed)
    g = Graph("unet")
    x_value = rng.standard_normal((batch, in_channels, image, image))
    scores = np.einsum(
        "bchw,ck->bhwk", x_value, rng.standard_normal((in_channels, classes))
    ) + rng.standard_normal((batch, image, image, classes))
    inputs: dict[str, np.ndarray] = {
        "x": x_value.astype(dtype),
        "labels": np.argmax(scores, axis=-1).astype("int64"),
    }
    h = g.input("x", inputs["x"].shape, dtype)
    labels = g.input("labels", inputs["labels"].shape, "int64")

    def conv(t, c_in: int, c_out: int, param: str, suffix: str = "", kernel: int = 3):
        """conv `kernel`x`kernel` + bias, parameters {param}_w{suffix}, {param}_b{suffix}."""
        w_name, b_name = f"{param}_w{suffix}", f"{param}_b{suffix}"
        inputs[w_name] = (
            rng.standard_normal((c_out, c_in, kernel, kernel)) / np.sqrt(kernel * kernel * c_in)
        ).astype(dtype)
        inputs[b_name] = np.zeros(c_out, dtype)
        w = g.input(w_name, inputs[w_name].shape, dtype)
        b = g.input(b_name, (c_out,), dtype)
        out = ops.conv2d(t, w, padding=kernel // 2, name=f"{param}_conv{suffix}")
        return ops.add(out, ops.reshape(b, (1, c_out, 1, 1)))

    def block(t, c_in: int, c_out: int, prefix: str):
        t = ops.relu(conv(t, c_in, c_out, prefix, "0"), name=f"{prefix}_relu0")
        return ops.relu(conv(t, c_out, c_out, prefix, "1"), name=prefix)

    skips, c_in, side = [], in_channels, image
    for i, width in enumerate(channels):
        h = block(h, c_in, width, f"enc{i}")
        c_in = width
        if i < levels - 1:
            skips.append(h)
            h = ops.max_pool2d(h, 2, name=f"pool{i}")
            side //= 2
    for i in reversed(range(levels - 1)):
        h = _upsample2(h, (batch, c_in, side, side), name=f"up{i}")
        side *= 2
        h = ops.concat([h, skips[i]], axis=1, name=f"cat{i}")
        h = block(h, c_in + channels[i], channels[i], f"dec{i}")
        c_in = channels[i]
    logits = conv(h, c_in, classes, "out", kernel=1)  # (B, K, H, W)
    logits = ops.transpose(logits, (0, 2, 3, 1), name="logits")  # classes last
    g.output("loss", ops.cross_entropy(logits, labels, name="loss"))
    return Model(g, inputs, [name for name in inputs if name not in ("x", "labels")])


def logistic_regression(
    batch: int = 64, features: int = 16, dtype: str = "float32", seed: int = 0, l2: float = 1e-3
) -> Model:
    """Binary logistic regression: z = x w + b, labels y in {0, 1} (float);
    loss = mean(max(z, 0) - z y + log(1 + exp(-|z|))) + l2 * sum(w ** 2), the stable
    form of binary cross-entropy on logits (torch's BCEWithLogits).

        >>> import remat
        >>> remat.models.logistic_regression(batch=8, features=3).wrt
        ['w', 'b']
    """
    rng = np.random.default_rng(seed)
    x_value = rng.standard_normal((batch, features))
    inputs: dict[str, np.ndarray] = {
        "x": x_value.astype(dtype),
        "y": _teacher_labels(rng, x_value, 2).astype(dtype),
        "w": (0.1 * rng.standard_normal(features)).astype(dtype),
        "b": np.zeros((), dtype),
    }
    g = Graph("logistic_regression")
    x, y = g.input("x", (batch, features), dtype), g.input("y", (batch,), dtype)
    w, b = g.input("w", (features,), dtype), g.input("b", (), dtype)
    z = ops.add(x @ w, b, name="logits")
    bce = ops.maximum(z, 0.0) - z * y + ops.log(1.0 + ops.exp(-ops.abs(z)))
    loss = ops.add(ops.mean(bce, name="bce"), ops.sum(w * w) * l2, name="loss")
    g.output("loss", loss)
    return Model(g, inputs, ["w", "b"])


def svm(
    batch: int = 64,
    features: int = 16,
    classes: int = 5,
    dtype: str = "float32",
    seed: int = 0,
    l2: float = 1e-3,
    margin: float = 1.0,
    variant: str = "weston_watkins",
) -> Model:
    """Linear multiclass SVM, scores s = x w + b, hinge loss averaged over the batch
    plus l2 * sum(w ** 2). With the true class y and Delta = margin:

        weston_watkins:  sum over j != y of relu(s_j - s_y + Delta)
        crammer_singer:  maximum(max over j of (s_j + Delta [j != y]) - s_y, 0)
                         (= max(0, Delta + max over j != y of s_j - s_y))

        >>> import remat
        >>> remat.models.svm(batch=8, features=3, classes=4).wrt
        ['w', 'b']
    """
    if variant not in ("weston_watkins", "crammer_singer"):
        raise ValueError(f"variant must be 'weston_watkins' or 'crammer_singer', got {variant!r}")
    rng = np.random.default_rng(seed)
    x_value = rng.standard_normal((batch, features))
    inputs: dict[str, np.ndarray] = {
        "x": x_value.astype(dtype),
        "labels": _teacher_labels(rng, x_value, classes),
        "w": (0.1 * rng.standard_normal((features, classes))).astype(dtype),
        "b": np.zeros(classes, dtype),
    }
    g = Graph(f"svm_{variant}")
    x, labels = g.input("x", (batch, features), dtype), g.input("labels", (batch,), "int64")
    w, b = g.input("w", (features, classes), dtype), g.input("b", (classes,), dtype)
    scores = ops.add(x @ w, b, name="scores")
    correct = ops.take_along_axis(
        scores, ops.reshape(labels, (batch, 1)), axis=1, name="correct"
    )  # (B, 1)
    others = 1.0 - ops.op("one_hot", labels, depth=classes, dtype=dtype)  # 0 at the true class
    if variant == "weston_watkins":
        hinge = ops.sum(ops.relu(scores - correct + margin) * others, axis=1, name="hinge")
    else:
        best = ops.max(scores + others * margin, axis=1, keepdims=True)
        hinge = ops.maximum(ops.reshape(best - correct, (batch,)), 0.0, name="hinge")
    loss = ops.add(ops.mean(hinge), ops.sum(w * w) * l2, name="loss")
    g.output("loss", loss)
    return Model(g, inputs, ["w", "b"])
