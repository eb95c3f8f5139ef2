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

from typing import Any, Iterable, Iterator, Mapping

import grpc

from . import compare as compare_module
from . import policies, wire
from .compare import ComparisonRow
from .errors import from_rpc_error
from .graph import Graph
from .results import OpInfo, PlanResult, RunResult
from .v1 import executor_pb2, executor_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = 512 << 20


class Client:
    """A connection to a remat server. Use as a context manager, or call `close()`."""

    def __init__(self, target: str, *, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Iterable[tuple[str, Any]] = ()):
        self.target = target
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes), *options])
        self._stub = executor_pb2_grpc.ExecutorStub(self._channel)
        self._server = None  # set by in_process()

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

    # --- calls ---------------------------------------------------------------------------
    def _call(self, method: str, request, timeout: float | None):
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def run(self, graph: Graph, inputs: Mapping[str, Any], *, wrt: Iterable[str] = (),
            loss: str | None = None, cotangents: Mapping[str, Any] | None = None,
            fetch: Iterable[str] | None = None, policy=None, timeline: bool = False,
            measure_memory: bool = False, trace: bool = False,
            timeout: float | None = None) -> RunResult:
        """Run forward (and backward, when `wrt` is given) on the server.

        `loss` names a scalar output; or pass `cotangents` (output name -> array) for a
        vector-Jacobian product. `policy` is a `remat.policies` object or the name of a
        parameterless one (default auto: store_all when it fits the server's memory
        limit, else the cheapest plan that does). `timeline=True` also returns the
        live bytes after every schedule step; `trace=True` every executed step with
        its timing; `measure_memory=True` measures the real peak allocation
        (`metrics.measured_peak_bytes`; such runs go one at a time).
        Returns `.outputs`, `.grads` (NumPy), `.metrics`, `.timeline` and `.trace`.
        """
        request = self._run_request(graph, inputs, wrt=wrt, loss=loss, cotangents=cotangents,
                                    fetch=fetch, policy=policy, timeline=timeline,
                                    measure_memory=measure_memory, trace=trace)
        response = self._call("Run", request, timeout)
        return RunResult(
            outputs={k: wire.tensor_to_array(v) for k, v in response.outputs.items()},
            grads={k: wire.tensor_to_array(v) for k, v in response.grads.items()},
            metrics=wire.metrics_from_proto(response.metrics), warnings=tuple(response.warnings),
            timeline=tuple(response.timeline), trace=wire.trace_from_proto(response.trace))

    def _run_request(self, graph: Graph, inputs: Mapping[str, Any], *, wrt, loss, cotangents,
                     fetch, policy, timeline: bool, measure_memory: bool, trace: bool):
        declared = {item.name: item.dtype for item in graph.inputs}
        request = executor_pb2.RunRequest(
            graph=executor_pb2.GraphRef(graph=graph.to_proto()), fetch=list(fetch or ()),
            wrt=list(wrt), loss=loss or "", policy=wire.policy_to_proto(policies.resolve(policy)),
            timeline=timeline, measure_memory=measure_memory, trace=trace)
        for name, value in inputs.items():
            wire.fill_tensor(request.inputs[name], value, _dtype_for(value, declared.get(name)))
        for name, value in (cotangents or {}).items():
            wire.fill_tensor(request.cotangents[name], value)
        return request

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
        request = executor_pb2.PlanRequest(
            graph=executor_pb2.GraphRef(graph=graph.to_proto()), wrt=list(wrt), loss=loss or "",
            cotangent_outputs=list(cotangent_outputs), fetch=list(fetch or ()),
            policy=wire.policy_to_proto(policies.resolve(policy)),
            include_schedule=include_schedule)
        for name, shape in (input_shapes or {}).items():
            request.input_shapes[name].values.extend(int(d) for d in shape)
        return wire.plan_from_proto(self._call("Plan", request, timeout))

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
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        chosen = compare_module.policy_list(policies)
        run = self._run_request(graph, inputs, wrt=list(wrt), loss=loss, cotangents=None,
                                fetch=None, policy=None, timeline=timeline,
                                measure_memory=measure_memory, trace=trace)
        request = executor_pb2.CompareRequest(
            run=run, policies=[wire.policy_to_proto(p) for p in chosen], repeats=repeats,
            warmup=warmup)
        try:
            stream = self._stub.Compare(request, timeout=timeout or self.timeout)
            base = None
            for result in stream:
                metrics = wire.metrics_from_proto(result.metrics)
                base = base or metrics
                yield compare_module.row_from_metrics(
                    result.policy, metrics, base, result.max_grad_diff,
                    timeline=result.timeline, trace=wire.trace_from_proto(result.trace),
                    error=result.error, error_code=result.error_code)
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
        request = executor_pb2.DifferentiateRequest(
            graph=executor_pb2.GraphRef(graph=graph.to_proto()), wrt=list(wrt), loss=loss or "")
        for name, shape in (input_shapes or {}).items():
            request.input_shapes[name].values.extend(int(d) for d in shape)
        response = self._call("Differentiate", request, timeout)
        joint = Graph.from_proto(response.graph)
        joint.grad_outputs = dict(response.grad_outputs)
        return joint

    def register(self, graph: Graph, timeout: float | None = None) -> str:
        """Store `graph` on the server; returns its content id (sha256)."""
        request = executor_pb2.RegisterGraphRequest(graph=graph.to_proto())
        return self._call("RegisterGraph", request, timeout).graph_id

    def list_ops(self, timeout: float | None = None) -> list[OpInfo]:
        response = self._call("ListOps", executor_pb2.ListOpsRequest(), timeout)
        return [wire.op_info_from_proto(op) for op in response.ops]


def _dtype_for(value: Any, declared: str | None) -> str | None:
    """Python lists and scalars take the input's declared dtype; arrays keep theirs."""
    return None if hasattr(value, "dtype") else declared
