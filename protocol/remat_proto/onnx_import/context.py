"""What an op converter sees of the ONNX node it converts: its attributes, its inputs
(remat values, constants, or initializers read as constants) and the builder.

A converter is `fn(c: NodeCtx) -> value or list of values`, one per ONNX output: a
`Sym` (a remat value), a NumPy array (a constant, folded at import) or `Missing`
(an output remat cannot produce; an error only if something uses it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from .emit import Builder, Sym
from .errors import OnnxImportError, Unsupported
from .model import count_elements
from .tensors import FLOAT_TYPES, NUMPY, REMAT, TensorReader, type_name

A = onnx.AttributeProto
REQUIRED = object()


class Missing:
    """A value that cannot be used: `reason` says why (None: an upstream problem,
    already reported)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str | None = None):
        self.reason = reason


class Init:
    """A non-float initializer not (yet) used as data: read as a constant where an op
    needs a static value; declared a graph input on its first use as data."""

    __slots__ = ("name", "array")

    def __init__(self, name: str, array: np.ndarray):
        self.name, self.array = name, array


def parse_attrs(node: onnx.NodeProto, reader: TensorReader, label: str) -> dict[str, Any]:
    """The node's attributes as Python values (strings decoded, tensors read)."""
    attrs: dict[str, Any] = {}
    for attr in node.attribute:
        what = f"{label}: attribute '{attr.name}'"
        kind = attr.type
        if kind == A.INT:
            attrs[attr.name] = int(attr.i)
        elif kind == A.FLOAT:
            attrs[attr.name] = float(attr.f)
        elif kind == A.STRING:
            try:
                attrs[attr.name] = attr.s.decode("utf-8")
            except UnicodeDecodeError:
                raise OnnxImportError(f"{what}: not valid UTF-8") from None
        elif kind == A.INTS:
            attrs[attr.name] = tuple(int(v) for v in attr.ints)
        elif kind == A.FLOATS:
            attrs[attr.name] = tuple(float(v) for v in attr.floats)
        elif kind == A.TENSOR:
            attrs[attr.name] = reader.read(attr.t, what)
        elif kind == A.STRINGS:
            attrs[attr.name] = tuple(s.decode("utf-8", "replace") for s in attr.strings)
        else:  # graphs are rejected earlier; sparse tensors, types, tensor lists here
            attrs[attr.name] = Missing(
                f"attribute '{attr.name}' of kind {A.AttributeType.Name(kind)}"
            )
    return attrs


class NodeCtx:
    """One ONNX node being converted (see the module docstring)."""

    def __init__(self, conv, node: onnx.NodeProto, label: str, attrs: dict, values: list):
        self.conv = conv
        self.node = node
        self.op = node.op_type
        self.label = label
        self.attrs = attrs
        self.values = values  # per input: Sym, ndarray, Init, or None (absent)
        self.b: Builder = conv.builder
        self.opset: int = conv.opset

    # --- attributes -----------------------------------------------------------------------
    def attr(self, name: str, default: Any = REQUIRED) -> Any:
        if name in self.attrs:
            value = self.attrs[name]
            if isinstance(value, Missing):
                raise Unsupported(value.reason)
            return value
        if default is REQUIRED:
            raise OnnxImportError(f"{self.label}: missing required attribute '{name}'")
        return default

    # --- inputs ------------------------------------------------------------------------------
    @property
    def n_inputs(self) -> int:
        return len(self.values)

    @property
    def n_outputs(self) -> int:
        return len(self.node.output)

    def has(self, i: int) -> bool:
        return i < len(self.values) and self.values[i] is not None

    def need(self, i: int) -> None:
        if not self.has(i):
            raise OnnxImportError(f"{self.label}: input {i} is required")

    def array(self, i: int) -> np.ndarray:
        """Input i of a node being folded (every present input is an array)."""
        self.need(i)
        return self.values[i]

    def sym(self, i: int) -> Sym:
        """Input i as a remat value (a constant becomes a `constant` node)."""
        self.need(i)
        value = self.values[i]
        if isinstance(value, Sym):
            return value
        name = self.node.input[i]
        if isinstance(value, Init):
            sym = self.conv.declare_initializer(value)
        else:
            sym = self.conv.materialize(name, value)
        self.values[i] = sym
        return sym

    def is_const(self, i: int) -> bool:
        """Input i is a constant (a Constant node's or a folded value)."""
        return self.has(i) and isinstance(self.values[i], np.ndarray)

    def is_static(self, i: int) -> bool:
        """Input i is known at import: a constant or an initializer (read as it is)."""
        value = self.values[i] if self.has(i) else None
        return isinstance(value, (np.ndarray, Init)) or (
            isinstance(value, Sym) and value.name in self.conv.initializer_values
        )

    def const(self, i: int, what: str) -> np.ndarray:
        """Input i's value, which the op needs at import (a shape, axes, pads...)."""
        self.need(i)
        value = self.values[i]
        if isinstance(value, np.ndarray):
            return value
        if isinstance(value, Init):
            return value.array
        stored = self.conv.initializer_values.get(value.name)
        if stored is not None:
            return stored
        raise Unsupported(
            f"input {i} ({what}) must be a constant, but '{self.node.input[i]}' is computed "
            "from the model's inputs"
        )

    def ints(self, i: int, what: str) -> tuple[int, ...]:
        value = self.const(i, what)
        if value.dtype.kind not in "iu":
            raise OnnxImportError(f"{self.label}: {what} must be integers, got {value.dtype}")
        return tuple(int(v) for v in value.reshape(-1))

    def scalar(self, i: int, what: str, default=None):
        if not self.has(i):
            return default
        value = self.const(i, what)
        if value.size != 1:
            raise OnnxImportError(f"{self.label}: {what} must be a scalar, got {value.shape}")
        return value.reshape(-1)[0].item()

    def shape(self, i: int) -> tuple[int, ...]:
        self.need(i)
        value = self.values[i]
        return tuple(value.array.shape if isinstance(value, Init) else value.shape)

    def dtype_of(self, i: int) -> np.dtype:
        """The NumPy dtype of input i."""
        value = self.values[i]
        if isinstance(value, Sym):
            return np.dtype(value.dtype)
        return (value.array if isinstance(value, Init) else value).dtype

    # --- outputs, dtypes, limits ---------------------------------------------------------------
    def used(self, k: int) -> bool:
        return k < len(self.node.output) and self.conv.uses.get(self.node.output[k], 0) > 0

    def remat_dtype(self, elem_type: int) -> str:
        """The remat dtype of an ONNX element type (floats follow `dtype=`)."""
        if elem_type in FLOAT_TYPES and self.conv.dtype is not None:
            return self.conv.dtype
        if elem_type not in REMAT:
            raise Unsupported(
                f"element type {type_name(elem_type)} (remat computes in "
                "float32, float64, int32, int64 and bool)"
            )
        return REMAT[elem_type]

    def numpy_dtype(self, elem_type: int) -> np.dtype:
        """The NumPy dtype a constant of this element type folds to."""
        if elem_type in FLOAT_TYPES and self.conv.dtype is not None:
            return np.dtype(self.conv.dtype)
        if elem_type == onnx.TensorProto.BFLOAT16:
            return np.dtype(np.float32)
        if elem_type not in NUMPY:
            raise Unsupported(f"element type {type_name(elem_type)}")
        return NUMPY[elem_type].newbyteorder("=")

    def float_const(self, value) -> np.ndarray:
        """A float constant the model states (e.g. ConstantOfShape's value) in the
        import's float dtype."""
        array = np.asarray(value)
        if array.dtype.kind == "f" and self.conv.dtype is not None:
            return array.astype(self.conv.dtype)
        return array

    def check_size(self, shape) -> int:
        """Raise before a folded tensor of `shape` is allocated if it is over the limit."""
        return count_elements(
            [int(d) for d in shape], self.conv.limits.max_folded_elements, self.label
        )

    def unsupported(self, message: str) -> Unsupported:
        return Unsupported(message)
