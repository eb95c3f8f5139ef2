"""Building blocks for server handlers and interceptors: run a handler inside a context
manager, refuse a call cheaply, answer unparseable requests with INVALID_ARGUMENT, and
drain in-flight calls on shutdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import grpc


def wrap_handler(
    handler: grpc.RpcMethodHandler, around: Callable[[grpc.ServicerContext], AbstractContextManager]
) -> grpc.RpcMethodHandler:
    """The same handler, its behavior run inside `around(context)`; for streaming
    responses, around the whole iteration (grpc drops a cancelled stream's iterator,
    and GeneratorExit ends the `with`)."""
    if handler.request_streaming and handler.response_streaming:
        behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler

    if handler.response_streaming:

        def wrapped(request, context):
            with around(context):
                yield from behavior(request, context)
    else:

        def wrapped(request, context):
            with around(context):
                return behavior(request, context)

    return make(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class WrappedHandlers:
    """`wrap_handler`, once per (handler, key): gRPC hands an interceptor the same
    handler object for every call of a method, so the wrapper is built once, not per
    call."""

    def __init__(self):
        self._wrapped: dict[tuple, tuple] = {}
        self._lock = threading.Lock()

    def get(
        self,
        handler: grpc.RpcMethodHandler,
        key,
        around: Callable[[grpc.ServicerContext], AbstractContextManager],
    ) -> grpc.RpcMethodHandler:
        entry = self._wrapped.get((id(handler), key))
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = wrap_handler(handler, around)
        with self._lock:
            if len(self._wrapped) < 1024:  # bounded: methods are few
                self._wrapped[id(handler), key] = (handler, wrapped)  # holds handler: id stays
        return wrapped


class Malformed(NamedTuple):
    """A request message protobuf could not parse. Deserializers hand it on rather than
    raising, so the client gets INVALID_ARGUMENT and not gRPC's bare INTERNAL
    "Exception deserializing request!"."""

    reason: str
    message: str = ""  # the request type's name, e.g. "RunRequest"


def _parse_or_malformed(parse: Callable[[bytes], object], raw: bytes):
    try:
        return parse(raw)
    except Exception as error:  # noqa: BLE001 - any parse failure is the client's
        return Malformed(f"{type(error).__name__}: {error}")


def tolerant_deserializer(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    return lambda raw: _parse_or_malformed(parse, raw)


def tolerant(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """`handler` (unary request) with a deserializer that hands unparseable bytes on as
    `Malformed`; whoever reads the request (the work-slot gate, `work_slots.gated`)
    answers INVALID_ARGUMENT with `refused_malformed`. The request type's name is
    `message`."""
    if handler.request_streaming:
        return handler
    parse = handler.request_deserializer

    def deserialize(raw: bytes):
        request = _parse_or_malformed(parse, raw)
        if type(request) is Malformed:
            return Malformed(request.reason, message)
        return request

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            handler.unary_stream,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        handler.unary_unary,
        request_deserializer=deserialize,
        response_serializer=handler.response_serializer,
    )


def refuse_malformed(request: Malformed, context) -> None:
    """Answer a request `tolerant` could not parse with INVALID_ARGUMENT (raises)."""
    context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request is not a valid {request.message or 'request'} ({request.reason})",
    )


def refusal(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler that answers `code` at once, of the same response kind as `handler`
    (None: an unknown method).

    It always takes the request as a stream. A unary request is never read: a unary
    handler would first buffer the whole request (up to max_message_bytes) from a peer
    we are about to refuse. On the wire the two kinds are the same, so any client sees
    the status. Of a streaming request (RunStream) the first message, its header, is
    read before refusing: a grpc.aio client whose first write races with the refusal
    would otherwise get INTERNAL instead of this status (grpc/grpc#36066), and it sends
    nothing more until the server accepts that header (RunStream's initial metadata)."""

    def abort(_requests, context):
        context.abort(code, message)

    def abort_after_header(requests, context):
        next(iter(requests), None)
        context.abort(code, message)

    if handler is not None and not handler.response_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler is not None and handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_after_header)
    return grpc.stream_stream_rpc_method_handler(abort)


class Drain:
    """Counts running executor calls (the work-slot gate reports each one's start and
    end); once `drain` starts, the gate refuses new ones with UNAVAILABLE (which
    clients retry, on another replica) instead of letting them race gRPC's own
    shutdown, which answers a call arriving at that moment with CANCELLED. Health
    checks never pass the gate, so probes see NOT_SERVING rather than an error."""

    REFUSAL = "the server is shutting down; retry (another replica will answer)"

    def __init__(self):
        self._running = 0
        self._lock = threading.Lock()  # taken directly (in C) on every call
        self._changed = threading.Condition(self._lock)
        self.draining = False

    def started(self) -> bool:
        """Count a call in, unless draining (False: refuse it)."""
        with self._lock:
            if self.draining:
                return False
            self._running += 1
            return True

    def ended(self) -> None:
        with self._lock:
            self._running -= 1
            if self.draining:
                self._changed.notify_all()

    def drain(self, timeout: float) -> float:
        """Refuse new calls and wait up to `timeout` seconds for running ones to end;
        returns the seconds left."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self.draining = True
            self._changed.wait_for(
                lambda: self._running == 0, timeout=max(deadline - time.monotonic(), 0.0)
            )
        return max(deadline - time.monotonic(), 0.0)
