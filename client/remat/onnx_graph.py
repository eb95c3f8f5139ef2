"""An ONNX model sent to the server as it is, which converts it (`remat.v1.OnnxModel`).

Pass an `OnnxModel` wherever a client method takes a graph. Its initializers are graph
inputs whose values default to the model's, so a run sends only the data inputs and
may name initializers in `wrt`. This is the route a client in any language takes; in
Python, `remat.from_onnx` converts the model on the client instead and returns the
parameters to send.

    >>> import numpy as np, onnx, remat
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> w = numpy_helper.from_array(np.full((2, 2), 0.5, np.float32), "w")
    >>> graph = helper.make_graph(
    ...     [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    >>> opset = [helper.make_opsetid("", 17)]
    >>> model = remat.OnnxModel(helper.make_model(graph, opset_imports=opset))
    >>> with remat.Client.in_process() as client:
    ...     client.run(model, {"x": np.ones((1, 2), np.float32)}).outputs["y"]
    array([[1., 1.]], dtype=float32)
"""

from __future__ import annotations

import os
from typing import Any

from remat_proto import wire
from remat_proto.v1 import executor_pb2


class OnnxModel:
    """An ONNX model (a path, the bytes of a ModelProto, or an `onnx.ModelProto`) for
    the server to convert; `dtype="float64"` has it cast every float tensor."""

    name = "onnx"
    inputs = ()  # declared by the model; the server checks what is sent against it

    def __init__(self, model: Any, dtype: str | None = None):
        if isinstance(model, (str, os.PathLike)):
            with open(model, "rb") as file:
                data = file.read()
        elif isinstance(model, (bytes, bytearray, memoryview)):
            data = bytes(model)
        elif hasattr(model, "SerializeToString"):
            data = model.SerializeToString()
        else:
            raise TypeError(
                f"an ONNX model is a path, bytes or an onnx.ModelProto, got {type(model).__name__}"
            )
        self._message = executor_pb2.OnnxModel(model=data, dtype=dtype or "")
        self._id = wire.content_id(self._message)

    def wire_form(self) -> tuple[executor_pb2.OnnxModel, str]:
        """(the OnnxModel message, the id every server registers it under)."""
        return self._message, self._id

    @property
    def graph_id(self) -> str:
        return self._id

    def __repr__(self) -> str:
        dtype = f", dtype={self._message.dtype!r}" if self._message.dtype else ""
        return f"<remat.OnnxModel {len(self._message.model):,} bytes{dtype}>"
