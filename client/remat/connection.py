"""What `Client` and `AsyncClient` share: the channel to the server (or servers), the
session (graphs sent), the retry policy, and `in_process()`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from remat_proto.v1 import executor_pb2_grpc

from . import calls, streaming
from .credentials import make_channel


class Connection:
    """A channel to `target` and what calls on it remember. See `remat.Client`."""

    _aio = False

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = None,
        max_message_bytes: int = calls.DEFAULT_MAX_MESSAGE_BYTES,
        options: Iterable[tuple[str, Any]] = (),
        tls=None,
        token: str | None = None,
        retry: calls.Retry = calls.DEFAULT_RETRY,
    ):
        """`target`: "host:port", a gRPC URI such as "dns:///remat-headless:50051", or
        several addresses (a list, or comma-separated); calls are balanced round robin
        over every address (see `remat.targets`).
        `tls`: None (plain text), True (system roots) or `remat.TLS(...)`. `token`: the
        bearer token; None reads REMAT_TOKEN or REMAT_TOKEN_FILE (see remat.credentials).
        `retry`: how calls that fail with UNAVAILABLE are retried (`remat.NO_RETRY`:
        never). `timeout`: the default deadline of every call, in seconds."""
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self._channel = make_channel(
            target,
            calls.channel_options(max_message_bytes, retry, options),
            tls=tls,
            token=token,
            aio=self._aio,
        )
        self._stub = executor_pb2_grpc.ExecutorStub(self._channel)
        self._run_stream_call = streaming.run_stream_call(self._channel)
        self._session = calls.Session()
        self._server = None  # set by in_process()

    @classmethod
    def in_process(cls, config=None, **kwargs):
        """Start a real server on a loopback ephemeral port in this process and connect.

        The server stops when the client is closed. `config` is a
        `remat_server.ServerConfig` (its host and port are overridden).
        """
        server, target, max_message_bytes = calls.start_in_process_server(config)
        try:
            client = cls(target, max_message_bytes=max_message_bytes, **kwargs)
        except BaseException:
            server.stop(grace=None)
            raise
        client._server = server
        return client

    def _deadline(self, timeout: float | None) -> float | None:
        return calls.deadline_of(timeout or self.timeout)

    def _attempt(self, op, left: float | None):
        """Start one attempt of a flow's unary RPC (a response, or an awaitable one)."""
        return getattr(self._stub, op.method)(op.request, timeout=left)
