"""The service tests against both SDK clients, and a server that records what it is sent.

`connect(kind, target)` and `in_process(kind, config)` give a `remat.Client` ("sync")
or a synchronous facade over a `remat.AsyncClient` ("async"): the async client lives
on an event loop in a background thread (a `grpc.aio` channel belongs to the loop it
was made on, so the client is created there), and each call is run on that loop and
waited for. Exceptions come back as they are raised, so one test body checks both.

`Recorder` is a server interceptor that counts calls by method, records how each
call referred to its graph (inline or by id) and the deadline it arrived with, and
can answer chosen calls with an error (after an optional delay) instead of serving
them; `serving(recorder)` starts a real server (`create_server`, port 0) with it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from support import HANG_SECONDS

import remat
from remat_proto.v1 import executor_pb2
from remat_server import ServerConfig, create_server

KINDS = ("sync", "async")

# Refusals of a RunStream before its upload is read (NOT_FOUND for an evicted graph id,
# UNAUTHENTICATED, RESOURCE_EXHAUSTED) used to reach the async client as INTERNAL
# (grpc/grpc#36066: grpc.aio kept writing the upload into the ended call) in 55-95% of
# the calls; the tests that cover it repeat the call 20 times.
WAIT_SECONDS = 90  # no facade call blocks a test for longer (calls' own timeouts are shorter)


# --- either client ---------------------------------------------------------------------
class AsyncFacade:
    """A `remat.AsyncClient` behind `remat.Client`'s synchronous surface."""

    def __init__(self, make):
        """`make()` builds the AsyncClient; it is called on the facade's event loop."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="async-client-loop"
        )
        self._thread.start()

        async def create():
            return make()

        try:
            self.client = self.wait(create())
        except BaseException:
            self._stop()
            raise

    def wait(self, awaitable):
        """Run `awaitable` on the client's loop; its result, or its exception."""

        async def main():
            return await awaitable

        return asyncio.run_coroutine_threadsafe(main(), self._loop).result(WAIT_SECONDS)

    def __getattr__(self, name: str):
        if name == "client":  # not made (yet): no recursion
            raise AttributeError(name)
        attribute = getattr(self.client, name)
        if inspect.iscoroutinefunction(attribute):
            return lambda *args, **kwargs: self.wait(attribute(*args, **kwargs))
        return attribute

    def compare_stream(self, *args, **kwargs):
        """The async iterator, one row at a time; closing this generator closes it."""
        stream = self.client.compare_stream(*args, **kwargs)
        try:
            while True:
                try:
                    row = self.wait(anext(stream))
                except StopAsyncIteration:
                    return
                yield row
        finally:
            self.wait(stream.aclose())

    def close(self) -> None:
        """`await client.close()` (the loop runs on, as a program's would)."""
        self.wait(self.client.close())

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT_SECONDS)
        self._loop.close()

    def __enter__(self) -> AsyncFacade:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            self._stop()

    def __repr__(self) -> str:
        return f"<AsyncFacade {self.client.target}>"


def connect(kind: str, target, **kwargs):
    """`remat.Client(target, **kwargs)`, or the same AsyncClient behind a facade."""
    if kind == "sync":
        return remat.Client(target, **kwargs)
    return AsyncFacade(lambda: remat.AsyncClient(target, **kwargs))


def in_process(kind: str, config: ServerConfig | None = None, **kwargs):
    """`remat.Client.in_process(config, **kwargs)`, or the AsyncClient's."""
    if kind == "sync":
        return remat.Client.in_process(config, **kwargs)
    return AsyncFacade(lambda: remat.AsyncClient.in_process(config, **kwargs))


# --- a server that records its calls ----------------------------------------------------
@dataclass(frozen=True)
class Seen:
    """One call as the server received it."""

    method: str
    graph: str | None  # "graph" (inline), "graph_id", or None (no graph reference)
    time_remaining: float | None  # seconds left of its deadline on arrival


def first(n: int) -> range:
    """Call numbers 1..n (for `Recorder(fail=...)`)."""
    return range(1, n + 1)


def _graph_kind(method: str, request) -> str | None:
    if method == "Compare":
        request = request.run
    elif isinstance(request, executor_pb2.RunStreamRequest) and request.HasField("header"):
        request = request.header
    if isinstance(
        request,
        (executor_pb2.RunRequest, executor_pb2.PlanRequest, executor_pb2.DifferentiateRequest),
    ):
        return request.graph.WhichOneof("kind")
    return None


class Recorder(grpc.ServerInterceptor):
    """Counts calls by method and records each (`Seen`). `fail[method]` holds the call
    numbers (1-based, per method) to answer with `code` instead of serving them, after
    `delay[method]` seconds (a slow server). `hold[method]` maps a server-streaming
    call's number to how many responses it sends before it waits for the client to
    cancel (at most `HOLD_SECONDS`, then it goes on): so a test can close a stream
    mid-way for sure."""

    HOLD_SECONDS = 10 * HANG_SECONDS  # far past any wait_until: only a cancel ends it

    def __init__(
        self,
        fail: dict[str, Iterable[int]] | None = None,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        delay: dict[str, float] | None = None,
        hold: dict[str, dict[int, int]] | None = None,
    ):
        self.counts: collections.Counter[str] = collections.Counter()
        self.seen: list[Seen] = []
        self.fail = {method: set(numbers) for method, numbers in (fail or {}).items()}
        self.code, self.delay, self.hold = code, dict(delay or {}), dict(hold or {})
        self._lock = threading.Lock()

    def refs(self, method: str) -> list[str | None]:
        """How the `method` calls referred to their graphs, in order."""
        with self._lock:
            return [s.graph for s in self.seen if s.method == method]

    def remaining(self, method: str) -> list[float | None]:
        with self._lock:
            return [s.time_remaining for s in self.seen if s.method == method]

    def intercept_service(self, continuation, details):
        method = details.method.rsplit("/", 1)[-1]
        with self._lock:
            self.counts[method] += 1
            number = self.counts[method]
        handler = continuation(details)
        if handler is None:
            return None
        refuse = number in self.fail.get(method, ())
        delay = self.delay.get(method, 0.0)

        def arrived(request, context):
            with self._lock:
                self.seen.append(
                    Seen(method, _graph_kind(method, request), context.time_remaining())
                )
            if delay:
                time.sleep(delay)  # a slow server, not synchronization
            if refuse:
                context.abort(self.code, f"injected {self.code.name} #{number}")

        hold = self.hold.get(method, {}).get(number)

        def held(responses, context):
            """The responses, pausing after the `hold`-th until the client cancels."""
            for sent, response in enumerate(responses, 1):
                yield response
                if sent == hold:
                    deadline = time.monotonic() + self.HOLD_SECONDS
                    while context.is_active() and time.monotonic() < deadline:
                        time.sleep(0.005)
                    if not context.is_active():
                        return

        def first(request, context):
            """The request (of a streaming request, its first message: the header, or
            the one message of a unary call the server takes as a stream), recorded."""
            if not handler.request_streaming:
                arrived(request, context)
                return request
            requests = iter(request)
            head = next(requests)
            arrived(head, context)

            def replay():
                yield head
                yield from requests

            return replay()

        kind = ("stream" if handler.request_streaming else "unary") + (
            "_stream" if handler.response_streaming else "_unary"
        )
        behaviour = getattr(handler, kind)
        if handler.response_streaming:

            def streamed(request, context):
                yield from held(behaviour(first(request, context), context), context)

            return handler._replace(**{kind: streamed})

        def answered(request, context):
            return behaviour(first(request, context), context)

        return handler._replace(**{kind: answered})


@contextlib.contextmanager
def serving(recorder: Recorder, **config: Any):
    """(server, address) of a real server with `recorder` after its own interceptors."""
    server, port = create_server(
        ServerConfig(host="127.0.0.1", **{"port": 0, **config}), interceptors=[recorder]
    )
    server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


def finished(server, method: str, code: str = "OK") -> int:
    """How many `method` calls `server` has finished with `code` (its own metrics)."""
    value = server.metrics.registry.get_sample_value(
        "remat_rpc_duration_seconds_count", {"method": method, "code": code}
    )
    return int(value or 0)


def wait_until(predicate, timeout: float = HANG_SECONDS, what: str = "the condition") -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.005)
