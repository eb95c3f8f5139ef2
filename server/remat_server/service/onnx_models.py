"""ONNX models over the wire: a `remat.v1.OnnxModel` becomes a graph spec and the
values of its initializer inputs, through the same importer as `remat.from_onnx`.

An ONNX file is a program from a stranger. The importer checks the server's limits
before it does any work (the model's bytes, its node count, the opset, the total
initializer bytes, the size of every tensor folded at import), accepts only the default
domain, no functions, no subgraphs and no external data, and executes nothing from the
model: constant folding evaluates a fixed table of shape ops with NumPy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from remat_proto import dtypes
from remat_proto.spec import GraphSpec
from remat_proto.v1 import executor_pb2

from ..errors import InvalidArgument
from ..graph.limits import Limits, check_shape

DTYPES = ("", "float64")


def convert(
    message: executor_pb2.OnnxModel, limits: Limits
) -> tuple[GraphSpec, Mapping[str, np.ndarray]]:
    """(spec, initializer values) of an ONNX model; InvalidArgument naming the node or
    field for anything the importer or the limits refuse."""
    if message.dtype not in DTYPES:
        raise InvalidArgument(
            f"onnx.dtype: expected one of {', '.join(repr(d) for d in DTYPES)}, "
            f"got {message.dtype!r}"
        )
    # Imported here: the importer loads onnx, which a server that never sees a model
    # need not pay for at start-up.
    from remat_proto import onnx_import

    try:
        imported = onnx_import.convert(
            message.model,
            dtype=message.dtype or None,
            limits=importer_limits(limits),
            allow_external_data=False,
        )
    except onnx_import.OnnxImportError as error:
        raise InvalidArgument(f"onnx: {error}") from None
    for name, value in imported.params.items():
        check_shape(value.shape, limits, f"onnx: initializer '{name}'")
        if dtypes.name_of(value.dtype) is None:
            raise InvalidArgument(f"onnx: initializer '{name}' has unsupported dtype {value.dtype}")
    return imported.spec, imported.params


def importer_limits(limits: Limits):
    """The importer's limits from the server's: nodes as for any graph, initializers
    within a request's bytes, every folded tensor within a tensor's elements."""
    from remat_proto import onnx_import

    return onnx_import.OnnxLimits(
        max_model_bytes=limits.max_request_bytes,
        max_nodes=limits.max_nodes,
        max_initializer_bytes=limits.max_request_bytes,
        max_folded_elements=limits.max_elements,
    )
