"""What `Client` and `AsyncClient` share: the channel to the server (or servers), the
per-replica channels sharded runs place their shards on, the session (graphs sent),
the retry policy, and `in_process()`."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from remat_proto.v1 import executor_pb2_grpc

from . import calls, retries, sharding, streaming, targets
from .credentials import make_channel, resolve_tls, resolve_token


class Endpoint:
    """A channel and the SDK's callables on it: the Executor stub and RunStream."""

    def __init__(self, channel):
        self.channel = channel
        self.stub = executor_pb2_grpc.ExecutorStub(channel)
        self.run_stream = streaming.run_stream_call(channel)


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
        retry: retries.Retry = retries.DEFAULT_RETRY,
    ):
        """`target`: "host:port", a gRPC URI such as "dns:///remat-headless:50051", or
        several addresses (a list, or comma-separated). Calls are balanced round robin
        over every address; with several addresses, the shards of a sharded run are
        placed on the replicas in turn (see `remat.targets`).
        `tls`: None (plain text), True (system roots) or `remat.TLS(...)`. `token`: the
        bearer token; None reads REMAT_TOKEN or REMAT_TOKEN_FILE (see remat.credentials).
        `retry`: how calls that fail with UNAVAILABLE are retried (`remat.NO_RETRY`:
        never). `timeout`: the default deadline of every call, in seconds."""
        self.target = target
        self.timeout = timeout
        self.retry = retry
        resolved = targets.channel_target(target)  # names are resolved once, here
        # Every channel of this client: the same options, credentials and token.
        self._open = functools.partial(
            make_channel,
            options=calls.channel_options(max_message_bytes, retry, options),
            tls=resolve_tls(tls),
            token=resolve_token(token) or "",  # "": no token, whatever the environment
            aio=self._aio,
        )
        self._main = Endpoint(self._open(resolved))
        self._channel, self._stub = self._main.channel, self._main.stub
        self._replicas = targets.replica_targets(resolved)
        self._replica_endpoints: dict[int, Endpoint] = {}
        self._next_shard = 0  # the offset of the next sharded run's placement
        self._lock = threading.Lock()  # the sync client's shards run on threads
        self._closed = False
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
        return retries.deadline_of(timeout or self.timeout)

    # --- placement ------------------------------------------------------------------------
    def _shard_placements(self, shards: int) -> list[retries.Placement | None]:
        """Where each shard of a sharded run goes: shard i to replica (i + offset) mod
        R when this client knows its R replicas' addresses, the offset moving on by
        `shards` with each run; else (None) the round-robin channel."""
        count = len(self._replicas)
        if not count:
            return [None] * shards
        with self._lock:
            offset, self._next_shard = self._next_shard, (self._next_shard + shards) % count
        return [retries.Placement(r, count) for r in sharding.placement(shards, count, offset)]

    def _endpoint(self, placement: retries.Placement | None) -> Endpoint:
        """The channel of `placement`'s replica (opened on first use), or the
        round-robin channel for None. Once closed, only the latter, whose calls fail."""
        if placement is None:
            return self._main
        with self._lock:
            if self._closed:
                return self._main
            endpoint = self._replica_endpoints.get(placement.replica)
            if endpoint is None:
                channel = self._open(self._replicas[placement.replica])
                endpoint = self._replica_endpoints[placement.replica] = Endpoint(channel)
            return endpoint

    def _take_channels(self) -> list:
        """Every channel this client opened, for `close()`; no new ones after it."""
        with self._lock:
            self._closed = True
            replicas, self._replica_endpoints = self._replica_endpoints, {}
        return [self._main.channel, *(endpoint.channel for endpoint in replicas.values())]

    def _attempt(self, op, left: float | None, placement: retries.Placement | None = None):
        """Start one attempt of a flow's unary RPC (a response, or an awaitable one)."""
        return getattr(self._endpoint(placement).stub, op.method)(op.request, timeout=left)
