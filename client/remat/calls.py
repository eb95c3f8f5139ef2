"""Each SDK call written once, with no I/O: `Client` and `AsyncClient` drive the same
flows, so they cannot diverge.

A flow is a generator. It yields the RPCs it needs, `Unary(method, request)` or
`Stream(request, chunked, out)` (a RunStream upload and download), and receives each
reply, or has the call's `remat.RematError` thrown into it, which it may handle:

- a graph goes by its content id once this client has sent it (`Session`); a server
  that answers NOT_FOUND (evicted, or another replica) gets it inline, once, and an
  inline graph registers itself there, so a graph's first use needs no separate
  RegisterGraph round trip;
- tensors over `STREAM_THRESHOLD_BYTES` go over RunStream; so does a Run whose results
  the server says are too big for one message (RESOURCE_EXHAUSTED with
  `remat-use-stream` in its trailing metadata).

Its return value is the call's result. A driver performs each RPC with retries on
UNAVAILABLE (`remat.retries`: backoff with jitter, all within the call's one deadline), on
the client's round-robin channel, or, for a shard of a sharded run, on the replica
its `Placement` names (which moves on to the next replica when one fails).

    >>> import numpy as np, remat
    >>> g = remat.Graph("g")
    >>> x = g.input("x", (2,), "float64")
    >>> _ = g.output("loss", remat.sum(x * x))
    >>> flow = run(Session(), g, {"x": np.ones(2)}, wrt=["x"], loss="loss")
    >>> op = next(flow)
    >>> type(op).__name__, op.method, op.request.graph.WhichOneof("kind")
    ('Unary', 'Run', 'graph')
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from remat_proto import metadata, policies, wire
from remat_proto.results import Metrics, from_fields
from remat_proto.v1 import executor_pb2

from . import compare, targets
from .compare import ComparisonRow
from .errors import NotFoundError, ResourceExhaustedError
from .graph import Graph
from .results import RunResult
from .retries import Retry
from .streaming import COTANGENT, GRAD, INPUT, OUTPUT, previous
from .wire import op_info_from_proto, plan_from_proto

# Tensors above this many bytes in total go through RunStream: below it one message is
# cheaper, above it chunks keep every message small and memory flat.
STREAM_THRESHOLD_BYTES = 1 << 20
# The SDK's gRPC message ceiling (gRPC's own default of 4 MiB is too small for tensors).
DEFAULT_MAX_MESSAGE_BYTES = 512 << 20


class Unary(NamedTuple):
    """A unary RPC: `method` of the Executor service (a tuple: every call yields one)."""

    method: str
    request: Any


@dataclass(frozen=True)
class Stream:
    """A RunStream call; the reply is (header, outputs, grads)."""

    request: executor_pb2.RunRequest
    chunked: dict  # (role, name) -> the array to send in chunks
    out: RunResult | None = None


Flow = Generator[Any, Any, Any]


class Session:
    """What a client remembers between calls: the graphs it has sent (by content id),
    which its server(s) now hold."""

    def __init__(self):
        self.sent: set[str] = set()


# --- channels --------------------------------------------------------------------------------
def channel_options(max_message_bytes: int, retry: Retry, extra: Iterable = ()) -> list:
    """The SDK's channel arguments: message ceilings, reconnects paced by `retry`,
    round-robin balancing over the target's addresses, then the caller's own (which
    win)."""
    extra = list(extra)
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *reconnect_options(retry),
        *targets.balancing_options(extra),
        *extra,
    ]


def reconnect_options(retry: Retry) -> list[tuple[str, int]]:
    """Channel arguments that keep gRPC's reconnect backoff within `retry`'s schedule.

    After a failed connection a channel waits 1 s (growing to 120 s) before it tries
    again, and meanwhile every call fails at once with UNAVAILABLE: retries of a call
    to a server that is starting or restarting would never reach it.

        >>> dict(reconnect_options(Retry(initial_backoff=0.1, max_backoff=2.0)))
        {'grpc.initial_reconnect_backoff_ms': 100, 'grpc.max_reconnect_backoff_ms': 2000}
    """
    initial = max(1, round(retry.initial_backoff * 1000))
    return [
        ("grpc.initial_reconnect_backoff_ms", initial),
        ("grpc.max_reconnect_backoff_ms", max(initial, round(retry.max_backoff * 1000))),
    ]


def start_in_process_server(config=None):
    """(server, target, max message bytes) of a real server started on a loopback
    ephemeral port in this process, for `Client.in_process()` and
    `AsyncClient.in_process()`. The only place the SDK imports the server."""
    from dataclasses import replace

    from remat_server import ServerConfig, create_server

    config = replace(config or ServerConfig(), host="127.0.0.1", port=0)
    server, port = create_server(config)
    server.start()
    return server, f"127.0.0.1:{port}", config.max_message_bytes


# --- graphs ----------------------------------------------------------------------------------
def with_graph(session: Session, graph: Graph, call) -> Flow:
    """`call(ref)`'s flow with the graph by id when this session has sent it, else
    inline (which registers it); NOT_FOUND for an id resends it inline once. `graph`
    is a `Graph` or an `OnnxModel`."""
    graph_id = graph.graph_id
    if graph_id in session.sent:
        try:
            return (yield from call(executor_pb2.GraphRef(graph_id=graph_id)))
        except NotFoundError:
            session.sent.discard(graph_id)
    result = yield from call(inline_ref(graph))
    session.sent.add(graph_id)
    return result


def inline_ref(graph) -> executor_pb2.GraphRef:
    """The graph itself as a reference: a Graph message, or an ONNX model's bytes."""
    message, _ = graph.wire_form()
    if isinstance(message, executor_pb2.OnnxModel):
        return executor_pb2.GraphRef(onnx=message)
    return executor_pb2.GraphRef(graph=message)


def register(session: Session, graph: Graph) -> Flow:
    message, _ = graph.wire_form()
    if isinstance(message, executor_pb2.OnnxModel):
        request = executor_pb2.RegisterGraphRequest(onnx=message)
    else:
        request = executor_pb2.RegisterGraphRequest(graph=message)
    response = yield Unary("RegisterGraph", request)
    session.sent.add(response.graph_id)
    return response.graph_id


def list_ops() -> Flow:
    response = yield Unary("ListOps", executor_pb2.ListOpsRequest())
    return [op_info_from_proto(op) for op in response.ops]


# --- Run -------------------------------------------------------------------------------------
def run(
    session: Session,
    graph: Graph,
    inputs: Mapping[str, Any],
    *,
    out: RunResult | None = None,
    **options,
) -> Flow:
    """Run (or RunStream) `graph` on `inputs`; `options` as `Client.run`'s. (A plain
    function returning `with_graph`'s flow: one generator fewer to resume.)"""

    def call(ref):
        request, chunked = run_request(ref, graph, inputs, **options)
        if not chunked:
            try:
                return run_result((yield Unary("Run", request)), out=out)
            except ResourceExhaustedError as error:
                if metadata.USE_STREAM not in error.metadata:
                    raise
            request, chunked = run_request(ref, graph, inputs, stream=True, **options)
        return run_result(*(yield Stream(request, chunked, out)))

    return with_graph(session, graph, call)


def run_request(
    ref: executor_pb2.GraphRef,
    graph: Graph,
    inputs: Mapping[str, Any],
    *,
    wrt: Iterable[str] = (),
    loss: str | None = None,
    cotangents: Mapping[str, Any] | None = None,
    fetch: Iterable[str] | None = None,
    policy=None,
    timeline: bool = False,
    measure_memory: bool = False,
    trace: bool = False,
    stream: bool | None = None,
    chunk_bytes: int = 1 << 20,
) -> tuple[executor_pb2.RunRequest, dict]:
    """The RunRequest, and the tensors to send in chunks ((role, name) -> array).

    `stream=None` streams when the tensors total more than STREAM_THRESHOLD_BYTES;
    when streaming, tensors stay inline while they total at most `chunk_bytes`, and
    the rest (every tensor above `chunk_bytes` among them) are chunked."""
    # Only the fields that differ from their defaults: each keyword costs a setter call,
    # and this is every call's path.
    fields = {"graph": ref}
    for name, value in (
        ("fetch", fetch),
        ("wrt", wrt),
        ("loss", loss),
        ("timeline", timeline),
        ("measure_memory", measure_memory),
        ("trace", trace),
    ):
        if value:
            fields[name] = list(value) if name in ("fetch", "wrt") else value
    request = executor_pb2.RunRequest(**fields)
    if policy is not None:  # unset means auto on the server (and `resolve(None)` here)
        request.policy.MergeFromString(wire.policy_bytes(policies.resolve(policy)))
    tensors = [
        (INPUT, request.inputs, name, wire.wire_array(value, _dtype_for(value, graph, name)))
        for name, value in inputs.items()
    ]
    tensors += [
        (COTANGENT, request.cotangents, name, wire.wire_array(value))
        for name, value in (cotangents or {}).items()
    ]
    if stream is None:
        stream = sum(array.nbytes for *_, array in tensors) > STREAM_THRESHOLD_BYTES
    chunked, inline = {}, 0
    for role, field, name, array in tensors:
        # Small tensors ride in the header, but only up to `chunk_bytes` in all: many
        # medium ones inline would make the header itself too big for one message.
        big = stream and inline + array.nbytes > chunk_bytes
        wire.fill_tensor(field[name], array, chunked=big)
        if big:
            chunked[role, name] = array
        else:
            inline += array.nbytes
    return request, chunked


def run_result(
    response: executor_pb2.RunResponse,
    outputs: dict | None = None,
    grads: dict | None = None,
    out: RunResult | None = None,
) -> RunResult:
    """A RunResult from a Run response (or a RunStream's header plus its arrays); `out`'s
    arrays take the values where they fit (see `Client.run`)."""
    # The set fields, read in one call (see `wire.field_names`); a plain Run's
    # response has no warnings, timeline or trace to decode.
    names = _RESPONSE_FIELDS
    present = {names[f]: value for f, value in response.ListFields()}
    if outputs is None:
        outputs = {
            k: wire.tensor_to_array(v, previous(out, OUTPUT, k))
            for k, v in present.get("outputs", {}).items()
        }
        grads = {
            k: wire.tensor_to_array(v, previous(out, GRAD, k))
            for k, v in present.get("grads", {}).items()
        }
    metrics = present.get("metrics")
    values = {
        "outputs": outputs,
        "grads": grads,
        "metrics": _NO_METRICS if metrics is None else wire.metrics_from_proto(metrics),
    }
    for name in ("warnings", "timeline"):  # the rest take their defaults
        if name in present:
            values[name] = tuple(present[name])
    if "trace" in present:
        values["trace"] = wire.trace_from_proto(present["trace"])
    return from_fields(RunResult, values)


_NO_METRICS = Metrics()


_RESPONSE_FIELDS = wire.field_names(executor_pb2.RunResponse)


def _dtype_for(value: Any, graph: Graph, name: str) -> str | None:
    """Python lists and scalars take the input's declared dtype; arrays keep theirs."""
    if isinstance(value, np.ndarray) or hasattr(value, "dtype"):
        return None
    return next((item.dtype for item in graph.inputs if item.name == name), None)


# --- Plan and Differentiate --------------------------------------------------------------
def plan(
    session: Session,
    graph: Graph,
    *,
    wrt: Iterable[str] = (),
    loss: str | None = None,
    policy=None,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
    fetch: Iterable[str] | None = None,
    cotangent_outputs: Iterable[str] = (),
    include_schedule: bool = False,
) -> Flow:
    request = executor_pb2.PlanRequest(
        wrt=list(wrt),
        loss=loss or "",
        cotangent_outputs=list(cotangent_outputs),
        fetch=list(fetch or ()),
        policy=wire.policy_to_proto(policies.resolve(policy)),
        include_schedule=include_schedule,
    )
    _fill_shapes(request.input_shapes, input_shapes)
    return (yield from with_graph(session, graph, _with_ref("Plan", request, plan_from_proto)))


def differentiate(
    session: Session,
    graph: Graph,
    *,
    wrt: Iterable[str],
    loss: str | None = None,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
) -> Flow:
    request = executor_pb2.DifferentiateRequest(wrt=list(wrt), loss=loss or "")
    _fill_shapes(request.input_shapes, input_shapes)
    return (
        yield from with_graph(session, graph, _with_ref("Differentiate", request, _joint_graph))
    )


def _with_ref(method: str, request, decode):
    """A `with_graph` call: `request` with the graph reference set, its reply decoded."""

    def call(ref):
        request.graph.CopyFrom(ref)
        return decode((yield Unary(method, request)))

    return call


def _joint_graph(response: executor_pb2.DifferentiateResponse) -> Graph:
    joint = Graph.from_proto(response.graph)
    joint.grad_outputs = dict(response.grad_outputs)
    return joint


def _fill_shapes(field, shapes: Mapping[str, Iterable[int]] | None) -> None:
    for name, shape in (shapes or {}).items():
        field[name].values.extend(int(d) for d in shape)


# --- Compare ---------------------------------------------------------------------------------
def compare_request(
    graph: Graph,
    inputs: Mapping[str, Any],
    *,
    wrt: Iterable[str],
    loss: str,
    policies: Iterable = compare.DEFAULT_POLICIES,
    repeats: int = 1,
    warmup: bool = True,
    measure_memory: bool = False,
    timeline: bool = False,
    trace: bool = False,
) -> executor_pb2.CompareRequest:
    """The graph goes inline: Compare is one call, however many policies it runs."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    chosen = compare.policy_list(policies)
    run_message, _ = run_request(
        inline_ref(graph),
        graph,
        inputs,
        wrt=list(wrt),
        loss=loss,
        timeline=timeline,
        measure_memory=measure_memory,
        trace=trace,
        stream=False,
    )
    return executor_pb2.CompareRequest(
        run=run_message,
        policies=[wire.policy_to_proto(p) for p in chosen],
        repeats=repeats,
        warmup=warmup,
    )


def comparison_rows() -> Generator[ComparisonRow | None, Any, None]:
    """A sans-I/O decoder of Compare's results: send each result as it arrives, get
    its row back (the first result is store_all's, the baseline of the others)."""
    base, row = None, None
    while True:
        result = yield row
        metrics = wire.metrics_from_proto(result.metrics)
        base = base or metrics
        row = compare.row_from_metrics(
            result.policy,
            metrics,
            base,
            result.max_grad_diff,
            timeline=result.timeline,
            trace=wire.trace_from_proto(result.trace),
            error=result.error,
            error_code=result.error_code,
        )


def rows_decoder():
    """`comparison_rows()`, primed: `.send(result)` returns that result's row."""
    decoder = comparison_rows()
    next(decoder)
    return decoder
