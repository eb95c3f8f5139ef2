"""The conversion driver: ONNX graph -> remat `GraphSpec` plus parameter values.

One pass over the nodes in topological order. Each ONNX value becomes a remat value
(`Sym`), a constant (folded at import), or `Missing`. Nodes remat cannot convert are
recorded and their outputs poisoned, so that the one error raised at the end lists
every unsupported op and attribute value of the model, not just the first.
"""

from __future__ import annotations

import graphlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from ..spec import GraphSpec
from . import fusions
from .context import Init, Missing, NodeCtx, parse_attrs
from .emit import Builder, ShapeProblem, Sym
from .errors import OnnxImportError, Unsupported
from .model import OnnxLimits, check_model, load_model, node_label, schema_problems
from .ops_table import CHECKS, CONVERT, FOLD, KNOWN, NEVER_FOLD
from .tensors import FLOAT_TYPES, ExternalData, TensorReader, type_name

DEFAULT_LIMITS = OnnxLimits()
MAX_LISTED = 500  # problems spelled out in the error; the rest are counted by op type


@dataclass(frozen=True)
class Imported:
    """A converted model: the graph as sent (`spec`) and the initializers' values by
    name (`params`), each a graph input of the same name."""

    spec: GraphSpec
    params: dict[str, np.ndarray]


def convert(
    model: bytes | onnx.ModelProto,
    *,
    dtype: str | None = None,
    limits: OnnxLimits = DEFAULT_LIMITS,
    base_dir: str | None = None,
    allow_external_data: bool = True,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Imported:
    """Convert an ONNX model (see the package docstring)."""
    if dtype not in (None, "float32", "float64"):
        raise OnnxImportError(f"dtype: must be None, 'float32' or 'float64', got {dtype!r}")
    proto = load_model(model, limits)
    opset, problems = check_model(proto, limits)
    reader = TensorReader(limits.max_folded_elements, ExternalData(base_dir, allow_external_data))
    return _Converter(proto.graph, opset, dtype, limits, reader, problems, input_shapes).run()


class _Converter:
    def __init__(self, graph, opset, dtype, limits, reader, problems, input_shapes):
        self.graph, self.opset, self.dtype, self.limits = graph, opset, dtype, limits
        self.reader, self.problems = reader, list(problems)
        self.input_shapes = dict(input_shapes or {})
        self.env: dict[str, object] = {}
        self.params: dict[str, np.ndarray] = {}
        self.initializer_values: dict[str, np.ndarray] = {}
        self.materialized: dict[str, Sym] = {}
        self.uses: Counter = Counter()
        self.fused: set[int] = set()  # ids of the nodes `fusions` made
        self.builder = Builder(self._names())

    def _names(self) -> set[str]:
        names: set[str] = set()
        for item in (*self.graph.input, *self.graph.output, *self.graph.initializer):
            names.add(item.name)
        for node in self.graph.node:
            names.update(node.output)
            self.uses.update(name for name in node.input if name)
        self.uses.update(o.name for o in self.graph.output)
        names.discard("")
        return names

    # --- the pass ----------------------------------------------------------------------------
    def run(self) -> Imported:
        self._inputs()
        self._initializers()
        graph_outputs = {item.name for item in self.graph.output}
        nodes, self.fused = fusions.gelu_tanh(list(self.graph.node), graph_outputs)
        attrs = [self._precheck(i, node) for i, node in enumerate(nodes)]
        for index in self._order(nodes):
            self._convert(index, nodes[index], attrs[index])
        outputs = self._outputs()
        if self.problems:
            raise OnnxImportError(_summary(self.problems))
        roots = {node for _, node in outputs}
        nodes = _live(self.builder.nodes, roots)
        spec = GraphSpec(
            self.graph.name or "onnx",
            tuple(self.builder.inputs),
            tuple(fusions.linear(nodes, roots, self.builder.shapes)),
            tuple(outputs),
        )
        return Imported(spec, self.params)

    def _initializers(self) -> None:
        self.builder.source = "ONNX initializer"
        for tensor in self.graph.initializer:
            name = tensor.name
            if not name or name in self.env:
                raise OnnxImportError(f"initializer '{name}': empty or duplicate name")
            array = self.reader.read(tensor, f"initializer '{name}'", max_elements=1 << 62)
            if tensor.data_type in FLOAT_TYPES:
                if self.dtype is not None:
                    array = array.astype(self.dtype)
                elif tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
                    raise OnnxImportError(
                        f"initializer '{name}': {type_name(tensor.data_type)}; remat computes in "
                        "float32 or float64 (pass dtype='float32')"
                    )
                self.initializer_values[name] = array
                self.env[name] = self.builder.add_input(name, array.shape, array.dtype.name)
                self.params[name] = array
            else:  # integer or bool: a graph input once used as data
                self.env[name] = Init(name, array)

    def declare_initializer(self, init: Init) -> Sym:
        declared = self.env.get(init.name)
        if isinstance(declared, Sym):  # used as data twice in one node
            return declared
        dtype = init.array.dtype
        if dtype.name not in ("int32", "int64", "bool"):
            raise Unsupported(f"initializer '{init.name}' of dtype {dtype} used as data")
        source, self.builder.source = self.builder.source, "ONNX initializer"
        sym = self.builder.add_input(init.name, init.array.shape, dtype.name)
        self.builder.source = source
        self.params[init.name] = init.array
        self.initializer_values[init.name] = init.array
        self.env[init.name] = sym
        return sym

    def _inputs(self) -> None:
        self.builder.source = "ONNX graph input"
        initializers = {tensor.name for tensor in self.graph.initializer}
        for item in self.graph.input:
            if item.name in initializers:  # listed as an input too (IR < 4): a parameter
                continue
            if item.name in self.env:
                raise OnnxImportError(f"graph input '{item.name}': declared twice")
            what = f"graph input '{item.name}'"
            if not item.name:
                raise OnnxImportError(f"{what}: empty name")
            if item.type.WhichOneof("value") != "tensor_type":
                raise OnnxImportError(f"{what}: only tensor inputs are supported")
            tensor_type = item.type.tensor_type
            kind = tensor_type.elem_type
            if kind in FLOAT_TYPES and self.dtype is not None:
                dtype = self.dtype
            elif kind in (
                onnx.TensorProto.FLOAT,
                onnx.TensorProto.DOUBLE,
                onnx.TensorProto.INT32,
                onnx.TensorProto.INT64,
                onnx.TensorProto.BOOL,
            ):
                dtype = {1: "float32", 11: "float64", 6: "int32", 7: "int64", 9: "bool"}[kind]
            else:
                raise OnnxImportError(f"{what}: element type {type_name(kind)} is not supported")
            shape = self._input_shape(item, what)
            self.env[item.name] = self.builder.add_input(item.name, shape, dtype)

    def _input_shape(self, item, what: str) -> tuple[int, ...]:
        given = self.input_shapes.get(item.name)
        dims = list(item.type.tensor_type.shape.dim)
        if given is not None:
            given = tuple(int(d) for d in given)
            if len(given) != len(dims) or any(
                d.HasField("dim_value") and d.dim_value != g for d, g in zip(dims, given)
            ):
                raise OnnxImportError(f"{what}: shape {given} does not fit the model's")
            return given
        if not item.type.tensor_type.HasField("shape") or any(
            not d.HasField("dim_value") for d in dims
        ):
            symbolic = [d.dim_param or "?" for d in dims if not d.HasField("dim_value")]
            raise OnnxImportError(
                f"{what}: dynamic dimensions {symbolic}; remat's shapes are static, give them "
                "with input_shapes={name: shape}"
            )
        return tuple(int(d.dim_value) for d in dims)

    def _precheck(self, index: int, node) -> dict | None:
        """The node's attributes, or None if it cannot be converted (recorded)."""
        label = node_label(node, index)
        if node.domain not in ("", "ai.onnx") or any(
            a.ref_attr_name or a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            return None  # already listed by check_model
        if node.op_type not in KNOWN:
            self.problems.append(
                (node.op_type, f"{label}: op type '{node.op_type}' is not supported")
            )
            return None
        # A fused Gelu is remat's, checked by its own table, not by the model's opset.
        found = [] if id(node) in self.fused else schema_problems(node, self.opset)
        attrs = parse_attrs(node, self.reader, label)
        check = CHECKS.get(node.op_type)
        found += check(attrs, self.opset) if check and not found else []
        self.problems.extend((node.op_type, f"{label}: unsupported {problem}") for problem in found)
        return None if found else attrs

    def _order(self, nodes) -> list[int]:
        """Node indices in topological order (ONNX requires it; otherwise sort)."""
        defined = set(self.env)
        for node in nodes:
            if any(name and name not in defined for name in node.input):
                break
            defined.update(node.output)
        else:
            return list(range(len(nodes)))
        producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
        sorter = graphlib.TopologicalSorter(
            {i: {producer[n] for n in node.input if n in producer} for i, node in enumerate(nodes)}
        )
        try:
            return list(sorter.static_order())
        except graphlib.CycleError:
            raise OnnxImportError("graph: the nodes form a cycle") from None

    def _convert(self, index: int, node, attrs: dict | None) -> None:
        label = node_label(node, index)
        values = []
        for name in node.input:
            if not name:
                values.append(None)
            elif name not in self.env:
                raise OnnxImportError(f"{label}: input '{name}' is not defined in the graph")
            else:
                values.append(self.env[name])
        for name in node.output:
            if name and name in self.env:
                raise OnnxImportError(f"{label}: output '{name}' is defined twice")
        missing = [(n, v) for n, v in zip(node.input, values) if isinstance(v, Missing)]
        if attrs is None or missing:
            for name, value in missing:
                if value.reason is not None:
                    self.problems.append((node.op_type, f"{label}: uses '{name}': {value.reason}"))
            return self._poison(node)
        builder = self.builder
        builder.hint = next((o for o in node.output if o), node.name or node.op_type)
        builder.source = f"ONNX {label}"
        start = len(builder.nodes)
        c = NodeCtx(self, node, label, attrs, values)
        constant = all(isinstance(v, np.ndarray) for v in values if v is not None)
        fold = FOLD.get(node.op_type) if constant and node.op_type not in NEVER_FOLD else None
        try:
            convert = fold or CONVERT.get(node.op_type)
            if convert is None:
                raise Unsupported(
                    f"{node.op_type} is supported on constants only, and an input here is "
                    "computed from the model's inputs or initializers"
                )
            outs = convert(c)
        except Unsupported as exc:
            self.problems.append((node.op_type, f"{label}: unsupported {exc}"))
            return self._poison(node)
        except ShapeProblem as exc:
            raise OnnxImportError(f"{label}: {exc}") from None
        except OnnxImportError:
            raise
        except (
            ValueError,
            TypeError,
            IndexError,
            KeyError,
            OverflowError,
            ZeroDivisionError,
        ) as exc:
            # Malformed values (NaN bounds, wrong ranks...) the checks above did not name.
            raise OnnxImportError(f"{label}: {type(exc).__name__}: {exc}") from None
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        if len(outs) < len(node.output):
            outs += [
                Missing(f"output {k} of {node.op_type}") for k in range(len(outs), len(node.output))
            ]
        for k, value in enumerate(outs):
            if isinstance(value, (np.ndarray, np.generic)):  # NumPy returns 0-d as scalars
                outs[k] = np.asarray(value)
                c.check_size(outs[k].shape)
        outs = self._rename(start, node.output, outs)
        for name, value in zip(node.output, outs):
            if name:
                self.env[name] = value

    def _poison(self, node) -> None:
        for name in node.output:
            if name:
                self.env[name] = Missing()

    def _rename(self, start: int, names, outs) -> list:
        """Give the remat nodes just emitted for the node's outputs the ONNX names."""
        nodes = self.builder.nodes
        fresh = {n.name for n in nodes[start:]}
        mapping: dict[str, str] = {}
        for name, value in zip(names, outs):
            if (
                isinstance(value, Sym)
                and value.name in fresh
                and value.name not in mapping
                and self.builder.claim(name)
            ):
                mapping[value.name] = name
        if mapping:
            shapes = self.builder.shapes
            for old, new in mapping.items():
                shapes[new] = shapes.pop(old)
            for k in range(start, len(nodes)):
                node = nodes[k]
                nodes[k] = replace(
                    node,
                    name=mapping.get(node.name, node.name),
                    inputs=tuple(mapping.get(i, i) for i in node.inputs),
                )
        return [
            Sym(mapping[v.name], v.shape, v.dtype)
            if isinstance(v, Sym) and v.name in mapping
            else v
            for v in outs
        ]

    def materialize(self, name: str, array: np.ndarray) -> Sym:
        """A constant used as data: one `constant` node per ONNX value."""
        sym = self.materialized.get(name)
        if sym is None:
            try:
                sym = self.builder.constant(array, name)
            except ShapeProblem as exc:
                raise Unsupported(f"'{name}' is {exc}") from None
            self.materialized[name] = sym
        return sym

    def _outputs(self) -> list[tuple[str, str]]:
        outputs = []
        for item in self.graph.output:
            value = self.env.get(item.name)
            what = f"graph output '{item.name}'"
            self.builder.hint, self.builder.source = item.name, f"ONNX {what}"
            if value is None:
                raise OnnxImportError(f"{what}: not defined in the graph")
            if isinstance(value, Missing):
                if value.reason is not None:
                    self.problems.append(("output", f"{what}: {value.reason}"))
                continue
            try:
                if isinstance(value, Init):
                    value = self.declare_initializer(value)
                elif isinstance(value, np.ndarray):
                    value = self.materialize(item.name, value)
            except Unsupported as exc:
                self.problems.append(("output", f"{what}: unsupported {exc}"))
                continue
            outputs.append((item.name, value.name))
        return outputs


def _live(nodes, roots) -> list:
    """The nodes the outputs depend on, in order (unused outputs of BatchNormalization,
    Dropout masks and folded leftovers are dropped)."""
    by_name = {n.name: n for n in nodes}
    live, stack = set(), [r for r in roots if r in by_name]
    while stack:
        name = stack.pop()
        if name in live:
            continue
        live.add(name)
        stack.extend(i for i in by_name[name].inputs if i in by_name and i not in live)
    return [n for n in nodes if n.name in live]


def _summary(problems: list[tuple[str, str]]) -> str:
    head = f"cannot import the ONNX model: {len(problems)} unsupported op(s) or value(s):"
    lines = [f"  - {message}" for _, message in problems[:MAX_LISTED]]
    rest = problems[MAX_LISTED:]
    if rest:  # a hostile model must not make a huge message: count the rest by op type
        kinds = Counter(op for op, _ in rest)
        counted = ", ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items()))
        lines.append(f"  ... and {len(rest)} more ({counted})")
    return "\n".join([head, *lines])
