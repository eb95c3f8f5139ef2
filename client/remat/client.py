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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import grpc

from . import compare as compare_module
from . import rpc, sharding, streaming, wire
from .compare import ComparisonRow
from .credentials import make_channel
from .errors import NotFoundError, ResourceExhaustedError, from_rpc_error
from .graph import Graph
from .results import OpInfo, PlanResult, RunResult
from .v1 import executor_pb2, executor_pb2_grpc



class Client:
    """A connection to a remat server. Use as a context manager, or call `close()`."""

    def __init__(self, target: str | Sequence[str], *, timeout: float | None = None,
                 max_message_bytes: int = rpc.DEFAULT_MAX_MESSAGE_BYTES,
                 options: Iterable[tuple[str, Any]] = (), tls=None, token: str | None = None,
                 retry: rpc.Retry = rpc.Retry()):
        """`target`: "host:port", a gRPC URI such as "dns:///remat-headless:50051", or
        several addresses (a list, or comma-separated); calls are balanced round robin
        over every address (see `remat.targets`).
        `tls`: None (plain text), True (system roots) or `remat.TLS(...)`. `token`: the
        bearer token; None reads REMAT_TOKEN or REMAT_TOKEN_FILE (see remat.credentials).
        `retry`: how calls that fail with UNAVAILABLE are retried (`rpc.NO_RETRY`: never)."""
        self.target = target
        self.timeout = timeout
        self._channel = make_channel(
            target, rpc.channel_options(max_message_bytes, retry, options),
            tls=tls, token=token)
        self._stub = executor_pb2_grpc.ExecutorStub(self._channel)
        self._run_stream_call = streaming.run_stream_call(self._channel)
        self._server = None  # set by in_process()
        self.retry = retry
        self._graph_ids = rpc.GraphIds()

    @classmethod
    def in_process(cls, config=None, **kwargs) -> "Client":
        """Start a real server on a loopback ephemeral port in this process and connect.

        The server stops when the client is closed. `config` is a
        `remat_server.ServerConfig` (its host and port are overridden).
        """
        from dataclasses import replace

        from remat_server import ServerConfig, create_server

        config = replace(config or ServerConfig(), host="127.0.0.1", port=0)
        server, port = create_server(config)
        server.start()
        client = cls(f"127.0.0.1:{port}", max_message_bytes=config.max_message_bytes, **kwargs)
        client._server = server
        return client

    # --- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------
    def _invoke(self, attempt: Callable[[float | None], Any], timeout: float | None):
        """`attempt(seconds_left)` with retries on UNAVAILABLE (backoff, within the
        deadline); gRPC errors become remat exceptions here."""
        timeout = timeout or self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = self.retry.delays()
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                return attempt(left)
            except grpc.RpcError as error:
                delay = next(delays, None) if rpc.retryable(error) else None
                if delay is None or (deadline is not None and time.monotonic() + delay >= deadline):
                    raise from_rpc_error(error) from None
                time.sleep(delay)

    def _with_graph(self, graph: Graph, call: Callable[[executor_pb2.GraphRef], Any],
                    timeout: float | None):
        """`call(ref)` with the graph by id, registered on first use. A server that no
        longer has it (evicted, or another replica answered) gets it inline once, and
        keeps it: an inline graph registers itself."""
        message = graph.to_proto()
        key = rpc.GraphIds.key(message)
        graph_id = self._graph_ids.get(key)
        if graph_id is None:
            graph_id = self._register(message, timeout)
            self._graph_ids.remember(key, graph_id)
        try:
            return call(executor_pb2.GraphRef(graph_id=graph_id))
        except NotFoundError:
            return call(executor_pb2.GraphRef(graph=message))

    def _unary(self, method: str, request, timeout: float | None):
        return self._invoke(lambda left: getattr(self._stub, method)(request, timeout=left),
                            timeout)

    def _register(self, message, timeout: float | None) -> str:
        request = executor_pb2.RegisterGraphRequest(graph=message)
        return self._unary("RegisterGraph", request, timeout).graph_id

    # --- calls ---------------------------------------------------------------------------
    def run(self, graph: Graph, inputs: Mapping[str, Any], *, wrt: Iterable[str] = (),
            loss: str | None = None, cotangents: Mapping[str, Any] | None = None,
            fetch: Iterable[str] | None = None, policy=None, timeline: bool = False,
            measure_memory: bool = False, trace: bool = False,
            timeout: float | None = None, out: RunResult | None = None, shards: int = 1,
            batch_axes: Mapping[str, int] | None = None, reduction: str | None = None,
            output_axes: Mapping[str, int | None] | None = None) -> RunResult:
        """Run forward (and backward, when `wrt` is given) on the server.

        `loss` names a scalar output; or pass `cotangents` (output name -> array) for a
        vector-Jacobian product. `policy` is a `remat.policies` object or the name of a
        parameterless one (default auto: store_all when it fits the server's memory
        limit, else the cheapest plan that does). `timeline=True` also returns the
        live bytes after every schedule step; `trace=True` every executed step with
        its timing; `measure_memory=True` measures the real peak allocation
        (`metrics.measured_peak_bytes`; such runs go one at a time).
        Returns `.outputs`, `.grads` (NumPy), `.metrics`, `.timeline` and `.trace`.

        Big tensors (over `rpc.STREAM_THRESHOLD_BYTES` in all, or results too big for
        one message) travel in ~1 MiB chunks over the RunStream RPC, invisibly.

        `out`: a previous RunResult to receive into, as a training loop would
        (`result = client.run(..., out=result)`): each output and gradient whose array
        there has the same shape and dtype is overwritten in place instead of
        allocated anew, which spares the page faults of fresh memory (about as much as
        the copy itself for big tensors). Its arrays must not be in use elsewhere.

        Data parallel: `shards=N` splits the inputs in `batch_axes` (name -> axis) into
        N parts, runs them at once (spread over the replicas of a multi-address or
        `dns:///` target) and combines the results exactly, given the loss's
        `reduction`, "mean" or "sum". Other scalar outputs are reduced the same way;
        `output_axes` says otherwise, per output: an axis to concatenate along (a
        per-example output), "mean" or "sum". See `remat.sharding`.

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
        options = dict(wrt=wrt, loss=loss, cotangents=cotangents, fetch=fetch, policy=policy,
                       timeline=timeline, measure_memory=measure_memory, trace=trace)
        if shards != 1:
            if out is not None:
                raise ValueError("out= is not available for a sharded run (shards > 1)")
            return self._run_sharded(graph, inputs, options, timeout, shards=shards,
                                     batch_axes=batch_axes, reduction=reduction,
                                     output_axes=output_axes)

        def call(ref):
            request, chunked = rpc.run_request(ref, graph, inputs, **options)
            if chunked:
                return self._run_stream(request, chunked, timeout, out)
            try:
                return self._invoke(
                    lambda left: self._stub.Run.with_call(request, timeout=left)[0], timeout)
            except ResourceExhaustedError as error:
                if rpc.USE_STREAM_KEY not in error.metadata:
                    raise
            request, chunked = rpc.run_request(ref, graph, inputs, stream=True, **options)
            return self._run_stream(request, chunked, timeout, out)

        return self._with_graph(graph, lambda ref: rpc.as_result(call(ref), out), timeout)

    def _run_sharded(self, graph: Graph, inputs, options: dict, timeout: float | None,
                     **sharding_args) -> RunResult:
        plan, runs = sharding.shard_runs(graph, inputs, options, **sharding_args)
        with ThreadPoolExecutor(len(runs), thread_name_prefix="remat-shard") as pool:
            futures = [pool.submit(self.run, graph, shard_inputs, timeout=timeout, **kwargs)
                       for shard_inputs, kwargs in runs]
            return sharding.combine(plan, [future.result() for future in futures])

    def _run_stream(self, request, chunked: dict, timeout: float | None, out=None):
        def attempt(left):
            download = streaming.Download(out)
            for message in self._run_stream_call(streaming.upload(request, chunked),
                                                 timeout=left):
                download.add(message)
            return download.finish()
        return self._invoke(attempt, timeout)

    def plan(self, graph: Graph, *, wrt: Iterable[str] = (), loss: str | None = None,
             policy=None, input_shapes: Mapping[str, Iterable[int]] | None = None,
             fetch: Iterable[str] | None = None, cotangent_outputs: Iterable[str] = (),
             include_schedule: bool = False, timeout: float | None = None) -> PlanResult:
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
        def call(ref):
            request = rpc.plan_request(
                ref, wrt=wrt, loss=loss, policy=policy, input_shapes=input_shapes, fetch=fetch,
                cotangent_outputs=cotangent_outputs, include_schedule=include_schedule)
            return wire.plan_from_proto(self._unary("Plan", request, timeout))
        return self._with_graph(graph, call, timeout)

    def compare(self, graph: Graph, inputs: Mapping[str, Any], *, wrt: Iterable[str],
                loss: str, policies: Iterable = compare_module.DEFAULT_POLICIES,
                repeats: int = 1, warmup: bool = True, measure_memory: bool = False,
                timeline: bool = False, trace: bool = False,
                timeout: float | None = None) -> list[ComparisonRow]:
        """Run the graph under store_all (the baseline, always first) and each policy;
        one `remat.ComparisonRow` per policy. See `remat.compare.compare`."""
        return compare_module.compare(self, graph, inputs, wrt=wrt, loss=loss,
                                      policies=policies, repeats=repeats, warmup=warmup,
                                      measure_memory=measure_memory, timeline=timeline,
                                      trace=trace, timeout=timeout)

    def compare_stream(self, graph: Graph, inputs: Mapping[str, Any], *, wrt: Iterable[str],
                       loss: str, policies: Iterable = compare_module.DEFAULT_POLICIES,
                       repeats: int = 1, warmup: bool = True, measure_memory: bool = False,
                       timeline: bool = False, trace: bool = False,
                       timeout: float | None = None) -> Iterator[ComparisonRow]:
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
        request = rpc.compare_request(
            graph, inputs, wrt=wrt, loss=loss, policies=policies, repeats=repeats,
            warmup=warmup, measure_memory=measure_memory, timeline=timeline, trace=trace)
        # Retried only until the first row arrives: rows already yielded are not replayed.
        head, rest = self._invoke(
            lambda left: _first(self._stub.Compare(request, timeout=left)), timeout)
        try:
            yield from rpc.comparison_rows(head, rest)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def differentiate(self, graph: Graph, *, wrt: Iterable[str], loss: str | None = None,
                      input_shapes: Mapping[str, Iterable[int]] | None = None,
                      timeout: float | None = None) -> Graph:
        """The joint forward+backward graph, as a `remat.Graph` you can extend.

        Its outputs are the original ones plus `grad/<input>` per `wrt` input (or
        `grad2/<input>` and so on when differentiating a graph that already has
        `grad/<input>`); `graph.grad_outputs` maps each input to its output name.
        """
        def call(ref):
            request = rpc.differentiate_request(ref, wrt=wrt, loss=loss,
                                                input_shapes=input_shapes)
            return rpc.joint_graph(self._unary("Differentiate", request, timeout))
        return self._with_graph(graph, call, timeout)

    def register(self, graph: Graph, timeout: float | None = None) -> str:
        """Store `graph` on the server; returns its content id (sha256)."""
        message = graph.to_proto()
        graph_id = self._register(message, timeout)
        self._graph_ids.remember(rpc.GraphIds.key(message), graph_id)
        return graph_id

    def list_ops(self, timeout: float | None = None) -> list[OpInfo]:
        response = self._unary("ListOps", executor_pb2.ListOpsRequest(), timeout)
        return [wire.op_info_from_proto(op) for op in response.ops]


def _first(stream: Iterator):
    """(first item or None, the rest) of a server stream."""
    iterator = iter(stream)
    return next(iterator, None), iterator
