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
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc

from remat_proto import metadata

from . import calls, retries, sharding, streaming
from . import compare as compare_module
from .compare import ComparisonRow
from .connection import Connection
from .errors import RematError, from_rpc_error
from .graph import Graph
from .results import OpInfo, PlanResult, RunResult


class AsyncClient(Connection):
    """A `grpc.aio` connection to a remat server: `async with`, or `await close()`.
    Arguments and results are `remat.Client`'s: both drive the same call flows
    (`remat.calls`)."""

    _aio = True

    def __init__(self, target: str | Sequence[str], **kwargs):
        """See `remat.Client`. Must be called with an event loop running."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # grpc.aio would bind the channel to a loop asyncio.run() never runs.
            raise RuntimeError(
                "create remat.AsyncClient inside a coroutine: its grpc.aio "
                "channel belongs to the running event loop"
            ) from None
        super().__init__(target, **kwargs)

    # --- lifecycle ------------------------------------------------------------------------
    async def close(self) -> None:
        for channel in self._take_channels():
            await channel.close()
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.stop(grace=None).wait)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- the driver -----------------------------------------------------------------------
    async def _drive(
        self, flow: calls.Flow, timeout: float | None, placement: retries.Placement | None = None
    ):
        """`remat.Client._drive`, awaiting each RPC."""
        deadline = self._deadline(timeout)
        reply, error = None, None
        while True:
            try:
                op = flow.throw(error) if error is not None else flow.send(reply)
            except StopIteration as done:
                return done.value
            try:
                reply, error = await self._perform(op, deadline, placement), None
            except RematError as exc:
                reply, error = None, exc

    async def _perform(self, op, deadline: float | None, placement: retries.Placement | None):
        attempts = None  # the retry schedule, made at the first failure
        while True:
            try:
                left = retries.time_left(deadline)
                if type(op) is calls.Stream:
                    return await self._stream(op, left, placement)
                return await self._attempt(op, left, placement)
            except grpc.RpcError as error:
                attempts = attempts or retries.Attempts(self.retry, deadline, placement)
                await asyncio.sleep(attempts.delay_after(error))

    async def _stream(
        self, op: calls.Stream, left: float | None, placement: retries.Placement | None
    ):
        download = streaming.Download(op.out)
        call = self._endpoint(placement).run_stream(timeout=left)
        try:
            await self._upload(call, streaming.upload(op.request, op.chunked), op.chunked)
            async for message in call:
                download.add(message)
        except asyncio.CancelledError:
            call.cancel()
            raise
        return download.finish()

    @staticmethod
    async def _upload(call, messages, chunked: dict) -> None:
        """Write the header, and the chunks only once the server has accepted it (its
        initial metadata carries `metadata.ACCEPTED`): grpc.aio, writing into a call
        the server has already refused, reports INTERNAL instead of the server's status
        (grpc/grpc#36066). A refusal's initial metadata arrives empty, with its status,
        and `call.done()` may not say so yet. Writes stop if the call ends meanwhile;
        reading it then raises its status."""
        await call.write(next(messages))
        if chunked and metadata.ACCEPTED not in dict(await call.initial_metadata()):
            return  # refused: reading the call raises the server's status
        for message in messages:
            if call.done():
                return
            try:
                await call.write(message)
            except (asyncio.InvalidStateError, grpc.aio.UsageError):
                return  # the call ended under us: its status says why
        if not call.done():
            await call.done_writing()

    # --- calls ---------------------------------------------------------------------------
    async def run(
        self,
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
        timeout: float | None = None,
        out: RunResult | None = None,
        shards: int = 1,
        batch_axes: Mapping[str, int] | None = None,
        reduction: str | None = None,
        output_axes: Mapping[str, int | None] | None = None,
    ) -> RunResult:
        """`remat.Client.run`, awaitable. Big tensors go over RunStream, invisibly;
        `shards=N` runs the shards concurrently, placed on the replicas as
        `remat.Client.run` places them (see `remat.sharding`)."""
        options = dict(
            wrt=wrt,
            loss=loss,
            cotangents=cotangents,
            fetch=fetch,
            policy=policy,
            timeline=timeline,
            measure_memory=measure_memory,
            trace=trace,
        )
        if shards != 1:
            if out is not None:
                raise ValueError("out= is not available for a sharded run (shards > 1)")
            plan, runs = sharding.shard_runs(
                graph,
                inputs,
                options,
                shards=shards,
                batch_axes=batch_axes,
                reduction=reduction,
                output_axes=output_axes,
            )
            placements = self._shard_placements(len(runs))
            tasks = [
                asyncio.ensure_future(
                    self._drive(
                        calls.run(self._session, graph, shard_inputs, **kwargs),
                        timeout,
                        placement,
                    )
                )
                for (shard_inputs, kwargs), placement in zip(runs, placements)
            ]
            try:
                return sharding.combine(plan, await asyncio.gather(*tasks))
            finally:  # one shard failed (or we were cancelled): stop the others
                for task in tasks:
                    task.cancel()
        return await self._drive(
            calls.run(self._session, graph, inputs, out=out, **options), timeout
        )

    async def plan(
        self,
        graph: Graph,
        *,
        wrt: Iterable[str] = (),
        loss: str | None = None,
        policy=None,
        input_shapes: Mapping[str, Iterable[int]] | None = None,
        fetch: Iterable[str] | None = None,
        cotangent_outputs: Iterable[str] = (),
        include_schedule: bool = False,
        timeout: float | None = None,
    ) -> PlanResult:
        """`remat.Client.plan`, awaitable: a dry run, no tensors sent."""
        return await self._drive(
            calls.plan(
                self._session,
                graph,
                wrt=wrt,
                loss=loss,
                policy=policy,
                input_shapes=input_shapes,
                fetch=fetch,
                cotangent_outputs=cotangent_outputs,
                include_schedule=include_schedule,
            ),
            timeout,
        )

    async def compare(
        self,
        graph: Graph,
        inputs: Mapping[str, Any],
        *,
        wrt: Iterable[str],
        loss: str,
        policies: Iterable = compare_module.DEFAULT_POLICIES,
        repeats: int = 1,
        warmup: bool = True,
        measure_memory: bool = False,
        timeline: bool = False,
        trace: bool = False,
        timeout: float | None = None,
    ) -> list[ComparisonRow]:
        """`remat.Client.compare`, awaitable: one row per policy, store_all's first."""
        return [
            row
            async for row in self.compare_stream(
                graph,
                inputs,
                wrt=wrt,
                loss=loss,
                policies=policies,
                repeats=repeats,
                warmup=warmup,
                measure_memory=measure_memory,
                timeline=timeline,
                trace=trace,
                timeout=timeout,
            )
        ]

    async def compare_stream(
        self,
        graph: Graph,
        inputs: Mapping[str, Any],
        *,
        wrt: Iterable[str],
        loss: str,
        policies: Iterable = compare_module.DEFAULT_POLICIES,
        repeats: int = 1,
        warmup: bool = True,
        measure_memory: bool = False,
        timeline: bool = False,
        trace: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[ComparisonRow]:
        """`remat.Client.compare_stream` as an async iterator: `async for row in ...`
        yields each policy's row as soon as the server has run it, store_all's first.
        Leaving the loop early (and closing the iterator) cancels the call."""
        request = calls.compare_request(
            graph,
            inputs,
            wrt=wrt,
            loss=loss,
            policies=policies,
            repeats=repeats,
            warmup=warmup,
            measure_memory=measure_memory,
            timeline=timeline,
            trace=trace,
        )
        attempts = retries.Attempts(self.retry, self._deadline(timeout))
        while True:  # retried until the first row arrives: rows yielded are not replayed
            call = self._stub.Compare(request, timeout=attempts.left())
            try:
                results = aiter(call)
                head = await anext(results, None)
                break
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.delay_after(error))
        rows = calls.rows_decoder()
        try:
            if head is None:
                return
            yield rows.send(head)
            async for result in results:
                yield rows.send(result)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()  # a no-op once the stream has ended

    async def differentiate(
        self,
        graph: Graph,
        *,
        wrt: Iterable[str],
        loss: str | None = None,
        input_shapes: Mapping[str, Iterable[int]] | None = None,
        timeout: float | None = None,
    ) -> Graph:
        """`remat.Client.differentiate`, awaitable: the joint forward+backward graph."""
        return await self._drive(
            calls.differentiate(
                self._session, graph, wrt=wrt, loss=loss, input_shapes=input_shapes
            ),
            timeout,
        )

    async def register(self, graph: Graph, timeout: float | None = None) -> str:
        """`remat.Client.register`, awaitable."""
        return await self._drive(calls.register(self._session, graph), timeout)

    async def list_ops(self, timeout: float | None = None) -> list[OpInfo]:
        return await self._drive(calls.list_ops(), timeout)
