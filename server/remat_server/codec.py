"""Protobuf <-> domain conversion. Together with the servicer, the only server code
that sees generated `pb2` types.

Every decoded size is checked against the limits before NumPy touches the bytes, and
tensors are wrapped zero-copy (np.frombuffer): a request's bytes are read, never copied.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from remat.v1 import executor_pb2, graph_pb2, tensor_pb2

from . import dtypes
from .checkpoint import policies
from .checkpoint.schedule import Compute, PlannerReport
from .engine import Metrics, Plan
from .errors import InvalidArgument, where
from .ir import Graph, GraphSpec, InputSpec, NodeSpec
from .limits import Limits, check_shape
from .ops.registry import OpDef

_DTYPE_TO_ENUM = {
    "float32": tensor_pb2.FLOAT32, "float64": tensor_pb2.FLOAT64, "int32": tensor_pb2.INT32,
    "int64": tensor_pb2.INT64, "bool": tensor_pb2.BOOL,
}
_ENUM_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ENUM.items()}


def _dtype_name(enum_value: int, what: str) -> str:
    if enum_value not in _ENUM_TO_DTYPE:
        raise InvalidArgument(f"{what}: dtype {enum_value} is not supported "
                              f"(one of {', '.join(_DTYPE_TO_ENUM)})")
    return _ENUM_TO_DTYPE[enum_value]


# --- tensors ---------------------------------------------------------------------------
def tensor_type(tensor: tensor_pb2.Tensor, limits: Limits, what: str) -> tuple[str, tuple, int]:
    """(dtype name, shape, bytes) of a tensor message, checked against the limits."""
    dtype = _dtype_name(tensor.dtype, what)
    shape = tuple(tensor.shape)
    check_shape(shape, limits, what)
    return dtype, shape, dtypes.itemsize(dtype) * math.prod(shape)


def tensor_to_array(tensor: tensor_pb2.Tensor, limits: Limits, what: str) -> np.ndarray:
    dtype, shape, expected = tensor_type(tensor, limits, what)
    if tensor.chunked:
        raise InvalidArgument(f"{what}: marked chunked, but chunked tensors are only "
                              "accepted by RunStream (send the data inline in Run)")
    if len(tensor.data) != expected:
        raise InvalidArgument(f"{what}: {len(tensor.data)} bytes of data, but {dtype} with shape "
                              f"{list(shape)} needs {expected}")
    return np.frombuffer(tensor.data, dtype=dtypes.NUMPY[dtype]).reshape(shape)


def fill_tensor(message: tensor_pb2.Tensor, array: np.ndarray, chunked: bool = False) -> None:
    """Write `array` into `message` in place (no intermediate message to copy); with
    `chunked`, only its dtype and shape (the data follows as TensorChunks)."""
    name = dtypes.of_array(array)
    message.dtype = _DTYPE_TO_ENUM[name]
    message.shape[:] = array.shape
    if chunked:
        message.chunked = True
    else:
        message.data = np.ascontiguousarray(array, dtype=dtypes.NUMPY[name]).tobytes()


def array_to_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    message = tensor_pb2.Tensor()
    fill_tensor(message, array)
    return message


def tensors_to_arrays(tensors, limits: Limits, what: str) -> dict[str, np.ndarray]:
    return {name: tensor_to_array(t, limits, f"{what} '{name}'") for name, t in tensors.items()}


# --- attributes ----------------------------------------------------------------------------
def attr_from_proto(value: graph_pb2.AttrValue, limits: Limits, what: str) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        raise InvalidArgument(f"{what}: the attribute has no value set")
    if kind == "ints":
        return tuple(value.ints.values)
    if kind == "floats":
        return tuple(value.floats.values)
    if kind == "tensor":
        return tensor_to_array(value.tensor, limits, what)
    return getattr(value, kind)


def attr_to_proto(value: Any) -> graph_pb2.AttrValue:
    if isinstance(value, bool):
        return graph_pb2.AttrValue(b=value)
    if isinstance(value, int):
        return graph_pb2.AttrValue(i=value)
    if isinstance(value, float):
        return graph_pb2.AttrValue(f=value)
    if isinstance(value, str):
        return graph_pb2.AttrValue(s=value)
    if isinstance(value, np.ndarray):
        return graph_pb2.AttrValue(tensor=array_to_tensor(value))
    if isinstance(value, (tuple, list)) and any(isinstance(v, float) for v in value):
        return graph_pb2.AttrValue(floats=graph_pb2.FloatList(values=value))
    if isinstance(value, (tuple, list)):
        return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=value))
    raise TypeError(f"cannot encode attribute value {value!r}")


# --- graphs ------------------------------------------------------------------------------
def graph_from_proto(graph: graph_pb2.Graph, limits: Limits) -> GraphSpec:
    inputs = tuple(
        InputSpec(i.name, tuple(i.shape), _dtype_name(i.dtype, where(i.name, "input", i.source)),
                  i.source)
        for i in graph.inputs)
    nodes = tuple(
        NodeSpec(n.name, n.op, tuple(n.inputs),
                 {k: attr_from_proto(v, limits, f"{where(n.name, n.op, n.source)}: attribute '{k}'")
                  for k, v in n.attrs.items()}, n.source)
        for n in graph.nodes)
    outputs = tuple((o.name, o.node) for o in graph.outputs)
    return GraphSpec(graph.name, inputs, nodes, outputs)


def graph_to_proto(graph: Graph) -> graph_pb2.Graph:
    message = graph_pb2.Graph(name=graph.name)
    for node in graph:
        if node.is_input:
            message.inputs.add(name=node.name, shape=node.shape,
                               dtype=_DTYPE_TO_ENUM[node.dtype], source=node.source)
            continue
        item = message.nodes.add(name=node.name, op=node.op, inputs=node.inputs,
                                 source=node.source)
        for key, value in node.attrs.items():
            if value is not None:  # None means "the default"; absence says the same
                item.attrs[key].CopyFrom(attr_to_proto(value))
    for name, node in graph.outputs.items():
        message.outputs.add(name=name, node=node)
    return message


def content_id(graph: graph_pb2.Graph) -> str:
    """sha256 of the canonical (deterministic) serialization."""
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()


# --- policies ----------------------------------------------------------------------------
def policy_from_proto(policy: executor_pb2.Policy) -> policies.Policy:
    kind = policy.WhichOneof("kind")
    if kind is None:
        return policies.Auto()
    if kind == "name":
        return policies.by_name(policy.name)
    value = getattr(policy, kind)
    return {
        "store_all": lambda: policies.StoreAll(),
        "recompute_all": lambda: policies.RecomputeAll(),
        "sqrt": lambda: policies.Sqrt(),
        "every_k": lambda: policies.EveryK(value.k),
        "checkpoints": lambda: policies.Checkpoints(tuple(value.names)),
        "save_ops": lambda: policies.SaveOps(tuple(value.ops)),
        "revolve": lambda: policies.Revolve(value.slots),
        "budget": lambda: policies.Budget(value.bytes, value.fraction, value.profile),
        "optimal": lambda: policies.Optimal(value.bytes, value.fraction,
                                            value.time_limit_seconds),
        "dtr": lambda: policies.DTR(value.bytes, value.fraction),
        "auto": lambda: policies.Auto(value.bytes),
    }[kind]()


def report_to_proto(report: PlannerReport | None) -> executor_pb2.PlannerReport | None:
    return None if report is None else executor_pb2.PlannerReport(**vars(report))


def plan_to_proto(plan: Plan, include_schedule: bool) -> executor_pb2.PlanResponse:
    sim, graph = plan.simulation, plan.joint.graph
    response = executor_pb2.PlanResponse(
        peak_bytes=sim.peak_bytes, flops=sim.flops, recompute_flops=sim.recompute_flops,
        node_evaluations=dict(sim.evaluations), timeline=sim.timeline, policy=plan.policy,
        recomputed_nodes=sim.recomputed_nodes, plan_seconds=plan.seconds,
        input_bytes=sum(node.type.nbytes for node in graph.inputs),
        planner=report_to_proto(plan.schedule.report))
    if include_schedule:
        response.steps.extend(
            executor_pb2.Step(compute=step.node) if isinstance(step, Compute)
            else executor_pb2.Step(free=step.node) for step in plan.schedule.steps)
    return response


# --- responses ---------------------------------------------------------------------------
def trace_to_proto(events) -> list[executor_pb2.TraceEvent]:
    return [executor_pb2.TraceEvent(node=node, op=op, phase=phase, start_seconds=start,
                                    seconds=seconds, live_bytes=live)
            for node, op, phase, start, seconds, live in events]


def metrics_to_proto(metrics: Metrics) -> executor_pb2.Metrics:
    fields = dict(vars(metrics))
    fields["planner"] = report_to_proto(fields["planner"])
    return executor_pb2.Metrics(**fields)


def op_to_proto(op: OpDef) -> executor_pb2.OpInfo:
    arity = op.min_inputs if op.max_inputs < 0 else op.max_inputs
    info = executor_pb2.OpInfo(
        name=op.name, family=op.family, min_inputs=op.min_inputs, max_inputs=op.max_inputs,
        differentiable=[op.differentiable(i) for i in range(max(arity, 1 if op.max_inputs < 0
                                                                 else 0))],
        residuals=op.residuals, doc=op.doc)
    for name, attr in op.attrs.items():
        info.attrs.add(name=name, type=attr.type, required=attr.required,
                       doc=" ".join(p for p in (attr.doc, attr.requirement) if p))
    return info
