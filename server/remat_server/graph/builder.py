"""Append validated nodes to a graph; the one place attrs are checked and shapes inferred.

Used twice: `validate.build_graph` feeds it a client's nodes, and autodiff feeds it the
backward nodes that VJP rules emit through a `Sym`/`Emitter` pair, so both pass the
same checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from remat_proto import dtypes

from ..errors import InvalidArgument, ShapeError, where
from ..ops import registry
from ..ops.registry import NODE_NAME, Attr
from .ir import INPUT_OP, Graph, Node, TensorType
from .limits import Limits, check_shape


def _coerce(attr: Attr, value: Any) -> Any:
    """Return `value` as the attr's type, or raise TypeError naming what was expected."""
    kind = attr.type
    if kind == "int" and type(value) is int:
        return value
    if kind == "float" and type(value) in (int, float):
        return float(value)
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "bool" and type(value) is bool:
        return value
    if kind == "ints" and isinstance(value, (tuple, list)) and all(type(v) is int for v in value):
        return tuple(value)
    if (
        kind == "floats"
        and isinstance(value, (tuple, list))
        and all(type(v) in (int, float) for v in value)
    ):
        return tuple(float(v) for v in value)
    if kind == "tensor" and isinstance(value, np.ndarray):
        return value
    raise TypeError(f"expected {kind}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return "tensor"
    if isinstance(value, (tuple, list)):
        return "list"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(type(value), "?")


def complete_attrs(op: registry.OpDef, given: dict[str, Any], node: str, label: str) -> dict:
    """Check `given` against the op's attr table and fill in defaults."""
    unknown = sorted(set(given) - set(op.attrs))
    if unknown:
        takes = ", ".join(sorted(op.attrs)) or "no attributes"
        raise InvalidArgument(
            f"{label}: unexpected attribute '{unknown[0]}' ({op.name} takes {takes})"
        )
    attrs = {}
    for attr_name, attr in op.attrs.items():
        if attr_name not in given:
            if attr.required:
                raise InvalidArgument(
                    f"{label}: missing required attribute '{attr_name}' ({attr.type})"
                )
            attrs[attr_name] = node if attr.default is NODE_NAME else attr.default
            continue
        try:
            value = _coerce(attr, given[attr_name])
        except TypeError as exc:
            raise InvalidArgument(f"{label}: attribute '{attr_name}': {exc}") from None
        if attr.check is not None and not attr.check(value):
            raise InvalidArgument(
                f"{label}: attribute '{attr_name}' = {value!r}: {attr.requirement}"
            )
        attrs[attr_name] = value
    return attrs


class _Label:
    """A node's description for error messages, built only when one is raised."""

    __slots__ = ("name", "op", "source")

    def __init__(self, name: str, op: str, source: str):
        self.name, self.op, self.source = name, op, source

    def __str__(self) -> str:
        return where(self.name, self.op, self.source)

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


_NO_ATTRS = MappingProxyType({})


# A tuple attr longer than this is checked in full, unkeyed: the checks refuse lists
# longer than twice the rank limit before any work proportional to their length.
_KEYED_TUPLE_ITEMS = 16


def _signature(op_name: str, types: list[TensorType], attrs: dict[str, Any] | None) -> tuple:
    """What a node's checks depend on. Each attr's Python type (a tuple's, its items')
    is part of it: `True` and `1.0` equal `1`, yet an int attribute refuses both. A
    list, an array or a long tuple raises TypeError: such a node is checked in full."""
    if not attrs:
        return (op_name, *types)
    key = [op_name, *types]
    for name, value in attrs.items():
        if type(value) is tuple:
            if len(value) > _KEYED_TUPLE_ITEMS:
                raise TypeError(name)
            key.append((name, tuple, value, *map(type, value)))
        else:
            key.append((name, type(value), value))
    return tuple(key)


class GraphBuilder:
    """An ordered, growing set of validated nodes."""

    def __init__(self, name: str, limits: Limits, base: Graph | None = None):
        self.name = name
        self.limits = limits
        self.nodes: dict[str, Node] = dict(base.nodes) if base is not None else {}
        self._suffix: dict[str, int] = {}
        # (op, input types, attrs as given) -> (complete attrs, result type) of a node
        # that passed every check: graphs repeat a few signatures many times (a chain's
        # adds, a model's layers, autodiff's gradient sums), and the checks and the
        # shape rule depend on nothing else (the limits are the builder's).
        self._signatures: dict[tuple, tuple[Mapping[str, Any], TensorType]] = {}

    def fresh_name(self, base: str) -> str:
        """`base`, or `base.1`, `base.2`... whichever is not taken yet (deterministic)."""
        if base not in self.nodes:
            return base
        k = self._suffix.get(base, 0)
        while True:
            k += 1
            candidate = f"{base}.{k}"
            if candidate not in self.nodes:
                self._suffix[base] = k
                return candidate

    def add_input(self, name: str, type_: TensorType, source: str = "") -> Node:
        label = where(name, "input", source)
        if type_.dtype not in dtypes.NUMPY:
            raise InvalidArgument(f"{label}: unsupported dtype '{type_.dtype}'")
        check_shape(type_.shape, self.limits, label)
        node = Node(name, INPUT_OP, (), {}, type_, source)
        self.nodes[name] = node
        return node

    def add(
        self,
        op_name: str,
        inputs: Iterable[str],
        attrs: dict[str, Any] | None = None,
        name: str = "",
        source: str = "",
    ) -> Node:
        """Validate and append one node; its inputs must already be present."""
        inputs = tuple(inputs)
        nodes = self.nodes
        try:
            types = [nodes[i].type for i in inputs]
        except KeyError:  # an unknown input: named below, after the op and arity checks
            types = None
        try:
            key = None if types is None else _signature(op_name, types, attrs)
            known = None if key is None else self._signatures.get(key)
        except TypeError:  # an attr that does not hash
            key = known = None
        if known is not None:
            node = nodes[name] = Node(name, op_name, inputs, known[0], known[1], source, key)
            return node
        op = registry.REGISTRY.get(op_name)
        if op is None:
            raise self._invalid(
                name, op_name, source, f"unknown op '{op_name}' (ListOps lists the known ones)"
            )
        count = len(inputs)
        if count < op.min_inputs or (op.max_inputs >= 0 and count > op.max_inputs):
            expected = (
                str(op.min_inputs)
                if op.min_inputs == op.max_inputs
                else f"at least {op.min_inputs}"
                if op.max_inputs < 0
                else f"{op.min_inputs} to {op.max_inputs}"
            )
            raise self._invalid(name, op_name, source, f"takes {expected} inputs, got {count}")
        if types is None:
            missing = next(i for i in inputs if i not in nodes)
            raise self._invalid(
                name, op_name, source, f"input '{missing}' is not defined in the graph"
            )
        if attrs:
            for attr_name, value in attrs.items():
                # Every list attribute is per axis, or per axis and side (pad's begin and
                # end pads), so the rank limit bounds its length; checked before any rule
                # does arithmetic on a hostile list.
                if isinstance(value, (tuple, list)) and len(value) > 2 * self.limits.max_rank:
                    raise self._invalid(
                        name,
                        op_name,
                        source,
                        f"attribute '{attr_name}' has {len(value)} entries; at most twice the "
                        f"rank limit {self.limits.max_rank} (server flag --max-rank)",
                    )
            full = complete_attrs(op, dict(attrs), name, _Label(name, op_name, source))
        elif op.attrs:
            full = complete_attrs(op, {}, name, _Label(name, op_name, source))
        else:
            full = {}
        try:
            if op.normalize is not None:
                full = op.normalize(*types, **full)
            out = op.infer(*types, **full)
        except ShapeError as exc:
            raise self._invalid(name, op_name, source, str(exc)) from None
        if out.shape != (types[0].shape if types else None):  # else checked already
            check_shape(out.shape, self.limits, _Label(name, op_name, source))
        if op.workspace is not None:  # a temporary is a tensor too: same limits
            check_shape(
                op.workspace(*types, **full),
                self.limits,
                f"{_Label(name, op_name, source)}: its largest temporary",
            )
        full = MappingProxyType(full) if full else _NO_ATTRS
        if key is not None and not op.names_itself:  # its attrs hold the node's name
            self._signatures[key] = (full, out)
        node = nodes[name] = Node(name, op_name, inputs, full, out, source, key)
        return node

    @staticmethod
    def _invalid(name: str, op: str, source: str, message: str) -> InvalidArgument:
        return InvalidArgument(f"{where(name, op, source)}: {message}")

    def graph(self, outputs: dict[str, str]) -> Graph:
        return Graph(self.name, self.nodes, outputs)
