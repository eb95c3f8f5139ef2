"""The gRPC servicer: decode, call the engine, encode. Nothing else lives here.

Domain errors become gRPC statuses in one place (`_status`); anything unexpected is
INTERNAL with the exception's message, and the server keeps serving.
"""
from __future__ import annotations

import functools
import logging

import grpc

from remat.v1 import executor_pb2, executor_pb2_grpc

from . import allocator, codec
from .build import validate_spec
from .engine import Engine, RunRequest
from .errors import InvalidArgument, RematError
from .graph_store import GraphStore
from .ir import GraphSpec
from .ops import REGISTRY

log = logging.getLogger(__name__)


def _status(method):
    """Run a handler, turning RematError into its status code and bugs into INTERNAL."""
    @functools.wraps(method)
    def handler(self, request, context):
        try:
            return method(self, request, context)
        except RematError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        except RecursionError:  # defensive: every algorithm is iterative
            log.exception("recursion in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error: recursion too deep")
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("unexpected error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    return handler


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, engine: Engine, store: GraphStore):
        self.engine = engine
        self.store = store

    def _graph(self, ref: executor_pb2.GraphRef) -> GraphSpec:
        kind = ref.WhichOneof("kind")
        if kind == "graph_id":
            if not ref.graph_id:  # set but empty: a malformed request, not a missing graph
                raise InvalidArgument("graph: graph_id is empty")
            return self.store.get(ref.graph_id)
        if kind is None:
            raise InvalidArgument("graph: send a graph inline or a graph_id")
        return codec.graph_from_proto(ref.graph, self.engine.limits)

    @_status
    def RegisterGraph(self, request, context):
        spec = codec.graph_from_proto(request.graph, self.engine.limits)
        validate_spec(spec, self.engine.limits)
        graph_id = codec.content_id(request.graph)
        self.store.put(graph_id, spec, request.graph.ByteSize())
        return executor_pb2.RegisterGraphResponse(graph_id=graph_id)

    @_status
    def Run(self, request, context):
        limits = self.engine.limits
        run = RunRequest(
            graph=self._graph(request.graph),
            inputs=codec.tensors_to_arrays(request.inputs, limits, "input"),
            fetch=tuple(request.fetch), wrt=tuple(request.wrt), loss=request.loss,
            cotangents=codec.tensors_to_arrays(request.cotangents, limits, "cotangent"),
            policy=codec.policy_from_proto(request.policy), timeline=request.timeline,
            measure_memory=request.measure_memory)
        try:
            result = self.engine.run(run, should_stop=lambda: not context.is_active())
        finally:
            allocator.release_free_memory()
        response = executor_pb2.RunResponse(metrics=codec.metrics_to_proto(result.metrics),
                                            warnings=result.warnings, timeline=result.timeline)
        for name, array in result.outputs.items():
            codec.fill_tensor(response.outputs[name], array)
        for name, array in result.grads.items():
            codec.fill_tensor(response.grads[name], array)
        return response

    @_status
    def Differentiate(self, request, context):
        shapes = {name: tuple(dims.values) for name, dims in request.input_shapes.items()}
        joint = self.engine.differentiate(self._graph(request.graph), tuple(request.wrt),
                                          request.loss, shapes)
        return executor_pb2.DifferentiateResponse(graph=codec.graph_to_proto(joint.graph),
                                                  grad_outputs=joint.grad_outputs)

    @_status
    def Plan(self, request, context):
        shapes = {name: tuple(dims.values) for name, dims in request.input_shapes.items()}
        planned = self.engine.plan(
            self._graph(request.graph), wrt=tuple(request.wrt), loss=request.loss,
            cotangent_outputs=tuple(request.cotangent_outputs),
            policy=codec.policy_from_proto(request.policy), input_shapes=shapes,
            fetch=tuple(request.fetch))
        return codec.plan_to_proto(planned, request.include_schedule)

    @_status
    def ListOps(self, request, context):
        ops = [codec.op_to_proto(op) for _, op in sorted(REGISTRY.items())]
        return executor_pb2.ListOpsResponse(ops=ops)

