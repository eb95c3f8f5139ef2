"""Domain values <-> protobuf messages, for the SDK and the server alike: tensors,
attributes, graphs, policies, metrics, and a graph's content id.

Decoding never trusts the message: anything malformed raises `WireError` (a
ValueError) naming the field, which the server answers with INVALID_ARGUMENT. Sizes
are the caller's to check (the server holds them to its limits before a tensor's
bytes are touched); tensors decode zero-copy (`tensor_view`) or into a new writable
array (`tensor_to_array`).

    >>> import numpy as np
    >>> message = array_to_tensor(np.arange(3.0))
    >>> tensor_to_array(message).tolist(), policy_from_proto(policy_to_proto(policies.EveryK(4)))
    ([0.0, 1.0, 2.0], EveryK(k=4))
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import dtypes, policies
from .results import Metrics, PlannerReport, TraceEvent, from_fields
from .spec import GraphSpec, InputSpec, NodeSpec, where
from .v1 import executor_pb2, graph_pb2, tensor_pb2

DTYPE_ENUM = {name: tensor_pb2.DType.Value(name.upper()) for name in dtypes.NAMES}
ENUM_DTYPE = {value: name for name, value in DTYPE_ENUM.items()}
# Wire enum -> (name, NumPy dtype): what decoding a tensor looks up, once.
ENUM_NUMPY = {value: (name, dtypes.NUMPY[name]) for value, name in ENUM_DTYPE.items()}
# The wire's NumPy dtypes -> wire enum: what encoding an array looks up.
_NUMPY_ENUM = {dtypes.NUMPY[name]: value for name, value in DTYPE_ENUM.items()}


class WireError(ValueError):
    """A message that does not decode; the text names the field."""


# --- tensors ---------------------------------------------------------------------------------
def dtype_name(enum_value: int, what: str) -> str:
    if enum_value not in ENUM_DTYPE:
        raise WireError(
            f"{what}: dtype {enum_value} is not supported (one of {', '.join(dtypes.NAMES)})"
        )
    return ENUM_DTYPE[enum_value]


def wire_array(value: Any, dtype: str | None = None) -> np.ndarray:
    """`value` as a C-contiguous little-endian array of a supported dtype (no copy when
    it already is one)."""
    array = value if dtype is None and type(value) is np.ndarray else np.asarray(value, dtype)
    if array.dtype in _NUMPY_ENUM and array.flags.c_contiguous:  # already as on the wire
        return array
    name = dtypes.name_of(array.dtype)
    if name is None:
        raise TypeError(
            f"dtype {array.dtype} is not supported; use one of {', '.join(dtypes.NAMES)}"
        )
    wire = dtypes.NUMPY[name]
    if array.dtype == wire and array.flags.c_contiguous:
        return array
    # Not ascontiguousarray: it turns a 0-d array into a 1-d one.
    return np.asarray(array, dtype=wire, order="C")


def fill_tensor(
    message: tensor_pb2.Tensor, value: Any, dtype: str | None = None, chunked: bool = False
) -> np.ndarray:
    """Write `value` into `message` in place (no intermediate message to copy); with
    `chunked`, only dtype and shape (its data goes in TensorChunks). Returns the array
    as it goes on the wire."""
    array = wire_array(value, dtype)
    message.dtype = _NUMPY_ENUM[array.dtype]
    message.shape[:] = array.shape
    if chunked:
        message.chunked = True
    else:
        message.data = array.tobytes()
    return array


def array_to_tensor(value: Any, dtype: str | None = None) -> tensor_pb2.Tensor:
    message = tensor_pb2.Tensor()
    fill_tensor(message, value, dtype)
    return message


def tensor_view(tensor: tensor_pb2.Tensor, what: str = "tensor") -> np.ndarray:
    """The tensor's data as a read-only array over the message's bytes (no copy).
    WireError if its dtype is unknown or its byte count does not match its shape;
    check the shape against any limits first."""
    kind = ENUM_NUMPY.get(tensor.dtype)
    if kind is None:
        dtype_name(tensor.dtype, what)  # raises, naming the field
    name, dtype = kind
    shape = tuple(tensor.shape[:])  # a slice is a list in one C call: 2x faster
    if shape and min(shape) < 0:
        raise WireError(f"{what}: shape {list(shape)} has a negative dimension")
    data = tensor.data
    expected = dtype.itemsize * math.prod(shape)
    if len(data) != expected:
        raise WireError(
            f"{what}: {len(data)} bytes of data, but {name} with shape "
            f"{list(shape)} needs {expected}"
        )
    return np.ndarray(shape, dtype, data)  # one object over the bytes: read-only


def reusable(array: np.ndarray | None, shape: tuple, dtype: np.dtype) -> bool:
    """Whether `array` can take a tensor's bytes as they are: a writable C-contiguous
    array of exactly that shape and (little-endian) dtype."""
    return (
        isinstance(array, np.ndarray)
        and array.shape == shape
        and array.dtype == dtype
        and array.dtype.isnative
        and array.flags.c_contiguous
        and array.flags.writeable
    )


def tensor_to_array(tensor: tensor_pb2.Tensor, reuse: np.ndarray | None = None) -> np.ndarray:
    """The tensor as a new writable array, or written into `reuse` when it fits."""
    data = tensor_view(tensor)
    if reuse is not None and reusable(reuse, data.shape, data.dtype):
        np.copyto(reuse, data)
        return reuse
    # Copy: the message's buffer is read-only and users expect writable arrays.
    if data.dtype.isnative:
        return data.copy()
    return data.astype(data.dtype.newbyteorder("="), copy=True)


# --- attributes ------------------------------------------------------------------------------
def attr_to_proto(value: Any) -> graph_pb2.AttrValue:
    if isinstance(value, (bool, np.bool_)):
        return graph_pb2.AttrValue(b=bool(value))
    if isinstance(value, (int, np.integer)):
        return graph_pb2.AttrValue(i=int(value))
    if isinstance(value, (float, np.floating)):
        return graph_pb2.AttrValue(f=float(value))
    if isinstance(value, str):
        return graph_pb2.AttrValue(s=value)
    if isinstance(value, np.ndarray):
        return graph_pb2.AttrValue(tensor=array_to_tensor(value))
    if isinstance(value, (tuple, list)):
        if any(isinstance(v, (float, np.floating)) for v in value):
            return graph_pb2.AttrValue(floats=graph_pb2.FloatList(values=[float(v) for v in value]))
        return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=[int(v) for v in value]))
    raise TypeError(f"cannot send attribute value {value!r} ({type(value).__name__})")


TensorDecoder = Callable[[tensor_pb2.Tensor, str], np.ndarray]


def _copy_tensor(tensor: tensor_pb2.Tensor, what: str) -> np.ndarray:
    return tensor_to_array(tensor)


def attr_from_proto(
    value: graph_pb2.AttrValue, what: str, tensor: TensorDecoder = _copy_tensor
) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        raise WireError(f"{what}: the attribute has no value set")
    if kind == "ints":
        return tuple(value.ints.values)
    if kind == "floats":
        return tuple(value.floats.values)
    if kind == "tensor":
        return tensor(value.tensor, what)
    return getattr(value, kind)


# --- graphs ----------------------------------------------------------------------------------
def graph_to_proto(spec: GraphSpec) -> graph_pb2.Graph:
    """The Graph message of a spec; attributes whose value is None are left out (None
    means "the op's default", and absence says the same)."""
    message = graph_pb2.Graph(name=spec.name)
    for item in spec.inputs:
        message.inputs.add(
            name=item.name, shape=item.shape, dtype=DTYPE_ENUM[item.dtype], source=item.source
        )
    add_node = message.nodes.add
    for node in spec.nodes:
        entry = add_node(name=node.name, op=node.op, inputs=node.inputs, source=node.source)
        for key, value in node.attrs.items():
            if value is not None:
                entry.attrs[key].CopyFrom(attr_to_proto(value))
    for name, node in spec.outputs:
        message.outputs.add(name=name, node=node)
    return message


def graph_from_proto(message: graph_pb2.Graph, tensor: TensorDecoder = _copy_tensor) -> GraphSpec:
    """The spec of a Graph message; attribute tensors go through `tensor(message, what)`
    (the server's checks them against its limits). Nothing else is validated here."""
    inputs = tuple(
        InputSpec(
            i.name, tuple(i.shape), dtype_name(i.dtype, where(i.name, "input", i.source)), i.source
        )
        for i in message.inputs
    )
    nodes = tuple(
        NodeSpec(
            n.name,
            n.op,
            tuple(n.inputs),
            {
                k: attr_from_proto(v, f"{where(n.name, n.op, n.source)}: attribute '{k}'", tensor)
                for k, v in n.attrs.items()
            }
            if n.attrs
            else {},
            n.source,
        )
        for n in message.nodes
    )
    outputs = tuple((o.name, o.node) for o in message.outputs)
    return GraphSpec(message.name, inputs, nodes, outputs)


def content_id(message) -> str:
    """The id every server knows a graph by: sha256 of its Graph message's deterministic
    serialization. An OnnxModel's bytes are hashed after its type's name, so a model and
    a graph can never share an id."""
    data = message.SerializeToString(deterministic=True)
    kind = message.DESCRIPTOR.full_name
    if kind != "remat.v1.Graph":
        data = kind.encode() + b"\0" + data
    return hashlib.sha256(data).hexdigest()


# --- policies --------------------------------------------------------------------------------
@functools.cache
def _wire_fields(cls: type) -> tuple[tuple[str, str], ...]:
    """(dataclass field, proto field) pairs of a policy class, from its table row."""
    kind = policies.KINDS[cls]
    return tuple((f.name, kind.wire_names.get(f.name, f.name)) for f in dataclasses.fields(cls))


@functools.lru_cache(maxsize=256)
def policy_bytes(policy: policies.Policy) -> bytes:
    """The serialized `Policy` oneof for a policy object (remembered: a loop sends the
    same one every call); `message.policy.MergeFromString(...)` sets it."""
    kind = policies.kind_of(policy)
    message = executor_pb2.Policy()
    part = getattr(message, kind.name)
    # CopyFrom sets the oneof even for a message without fields.
    part.CopyFrom(
        type(part)(**{wire: getattr(policy, field) for field, wire in _wire_fields(type(policy))})
    )
    return message.SerializeToString()


def policy_to_proto(policy: policies.Policy) -> executor_pb2.Policy:
    """The `Policy` oneof for a policy object (names are resolved before this)."""
    return executor_pb2.Policy.FromString(policy_bytes(policy))


def policy_from_proto(message: executor_pb2.Policy) -> policies.Policy:
    """The policy a `Policy` oneof names (unset: auto); WireError when its parameters
    are invalid (a constructor's check) or its name is unknown."""
    name = message.WhichOneof("kind")
    try:
        if name is None:
            return policies.Auto()
        if name == "name":
            return policies.resolve(message.name)
        kind = policies.BY_NAME[name]
        part = getattr(message, name)
        values = {}
        for field, wire in _wire_fields(kind.cls):
            value = getattr(part, wire)
            values[field] = value if isinstance(value, (int, float, str, bool)) else tuple(value)
        return kind.cls(**values)
    except (TypeError, ValueError) as error:
        raise WireError(_policy_error(name, str(error))) from None


def _policy_error(name: str | None, text: str) -> str:
    """A constructor's message in the wire's words: "policy optimal: time_limit_seconds
    must be ..." for "Optimal: time_limit must be ..."."""
    kind = policies.BY_NAME.get(name)
    if kind is None:  # a policy by name: the message names it
        return text
    text = text.removeprefix(f"{kind.cls.__name__}: ")
    for field, wire in kind.wire_names.items():
        text = re.sub(rf"\b{field}\b", wire, text)
    return f"policy {name}: {text}"


# --- results ---------------------------------------------------------------------------------
_METRIC_FIELDS = tuple(f.name for f in dataclasses.fields(Metrics) if f.name != "planner")


def field_names(message_type, record=None) -> dict:
    """A message type's field descriptors -> field names (with `record`, a dataclass,
    only the fields it has too: a field the .proto gained and the record did not yet
    is left out). Every request and response is read with one ListFields call mapped
    through this: on a freshly parsed message every attribute access builds a wrapper,
    and a descriptor's `name` is a new string each time.

        >>> names = field_names(executor_pb2.RunRequest)
        >>> request = executor_pb2.RunRequest(loss="loss")
        >>> {names[f]: value for f, value in request.ListFields()}
        {'loss': 'loss'}
    """
    keep = None if record is None else {f.name for f in dataclasses.fields(record)}
    return {f: f.name for f in message_type.DESCRIPTOR.fields if keep is None or f.name in keep}


_METRIC_NAMES = field_names(executor_pb2.Metrics, Metrics)
_REPORT_NAMES = field_names(executor_pb2.PlannerReport, PlannerReport)


def report_to_proto(report: PlannerReport | None) -> executor_pb2.PlannerReport | None:
    return None if report is None else executor_pb2.PlannerReport(**vars(report))


@functools.lru_cache(maxsize=64)
def _report_bytes(report: PlannerReport) -> bytes:
    """A report's wire form, remembered: a cached plan sends the same one every run."""
    return report_to_proto(report).SerializeToString()


def report_from_proto(message, field: str = "planner") -> PlannerReport | None:
    """The PlannerReport in `message.<field>`, or None when it is not set."""
    if not message.HasField(field):
        return None
    return _report(getattr(message, field))


def _report(message: executor_pb2.PlannerReport) -> PlannerReport:
    names = _REPORT_NAMES
    return from_fields(
        PlannerReport, {names[f]: value for f, value in message.ListFields() if f in names}
    )


def metrics_to_proto(metrics: Metrics) -> executor_pb2.Metrics:
    message = executor_pb2.Metrics()
    fill_metrics(message, metrics)
    return message


def fill_metrics(message: executor_pb2.Metrics, metrics: Metrics) -> None:
    """Write `metrics` into `message` in place (a response's own field: no message to
    build and copy). Only the fields that are set: a zero is not on the wire anyway,
    and this is every response's path."""
    for name in _METRIC_FIELDS:
        value = getattr(metrics, name)
        if value:
            setattr(message, name, value)
    if metrics.planner is not None:
        message.planner.MergeFromString(_report_bytes(metrics.planner))


def metrics_from_proto(message: executor_pb2.Metrics) -> Metrics:
    names = _METRIC_NAMES
    values = {names[f]: value for f, value in message.ListFields() if f in names}
    planner = values.get("planner")
    if planner is not None:
        data = planner.SerializeToString()
        values["planner"] = _report_of(data) if len(data) <= 4096 else _report(planner)
    return from_fields(Metrics, values)


@functools.lru_cache(maxsize=64)
def _report_of(data: bytes) -> PlannerReport:
    """The report a cached plan sends with every run, decoded once (reports are
    immutable, so one object serves every result)."""
    return _report(executor_pb2.PlannerReport.FromString(data))


def trace_to_proto(events: Iterable[TraceEvent]) -> list[executor_pb2.TraceEvent]:
    return [
        executor_pb2.TraceEvent(
            node=e.node,
            op=e.op,
            phase=e.phase,
            start_seconds=e.start_seconds,
            seconds=e.seconds,
            live_bytes=e.live_bytes,
        )
        for e in events
    ]


def trace_from_proto(events) -> tuple[TraceEvent, ...]:
    return tuple(
        TraceEvent(e.node, e.op, e.phase, e.start_seconds, e.seconds, e.live_bytes) for e in events
    )
