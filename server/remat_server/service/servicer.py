"""The gRPC servicer: decode, call the engine, encode. Nothing else lives here.

Domain errors become gRPC statuses in one place (`_status`); anything unexpected is
INTERNAL with the exception's message, and the server keeps serving.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time

import grpc

from remat_proto import metadata
from remat_proto.policies import Auto, StoreAll, label
from remat_proto.v1 import executor_pb2, executor_pb2_grpc
from remat_proto.wire import field_names

from ..engine import Engine, RunRequest, gc_pause, max_abs_diff
from ..errors import Cancelled, DeadlineExceeded, InvalidArgument, RematError, ResponseTooLarge
from ..ops import REGISTRY
from ..runtime import allocator
from ..runtime.buffers import BufferPool
from . import codec, onnx_models, streaming, work_slots
from .admission import MemoryAdmission
from .graph_store import GraphStore, Registered

log = logging.getLogger(__name__)

_NO_GRAPH = executor_pb2.GraphRef()  # an unset graph reference: refused by `_graph`
_AUTO = Auto()  # what an unset policy means
_REQUEST_FIELDS = field_names(executor_pb2.RunRequest)

# Room in a message for everything but the tensors (metrics, trace, framing).
_RESPONSE_HEADROOM = 1 << 20


def _abort(context, method_name: str, exc: Exception):
    """Turn RematError into its status code and bugs into INTERNAL."""
    if isinstance(exc, RematError):
        if isinstance(exc, ResponseTooLarge):  # tells the SDK to resend with RunStream
            context.set_trailing_metadata(((metadata.USE_STREAM, "1"),))
        context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
    if isinstance(exc, RecursionError):  # defensive: every algorithm is iterative
        log.error("recursion in %s", method_name, exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL, "internal error: recursion too deep")
    log.error("unexpected error in %s", method_name, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _status(method):
    """A unary handler whose errors become statuses."""

    @functools.wraps(method)
    def handler(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            _abort(context, method.__name__, exc)

    return handler


def _status_stream(method):
    """A server-streaming handler whose errors (raised while streaming) become statuses."""

    @functools.wraps(method)
    def handler(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            _abort(context, method.__name__, exc)

    return handler


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(
        self,
        engine: Engine,
        store: GraphStore,
        admission: MemoryAdmission | None = None,
        *,
        metrics=None,
        chunk_bytes: int = 1 << 20,
        max_message_bytes: int = 512 << 20,
        max_upload_seconds: float = 600.0,
        buffers: BufferPool | None = None,
        trimmer: allocator.Trimmer | None = None,
    ):
        self.engine = engine
        self.buffers = buffers or BufferPool(0)
        self.trimmer = trimmer or allocator.Trimmer(on_idle=self._on_idle)
        self.store = store
        self.admission = admission or MemoryAdmission(0, 0)
        self._metered = self.admission.metered  # its capacity is fixed: read once
        self.metrics = metrics
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes
        # What a Run's outputs and gradients may weigh: one message, less the rest of it.
        self._max_response_bytes = max_message_bytes - min(
            _RESPONSE_HEADROOM, max_message_bytes // 4
        )
        self.max_upload_seconds = max_upload_seconds

    def _on_idle(self) -> None:
        """Once no request has started for a while: the full garbage collection a big
        compile left owed (`gc_pause`, off the requests' path), and the upload buffers
        given back; the trimmer then returns the memory both freed."""
        gc_pause.collect_if_owed()
        self.buffers.shrink()

    def _graph(self, ref: executor_pb2.GraphRef) -> Registered:
        """The graph a request refers to: registered, inline or an ONNX model."""
        kind = ref.WhichOneof("kind")
        if kind == "graph_id":
            if not ref.graph_id:  # set but empty: a malformed request, not a missing graph
                raise InvalidArgument("graph: graph_id is empty")
            return self.store.get(ref.graph_id)
        if kind == "onnx":
            return self._store_onnx(ref.onnx)
        if kind is None:
            raise InvalidArgument("graph: send a graph inline, a graph_id or an ONNX model")
        return self._store(ref.graph)

    def _store(self, message) -> Registered:
        """Parse and validate a graph, and keep it in the registry under its content id:
        an inline graph registers itself, so a client that got NOT_FOUND from this
        replica (evicted, or registered on another one) resends it once, not once per
        call. A graph the registry already holds is neither parsed nor validated again."""
        graph_id = codec.content_id(message)
        found = self.store.find(graph_id)
        if found is None:
            with gc_pause.paused(len(message.nodes)):  # a few objects per node, no garbage
                spec = codec.graph_from_proto(message, self.engine.limits)
            self.engine.validate(spec, graph_id)
            found = Registered(graph_id, spec)
            self.store.put(graph_id, found, found.nbytes)
        return found

    def _store_onnx(self, message: executor_pb2.OnnxModel) -> Registered:
        """Convert an ONNX model (limits checked before any work) and register it like
        an inline graph, with its initializers' values as the inputs' defaults."""
        graph_id = codec.content_id(message)
        found = self.store.find(graph_id)
        if found is None:
            spec, defaults = onnx_models.convert(message, self.engine.limits)
            self.engine.validate(spec, graph_id)
            found = Registered(graph_id, spec, defaults)
            self.store.put(graph_id, found, found.nbytes)
        return found

    @_status
    def RegisterGraph(self, request, context):
        if request.HasField("onnx"):
            if request.HasField("graph"):
                raise InvalidArgument("RegisterGraph: send a graph or an ONNX model, not both")
            registered = self._store_onnx(request.onnx)
        else:
            registered = self._store(request.graph)
        return executor_pb2.RegisterGraphResponse(graph_id=registered.graph_id)

    def _run_request(
        self,
        request: executor_pb2.RunRequest,
        policy=None,
        tensors: tuple[dict, dict] | None = None,
        graph: Registered | None = None,
    ) -> RunRequest:
        """The domain request; `tensors` (inputs, cotangents) and `graph` when already
        decoded. Inputs the request leaves out take the graph's defaults (an ONNX
        model's initializers)."""
        # The fields that are set, read in one call (see `wire.field_names`).
        names = _REQUEST_FIELDS
        fields = {names[f]: value for f, value in request.ListFields()}
        limits = self.engine.limits
        graph_id, spec, defaults = graph or self._graph(fields.get("graph", _NO_GRAPH))
        inputs, cotangents = tensors or (
            codec.tensors_to_arrays(fields.get("inputs", {}), limits, "input"),
            codec.tensors_to_arrays(fields["cotangents"], limits, "cotangent")
            if "cotangents" in fields
            else {},
        )
        if defaults:
            inputs = {**{k: v for k, v in defaults.items() if k not in inputs}, **inputs}
        if policy is None:
            policy = codec.policy_from_proto(fields["policy"]) if "policy" in fields else _AUTO
        return RunRequest(
            graph=spec,
            graph_id=graph_id,
            inputs=inputs,
            fetch=tuple(fields.get("fetch", ())),
            wrt=tuple(fields.get("wrt", ())),
            loss=fields.get("loss", ""),
            cotangents=cotangents,
            policy=policy,
            timeline=fields.get("timeline", False),
            measure_memory=fields.get("measure_memory", False),
            trace=fields.get("trace", False),
        )

    def _execute(self, run: RunRequest, context, max_response_bytes: int = 0):
        """Run with memory admission (waiting at most until the deadline); freed memory
        goes back to the OS when a request needs much less than is kept, or when idle
        (`allocator.Trimmer`)."""
        end = work_slots.call_end(context)
        ended, deadline = end.ended, end.deadline

        def admit(nbytes: int):
            self.trimmer.before(nbytes)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            return self.admission.reserve(nbytes, timeout=remaining, cancelled=ended)

        try:
            result = self.engine.run(
                run,
                should_stop=ended,
                admit=admit if self._metered else self._at_once,
                max_response_bytes=max_response_bytes,
                deadline=deadline,
            )
        except Cancelled:
            left = context.time_remaining()
            if left is not None and left <= 0:  # gRPC ends a call the same way at its deadline
                raise DeadlineExceeded(
                    "the request's deadline passed while it ran; "
                    "it was stopped and its memory freed"
                ) from None
            raise
        if self.metrics is not None:
            self.metrics.observe_run(result.metrics)
        return result

    def _at_once(self, nbytes: int) -> None:
        """The admission of a request when no memory budget is shared: run now."""
        self.trimmer.before(nbytes)

    @_status
    def Run(self, request, context):
        result = self._execute(self._run_request(request), context, self._max_response_bytes)
        response = _response_header(result)
        for name, array in result.outputs.items():
            codec.fill_tensor(response.outputs[name], array)
        for name, array in result.grads.items():
            codec.fill_tensor(response.grads[name], array)
        return response

    @_status_stream
    def RunStream(self, request_iterator, context):
        """Run with tensors in chunks both ways (see `streaming`)."""
        graph = []  # resolved from the header, before any tensor arrives
        overdue = threading.Event()

        def cut_off() -> None:  # a client that never finishes its upload must not hold a thread
            overdue.set()
            context.cancel()

        timer = threading.Timer(self.max_upload_seconds, cut_off)
        timer.start()
        try:
            upload = streaming.receive(
                _uploaded(request_iterator, context),
                self.engine.limits,
                on_header=lambda header: graph.append(self._graph(header.graph)),
                pool=self.buffers,
                # The header passed: the client may send chunks. (A refusal comes before
                # this, so a client that waits for it never writes into an ended call.)
                on_accepted=lambda: _accept(context),
            )
            tensors = upload.finish()
        except RematError:
            # Cut off, the upload may end as if the client had stopped sending (data
            # missing: INVALID_ARGUMENT): the call is CANCELLED, as its client sees it.
            if overdue.is_set():
                raise Cancelled(
                    f"the upload did not finish within {self.max_upload_seconds:g} s "
                    "(--max-upload-seconds)"
                ) from None
            raise
        finally:
            timer.cancel()
        run = self._run_request(upload.header, tensors=tensors, graph=graph[0])
        del upload  # the arrays live on in `run` only, so the executor can free them
        result = self._execute(run, context)
        del run
        yield from streaming.send(
            _response_header(result), result.outputs, result.grads, self.chunk_bytes
        )

    @_status_stream
    def Compare(self, request, context):
        """store_all first (the baseline), then each policy; one result as each completes.
        A policy that fails becomes a result with `error`; the baseline failing ends
        the call with its status."""
        chosen = [codec.policy_from_proto(p) for p in request.policies]
        chosen = [StoreAll()] + [p for p in chosen if not isinstance(p, StoreAll)]
        repeats = max(1, request.repeats)
        # Decoded once: every policy runs the same graph and tensors, and the engine
        # compiles (validates, differentiates) it once, then plans each policy.
        run = self._run_request(request.run, StoreAll())
        if request.warmup:
            self._execute(run, context)
        baseline = None
        for index, policy in enumerate(chosen):
            result = executor_pb2.CompareResult(
                index=index, total=len(chosen), policy=label(policy)
            )
            try:
                runs = [
                    self._execute(dataclasses.replace(run, policy=policy), context)
                    for _ in range(repeats)
                ]
            except RematError as exc:
                if baseline is None or isinstance(exc, (Cancelled, DeadlineExceeded)):
                    raise
                result.error, result.error_code = str(exc), exc.code
                yield result
                continue
            best = min(runs, key=lambda r: r.metrics.total_seconds)
            baseline = baseline or best
            result.metrics.CopyFrom(codec.metrics_to_proto(best.metrics))
            result.max_grad_diff = max_abs_diff(best.grads, baseline.grads)
            result.timeline.extend(best.timeline)
            result.trace.extend(codec.trace_to_proto(best.trace))
            yield result

    @_status
    def Differentiate(self, request, context):
        shapes = {name: tuple(dims.values) for name, dims in request.input_shapes.items()}
        graph_id, spec, _ = self._graph(request.graph)
        joint = self.engine.differentiate(
            spec, tuple(request.wrt), request.loss, shapes, graph_id=graph_id
        )
        return executor_pb2.DifferentiateResponse(
            graph=codec.graph_to_proto(joint.graph), grad_outputs=joint.grad_outputs
        )

    @_status
    def Plan(self, request, context):
        shapes = {name: tuple(dims.values) for name, dims in request.input_shapes.items()}
        graph_id, spec, _ = self._graph(request.graph)
        end = work_slots.call_end(context)
        try:
            planned = self.engine.plan(
                spec,
                graph_id=graph_id,
                wrt=tuple(request.wrt),
                loss=request.loss,
                cotangent_outputs=tuple(request.cotangent_outputs),
                policy=codec.policy_from_proto(request.policy),
                input_shapes=shapes,
                fetch=tuple(request.fetch),
                should_stop=end.ended,
                deadline=end.deadline,
            )
        finally:  # a solve, even a stopped one, leaves memory to give back when idle
            self.trimmer.planned()
        return codec.plan_to_proto(planned, request.include_schedule)

    @_status
    def ListOps(self, request, context):
        ops = [codec.op_to_proto(op) for _, op in sorted(REGISTRY.items())]
        return executor_pb2.ListOpsResponse(ops=ops)


def _response_header(result) -> executor_pb2.RunResponse:
    """Everything of a RunResponse but the tensors (filled in place: fewer messages to
    build and copy on every response's path)."""
    response = executor_pb2.RunResponse()
    codec.fill_metrics(response.metrics, result.metrics)
    if result.warnings:
        response.warnings.extend(result.warnings)
    if result.timeline:
        response.timeline.extend(result.timeline)
    if result.trace:
        response.trace.extend(codec.trace_to_proto(result.trace))
    return response


def _accept(context) -> None:
    """Tell a RunStream client it may send its chunks (the initial metadata); a call
    that ended meanwhile is the client's doing, not a server error to log."""
    try:
        context.send_initial_metadata(((metadata.ACCEPTED, "1"),))
    except (grpc.RpcError, ValueError):
        if context.is_active():
            raise
        _ended_by_client(context)


def _uploaded(request_iterator, context):
    """The client's messages; the call ending under us (cancelled, or its deadline
    passed) is the client's doing, not a server error to log."""
    try:
        yield from request_iterator
    except grpc.RpcError:
        _ended_by_client(context)


def _ended_by_client(context) -> None:
    """Raise what ended the call during an upload: its deadline, or the client."""
    left = context.time_remaining()
    if left is not None and left <= 0:
        raise DeadlineExceeded("the deadline passed during the upload") from None
    raise Cancelled("the client cancelled the upload") from None
