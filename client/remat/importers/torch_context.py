"""What `from_torch`'s ATen handlers (aten_table and the modules it gathers) see of the
importer: the node being imported (`out`, `out_dtype`), and how to add remat ops and
constants to the graph (`op`, `node`, `const`, `fresh`), with torch's typing rules
(`dtype_of`, `shape_of`, `result_type`). The walk over torch.export's graph that sets
`fx`, `graph` and the rest is `torch_export._Importer`, a subclass.
"""

from __future__ import annotations

import numpy as np

from ..graph import Node
from .torch_values import Tensor, remat_dtype

# Constants of these dtypes are widened so the graph can hold them.
_WIDEN = {"uint8": "int64", "int8": "int64", "int16": "int64", "float16": "float32"}


def _as_remat(dtype) -> str:
    return dtype if isinstance(dtype, str) else remat_dtype(dtype)


class ImportContext:
    """The handler API; the subclass provides `torch`, `fx` (the node being imported),
    `graph`, `source`, `_prefix`, `_constants` and `_keep`."""

    @property
    def out(self):
        """torch's (fake) value of the node being imported: shapes and dtypes."""
        return self.fx.meta.get("val")

    @property
    def out_dtype(self):
        val = self.out
        return (val[0] if isinstance(val, (list, tuple)) else val).dtype

    def op(self, op: str, inputs, **attrs) -> Node:
        """Append a remat op, named after the ATen node (`<fx name>/<op>`)."""
        return self.graph.add(op, inputs, attrs, name=self.fresh(op), source=self.source)

    def fresh(self, label: str) -> str:
        """An unused node name `<fx name>/<label>` (with a suffix when taken)."""
        name = f"{self._prefix}/{label}"
        if name in self.graph:
            i = 1
            while f"{name}_{i}" in self.graph:
                i += 1
            name = f"{name}_{i}"
        return name

    def node(self, value, dtype=None) -> Node:
        """`value` as a graph node, cast to `dtype` (torch or remat name) when given:
        a Tensor as is, a constant (tensor, number, bool) as a graph constant."""
        want = None if dtype is None else _as_remat(dtype)
        if isinstance(value, Tensor):
            if want is not None and value.node.dtype != want:
                return self.op("cast", [value.node], dtype=want)
            return value.node
        if isinstance(value, Node):
            return value
        return self.const(value, want)

    def const(self, value, dtype: str | None = None) -> Node:
        torch = self.torch
        if isinstance(value, torch.Tensor):
            key = (id(value), dtype)
            if key not in self._constants:
                array = value.detach().cpu()
                name = str(array.dtype).removeprefix("torch.")
                if name in _WIDEN:
                    array = array.to(getattr(torch, _WIDEN[name]))
                array = array.numpy()
                if dtype is None:
                    remat_dtype(array.dtype)  # raises for unsupported dtypes
                else:
                    array = array.astype(dtype)
                self._keep.append(value)
                self._constants[key] = self.op("constant", [], value=np.ascontiguousarray(array))
            return self._constants[key]
        if dtype is None:
            dtype = (
                "bool"
                if isinstance(value, bool)
                else "int64"
                if isinstance(value, int)
                else "float32"
            )
        key = ("scalar", repr(value), dtype)
        if key not in self._constants:
            self._constants[key] = self.op("constant", [], value=np.asarray(value, dtype=dtype))
        return self._constants[key]

    def dtype_of(self, value):
        torch = self.torch
        if isinstance(value, (Tensor, torch.Tensor)):
            return value.dtype
        return torch.tensor(value).dtype

    def shape_of(self, value) -> tuple[int, ...]:
        if isinstance(value, Tensor):
            return value.shape
        return tuple(getattr(value, "shape", ()))

    def result_type(self, *values):
        """torch's type promotion over tensors and Python scalars."""
        torch = self.torch
        stand_ins = [
            torch.empty((1,) * v.ndim, dtype=v.dtype) if isinstance(v, Tensor) else v
            for v in values
        ]
        result = stand_ins[0]
        for other in stand_ins[1:]:
            result = torch.empty((), dtype=torch.result_type(result, other))
        return result.dtype if isinstance(result, torch.Tensor) else torch.tensor(result).dtype

    def stop_gradient(self, node: Node, shape: tuple[int, ...], dtype) -> Node:
        """node's value with no gradient: batch_norm in inference form treats its
        running mean as a constant, and (0 - (-x)) / sqrt(1 + 0) * 1 + 0 is x exactly."""
        size = int(np.prod(shape, dtype=np.int64))
        name = remat_dtype(dtype)
        flat = self.op("neg", [self.op("reshape", [node], shape=[size])])
        zeros = self.const(self.torch.zeros(1, size, dtype=dtype), name)
        ones = self.const(self.torch.ones(size, dtype=dtype), name)
        bias = self.const(self.torch.zeros(size, dtype=dtype), name)
        out = self.op("batch_norm", [zeros, ones, bias, flat, ones], training=False, eps=0.0)
        return self.op("reshape", [out], shape=list(shape))
