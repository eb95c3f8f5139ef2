"""The model zoo (tests/zoo.py) exported to ONNX the way issue 13 prescribes: torch's
legacy exporter in training mode, without constant folding (the default exporter turns
training-mode BatchNorm into its inference form).

    >>> # exports = Exports(tmp_path); path = exports("resnet", "float64")
"""

from __future__ import annotations

import warnings
from pathlib import Path

ZOO = ("resnet", "unet", "gpt2", "bert", "llama")
OPSET = 17


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm has no legacy-exporter symbolic up to opset 21: decompose it
    (x / sqrt(mean(x^2) + eps) * weight), the math nn.RMSNorm computes."""
    import torch
    from torch.onnx import symbolic_helper as sh

    axes = list(range(-len(sh._get_const(normalized_shape, "is", "normalized_shape")), 0))
    two = g.op("Constant", value_t=torch.tensor(2.0))
    mean = g.op("ReduceMean", g.op("Pow", x, two), axes_i=axes, keepdims_i=1)
    eps = g.op("Constant", value_t=torch.tensor(float(sh._get_const(eps, "f", "eps"))))
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, eps)))
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def export(name: str, dtype: str, path, opset: int = OPSET) -> None:
    """Write zoo model `name` in `dtype` ("float32" or "float64") to `path`; its graph
    inputs are named as `zoo.input_names(name)`."""
    import torch
    import zoo

    module, args, kwargs = zoo.MODELS[name](getattr(torch, dtype))
    names = zoo.input_names(name)
    values = tuple(args) + tuple(kwargs[k] for k in names[len(args) :])
    forward = module.forward

    def positional(*inputs):  # the legacy exporter mishandles transformers' keywords
        return forward(**dict(zip(names, inputs)))

    module.forward = positional
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, opset)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                values,
                str(path),
                dynamo=False,
                opset_version=opset,
                training=torch.onnx.TrainingMode.TRAINING,
                do_constant_folding=False,
                input_names=names,
            )
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::rms_norm", opset)
        del module.forward


class Exports:
    """(name, dtype, opset) -> path of the export in `directory`, each exported once,
    when first asked for. The float64 export keeps the model's constants (GELU's,
    attention scales) in float64; a float32 export rounds them, which bounds how
    closely its float64 import can match torch's float64 module."""

    def __init__(self, directory: Path):
        self.directory, self.paths = Path(directory), {}

    def __call__(self, name: str, dtype: str = "float32", opset: int = OPSET) -> Path:
        key = (name, dtype, opset)
        if key not in self.paths:
            self.paths[key] = self.directory / f"{name}_{dtype}_{opset}.onnx"
            export(name, dtype, self.paths[key], opset)
        return self.paths[key]
