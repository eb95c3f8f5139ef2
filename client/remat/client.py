"""The synchronous client.

>>> import numpy as np, remat
>>> g = remat.Graph("square")
>>> x = g.input("x", (3,), dtype="float64")
>>> _ = g.output("loss", remat.sum(x * x))
>>> with remat.Client.in_process() as client:
...     result = client.run(g, {"x": np.array([1.0, 2.0, 3.0])}, wrt=["x"], loss="loss")
>>> float(result.outputs["loss"]), result.grads["x"].tolist()
(14.0, [2.0, 4.0, 6.0])
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from . import calls, retries, sharding, streaming
from . import compare as compare_module
from .compare import ComparisonRow
from .connection import Connection
from .errors import RematError, from_rpc_error
from .graph import Graph
from .results import OpInfo, PlanResult, RunResult


class Client(Connection):
    """A connection to a remat server. Use as a context manager, or call `close()`.
    Arguments: see `remat.connection.Connection`."""

    # --- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        for channel in self._take_channels():
            channel.close()
        if self._server is not None:
            server, self._server = self._server, None
            server.stop(grace=None).wait()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the driver -----------------------------------------------------------------------
    def _drive(
        self, flow: calls.Flow, timeout: float | None, placement: retries.Placement | None = None
    ):
        """Run a flow (see `remat.calls`): perform each RPC it yields, with retries (on
        `placement`'s replica, else round robin), and send back the reply or throw in
        the error; return what the flow returns."""
        deadline = self._deadline(timeout)
        reply, error = None, None
        while True:
            try:
                op = flow.throw(error) if error is not None else flow.send(reply)
            except StopIteration as done:
                return done.value
            try:
                reply, error = self._perform(op, deadline, placement), None
            except RematError as exc:
                reply, error = None, exc

    def _perform(self, op, deadline: float | None, placement: retries.Placement | None):
        attempts = None  # the retry schedule, made at the first failure
        while True:
            try:
                left = retries.time_left(deadline)
                if type(op) is calls.Stream:
                    return self._stream(op, left, placement)
                return self._attempt(op, left, placement)
            except grpc.RpcError as error:
                attempts = attempts or retries.Attempts(self.retry, deadline, placement)
                time.sleep(attempts.delay_after(error))

    def _stream(self, op: calls.Stream, left: float | None, placement: retries.Placement | None):
        download = streaming.Download(op.out)
        for message in self._endpoint(placement).run_stream(
            streaming.upload(op.request, op.chunked), timeout=left
        ):
            download.add(message)
        return download.finish()

    # --- calls ---------------------------------------------------------------------------
    def run(
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
        """Run forward (and backward, when `wrt` is given) on the server.

        `loss` names a scalar output; or pass `cotangents` (output name -> array) for a
        vector-Jacobian product. `policy` is a `remat.policies` object or the name of a
        parameterless one (default auto: store_all when it fits the server's memory
        limit, else the cheapest plan that does). `timeline=True` also returns the
        bytes in use at every schedule step (live values, plus the running op's
        temporaries); `trace=True` every executed step with
        its timing; `measure_memory=True` measures the real peak allocation
        (`metrics.measured_peak_bytes`; such runs go one at a time).
        Returns `.outputs`, `.grads` (NumPy), `.metrics`, `.timeline` and `.trace`.

        Big tensors (over `calls.STREAM_THRESHOLD_BYTES` in all, or results too big for
        one message) travel in ~1 MiB chunks over the RunStream RPC, invisibly.

        `out`: a previous RunResult to receive into, as a training loop would
        (`result = client.run(..., out=result)`): each output and gradient whose array
        there has the same shape and dtype is overwritten in place instead of
        allocated anew, which spares the page faults of fresh memory (about as much as
        the copy itself for big tensors). Its arrays must not be in use elsewhere.

        Data parallel: `shards=N` splits the inputs in `batch_axes` (name -> axis) into
        N parts, runs them at once and combines the results exactly, given the loss's
        `reduction`, "mean" or "sum". Other scalar outputs are reduced the same way;
        `output_axes` says otherwise, per output: an axis to concatenate along (a
        per-example output), "mean" or "sum". See `remat.sharding`. With several
        addresses, shard i runs on replica (i + offset) mod R, the offset moving on by N
        with each sharded run, and a shard whose replica fails with UNAVAILABLE is
        retried on the next one; behind a `dns:///` name, whose addresses only gRPC
        knows, shards go round robin like any call (see `remat.targets`).

            >>> import numpy as np, remat
            >>> g = remat.Graph("least_squares")
            >>> x, y = g.input("x", (-1, 2), "float64"), g.input("y", (-1,), "float64")
            >>> w = g.input("w", (2,), "float64")
            >>> _ = g.output("loss", remat.mean((remat.matmul(x, w) - y) ** 2))
            >>> feed = {"x": np.arange(10.0).reshape(5, 2), "y": np.ones(5), "w": np.ones(2)}
            >>> with remat.Client.in_process() as client:
            ...     whole = client.run(g, feed, wrt=["w"], loss="loss")
            ...     split = client.run(g, feed, wrt=["w"], loss="loss", shards=2,
            ...                        batch_axes={"x": 0, "y": 0}, reduction="mean")
            >>> bool(np.allclose(split.grads["w"], whole.grads["w"])), len(split.shards)
            (True, 2)
        """
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
            with ThreadPoolExecutor(len(runs), thread_name_prefix="remat-shard") as pool:
                futures = [
                    pool.submit(
                        self._drive,
                        calls.run(self._session, graph, shard_inputs, **kwargs),
                        timeout,
                        placement,
                    )
                    for (shard_inputs, kwargs), placement in zip(runs, placements)
                ]
                return sharding.combine(plan, [future.result() for future in futures])
        return self._drive(calls.run(self._session, graph, inputs, out=out, **options), timeout)

    def plan(
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
        """Dry run: what `run` would cost under `policy`, from the server's simulator.
        No tensors are sent and no kernel runs.

        Arguments mean what they mean for `run`; `input_shapes` binds -1 (batch)
        dimensions, and `cotangent_outputs` names the outputs whose cotangents a
        vector-Jacobian run would send (instead of `loss`). The figures equal the
        run's: `peak_bytes` is its `metrics.predicted_peak_bytes`, `flops` its flops.

            >>> import remat
            >>> model = remat.models.mlp(batch=8, widths=(16, 32, 32, 4))
            >>> with remat.Client.in_process() as client:
            ...     store = client.plan(model.graph, wrt=model.wrt, loss="loss")
            ...     low = client.plan(model.graph, wrt=model.wrt, loss="loss",
            ...                       policy="recompute_all")
            >>> low.peak_bytes < store.peak_bytes, low.recompute_flops > 0
            (True, True)
            >>> set(store.node_evaluations.values())
            {1}
        """
        return self._drive(
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

    def compare(
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
        """Run `graph` under store_all first (the baseline, listed or not), then under
        each policy in order; return one `remat.ComparisonRow` per policy, store_all's
        first.

        The server runs them all in one streaming `Compare` call (see `compare_stream`
        to see each row as it completes), compiling the graph once and planning each
        policy. Each policy runs `repeats` times; the row reports the fastest run (by
        total seconds), so timings are less noisy. With `warmup`, one untimed
        store_all run comes first, so the baseline does not pay for a cold server.
        Policies are `remat.policies` objects or names; they are checked before
        anything runs. A policy that cannot plan or run gives a row with `error` set.
        """
        return list(
            self.compare_stream(
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
        )

    def compare_stream(
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
    ) -> Iterator[ComparisonRow]:
        """Like `compare`, but yields each policy's row as soon as the server has run
        it (the `Compare` RPC streams them), store_all's first: for progress bars.
        The number of rows is `len(remat.compare.policy_list(policies))`.

            >>> import remat
            >>> model = remat.models.mlp(batch=8, widths=(16, 32, 32, 4))
            >>> with remat.Client.in_process() as client:
            ...     for row in client.compare_stream(model.graph, model.inputs, wrt=model.wrt,
            ...                                      loss=model.loss, policies=["sqrt"]):
            ...         print(row.policy, row.max_grad_diff)
            store_all 0.0
            sqrt 0.0
        """
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
            try:
                results = self._stub.Compare(request, timeout=attempts.left())
                head = next(results, None)
                break
            except grpc.RpcError as error:
                time.sleep(attempts.delay_after(error))
        if head is None:
            return
        rows = calls.rows_decoder()
        try:
            yield rows.send(head)
            for result in results:
                yield rows.send(result)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def differentiate(
        self,
        graph: Graph,
        *,
        wrt: Iterable[str],
        loss: str | None = None,
        input_shapes: Mapping[str, Iterable[int]] | None = None,
        timeout: float | None = None,
    ) -> Graph:
        """The joint forward+backward graph, as a `remat.Graph` you can extend.

        Its outputs are the original ones plus `grad/<input>` per `wrt` input (or
        `grad2/<input>` and so on when differentiating a graph that already has
        `grad/<input>`); `graph.grad_outputs` maps each input to its output name.
        """
        return self._drive(
            calls.differentiate(
                self._session, graph, wrt=wrt, loss=loss, input_shapes=input_shapes
            ),
            timeout,
        )

    def register(self, graph: Graph, timeout: float | None = None) -> str:
        """Store `graph` on the server; returns its content id (sha256). Not needed
        before a call: a graph's first use sends it, and the server keeps it."""
        return self._drive(calls.register(self._session, graph), timeout)

    def list_ops(self, timeout: float | None = None) -> list[OpInfo]:
        return self._drive(calls.list_ops(), timeout)
