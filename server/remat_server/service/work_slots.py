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

    >>> pool_threads(max_concurrent_rpcs=256)
    264
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar

import grpc

from ..errors import RematError
from .admission import Admission, FifoLimiter

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


class _Held:
    """The work slot a call holds: given back while the call only waits (`lent`)."""

    def __init__(self, slots: FifoLimiter, context):
        self.slots, self.held = slots, False
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.monotonic() + remaining
        ended = []  # set when the call ends: waiting then stops
        if not context.add_callback(lambda: ended.append(True)):
            ended.append(True)
        self.ended = lambda: bool(ended)

    def take(self) -> None:
        left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        self.slots.acquire(1, left, self.ended)
        self.held = True

    def give(self) -> None:
        if self.held:
            self.held = False
            self.slots.release(1)


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

    @contextlib.contextmanager
    def reserve(self, amount: int = 1, *, timeout, cancelled) -> Iterator[Admission]:
        amount = int(amount)
        if self.limiter.try_acquire(amount):  # no wait: the work slot is kept, not lent
            try:
                yield _AT_ONCE
            finally:
                self.limiter.release(amount)
            return
        with contextlib.ExitStack() as stack:
            with lent():
                admitted = stack.enter_context(
                    self.limiter.reserve(amount, timeout=timeout, cancelled=cancelled)
                )
            yield admitted  # what was reserved, and a work slot again


def gated(handler: grpc.RpcMethodHandler, slots: FifoLimiter) -> grpc.RpcMethodHandler:
    """`handler`, run only while it holds one of `slots`; its request is read after."""
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
        return request

    @contextlib.contextmanager
    def holding(context) -> Iterator[None]:
        held = _Held(slots, context)
        try:
            held.take()
        except RematError as error:  # busy, cancelled or past its deadline while waiting
            context.abort(getattr(grpc.StatusCode, error.code), str(error))
        token = _held.set(held)
        try:
            yield
        finally:
            _held.reset(token)
            held.give()

    if handler.response_streaming:

        def streaming(requests, context):
            with holding(context):
                yield from behavior(read(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(
            streaming,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def unary(requests, context):
        with holding(context):
            return behavior(read(requests, context), context)

    return grpc.stream_unary_rpc_method_handler(
        unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
