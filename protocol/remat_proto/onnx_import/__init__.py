"""ONNX models as remat graphs: the importer both the SDK (`remat.from_onnx`) and the
server (ONNX bytes over gRPC) use.

`convert(model, *, dtype=None, limits=OnnxLimits(), base_dir=None,
allow_external_data=True, input_shapes=None) -> Imported(spec, params)`:

- `model` is the serialized bytes or an `onnx.ModelProto` (default domain, opsets
  13 to 21). Graph inputs and outputs keep their ONNX names; every float initializer
  is a graph input of its own name with its value in `params` (integer initializers
  too, once used as data). The remat nodes take the names of the ONNX values they
  compute (helper nodes `<value>/<op>`), so no name is ever rewritten.
- `dtype="float64"` (or "float32") casts every float initializer, input and constant.
- Shape arithmetic on constants (Shape, Gather, Concat, ConstantOfShape, Unsqueeze,
  Range, ...) is folded at import, sizes checked before allocation (`fold.py`);
  operations on parameters or data inputs are never folded. An integer initializer
  may be read where an op needs a static value (a Reshape target, Slice bounds).
- BatchNormalization with training_mode=1 and Dropout with training_mode=true keep
  their training behaviour (`ops_nn.py`).
- GELU's tanh formula written out in eight nodes (GPT-2's) becomes one remat `gelu`,
  whose backward holds a quarter of the memory (`fusions.py`).
- Every limit (`OnnxLimits`) is checked before the work it bounds; nothing from the
  model is executed; external data is read only from inside `base_dir`.
- Anything unsupported raises one `OnnxImportError` listing every unsupported node
  (name and op type) and attribute value.

    >>> import numpy as np, onnx
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    >>> graph = helper.make_graph(
    ...     [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
    ...     "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])], [w])
    >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    >>> imported = convert(model.SerializeToString(), dtype="float64")
    >>> [(n.name, n.op) for n in imported.spec.nodes], imported.params["w"].dtype
    ([('h', 'matmul'), ('y', 'relu')], dtype('float64'))
"""

from .convert import Imported, convert
from .errors import OnnxImportError
from .model import OnnxLimits
from .ops_table import CONVERT, FOLD

SUPPORTED_OPS = frozenset(CONVERT) | frozenset(FOLD)

__all__ = ["convert", "Imported", "OnnxImportError", "OnnxLimits", "SUPPORTED_OPS"]
