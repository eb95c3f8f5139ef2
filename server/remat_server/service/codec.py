"""Protobuf <-> domain conversion on the server: `remat_proto.wire`'s mappings, held to
the server's limits, with malformed input as InvalidArgument. Together with the
servicer, the only server code that sees generated `pb2` types.

Every decoded size is checked against the limits before NumPy touches the bytes, and
tensors are wrapped zero-copy (np.frombuffer): a request's bytes are read, never copied.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np

from remat_proto import dtypes, policies, wire
from remat_proto.spec import GraphSpec, InputSpec, NodeSpec
from remat_proto.v1 import executor_pb2, tensor_pb2
from remat_proto.wire import (  # noqa: F401
    content_id,
    fill_metrics,
    fill_tensor,
    metrics_to_proto,
    report_to_proto,
    trace_to_proto,
)

from ..checkpoint.schedule import Compute
from ..engine import Plan
from ..errors import InvalidArgument
from ..graph.ir import Graph
from ..graph.limits import Limits, check_shape
from ..ops.registry import OpDef


@contextlib.contextmanager
def _invalid():
    """A malformed message is the client's error: INVALID_ARGUMENT, naming the field."""
    try:
        yield
    except wire.WireError as error:
        raise InvalidArgument(str(error)) from None


# --- tensors ---------------------------------------------------------------------------
def tensor_type(tensor: tensor_pb2.Tensor, limits: Limits, what: str) -> tuple[str, tuple, int]:
    """(dtype name, shape, bytes) of a tensor message, checked against the limits."""
    dtype = wire.ENUM_DTYPE.get(tensor.dtype)
    if dtype is None:  # unsupported: the error, naming the field
        with _invalid():
            wire.dtype_name(tensor.dtype, what)
    shape = tuple(tensor.shape[:])  # see wire.tensor_view
    check_shape(shape, limits, what)
    return dtype, shape, dtypes.itemsize(dtype) * math.prod(shape)


def tensor_to_array(tensor: tensor_pb2.Tensor, limits: Limits, what: str) -> np.ndarray:
    """A read-only view of the tensor's bytes, its shape checked first."""
    dtype, shape, nbytes = tensor_type(tensor, limits, what)
    if tensor.chunked:
        raise InvalidArgument(
            f"{what}: marked chunked, but chunked tensors are only "
            "accepted by RunStream (send the data inline in Run)"
        )
    data = tensor.data
    if len(data) != nbytes:
        with _invalid():
            return wire.tensor_view(tensor, what)  # raises, naming the mismatch
    # A read-only array over the bytes, in one object (frombuffer, then reshape: two).
    return np.ndarray(shape, dtypes.NUMPY[dtype], data)


def tensors_to_arrays(tensors, limits: Limits, what: str) -> dict[str, np.ndarray]:
    """`tensor_to_array` of each tensor of a request's map. A tensor well within every
    limit takes the short way, the same checks in fewer steps (every request's path);
    any other goes through `tensor_to_array`, which names what is wrong."""
    arrays = {}
    # By key, not `items()`: a protobuf map's items() is collections.abc's, in Python.
    for name in tensors:
        tensor = tensors[name]
        kind = wire.ENUM_NUMPY.get(tensor.dtype)
        shape = tuple(tensor.shape[:])
        data = tensor.data
        if (
            kind is not None
            and len(shape) <= limits.max_rank
            and (not shape or (min(shape) >= 0 and max(shape) <= limits.max_dim))
            and (elements := math.prod(shape)) <= limits.max_elements
            and len(data) == kind[1].itemsize * elements
            and not tensor.chunked
        ):
            arrays[name] = np.ndarray(shape, kind[1], data)
        else:
            arrays[name] = tensor_to_array(tensor, limits, f"{what} '{name}'")
    return arrays


# --- graphs and policies ---------------------------------------------------------------------
def graph_from_proto(message, limits: Limits) -> GraphSpec:
    with _invalid():
        return wire.graph_from_proto(
            message, lambda tensor, what: tensor_to_array(tensor, limits, what)
        )


def graph_to_proto(graph: Graph):
    """A validated graph (a joint graph, for Differentiate) as a Graph message."""
    nodes = tuple(
        NodeSpec(n.name, n.op, n.inputs, n.attrs, n.source) for n in graph if not n.is_input
    )
    inputs = tuple(InputSpec(n.name, n.shape, n.dtype, n.source) for n in graph.inputs)
    return wire.graph_to_proto(GraphSpec(graph.name, inputs, nodes, tuple(graph.outputs.items())))


def policy_from_proto(message: executor_pb2.Policy) -> policies.Policy:
    data = message.SerializeToString()
    if len(data) <= _MEMO_POLICY_BYTES:  # a loop sends the same few policies
        return _policy_from_bytes(data)
    with _invalid():
        return wire.policy_from_proto(message)


# Policies whose wire form is at most this long are parsed once (a bounded memo: a
# policy message is a few bytes, but its strings come from the client).
_MEMO_POLICY_BYTES = 256


@functools.lru_cache(maxsize=256)
def _policy_from_bytes(data: bytes) -> policies.Policy:
    """The policy of a serialized `Policy` (policies are immutable: shared safely). An
    invalid one raises, and is not remembered."""
    with _invalid():
        return wire.policy_from_proto(executor_pb2.Policy.FromString(data))


# --- responses ---------------------------------------------------------------------------
def plan_to_proto(plan: Plan, include_schedule: bool) -> executor_pb2.PlanResponse:
    sim, graph = plan.simulation, plan.joint.graph
    response = executor_pb2.PlanResponse(
        peak_bytes=sim.peak_bytes,
        flops=sim.flops,
        recompute_flops=sim.recompute_flops,
        node_evaluations=dict(sim.evaluations),
        timeline=sim.timeline,
        policy=plan.policy,
        recomputed_nodes=sim.recomputed_nodes,
        plan_seconds=plan.seconds,
        input_bytes=sum(node.type.nbytes for node in graph.inputs),
        planner=report_to_proto(plan.schedule.report),
        plan_cached=plan.cached,
    )
    if include_schedule:
        response.steps.extend(
            executor_pb2.Step(compute=step.node)
            if isinstance(step, Compute)
            else executor_pb2.Step(free=step.node)
            for step in plan.schedule.steps
        )
    return response


def op_to_proto(op: OpDef) -> executor_pb2.OpInfo:
    arity = op.min_inputs if op.max_inputs < 0 else op.max_inputs
    info = executor_pb2.OpInfo(
        name=op.name,
        family=op.family,
        min_inputs=op.min_inputs,
        max_inputs=op.max_inputs,
        differentiable=[
            op.differentiable(i) for i in range(max(arity, 1 if op.max_inputs < 0 else 0))
        ],
        residuals=op.residuals,
        doc=op.doc,
    )
    for name, attr in op.attrs.items():
        info.attrs.add(
            name=name,
            type=attr.type,
            required=attr.required,
            doc=" ".join(p for p in (attr.doc, attr.requirement) if p),
        )
    return info
