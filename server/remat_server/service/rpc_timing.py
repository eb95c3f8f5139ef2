"""Timing RPCs for the metrics: a call's duration and status, by method.

Handlers time themselves (`Call`, made by `ServerMetrics.call_timer`), wrapped once when
they are registered; `UnknownMethods` answers and records the paths no service has. The
interceptor (`MetricsInterceptor`) is there only when a later interceptor may refuse a
call in a handler's place: it goes first and times those refusals. `m` is the server's
metric instruments (`metrics._Instruments`).
"""

from __future__ import annotations

import threading
import time

import grpc

from .interceptors import WrappedHandlers, refusal

# Requests refused because of what the client sent or may do; reason = lower-case name.
REJECTED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

# Method names come from the request path. Unknown methods are labelled "unknown", but
# an interceptor placed after ours may answer any path (auth refusing it), so cap the
# label set as a safety net against a client inventing paths.
MAX_METHOD_LABELS = 64


class Call:
    """Times one RPC and records its status: a context manager around the handler
    (around the whole iteration for streaming responses). With `timing`, the set of
    calls the interceptor times (by id of their context), in which it stays meanwhile:
    a self-timed handler inside (`ServerMetrics.call_timer`) then does not time the
    call again."""

    __slots__ = ("_m", "_method", "_context", "_start", "_timing")

    def __init__(self, m, method: str, context, timing: set[int] | None = None):
        self._m, self._method, self._context, self._timing = m, method, context, timing

    def __enter__(self):
        if self._timing is not None:
            self._timing.add(id(self._context))
        self._m.inflight.inc()
        self._start = time.perf_counter()

    def __exit__(self, exc_type, exc, tb):
        elapsed = time.perf_counter() - self._start
        try:
            _record(self._m, self._method, _status(self._context, exc_type), elapsed)
        finally:
            self._m.inflight.dec()
            if self._timing is not None:
                self._timing.discard(id(self._context))
        return False  # never swallow: grpc turns the exception into the status


def _status(context, exc_type) -> grpc.StatusCode:
    """The status the client will get. `abort()` and `set_code()` store it on the
    context; otherwise it follows from how the handler ended."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if not context.is_active():  # the client went away (or its deadline passed)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    if exc_type is None:
        return grpc.StatusCode.OK
    if issubclass(exc_type, GeneratorExit):  # grpc dropped the response stream
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # grpc's status for an uncaught exception


def _record(m, method: str, code: grpc.StatusCode, seconds: float) -> None:
    child = m.durations.get((method, code))
    if child is None:  # label lookups take a lock: memoized (methods are bounded)
        child = m.durations[method, code] = m.rpc_duration.labels(method, code.name)
    child.observe(seconds)
    if code in REJECTED_CODES:
        m.rejected.labels(code.name.lower()).inc()


class _Untimed:
    """The timer of a call the interceptor times already."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


UNTIMED = _Untimed()


class UnknownMethods(grpc.GenericRpcHandler):
    """Answers every method with UNIMPLEMENTED (`refuse`), recorded as "unknown"."""

    def __init__(self, m):
        self._m = m
        self.refuse = refusal(None, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    def service(self, handler_call_details):
        _record(self._m, "unknown", grpc.StatusCode.UNIMPLEMENTED, 0.0)
        return self.refuse


class MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, m):
        self._m = m
        self._methods: set[str] = set()
        self._lock = threading.Lock()
        self._wrapped = WrappedHandlers()
        self.self_timed: set[int] = set()  # ids of handlers that time themselves
        self.keep: list = []  # ... held, so that their ids stay theirs
        self.timing: set[int] = set()  # ids of the contexts of the calls it times now

    def method_label(self, path: str) -> str:
        name = path.rsplit("/", 1)[-1] or "unknown"  # "/remat.v1.Executor/Run" -> "Run"
        if name in self._methods:  # known: no lock (a set read is atomic)
            return name
        with self._lock:
            if name not in self._methods:
                if len(self._methods) >= MAX_METHOD_LABELS:
                    return "other"
                self._methods.add(name)
        return name

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            # grpc answers UNIMPLEMENTED without calling anything; the path is the
            # client's invention, so it does not become a label.
            _record(self._m, "unknown", grpc.StatusCode.UNIMPLEMENTED, 0.0)
            return None
        if id(handler) in self.self_timed:
            return handler
        method = self.method_label(handler_call_details.method)
        return self._wrapped.get(
            handler, method, lambda context: Call(self._m, method, context, self.timing)
        )
