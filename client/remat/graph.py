"""Build computation graphs in Python, PyTorch-style.

    >>> import remat
    >>> g = remat.Graph("mlp")
    >>> x = g.input("x", (4, 3), dtype="float64")
    >>> w = g.input("w", (3, 2), dtype="float64")
    >>> h = remat.relu(x @ w, name="h")
    >>> loss = g.output("loss", remat.sum(h * h))
    >>> g.output_names
    ['loss']
    >>> g["h"].op
    'relu'

Each node remembers the file:line that built it; the server quotes it in errors.
Shapes are checked by the server, which infers them; the SDK tracks only dtypes (so
Python scalars in `x * 2` become constants of `x`'s dtype).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
from google.protobuf import json_format

from remat_proto import wire
from remat_proto.dtypes import NAMES as DTYPES
from remat_proto.spec import GraphSpec, InputSpec, NodeSpec
from remat_proto.v1 import graph_pb2

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


_BOOL_OPS = frozenset(
    {"gt", "ge", "lt", "le", "eq", "isnan", "isinf"}
    | {"logical_not", "logical_and", "logical_or", "logical_xor"}
)
_INDEX_OPS = frozenset({"argmax", "argmin"})


def result_dtype(op: str, attrs: dict, input_dtypes: list) -> str | None:
    """The dtype of an op's result, as far as the SDK needs it (for scalar constants)."""
    if op in _BOOL_OPS:
        return "bool"
    if op in _INDEX_OPS:
        return "int64"
    if op in ("cast", "one_hot"):
        return attrs.get("dtype", "float32")
    if op == "constant":
        return np.asarray(attrs["value"]).dtype.name
    if op == "where" and len(input_dtypes) > 1:
        return input_dtypes[1]
    return input_dtypes[0] if input_dtypes else None


def _user_source() -> str:
    """file:line of the innermost caller outside the remat package."""
    frame, shown = sys._getframe(1), _SHOWN_PATHS
    while frame is not None:
        path = frame.f_code.co_filename
        display = shown.get(path)
        if display is None:
            display = shown[path] = _display_path(path)
        if display:  # outside the package
            return f"{display}:{frame.f_lineno}"
        frame = frame.f_back
    return ""


# co_filename -> how a source location shows it ("" inside the package): asked once per
# file, since resolving paths on every node was most of building a graph (20 us a node).
_SHOWN_PATHS: dict[str, str] = {}


def _display_path(path: str) -> str:
    if os.path.abspath(path).startswith(_PACKAGE_DIR):
        return ""
    try:
        relative = os.path.relpath(path)
        return relative if not relative.startswith("..") else os.path.basename(path)
    except ValueError:  # another drive on Windows
        return os.path.basename(path)


class Node:
    """A handle on an input or node of a Graph; supports + - * / @ ** and unary -."""

    __slots__ = ("graph", "name", "op", "dtype")
    __array_priority__ = 1000  # so ndarray + node defers to Node.__radd__
    __hash__ = object.__hash__

    def __init__(self, graph: Graph, name: str, op: str, dtype: str | None):
        self.graph, self.name, self.op, self.dtype = graph, name, op, dtype

    def __repr__(self) -> str:
        return f"<remat.Node {self.name!r} op={self.op} dtype={self.dtype}>"

    def _binary(self, op: str, other: Any, reverse: bool = False) -> Node:
        other = self.graph.lift(other, like=self)
        a, b = (other, self) if reverse else (self, other)
        return self.graph.add(op, (a, b))

    def __add__(self, other):
        return self._binary("add", other)

    def __radd__(self, other):
        return self._binary("add", other, True)

    def __sub__(self, other):
        return self._binary("sub", other)

    def __rsub__(self, other):
        return self._binary("sub", other, True)

    def __mul__(self, other):
        return self._binary("mul", other)

    def __rmul__(self, other):
        return self._binary("mul", other, True)

    def __truediv__(self, other):
        return self._binary("div", other)

    def __rtruediv__(self, other):
        return self._binary("div", other, True)

    def __matmul__(self, other):
        return self._binary("matmul", other)

    def __rmatmul__(self, other):
        return self._binary("matmul", other, True)

    def __gt__(self, other):
        return self._binary("gt", other)

    def __ge__(self, other):
        return self._binary("ge", other)

    def __lt__(self, other):
        return self._binary("lt", other)

    def __le__(self, other):
        return self._binary("le", other)

    def __neg__(self):
        return self.graph.add("neg", (self,))

    def __rpow__(self, base):
        """`2.0 ** x` as exp(x * log(base)); the base must be a positive number."""
        if not isinstance(base, (int, float, np.number)) or base <= 0:
            raise ValueError(f"a scalar base of ** must be a positive number, got {base!r}")
        if self.dtype not in ("float32", "float64"):
            raise TypeError(f"scalar ** node needs a float node, {self.name!r} is {self.dtype}")
        return self.graph.add("exp", (self._binary("mul", math.log(base)),))

    def __pow__(self, exponent):
        if isinstance(exponent, Node):
            raise TypeError("pow takes a scalar exponent (use exp(log(x) * y) for tensors)")
        if exponent == 2:
            return self.graph.add("square", (self,))
        return self.graph.add("pow", (self,), {"exponent": float(exponent)})


class Graph:
    """An ordered set of inputs and nodes with named outputs; serializable to protobuf."""

    def __init__(self, name: str = "graph"):
        self._name = name
        self.inputs: list[InputSpec] = []
        self.nodes: list[NodeSpec] = []
        self._outputs: dict[str, str] = {}
        self._handles: dict[str, Node] = {}
        self._counter = 0
        # Bumped by every change; the wire form is computed once per version.
        self._version = 0
        self._wire: tuple[int, Any, str] | None = None
        # Set on graphs returned by Client.differentiate: input -> gradient output name.
        self.grad_outputs: dict[str, str] = {}

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, name: str) -> None:  # the name is part of the graph's content (its id)
        self._name = name
        self._version += 1

    # --- building -------------------------------------------------------------------
    def input(self, name: str, shape, dtype: str = "float32") -> Node:
        """Declare an input; a leading -1 dimension is a batch size bound at run time."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self._claim(name)
        self.inputs.append(InputSpec(name, tuple(int(d) for d in shape), dtype, _user_source()))
        return self._handle(name, "input", dtype)

    def add(
        self,
        op: str,
        inputs,
        attrs: dict | None = None,
        name: str | None = None,
        dtype: str | None = None,
        source: str | None = None,
    ) -> Node:
        """Append a node running `op` (any op the server lists; see `remat ops`).
        `source` says where the node came from in errors (default: the caller's
        file:line; importers give the model's module path)."""
        handles = [self.lift(i) for i in inputs]
        for handle in handles:
            if handle.graph is not self:
                raise ValueError(
                    f"{handle.name!r} belongs to graph {handle.graph.name!r}, not {self.name!r}"
                )
        name = name or self._fresh(op)
        self._claim(name)
        attrs = {k: v for k, v in (attrs or {}).items() if v is not None}
        source = _user_source() if source is None else source
        self.nodes.append(NodeSpec(name, op, tuple(h.name for h in handles), attrs, source))
        if dtype is None:
            dtype = result_dtype(op, attrs, [h.dtype for h in handles])
        return self._handle(name, op, dtype)

    def constant(self, value, dtype: str | None = None, name: str | None = None) -> Node:
        """A tensor baked into the graph."""
        array = np.asarray(value, dtype=dtype)
        if array.dtype.name not in DTYPES:
            array = array.astype("float32" if array.dtype.kind == "f" else "int64")
        return self.add("constant", (), {"value": array}, name=name, dtype=array.dtype.name)

    def lift(self, value: Any, like: Node | None = None) -> Node:
        """A Node as is; a Python number or array as a constant (of `like`'s dtype)."""
        if isinstance(value, Node):
            return value
        dtype = like.dtype if like is not None and like.dtype else None
        if dtype is None and isinstance(value, float):
            dtype = "float32"
        return self.constant(value, dtype=dtype)

    def output(self, name: str, node: Node) -> Node:
        """Name `node` as an output (fetched by `Client.run`, differentiable as `loss`)."""
        if name in self._outputs:
            raise ValueError(f"output {name!r} is already defined")
        self._outputs[name] = self.lift(node).name
        self._version += 1
        return node

    # --- access ---------------------------------------------------------------------
    def __getitem__(self, name: str) -> Node:
        """The input or node called `name`, else the node the output `name` names
        (`joint["grad/w"]` after `client.differentiate`)."""
        handle = self._handles.get(name)
        if handle is None and name in self._outputs:
            handle = self._handles.get(self._outputs[name])
        if handle is None:
            raise KeyError(f"graph {self.name!r} has no input, node or output {name!r}")
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self._handles or name in self._outputs

    def __iter__(self) -> Iterator[Node]:
        return iter(self._handles.values())

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def outputs(self) -> dict[str, str]:
        """Output name -> the node it names."""
        return dict(self._outputs)

    def __repr__(self) -> str:
        return (
            f"<remat.Graph {self.name!r}: {len(self.inputs)} inputs, {len(self.nodes)} nodes, "
            f"outputs {self.output_names}>"
        )

    # --- serialization: the remat.v1.Graph message (remat_proto.wire maps it) ------------
    def spec(self) -> GraphSpec:
        """The graph as sent: inputs, nodes and outputs (`remat_proto.spec`)."""
        return GraphSpec(
            self.name, tuple(self.inputs), tuple(self.nodes), tuple(self._outputs.items())
        )

    def to_proto(self):
        """The `remat.v1.Graph` message (a copy: change it freely)."""
        message = graph_pb2.Graph()
        message.CopyFrom(self.wire_form()[0])
        return message

    def wire_form(self) -> tuple[Any, str]:
        """(the Graph message, its content id), computed once per version of the graph:
        a training loop that runs the same graph sends its id, not its bytes, and pays
        for neither serializing nor hashing it again. Do not modify the message."""
        if self._wire is None or self._wire[0] != self._version:
            message = wire.graph_to_proto(self.spec())
            self._wire = (self._version, message, wire.content_id(message))
        return self._wire[1], self._wire[2]

    @property
    def graph_id(self) -> str:
        """The content id every server knows this graph by (sha256 of its message)."""
        return self.wire_form()[1]

    @classmethod
    def from_proto(cls, message) -> Graph:
        """The graph a `remat.v1.Graph` message describes."""
        spec = wire.graph_from_proto(message)
        graph = cls(spec.name)
        graph._restore(spec.inputs, spec.nodes, dict(spec.outputs))
        return graph

    def to_json(self) -> str:
        return json_format.MessageToJson(self.wire_form()[0])

    @classmethod
    def from_json(cls, text: str) -> Graph:
        return cls.from_proto(json_format.Parse(text, graph_pb2.Graph()))

    # --- internals --------------------------------------------------------------------
    def _claim(self, name: str) -> None:
        if not name:
            raise ValueError("names must be non-empty")
        if name in self._handles:
            raise ValueError(f"graph {self.name!r} already has a node or input named {name!r}")

    def _fresh(self, op: str) -> str:
        while True:
            self._counter += 1
            name = f"{op}_{self._counter}"
            if name not in self._handles:
                return name

    def _handle(self, name: str, op: str, dtype: str | None) -> Node:
        handle = Node(self, name, op, dtype)
        self._handles[name] = handle
        self._version += 1
        return handle

    def _restore(self, inputs, nodes, outputs) -> None:
        """Fill an empty graph from decoded definitions (used by from_proto)."""
        for item in inputs:
            self._claim(item.name)
            self.inputs.append(item)
            self._handle(item.name, "input", item.dtype)
        for node in nodes:
            self._claim(node.name)
            self.nodes.append(node)
            dtypes = [self._handles[i].dtype if i in self._handles else None for i in node.inputs]
            self._handle(node.name, node.op, result_dtype(node.op, node.attrs, dtypes))
        self._outputs.update(outputs)
        self._version += 1
