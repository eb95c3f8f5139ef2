"""What `Client` and `AsyncClient` share, with no I/O: building requests, reading
responses, when to stream, and how long to wait between retries.

Every call is idempotent (running a graph has no side effects on the server beyond
caching it), so any call that failed with UNAVAILABLE may be retried.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import grpc
import numpy as np

from . import compare, policies, targets, wire
from .compare import ComparisonRow
from .graph import Graph
from .results import RunResult
from .streaming import COTANGENT, GRAD, INPUT, OUTPUT, previous
from .v1 import executor_pb2

# Tensors above this many bytes in total go through RunStream: below it one message is
# cheaper, above it chunks keep every message small and memory flat.
STREAM_THRESHOLD_BYTES = 1 << 20
# The SDK's gRPC message ceiling (gRPC's own default of 4 MiB is too small for tensors).
DEFAULT_MAX_MESSAGE_BYTES = 512 << 20
# Trailing metadata the server sets when a Run's results need RunStream.
USE_STREAM_KEY = "remat-use-stream"


@dataclass(frozen=True)
class Retry:
    """Retry UNAVAILABLE with exponential backoff and full jitter.

    `attempts` counts the first try; delays grow from `initial_backoff` by
    `multiplier` up to `max_backoff`; never past the call's deadline.

        >>> list(Retry(attempts=1).delays())
        []
        >>> len(list(Retry(attempts=4).delays()))
        3
    """

    attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        ceiling = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield random.uniform(0, ceiling)
            ceiling = min(ceiling * self.multiplier, self.max_backoff)


NO_RETRY = Retry(attempts=1)


def channel_options(max_message_bytes: int, retry: Retry, extra: Iterable = ()) -> list:
    """The SDK's channel arguments: message ceilings, reconnects paced by `retry`,
    round-robin balancing over the target's addresses, then the caller's own (which
    win)."""
    extra = list(extra)
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *reconnect_options(retry), *targets.balancing_options(extra), *extra]


def reconnect_options(retry: Retry) -> list[tuple[str, int]]:
    """Channel arguments that keep gRPC's reconnect backoff within `retry`'s schedule.

    After a failed connection a channel waits 1 s (growing to 120 s) before it tries
    again, and meanwhile every call fails at once with UNAVAILABLE: retries of a call
    to a server that is starting or restarting would never reach it.

        >>> dict(reconnect_options(Retry(initial_backoff=0.1, max_backoff=2.0)))
        {'grpc.initial_reconnect_backoff_ms': 100, 'grpc.max_reconnect_backoff_ms': 2000}
    """
    initial = max(1, round(retry.initial_backoff * 1000))
    return [("grpc.initial_reconnect_backoff_ms", initial),
            ("grpc.max_reconnect_backoff_ms", max(initial, round(retry.max_backoff * 1000)))]


def retryable(error: grpc.RpcError) -> bool:
    return getattr(error, "code", lambda: None)() == grpc.StatusCode.UNAVAILABLE


# --- graphs --------------------------------------------------------------------------------
class GraphIds:
    """Server graph ids by graph content, so a graph is sent once and then run by id.

    The server may evict it (LRU) or another replica may answer: on NOT_FOUND the
    client sends that call's graph inline, which registers it there, and keeps the id
    (a graph's id is the same on every server)."""

    def __init__(self):
        self._ids: dict[str, str] = {}

    @staticmethod
    def key(message) -> str:
        return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()

    def get(self, key: str) -> str | None:
        return self._ids.get(key)

    def remember(self, key: str, graph_id: str) -> None:
        self._ids[key] = graph_id



# --- Run --------------------------------------------------------------------------------------
def run_request(ref: executor_pb2.GraphRef, graph: Graph, inputs: Mapping[str, Any], *,
                wrt: Iterable[str] = (), loss: str | None = None,
                cotangents: Mapping[str, Any] | None = None, fetch: Iterable[str] | None = None,
                policy=None, timeline: bool = False, measure_memory: bool = False,
                trace: bool = False, stream: bool | None = None,
                chunk_bytes: int = 1 << 20) -> tuple[executor_pb2.RunRequest, dict]:
    """The RunRequest, and the tensors to send in chunks ((role, name) -> array).

    `stream=None` streams when the tensors total more than STREAM_THRESHOLD_BYTES;
    when streaming, tensors stay inline while they total at most `chunk_bytes`, and
    the rest (every tensor above `chunk_bytes` among them) are chunked."""
    declared = {item.name: item.dtype for item in graph.inputs}
    request = executor_pb2.RunRequest(
        graph=ref, fetch=list(fetch or ()), wrt=list(wrt), loss=loss or "",
        policy=wire.policy_to_proto(policies.resolve(policy)), timeline=timeline,
        measure_memory=measure_memory, trace=trace)
    tensors = [(INPUT, request.inputs, name, wire.wire_array(value, _dtype_for(value, declared.get(name))))
               for name, value in inputs.items()]
    tensors += [(COTANGENT, request.cotangents, name, wire.wire_array(value))
                for name, value in (cotangents or {}).items()]
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


def run_result(response: executor_pb2.RunResponse, outputs: dict | None = None,
               grads: dict | None = None, out: RunResult | None = None) -> RunResult:
    """A RunResult from a Run response (or a RunStream's header plus its arrays); `out`'s
    arrays take the values where they fit (see `Client.run`)."""
    if outputs is None:
        outputs = {k: wire.tensor_to_array(v, previous(out, OUTPUT, k))
                   for k, v in response.outputs.items()}
        grads = {k: wire.tensor_to_array(v, previous(out, GRAD, k))
                 for k, v in response.grads.items()}
    return RunResult(outputs=outputs, grads=grads, metrics=wire.metrics_from_proto(response.metrics),
                     warnings=tuple(response.warnings), timeline=tuple(response.timeline),
                     trace=wire.trace_from_proto(response.trace))


# --- Compare ----------------------------------------------------------------------------------
def compare_request(graph: Graph, inputs: Mapping[str, Any], *, wrt: Iterable[str], loss: str,
                    policies: Iterable = compare.DEFAULT_POLICIES, repeats: int = 1,
                    warmup: bool = True, measure_memory: bool = False, timeline: bool = False,
                    trace: bool = False) -> executor_pb2.CompareRequest:
    """The graph goes inline: Compare is one call, however many policies it runs."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    chosen = compare.policy_list(policies)
    run, _ = run_request(executor_pb2.GraphRef(graph=graph.to_proto()), graph, inputs,
                         wrt=list(wrt), loss=loss, timeline=timeline,
                         measure_memory=measure_memory, trace=trace, stream=False)
    return executor_pb2.CompareRequest(run=run, policies=[wire.policy_to_proto(p) for p in chosen],
                                       repeats=repeats, warmup=warmup)


def comparison_rows(head, rest: Iterable) -> Iterator[ComparisonRow]:
    """ComparisonRows from Compare's results (the first already read, then the rest)."""
    base = None
    for result in _chain(head, rest):
        metrics = wire.metrics_from_proto(result.metrics)
        base = base or metrics
        yield compare.row_from_metrics(
            result.policy, metrics, base, result.max_grad_diff, timeline=result.timeline,
            trace=wire.trace_from_proto(result.trace), error=result.error,
            error_code=result.error_code)


def _chain(head, rest: Iterable) -> Iterator:
    if head is not None:
        yield head
        yield from rest


def as_result(reply, out: RunResult | None = None) -> RunResult:
    """A Run response, or a RunStream's (header, outputs, grads), as a RunResult."""
    if isinstance(reply, tuple):
        header, outputs, grads = reply
        return run_result(header, outputs, grads)
    return run_result(reply, out=out)


def _dtype_for(value: Any, declared: str | None) -> str | None:
    """Python lists and scalars take the input's declared dtype; arrays keep theirs."""
    return None if isinstance(value, np.ndarray) or hasattr(value, "dtype") else declared


# --- Plan and Differentiate ---------------------------------------------------------------
def plan_request(ref: executor_pb2.GraphRef, *, wrt: Iterable[str] = (), loss: str | None = None,
                 policy=None, input_shapes: Mapping[str, Iterable[int]] | None = None,
                 fetch: Iterable[str] | None = None, cotangent_outputs: Iterable[str] = (),
                 include_schedule: bool = False) -> executor_pb2.PlanRequest:
    request = executor_pb2.PlanRequest(
        graph=ref, wrt=list(wrt), loss=loss or "", cotangent_outputs=list(cotangent_outputs),
        fetch=list(fetch or ()), policy=wire.policy_to_proto(policies.resolve(policy)),
        include_schedule=include_schedule)
    _fill_shapes(request.input_shapes, input_shapes)
    return request


def differentiate_request(ref: executor_pb2.GraphRef, *, wrt: Iterable[str],
                          loss: str | None = None,
                          input_shapes: Mapping[str, Iterable[int]] | None = None
                          ) -> executor_pb2.DifferentiateRequest:
    request = executor_pb2.DifferentiateRequest(graph=ref, wrt=list(wrt), loss=loss or "")
    _fill_shapes(request.input_shapes, input_shapes)
    return request


def joint_graph(response: executor_pb2.DifferentiateResponse) -> Graph:
    joint = Graph.from_proto(response.graph)
    joint.grad_outputs = dict(response.grad_outputs)
    return joint


def _fill_shapes(field, shapes: Mapping[str, Iterable[int]] | None) -> None:
    for name, shape in (shapes or {}).items():
        field[name].values.extend(int(d) for d in shape)
