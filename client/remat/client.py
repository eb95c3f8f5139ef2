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

from typing import Any, Iterable, Mapping

import grpc

from . import policies, wire
from .errors import from_rpc_error
from .graph import Graph
from .results import OpInfo, RunResult
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
            fetch: Iterable[str] | None = None, policy=None,
            timeout: float | None = None) -> RunResult:
        """Run forward (and backward, when `wrt` is given) on the server.

        `loss` names a scalar output; or pass `cotangents` (output name -> array) for a
        vector-Jacobian product. Returns `.outputs`, `.grads` (NumPy) and `.metrics`.
        """
        declared = {item.name: item.dtype for item in graph.inputs}
        request = executor_pb2.RunRequest(
            graph=executor_pb2.GraphRef(graph=graph.to_proto()), fetch=list(fetch or ()),
            wrt=list(wrt), loss=loss or "", policy=wire.policy_to_proto(policies.resolve(policy)))
        for name, value in inputs.items():
            wire.fill_tensor(request.inputs[name], value, _dtype_for(value, declared.get(name)))
        for name, value in (cotangents or {}).items():
            wire.fill_tensor(request.cotangents[name], value)
        response = self._call("Run", request, timeout)
        return RunResult(
            outputs={k: wire.tensor_to_array(v) for k, v in response.outputs.items()},
            grads={k: wire.tensor_to_array(v) for k, v in response.grads.items()},
            metrics=wire.metrics_from_proto(response.metrics), warnings=tuple(response.warnings))

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
