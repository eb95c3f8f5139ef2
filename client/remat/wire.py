"""The SDK's wire layer: NumPy and Graph <-> protobuf. The only SDK module (with the
client) that touches generated types."""
from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format

from . import policies
from .graph import Graph, InputDef, NodeDef
from .results import AttrInfo, Metrics, OpInfo, PlannerReport, PlanResult, TraceEvent
from .v1 import executor_pb2, graph_pb2, tensor_pb2

_DTYPES = {"float32": tensor_pb2.FLOAT32, "float64": tensor_pb2.FLOAT64,
           "int32": tensor_pb2.INT32, "int64": tensor_pb2.INT64, "bool": tensor_pb2.BOOL}
_NAMES = {v: k for k, v in _DTYPES.items()}


def wire_array(value: Any, dtype: str | None = None) -> np.ndarray:
    """`value` as a C-contiguous little-endian array of a supported dtype (no copy when
    it already is one)."""
    array = np.asarray(value, dtype=dtype)
    if array.dtype.name not in _DTYPES:
        raise TypeError(f"dtype {array.dtype} is not supported; use one of {', '.join(_DTYPES)}")
    # Not ascontiguousarray: it turns a 0-d array into a 1-d one.
    return np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")


def fill_tensor(message: tensor_pb2.Tensor, value: Any, dtype: str | None = None,
                chunked: bool = False) -> np.ndarray:
    """Write `value` into `message` in place (no intermediate message to copy); with
    `chunked`, only dtype and shape (its data goes in TensorChunks). Returns the array
    as it goes on the wire."""
    array = wire_array(value, dtype)
    message.dtype = _DTYPES[array.dtype.name]
    message.shape[:] = array.shape
    if chunked:
        message.chunked = True
    else:
        message.data = array.tobytes()
    return array


def empty_array(tensor: tensor_pb2.Tensor, reuse: np.ndarray | None = None) -> np.ndarray:
    """A writable little-endian array for a chunked tensor's data (`native` converts
    it once complete): `reuse` when it fits (see `reusable`), else a new one."""
    dtype = np.dtype(_NAMES[tensor.dtype]).newbyteorder("<")
    if reusable(reuse, tuple(tensor.shape), dtype):
        return reuse
    return np.empty(tuple(tensor.shape), dtype=dtype)


def reusable(array: np.ndarray | None, shape: tuple, dtype: np.dtype) -> bool:
    """Whether `array` can take a tensor's bytes as they are: a writable C-contiguous
    array of exactly that shape and (little-endian) dtype."""
    return (isinstance(array, np.ndarray) and array.shape == shape and array.dtype == dtype
            and array.dtype.isnative and array.flags.c_contiguous and array.flags.writeable)


def native(array: np.ndarray) -> np.ndarray:
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def array_to_tensor(value: Any, dtype: str | None = None) -> tensor_pb2.Tensor:
    message = tensor_pb2.Tensor()
    fill_tensor(message, value, dtype)
    return message


def tensor_to_array(tensor: tensor_pb2.Tensor, reuse: np.ndarray | None = None) -> np.ndarray:
    """The tensor as a new writable array, or written into `reuse` when it fits."""
    dtype = np.dtype(_NAMES[tensor.dtype]).newbyteorder("<")
    data = np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))
    if reusable(reuse, data.shape, dtype):
        np.copyto(reuse, data)
        return reuse
    # Copy: the message's buffer is read-only and users expect writable arrays.
    return data.astype(dtype.newbyteorder("="), copy=True)


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


def attr_from_proto(value: graph_pb2.AttrValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "ints":
        return tuple(value.ints.values)
    if kind == "floats":
        return tuple(value.floats.values)
    if kind == "tensor":
        return tensor_to_array(value.tensor)
    return getattr(value, kind) if kind else None


def graph_to_proto(graph: Graph) -> graph_pb2.Graph:
    message = graph_pb2.Graph(name=graph.name)
    for item in graph.inputs:
        message.inputs.add(name=item.name, shape=item.shape, dtype=_DTYPES[item.dtype],
                           source=item.source)
    for node in graph.nodes:
        entry = message.nodes.add(name=node.name, op=node.op, inputs=node.inputs,
                                  source=node.source)
        for key, value in node.attrs.items():
            entry.attrs[key].CopyFrom(attr_to_proto(value))
    for name, node in graph.outputs.items():
        message.outputs.add(name=name, node=node)
    return message


def graph_from_proto(message: graph_pb2.Graph) -> Graph:
    graph = Graph(message.name)
    inputs = [InputDef(i.name, tuple(i.shape), _NAMES.get(i.dtype, "float32"), i.source)
              for i in message.inputs]
    nodes = [NodeDef(n.name, n.op, tuple(n.inputs),
                     {k: attr_from_proto(v) for k, v in n.attrs.items()}, n.source)
             for n in message.nodes]
    graph._restore(inputs, nodes, {o.name: o.node for o in message.outputs})
    return graph


def metrics_from_proto(message: executor_pb2.Metrics) -> Metrics:
    fields = {f: getattr(message, f) for f in Metrics.__dataclass_fields__ if f != "planner"}
    return Metrics(**fields, planner=report_from_proto(message, "planner"))


def report_from_proto(message, field: str) -> PlannerReport | None:
    if not message.HasField(field):
        return None
    report = getattr(message, field)
    return PlannerReport(**{f: getattr(report, f) for f in PlannerReport.__dataclass_fields__})


def trace_from_proto(events) -> tuple[TraceEvent, ...]:
    return tuple(TraceEvent(e.node, e.op, e.phase, e.start_seconds, e.seconds, e.live_bytes)
                 for e in events)


def op_info_from_proto(message: executor_pb2.OpInfo) -> OpInfo:
    attrs = tuple(AttrInfo(a.name, a.type, a.required, a.doc) for a in message.attrs)
    return OpInfo(message.name, message.family, message.min_inputs, message.max_inputs, attrs,
                  tuple(message.differentiable), message.residuals, message.doc)


def policy_to_proto(policy: policies.Policy) -> executor_pb2.Policy:
    """The `Policy` oneof for a policy object (names are resolved before this)."""
    pb = executor_pb2
    if isinstance(policy, policies.StoreAll):
        return pb.Policy(store_all=pb.StoreAll())
    if isinstance(policy, policies.RecomputeAll):
        return pb.Policy(recompute_all=pb.RecomputeAll())
    if isinstance(policy, policies.Sqrt):
        return pb.Policy(sqrt=pb.Sqrt())
    if isinstance(policy, policies.EveryK):
        return pb.Policy(every_k=pb.EveryK(k=policy.k))
    if isinstance(policy, policies.Revolve):
        return pb.Policy(revolve=pb.Revolve(slots=policy.slots))
    if isinstance(policy, policies.Checkpoints):
        return pb.Policy(checkpoints=pb.Checkpoints(names=policy.names))
    if isinstance(policy, policies.SaveOps):
        return pb.Policy(save_ops=pb.SaveOps(ops=policy.ops))
    if isinstance(policy, policies.Budget):
        return pb.Policy(budget=pb.Budget(bytes=policy.bytes, fraction=policy.fraction,
                                          profile=policy.profile))
    if isinstance(policy, policies.Optimal):
        return pb.Policy(optimal=pb.Optimal(bytes=policy.bytes, fraction=policy.fraction,
                                            time_limit_seconds=policy.time_limit))
    if isinstance(policy, policies.DTR):
        return pb.Policy(dtr=pb.DTR(bytes=policy.bytes, fraction=policy.fraction))
    if isinstance(policy, policies.Auto):
        return pb.Policy(auto=pb.Auto(bytes=policy.bytes))
    raise TypeError(f"expected a remat.policies object, got {type(policy).__name__}")


def plan_from_proto(message: executor_pb2.PlanResponse) -> PlanResult:
    schedule = tuple((step.WhichOneof("kind"), getattr(step, step.WhichOneof("kind")))
                     for step in message.steps)
    return PlanResult(
        peak_bytes=message.peak_bytes, flops=message.flops,
        recompute_flops=message.recompute_flops,
        node_evaluations=dict(message.node_evaluations), timeline=tuple(message.timeline),
        schedule=schedule, policy=message.policy, recomputed_nodes=message.recomputed_nodes,
        plan_seconds=message.plan_seconds, input_bytes=message.input_bytes,
        planner=report_from_proto(message, "planner"))


def graph_to_json(graph: Graph) -> str:
    return json_format.MessageToJson(graph_to_proto(graph))


def graph_from_json(text: str) -> Graph:
    return graph_from_proto(json_format.Parse(text, graph_pb2.Graph()))


def graph_from_bytes(data: bytes) -> Graph:
    """A graph from a saved `remat.v1.Graph` message, binary or JSON (told apart by
    the first character); ValueError naming the format when it is not one."""
    from google.protobuf.message import DecodeError

    message, is_json = graph_pb2.Graph(), data.lstrip()[:1] == b"{"
    try:
        if is_json:
            json_format.Parse(data.decode("utf-8"), message)
        else:
            message.ParseFromString(data)
    except (json_format.ParseError, DecodeError, UnicodeDecodeError) as error:
        kind = "JSON" if is_json else "binary protobuf"
        raise ValueError(f"is not a remat graph ({kind}: {error}); expected the remat.v1.Graph "
                         "message, binary or JSON") from None
    if not message.nodes or not message.outputs:
        raise ValueError("holds no remat graph (no nodes or no outputs); expected the "
                         "remat.v1.Graph message, binary or JSON")
    return graph_from_proto(message)
