"""Work slots: at most `--threads` executor calls do work at once, and health checks
never wait behind them.

gRPC's Python server runs each call on a thread of one pool, and a call that finds
every thread busy waits in the pool's FIFO queue: behind long runs, a health check
would wait too, and Kubernetes restarts a pod that is only busy. So the pool is sized
for every call the server admits (`--max-concurrent-rpcs`) plus a few spare threads,
and it is here, not in the pool, that executor calls wait for one of `--threads` work
slots. Health, reflection and the metrics endpoint never take a slot, so they answer
while every slot is busy.

A waiting call must not hold its request in memory (up to a full message each), so a
unary-request handler becomes a streaming-request one (the same on the wire) that
reads its request only once it holds a slot. Waiting honours the call's deadline and
cancellation; a call that finds `max_concurrent_rpcs` others running or waiting is
refused with RESOURCE_EXHAUSTED, leaving gRPC's own limit (set `SPARE_THREADS` higher)
to health checks. A call that waits for one of `--max-concurrent-solves` solve slots
(or for memory, or for another request's plan) lends its work slot out meanwhile
(`Lending`), so queued solves do not stall small requests, and a planner that needs its
slot back never waits for calls that wait for its plan.

The gate is the one wrapper around every executor call (`gated`): besides the slot it
counts the call for a graceful drain (`interceptors.Drain`), answers a request that did
not parse, and times the call for the metrics, whose interceptor then leaves it alone.

    >>> pool_threads(max_concurrent_rpcs=256)
    264
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from contextvars import ContextVar

import grpc

from ..errors import RematError
from .admission import Admission, FifoLimiter
from .interceptors import Drain, Malformed, refuse_malformed

_AT_ONCE = Admission(queue_seconds=0.0)

# Threads (and gRPC call slots) kept beyond what executor calls may take: for health
# checks and reflection.
SPARE_THREADS = 8
# `--max-concurrent-rpcs 0` (no limit): the pool still needs a size.
UNLIMITED_CALLS = 1024


def pool_threads(max_concurrent_rpcs: int) -> int:
    """Threads for gRPC's pool: every admitted executor call, and the spares."""
    return (max_concurrent_rpcs or UNLIMITED_CALLS) + SPARE_THREADS


def grpc_call_limit(max_concurrent_rpcs: int) -> int | None:
    """gRPC's `maximum_concurrent_rpcs`: the executor's calls plus the spares."""
    return max_concurrent_rpcs + SPARE_THREADS if max_concurrent_rpcs else None


def work_limiter(threads: int, max_concurrent_rpcs: int) -> FifoLimiter:
    """`threads` calls work at once; the rest of `max_concurrent_rpcs` may wait.

    >>> limiter = work_limiter(threads=8, max_concurrent_rpcs=256)
    >>> limiter.capacity
    8
    """
    calls = max_concurrent_rpcs or UNLIMITED_CALLS
    working = min(threads, calls)
    return FifoLimiter(
        working, calls - working, "handler threads", "--threads", "--max-concurrent-rpcs"
    )


class CallEnd:
    """When a call ends: `ended()` turns true once it is cancelled or past its deadline
    (gRPC calls back; a bool's write is atomic under the GIL, and reading it is cheaper
    than asking the call under its lock), and `deadline` (time.monotonic(); None: none).
    Made once per call, by the work-slot gate, and shared with the handler."""

    __slots__ = ("deadline", "_ended")

    def __init__(self, context):
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.monotonic() + remaining
        self._ended = False
        if not context.add_callback(self._end):
            self._ended = True  # it has ended already

    def _end(self) -> None:
        self._ended = True

    def ended(self) -> bool:
        return self._ended


def call_end(context) -> CallEnd:
    """The current call's `CallEnd`: the gate's, or a new one outside a gated call."""
    held = _held.get()
    return held.end if held is not None else CallEnd(context)


class _Held:
    """An executor call: timed (the metrics' call timer, when given), counted in by the
    drain and holding a work slot; a context manager around the handler. The slot is
    given back while the call only waits (`lent`)."""

    __slots__ = ("slots", "drain", "held", "end", "context", "timer", "_token")

    def __init__(self, slots: FifoLimiter, drain: Drain, context, timer=None):
        self.slots, self.drain, self.held, self.context = slots, drain, False, context
        self.timer = timer
        self.end = CallEnd(context)

    def take(self) -> None:
        deadline = self.end.deadline
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.slots.acquire(1, left, self.end.ended)
        self.held = True

    def give(self) -> None:
        if self.held:
            self.held = False
            self.slots.release(1)

    def __enter__(self) -> None:
        timer = self.timer
        if timer is not None:
            timer.__enter__()
        try:
            if not self.drain.started():
                self.context.abort(grpc.StatusCode.UNAVAILABLE, Drain.REFUSAL)
            try:
                self.take()
            except RematError as error:  # busy, cancelled or past its deadline while waiting
                self.drain.ended()
                self.context.abort(getattr(grpc.StatusCode, error.code), str(error))
        except BaseException as error:  # refused: timed with the status it got
            if timer is not None:
                timer.__exit__(type(error), error, error.__traceback__)
            raise
        self._token = _held.set(self)

    def __exit__(self, *exc) -> bool:
        try:
            self.give()
            self.drain.ended()
            _held.reset(self._token)
        finally:
            if self.timer is not None:
                self.timer.__exit__(*exc)
        return False


_held: ContextVar[_Held | None] = ContextVar("work_slot", default=None)


@contextlib.contextmanager
def lent() -> Iterator[None]:
    """Give the current call's work slot back for the block (it only waits there, for
    a solve slot), and take one again after: calls waiting for a solve must not keep
    small requests from working. Outside a gated call: nothing."""
    held = _held.get()
    if held is None or not held.held:
        yield
        return
    held.give()
    try:
        yield
    finally:
        held.take()  # FIFO behind the calls that came meanwhile; raises if the call ended


class Lending:
    """A FIFO limiter waited for with the call's work slot lent out: the solve slots
    (`--max-concurrent-solves`, the engine's `solve_slots`) and the memory budget. A
    call that waits does no work, and must not keep small requests from working."""

    def __init__(self, limiter: FifoLimiter):
        self.limiter = limiter

    def __getattr__(self, name: str):  # in_use, queued, metered, capacity, ...
        return getattr(self.limiter, name)

    @staticmethod
    def lent():
        return lent()

    def reserve(self, amount: int = 1, *, timeout, cancelled) -> AbstractContextManager[Admission]:
        amount = int(amount)
        if self.limiter.try_acquire(amount):  # no wait: the work slot is kept, not lent
            return _Taken(self.limiter, amount)
        return self._waiting(amount, timeout, cancelled)

    @contextlib.contextmanager
    def _waiting(self, amount: int, timeout, cancelled) -> Iterator[Admission]:
        with contextlib.ExitStack() as stack:
            with lent():
                admitted = stack.enter_context(
                    self.limiter.reserve(amount, timeout=timeout, cancelled=cancelled)
                )
            yield admitted  # what was reserved, and a work slot again


class _Taken:
    """What `try_acquire` took, given back on exit (a class: this is every request's
    path, and a generator context manager costs a few microseconds more)."""

    __slots__ = ("limiter", "amount")

    def __init__(self, limiter: FifoLimiter, amount: int):
        self.limiter, self.amount = limiter, amount

    def __enter__(self) -> Admission:
        return _AT_ONCE

    def __exit__(self, *exc) -> bool:
        self.limiter.release(self.amount)
        return False


def gated(
    handler: grpc.RpcMethodHandler,
    slots: FifoLimiter,
    drain: Drain,
    timing: Callable[[object], AbstractContextManager] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler`, run only while it holds one of `slots` (and counted by `drain`, and
    timed by `timing(context)` when given); its request is read after, and one that
    did not parse (`interceptors.tolerant`) is answered INVALID_ARGUMENT."""
    if handler.request_streaming:
        behavior = handler.stream_stream or handler.stream_unary
    else:
        behavior = handler.unary_stream or handler.unary_unary

    def read(requests, context):
        """The one request of a unary-request call (it was taken as a stream)."""
        if handler.request_streaming:
            return requests
        request = next(iter(requests), None)
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request")
        if type(request) is Malformed:
            refuse_malformed(request, context)
        return request

    def held(context) -> _Held:
        return _Held(slots, drain, context, None if timing is None else timing(context))

    if handler.response_streaming:

        def streaming(requests, context):
            with held(context):
                yield from behavior(read(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(
            streaming,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def unary(requests, context):
        with held(context):
            return behavior(read(requests, context), context)

    return grpc.stream_unary_rpc_method_handler(
        unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
