"""The values `from_torch` passes between its walk and its op table (`aten_table`,
`aten_nn`): graph-computed tensors with torch's shape and dtype, and the exception a
handler raises for a form of an op it cannot import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..graph import Node

# torch dtype name -> remat dtype name; other dtypes are not supported.
_DTYPES = {
    "float32": "float32",
    "float64": "float64",
    "int32": "int32",
    "int64": "int64",
    "bool": "bool",
}


class Unsupported(Exception):
    """Raised by an op handler: this use of the op cannot be imported (and why)."""


@dataclass(frozen=True)
class Tensor:
    """A value computed by the graph: its node and torch's view of its shape and dtype."""

    node: Node
    shape: tuple[int, ...]
    dtype: Any  # torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def remat_dtype(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise Unsupported(f"dtype {name} is not supported (float32, float64, int32, int64, bool)")
    return _DTYPES[name]
