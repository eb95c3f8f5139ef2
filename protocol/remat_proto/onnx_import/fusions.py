"""Formulas the ONNX importer converts as one remat op (the ONNX side of the SDK's
`importers/torch_fusions.py` and of `from_torch`'s linear layers).

A linear layer (MatMul then Add, or Gemm with a bias) becomes remat's `linear` after
the conversion (`linear`): one buffer, where matmul then add hold the product and the
sum at once. Only where the product has the add as its one reader, is not a graph
output, and the bias broadcasts to the product's shape.

GPT-2's GELU, as `transformers` writes it and any exporter keeps it, is eight ONNX
nodes: `0.5 x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`. Their backward pass
reads four values of x's size, where remat's `gelu(approximate="tanh")` reads x alone.
So before the conversion each such subgraph becomes one `Gelu` node with
`approximate="tanh"` (ONNX's own op from opset 20; remat converts it at any opset),
named after the formula's result. Only where every intermediate value has the formula
as its one reader and is not a graph output, and the constants are `Constant` nodes
equal to the formula's in float32 (an initializer is a parameter the caller may set).

    >>> # nodes, fused = gelu_tanh(nodes, graph_outputs)   # fused: the new nodes' ids
    >>> from remat_proto.spec import NodeSpec
    >>> nodes = [NodeSpec("h", "matmul", ("x", "w"), {}), NodeSpec("y", "add", ("b", "h"), {})]
    >>> linear(nodes, {"y"}, {"x": (2, 3), "w": (3, 4), "b": (4,), "h": (2, 4), "y": (2, 4)})
    [NodeSpec(name='y', op='linear', inputs=('x', 'w', 'b'), attrs={}, source='')]
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx

from ..spec import NodeSpec
from .emit import ShapeProblem, broadcast

_HALF, _CUBIC, _SCALE, _THREE, _ONE = 0.5, 0.044715, math.sqrt(2.0 / math.pi), 3.0, 1.0


def gelu_tanh(nodes: list, graph_outputs: set[str]) -> tuple[list, set[int]]:
    """`nodes` with each GELU formula replaced by a Gelu node, and the ids of those."""
    producer = {name: node for node in nodes for name in node.output if name}
    readers = Counter(name for node in nodes for name in node.input if name)
    readers.update(graph_outputs)
    constant = {
        node.output[0]: _scalar(node)
        for node in nodes
        if node.op_type == "Constant" and len(node.output) == 1
    }
    sole_reader_of = {}
    for node in nodes:
        for name in node.input:
            if name and readers[name] == 1:
                sole_reader_of[name] = node
    removed: set[int] = set()
    replaced: dict[int, onnx.NodeProto] = {}
    for tanh in nodes:
        if tanh.op_type != "Tanh" or len(tanh.input) != 1:
            continue
        match = _Match(producer, constant, sole_reader_of).gelu(tanh)
        if match is None or any(id(n) in removed for n in match[1]):
            continue
        x, formula, result = match
        removed.update(id(n) for n in formula)
        replaced[id(result)] = onnx.helper.make_node(
            "Gelu", [x], [result.output[0]], name=result.name, approximate="tanh"
        )
    if not replaced:
        return nodes, set()
    out = [replaced.get(id(n), n) for n in nodes if id(n) not in removed or id(n) in replaced]
    return out, {id(n) for n in replaced.values()}


class _Match:
    """Walks one candidate formula from its Tanh node."""

    def __init__(self, producer, constant, sole_reader_of):
        self.producer, self.constant, self.sole = producer, constant, sole_reader_of

    def gelu(self, tanh):
        """(x, the formula's nodes, its result node) or None."""
        scaled = self._only(tanh.input[0], "Mul")
        inner = self._with_constant(scaled, _SCALE)
        add = self._only(inner, "Add")
        split = self._split(add, self._cube_term)
        if split is None:
            return None
        x, (cubic, power) = split
        plus_one = self.sole.get(tanh.output[0])
        if power.input[0] != x or self._with_constant(plus_one, _ONE, "Add") != tanh.output[0]:
            return None
        result = self.sole.get(plus_one.output[0])
        if result is None or result.op_type != "Mul" or len(result.input) != 2:
            return None
        others = [name for name in result.input if name != plus_one.output[0]]
        half = self._only(others[0], "Mul") if len(others) == 1 else None
        if self._with_constant(half, _HALF) != x:
            return None
        return x, [power, cubic, add, scaled, tanh, plus_one, half, result], result

    def _cube_term(self, name: str):
        """(the Mul node, the Pow node) if `name` is 0.044715 * x^3 read only here."""
        mul = self._only(name, "Mul")
        power = self._only(self._with_constant(mul, _CUBIC), "Pow")
        if power is None or len(power.input) != 2:
            return None
        if not _near(self.constant.get(power.input[1]), _THREE):
            return None
        return mul, power

    def _only(self, name: str | None, op_type: str):
        """The node computing `name` if it is an `op_type` and `name` has one reader."""
        node = self.producer.get(name) if name else None
        if node is None or node.op_type != op_type or name not in self.sole:
            return None
        return node

    def _with_constant(self, node, value: float, op_type: str = "Mul") -> str | None:
        """The other input of a binary `op_type` node whose one input is the constant
        `value` (None: not such a node)."""
        if node is None or node.op_type != op_type or len(node.input) != 2:
            return None
        a, b = node.input
        if _near(self.constant.get(b), value):
            return a
        if _near(self.constant.get(a), value):
            return b
        return None

    def _split(self, node, term):
        """(the other input, term(input)) for the input of binary `node` that `term`
        recognises (None: neither)."""
        if node is None or len(node.input) != 2:
            return None
        a, b = node.input
        for mine, other in ((b, a), (a, b)):
            found = term(mine)
            if found is not None:
                return other, found
        return None


def _scalar(node) -> float | None:
    """A Constant node's value when it is one float32 or float64. Read from the proto's
    fields, never through `numpy_helper`: this runs before the importer's size checks,
    and a stranger's Constant may declare a terabyte."""
    for attribute in node.attribute:
        if attribute.name == "value_float" and attribute.type == onnx.AttributeProto.FLOAT:
            return float(attribute.f)
        if attribute.name != "value" or attribute.type != onnx.AttributeProto.TENSOR:
            continue
        tensor = attribute.t
        kinds = {
            onnx.TensorProto.FLOAT: ("<f4", "float_data"),
            onnx.TensorProto.DOUBLE: ("<f8", "double_data"),
        }
        kind = kinds.get(tensor.data_type)
        if kind is None or any(d != 1 for d in tensor.dims) or tensor.external_data:
            return None
        layout, field = kind
        if tensor.raw_data:
            if len(tensor.raw_data) != np.dtype(layout).itemsize:
                return None
            return float(np.frombuffer(tensor.raw_data, layout)[0])
        values = getattr(tensor, field)
        return float(values[0]) if len(values) == 1 else None
    return None


def _near(value: float | None, expected: float) -> bool:
    """Equal in float32, the precision exporters write the formula's constants in."""
    return value is not None and np.float32(value) == np.float32(expected)


def linear(nodes: list, outputs: set[str], shapes: dict[str, tuple[int, ...]]) -> list:
    """`nodes` (remat NodeSpecs, in order) with each add(matmul(x, w), b) that can be
    one `linear(x, w, b)` so: named and placed as the add, the matmul gone. `outputs`:
    the nodes the graph outputs name; `shapes`: every value's shape."""
    readers = Counter(name for node in nodes for name in node.inputs)
    readers.update(outputs)
    matmuls = {node.name: node for node in nodes if node.op == "matmul"}
    replaced, fused = {}, set()
    for node in nodes:
        if node.op != "add":
            continue
        for product, bias in (node.inputs, node.inputs[::-1]):
            matmul = matmuls.get(product)
            if matmul is not None and readers[product] == 1 and _into(shapes, bias, product):
                replaced[node.name] = NodeSpec(
                    node.name, "linear", (*matmul.inputs, bias), {}, node.source
                )
                fused.add(product)
                break
    return [replaced.get(node.name, node) for node in nodes if node.name not in fused]


def _into(shapes: dict[str, tuple[int, ...]], bias: str, product: str) -> bool:
    """Whether `bias` broadcasts to `product`'s shape (False for a value whose shape is
    not known: then nothing is fused)."""
    target, shape = shapes.get(product), shapes.get(bias)
    if target is None or shape is None or len(shape) > len(target):
        return False
    try:
        return broadcast(shape, target) == target
    except ShapeProblem:
        return False
