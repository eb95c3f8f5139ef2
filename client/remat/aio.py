"""The asyncio client: `remat.Client`'s surface on `grpc.aio`, every call awaitable.

    >>> import asyncio, numpy as np, remat
    >>> g = remat.Graph("square")
    >>> x = g.input("x", (3,), dtype="float64")
    >>> _ = g.output("loss", remat.sum(x * x))
    >>> async def main():
    ...     async with remat.AsyncClient.in_process() as client:
    ...         runs = [client.run(g, {"x": np.full(3, float(k))}, wrt=["x"], loss="loss")
    ...                 for k in (1, 2)]
    ...         return [float(r.outputs["loss"]) for r in await asyncio.gather(*runs)]
    >>> asyncio.run(main())
    [3.0, 12.0]

Create the client inside the coroutine that uses it (a `grpc.aio` channel belongs to
the event loop running when it is made). Cancelling the task awaiting a call cancels
the RPC, and the server stops that run at its next schedule step.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence

import grpc

from . import compare as compare_module
from . import rpc, sharding, streaming, wire
from .compare import ComparisonRow
from .credentials import make_channel
from .errors import NotFoundError, ResourceExhaustedError, from_rpc_error
from .graph import Graph
from .results import OpInfo, PlanResult, RunResult
from .v1 import executor_pb2, executor_pb2_grpc


class AsyncClient:
    """A `grpc.aio` connection to a remat server: `async with`, or `await close()`.
    Arguments and results are `remat.Client`'s."""

    def __init__(self, target: str | Sequence[str], *, timeout: float | None = None,
                 max_message_bytes: int = rpc.DEFAULT_MAX_MESSAGE_BYTES,
                 options: Iterable[tuple[str, Any]] = (), tls=None, token: str | None = None,
                 retry: rpc.Retry = rpc.Retry()):
        """See `remat.Client`. Must be called with an event loop running."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # grpc.aio would bind the channel to a loop asyncio.run() never runs.
            raise RuntimeError("create remat.AsyncClient inside a coroutine: its grpc.aio "
                               "channel belongs to the running event loop") from None
        self.target = target
        self.timeout = timeout
        self._channel = make_channel(
            target, rpc.channel_options(max_message_bytes, retry, options),
            tls=tls, token=token, aio=True)
        self._stub = executor_pb2_grpc.ExecutorStub(self._channel)
        self._run_stream_call = streaming.run_stream_call(self._channel)
        self._server = None  # set by in_process()
        self.retry = retry
        self._graph_ids = rpc.GraphIds()
        # One registration per graph even when many tasks run it for the first time.
        self._registering: dict[str, asyncio.Lock] = {}

    @classmethod
    def in_process(cls, config=None, **kwargs) -> "AsyncClient":
        """Start a real server on a loopback ephemeral port in this process and connect
        (call it from a coroutine). The server stops when the client is closed.
        `config` is a `remat_server.ServerConfig` (its host and port are overridden)."""
        from dataclasses import replace

        from remat_server import ServerConfig, create_server

        config = replace(config or ServerConfig(), host="127.0.0.1", port=0)
        server, port = create_server(config)
        server.start()
        try:
            client = cls(f"127.0.0.1:{port}", max_message_bytes=config.max_message_bytes,
                         **kwargs)
        except BaseException:
            server.stop(grace=None)
            raise
        client._server = server
        return client

    # --- lifecycle ------------------------------------------------------------------------
    async def close(self) -> None:
        await self._channel.close()
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.stop(grace=None).wait)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- plumbing -----------------------------------------------------------------------
    async def _invoke(self, attempt: Callable[[float | None], Awaitable], timeout: float | None):
        """`await attempt(seconds_left)` with retries on UNAVAILABLE (backoff, within the
        deadline); gRPC errors become remat exceptions here."""
        timeout = timeout or self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = self.retry.delays()
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                return await attempt(left)
            except grpc.RpcError as error:
                delay = next(delays, None) if rpc.retryable(error) else None
                if delay is None or (deadline is not None and time.monotonic() + delay >= deadline):
                    raise from_rpc_error(error) from None
            await asyncio.sleep(delay)

    async def _with_graph(self, graph: Graph, call: Callable[[executor_pb2.GraphRef], Awaitable],
                          timeout: float | None):
        """`await call(ref)` with the graph by id, registered on first use. A server that
        no longer has it (evicted, or another replica answered) gets it inline once, and
        keeps it: an inline graph registers itself."""
        message = graph.to_proto()
        key = rpc.GraphIds.key(message)
        graph_id = await self._graph_id(key, message, timeout)
        try:
            return await call(executor_pb2.GraphRef(graph_id=graph_id))
        except NotFoundError:
            return await call(executor_pb2.GraphRef(graph=message))

    async def _graph_id(self, key: str, message, timeout: float | None) -> str:
        graph_id = self._graph_ids.get(key)
        if graph_id is not None:
            return graph_id
        try:
            async with self._registering.setdefault(key, asyncio.Lock()):
                graph_id = self._graph_ids.get(key)  # another task registered it meanwhile
                if graph_id is None:
                    graph_id = await self._register(message, timeout)
                    self._graph_ids.remember(key, graph_id)
        finally:
            # Tasks already waiting keep the lock they hold; later ones take the fast path.
            self._registering.pop(key, None)
        return graph_id

    async def _unary(self, method: str, request, timeout: float | None):
        return await self._invoke(
            lambda left: getattr(self._stub, method)(request, timeout=left), timeout)

    async def _register(self, message, timeout: float | None) -> str:
        request = executor_pb2.RegisterGraphRequest(graph=message)
        return (await self._unary("RegisterGraph", request, timeout)).graph_id

    # --- calls ---------------------------------------------------------------------------
    async def run(self, graph: Graph, inputs: Mapping[str, Any], *, wrt: Iterable[str] = (),
                  loss: str | None = None, cotangents: Mapping[str, Any] | None = None,
                  fetch: Iterable[str] | None = None, policy=None, timeline: bool = False,
                  measure_memory: bool = False, trace: bool = False,
                  timeout: float | None = None, out: RunResult | None = None, shards: int = 1,
                  batch_axes: Mapping[str, int] | None = None, reduction: str | None = None,
                  output_axes: Mapping[str, int | None] | None = None) -> RunResult:
        """`remat.Client.run`, awaitable. Big tensors go over RunStream, invisibly;
        `shards=N` runs the shards concurrently (see `remat.sharding`)."""
        options = dict(wrt=wrt, loss=loss, cotangents=cotangents, fetch=fetch, policy=policy,
                       timeline=timeline, measure_memory=measure_memory, trace=trace)
        if shards != 1:
            if out is not None:
                raise ValueError("out= is not available for a sharded run (shards > 1)")
            plan, runs = sharding.shard_runs(graph, inputs, options, shards=shards,
                                             batch_axes=batch_axes, reduction=reduction,
                                             output_axes=output_axes)
            tasks = [asyncio.ensure_future(self.run(graph, shard_inputs, timeout=timeout,
                                                    **kwargs))
                     for shard_inputs, kwargs in runs]
            try:
                return sharding.combine(plan, await asyncio.gather(*tasks))
            finally:  # one shard failed (or we were cancelled): stop the others
                for task in tasks:
                    task.cancel()

        async def call(ref):
            request, chunked = rpc.run_request(ref, graph, inputs, **options)
            if chunked:
                return rpc.as_result(await self._run_stream(request, chunked, timeout, out))
            try:
                return rpc.as_result(await self._invoke(
                    lambda left: self._stub.Run(request, timeout=left), timeout), out)
            except ResourceExhaustedError as error:
                if rpc.USE_STREAM_KEY not in error.metadata:
                    raise
            request, chunked = rpc.run_request(ref, graph, inputs, stream=True, **options)
            return rpc.as_result(await self._run_stream(request, chunked, timeout, out))

        return await self._with_graph(graph, call, timeout)

    async def _run_stream(self, request, chunked: dict, timeout: float | None, out=None):
        async def attempt(left):
            download = streaming.Download(out)
            # grpc.aio writes a plain iterator's messages itself, with flow control.
            call = self._run_stream_call(streaming.upload(request, chunked), timeout=left)
            try:
                async for message in call:
                    download.add(message)
            except asyncio.CancelledError:
                call.cancel()
                raise
            return download.finish()
        return await self._invoke(attempt, timeout)

    async def plan(self, graph: Graph, *, wrt: Iterable[str] = (), loss: str | None = None,
                   policy=None, input_shapes: Mapping[str, Iterable[int]] | None = None,
                   fetch: Iterable[str] | None = None, cotangent_outputs: Iterable[str] = (),
                   include_schedule: bool = False, timeout: float | None = None) -> PlanResult:
        """`remat.Client.plan`, awaitable: a dry run, no tensors sent."""
        async def call(ref):
            request = rpc.plan_request(
                ref, wrt=wrt, loss=loss, policy=policy, input_shapes=input_shapes, fetch=fetch,
                cotangent_outputs=cotangent_outputs, include_schedule=include_schedule)
            return wire.plan_from_proto(await self._unary("Plan", request, timeout))
        return await self._with_graph(graph, call, timeout)

    async def compare(self, graph: Graph, inputs: Mapping[str, Any], *, wrt: Iterable[str],
                      loss: str, policies: Iterable = compare_module.DEFAULT_POLICIES,
                      repeats: int = 1, warmup: bool = True, measure_memory: bool = False,
                      timeline: bool = False, trace: bool = False,
                      timeout: float | None = None) -> list[ComparisonRow]:
        """`remat.Client.compare`, awaitable: one row per policy, store_all's first."""
        return [row async for row in self.compare_stream(
            graph, inputs, wrt=wrt, loss=loss, policies=policies, repeats=repeats,
            warmup=warmup, measure_memory=measure_memory, timeline=timeline, trace=trace,
            timeout=timeout)]

    async def compare_stream(self, graph: Graph, inputs: Mapping[str, Any], *,
                             wrt: Iterable[str], loss: str,
                             policies: Iterable = compare_module.DEFAULT_POLICIES,
                             repeats: int = 1, warmup: bool = True,
                             measure_memory: bool = False, timeline: bool = False,
                             trace: bool = False,
                             timeout: float | None = None) -> AsyncIterator[ComparisonRow]:
        """`remat.Client.compare_stream` as an async iterator: `async for row in ...`
        yields each policy's row as soon as the server has run it, store_all's first.
        Leaving the loop early (and closing the iterator) cancels the call."""
        request = rpc.compare_request(
            graph, inputs, wrt=wrt, loss=loss, policies=policies, repeats=repeats,
            warmup=warmup, measure_memory=measure_memory, timeline=timeline, trace=trace)

        async def first(left):
            call = self._stub.Compare(request, timeout=left)
            responses = aiter(call)
            return call, responses, await anext(responses, None)

        # Retried only until the first row arrives: rows already yielded are not replayed.
        call, responses, head = await self._invoke(first, timeout)
        # rpc.comparison_rows pulls results from a plain iterator: hand it one result at a
        # time, each as it arrives, so it keeps its state (the store_all baseline).
        arrived: list = []
        rows = rpc.comparison_rows(head, iter(arrived.pop, None))
        try:
            if head is None:
                return
            yield next(rows)
            async for result in responses:
                arrived.append(result)
                yield next(rows)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()  # a no-op once the stream has ended

    async def differentiate(self, graph: Graph, *, wrt: Iterable[str], loss: str | None = None,
                            input_shapes: Mapping[str, Iterable[int]] | None = None,
                            timeout: float | None = None) -> Graph:
        """`remat.Client.differentiate`, awaitable: the joint forward+backward graph."""
        async def call(ref):
            request = rpc.differentiate_request(ref, wrt=wrt, loss=loss,
                                                input_shapes=input_shapes)
            return rpc.joint_graph(await self._unary("Differentiate", request, timeout))
        return await self._with_graph(graph, call, timeout)

    async def register(self, graph: Graph, timeout: float | None = None) -> str:
        """Store `graph` on the server; returns its content id (sha256)."""
        message = graph.to_proto()
        graph_id = await self._register(message, timeout)
        self._graph_ids.remember(rpc.GraphIds.key(message), graph_id)
        return graph_id

    async def list_ops(self, timeout: float | None = None) -> list[OpInfo]:
        response = await self._unary("ListOps", executor_pb2.ListOpsRequest(), timeout)
        return [wire.op_info_from_proto(op) for op in response.ops]
