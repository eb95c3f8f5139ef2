"""Loading an ONNX model and the checks made before any work starts.

An ONNX file is a program from a stranger: its size is checked before it is parsed,
its node count, opset and tensor sizes before anything is converted or allocated, and
nothing in it is ever executed (no custom domains, no local functions, no subgraphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from google.protobuf.message import DecodeError

from .errors import OnnxImportError
from .tensors import nbytes_of

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OnnxLimits:
    """What an imported model may cost, each checked before the work it bounds.

    >>> OnnxLimits(max_nodes=10).max_nodes
    10
    """

    max_model_bytes: int = (2 << 30) - 1  # protobuf's own ceiling
    max_nodes: int = 100_000
    max_initializer_bytes: int = 8 << 30  # all initializers, external data included
    max_folded_elements: int = 1 << 24  # any constant folded (or read) at import
    min_opset: int = 13
    max_opset: int = 21


def load_model(model, limits: OnnxLimits) -> onnx.ModelProto:
    """`model` (bytes or a ModelProto) as a ModelProto, its size checked first."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        size = len(model)
        _check_size(size, limits)
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(bytes(model))
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise OnnxImportError(f"model: not a valid ONNX model ({exc})") from None
        return proto
    if isinstance(model, onnx.ModelProto):
        _check_size(model.ByteSize(), limits)
        return model
    raise TypeError(f"an ONNX model is bytes or an onnx.ModelProto, got {type(model).__name__}")


def _check_size(size: int, limits: OnnxLimits) -> None:
    if size > limits.max_model_bytes:
        raise OnnxImportError(
            f"model: {size} bytes, over the limit of {limits.max_model_bytes} "
            "(OnnxLimits.max_model_bytes)"
        )


def node_label(node: onnx.NodeProto, index: int | None = None) -> str:
    """How errors name a node: "node '/conv1/Conv' (Conv)"."""
    if node.name:
        return f"node '{node.name}' ({node.op_type})"
    first = next((o for o in node.output if o), "")
    where = f"#{index}" if index is not None else "(unnamed)"
    return f"node {where} ({node.op_type}, output '{first}')"


def check_model(proto: onnx.ModelProto, limits: OnnxLimits) -> tuple[int, list[tuple[str, str]]]:
    """The default-domain opset, and the structural problems found (custom domains,
    subgraphs, ...) as (op type, message) pairs, to be listed with the unsupported ops.
    Over-limit sizes, a bad opset and local functions raise at once."""
    graph = proto.graph
    opset = _opset(proto, limits)
    if len(proto.functions):
        names = ", ".join(f"'{f.domain}:{f.name}'" for f in list(proto.functions)[:5])
        raise OnnxImportError(
            f"model.functions: {len(proto.functions)} model-local functions ({names}) are not "
            "supported; export without local functions (they are never inlined)"
        )
    if len(graph.node) > limits.max_nodes:
        raise OnnxImportError(
            f"graph: {len(graph.node)} nodes, over the limit of {limits.max_nodes} "
            "(OnnxLimits.max_nodes)"
        )
    if len(graph.sparse_initializer):
        raise OnnxImportError("graph.sparse_initializer: sparse initializers are not supported")
    total = 0
    for tensor in graph.initializer:
        total += nbytes_of(tensor, f"initializer '{tensor.name}'")
        if total > limits.max_initializer_bytes:
            raise OnnxImportError(
                f"initializers: more than {limits.max_initializer_bytes} bytes in total "
                f"(at '{tensor.name}'; OnnxLimits.max_initializer_bytes)"
            )
    problems = []
    for index, node in enumerate(graph.node):
        label = node_label(node, index)
        if node.domain not in DEFAULT_DOMAINS:
            problems.append(
                (node.op_type, f"{label}: custom domain '{node.domain}' is not supported")
            )
            continue
        for attr in node.attribute:
            if attr.ref_attr_name:
                problems.append(
                    (
                        node.op_type,
                        f"{label}: attribute '{attr.name}' refers to a function attribute",
                    )
                )
            elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                message = (
                    f"{label}: attribute '{attr.name}' holds a subgraph; control flow "
                    "(If, Loop, Scan) is not supported"
                )
                problems.append((node.op_type, message))
    return opset, problems


def _opset(proto: onnx.ModelProto, limits: OnnxLimits) -> int:
    versions = {entry.version for entry in proto.opset_import if entry.domain in DEFAULT_DOMAINS}
    if not versions:
        raise OnnxImportError("model.opset_import: the model imports no default ('ai.onnx') opset")
    if len(versions) > 1:
        raise OnnxImportError(
            f"model.opset_import: conflicting default opset versions {sorted(versions)}"
        )
    (opset,) = versions
    if not limits.min_opset <= opset <= limits.max_opset:
        raise OnnxImportError(
            f"model.opset_import: opset {opset} is not supported "
            f"(supported: {limits.min_opset} to {limits.max_opset})"
        )
    return opset


def count_elements(shape, limit: int, what: str) -> int:
    """The element count of `shape`, raising as soon as it passes `limit` (a hostile
    shape costs no big-number work)."""
    count = 1
    for dim in shape:
        if dim < 0:
            raise OnnxImportError(f"{what}: negative dimension in shape {tuple(shape)}")
        count *= dim
        if count > limit:
            raise OnnxImportError(
                f"{what}: shape {tuple(shape)} has more than {limit} elements "
                "(OnnxLimits.max_folded_elements)"
            )
    return count


def schema_problems(node, opset: int) -> list[str]:
    """The node against its ONNX schema at the model's opset (a table lookup; nothing
    runs): the op exists there, its input and output counts, its attribute names."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return [f"op: {node.op_type} does not exist in opset {opset}"]
    problems = []
    inputs, outputs = len(node.input), len(node.output)
    if not schema.min_input <= inputs <= schema.max_input:
        problems.append(
            f"input count {inputs} (the schema takes {schema.min_input} to {schema.max_input})"
        )
    if not schema.min_output <= outputs <= schema.max_output:
        problems.append(
            f"output count {outputs} (the schema has {schema.min_output} to {schema.max_output})"
        )
    unknown = sorted({a.name for a in node.attribute} - set(schema.attributes))
    problems += [f"attribute '{name}' (not in the schema)" for name in unknown]
    return problems
