"""`from_onnx`: an ONNX model as a `remat.Graph` and its parameters, converted on the
client by the same importer the server runs on ONNX bytes (`remat_proto.onnx_import`).

    >>> import numpy as np, remat
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> w = numpy_helper.from_array(np.full((3, 2), 0.5, np.float32), "fc.weight")
    >>> graph = helper.make_graph(
    ...     [helper.make_node("MatMul", ["x", "fc.weight"], ["h"]),
    ...      helper.make_node("Relu", ["h"], ["y"])], "mlp",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])], [w])
    >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    >>> g, params = remat.from_onnx(model, dtype="float64")
    >>> g.output_names, sorted(params), g["y"].op
    (['y'], ['fc.weight'], 'relu')
    >>> loss = g.output("loss", remat.sum(g["y"]))
    >>> x = np.ones((4, 3))
    >>> with remat.Client.in_process() as client:
    ...     result = client.run(g, {"x": x, **params}, wrt=["fc.weight"], loss="loss")
    >>> result.grads["fc.weight"].tolist()
    [[4.0, 4.0], [4.0, 4.0], [4.0, 4.0]]
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..graph import Graph


def from_onnx(
    model: Any,
    dtype: str | None = None,
    base_dir: str | os.PathLike | None = None,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    limits: Any = None,
) -> tuple[Graph, dict[str, np.ndarray]]:
    """`(graph, params)` of an ONNX model: a path, its bytes or an `onnx.ModelProto`.

    - Graph inputs and outputs keep their ONNX names (no name is rewritten); every
      float initializer is a graph input of its own name and its value is in
      `params` (an integer initializer too, once the model uses it as data). Pass
      `{**data, **params}` to `client.run`, and name initializers in `wrt`.
    - `dtype="float64"` casts every float initializer, input and constant (to check
      gradients in float64); "float32" casts float64 and float16 ones down.
    - External tensor data is read only from inside `base_dir`, which for a path
      defaults to the model's directory; bytes or a ModelProto with external data
      need `base_dir`.
    - `input_shapes` fixes dynamic input dimensions (remat's shapes are static).
    - `limits` (`remat_proto.onnx_import.OnnxLimits`) bounds the model's size.

    Raises `remat_proto.onnx_import.OnnxImportError` (a ValueError) listing every
    unsupported node, by name and op type, at once.
    """
    import onnx

    from remat_proto import onnx_import

    limits = limits or onnx_import.OnnxLimits()
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        size = os.path.getsize(path)
        if size > limits.max_model_bytes:
            raise onnx_import.OnnxImportError(
                f"model: {path} has {size} bytes, over the limit of {limits.max_model_bytes} "
                "(OnnxLimits.max_model_bytes)"
            )
        if base_dir is None:
            base_dir = os.path.dirname(os.path.abspath(path))
        model = onnx.load(path, load_external_data=False)
    imported = onnx_import.convert(
        model, dtype=dtype, limits=limits, base_dir=base_dir, input_shapes=input_shapes
    )
    spec = imported.spec
    graph = Graph(spec.name)
    graph._restore(spec.inputs, spec.nodes, dict(spec.outputs))
    return graph, imported.params
