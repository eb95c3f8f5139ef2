"""The SDK's own results <-> protobuf (plan results, op infos) and saved graphs read
from bytes. Tensors, policies, metrics and graphs map through `remat_proto.wire`,
shared with the server."""

from __future__ import annotations

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from remat_proto import wire
from remat_proto.v1 import executor_pb2, graph_pb2

from .graph import Graph
from .results import AttrInfo, OpInfo, PlanResult


def graph_from_bytes(data: bytes) -> Graph:
    """A graph from a saved `remat.v1.Graph` message, binary or JSON (told apart by
    the first character); ValueError naming the format when it is not one."""
    message, is_json = graph_pb2.Graph(), data.lstrip()[:1] == b"{"
    try:
        if is_json:
            json_format.Parse(data.decode("utf-8"), message)
        else:
            message.ParseFromString(data)
        if not message.nodes or not message.outputs:
            raise ValueError("no nodes or no outputs")
        return Graph.from_proto(message)
    except (json_format.ParseError, DecodeError, UnicodeDecodeError, ValueError) as error:
        kind = "JSON" if is_json else "binary protobuf"
        raise ValueError(
            f"is not a remat graph ({kind}: {error}); expected the "
            "remat.v1.Graph message, binary or JSON"
        ) from None


def op_info_from_proto(message: executor_pb2.OpInfo) -> OpInfo:
    attrs = tuple(AttrInfo(a.name, a.type, a.required, a.doc) for a in message.attrs)
    return OpInfo(
        message.name,
        message.family,
        message.min_inputs,
        message.max_inputs,
        attrs,
        tuple(message.differentiable),
        message.residuals,
        message.doc,
    )


def plan_from_proto(message: executor_pb2.PlanResponse) -> PlanResult:
    schedule = tuple(
        (step.WhichOneof("kind"), getattr(step, step.WhichOneof("kind"))) for step in message.steps
    )
    return PlanResult(
        peak_bytes=message.peak_bytes,
        flops=message.flops,
        recompute_flops=message.recompute_flops,
        node_evaluations=dict(message.node_evaluations),
        timeline=tuple(message.timeline),
        schedule=schedule,
        policy=message.policy,
        recomputed_nodes=message.recomputed_nodes,
        plan_seconds=message.plan_seconds,
        input_bytes=message.input_bytes,
        planner=wire.report_from_proto(message),
        plan_cached=message.plan_cached,
    )
