"""Server configuration: one frozen dataclass, filled from flags or by tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..graph.limits import Limits

MiB = 1 << 20
# memory_budget_bytes: decided at start from the machine (remat_server.service.memory_budget).
AUTO = -1


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    # Largest single gRPC message; tensors bigger than a message stream in chunks.
    max_message_bytes: int = 512 * MiB
    # Size of each chunk when tensors stream (RunStream).
    stream_chunk_bytes: int = 1 * MiB
    # A RunStream upload taking longer is cancelled (it holds a handler thread).
    max_upload_seconds: float = 600.0
    max_workers: int = 8
    # RPCs handled at once, queued ones included; beyond it gRPC answers
    # RESOURCE_EXHAUSTED at once (grpc.server's maximum_concurrent_rpcs).
    max_concurrent_rpcs: int = 256
    graph_cache_bytes: int = 256 * MiB
    # Compiled requests kept (validated and joint graphs, plans, schedules): a repeated
    # request pays decoding, execution and encoding only. An LRU bounded in bytes.
    compile_cache_bytes: int = 256 * MiB
    # Predicted peak bytes of all requests running at once; requests over it wait in a
    # FIFO queue of at most `max_queued_requests`. AUTO: `memory_budget_fraction` of
    # the machine's memory (its cgroup limit, else physical; `machine_memory_bytes`
    # overrides) less the caches and buffer pool, decided at start. 0: no shared
    # budget, only when asked for.
    memory_budget_bytes: int = AUTO
    memory_budget_fraction: float = 0.5
    machine_memory_bytes: int = 0
    max_queued_requests: int = 64
    # Exact solves and Budget searches planning at once; others wait in a FIFO queue
    # (at most `max_queued_requests`) until their deadline. Planning is pure CPU: more
    # at once than cores only slows every request down.
    max_concurrent_solves: int = 1
    # Idle RunStream upload buffers kept for reuse (0: none); fresh memory costs a page
    # fault per page on first write. See remat_server.buffers.
    buffer_pool_bytes: int = 1 << 30
    # glibc's mmap and trim thresholds, process-wide (remat_server.runtime.allocator):
    # at 4 MiB every big buffer goes back to the OS when freed and the RSS stays flat
    # under a mixed load; at 32/64 MiB freed buffers are reused (a transformer training
    # step 1.4x faster) but a mixed load's idle RSS grows 10-20%.
    malloc_mmap_threshold_bytes: int = 4 * MiB
    malloc_trim_threshold_bytes: int = 4 * MiB
    # glibc's arenas (0: its default, 8 per core): every thread that allocates gets one
    # up to that, and each keeps its own fragments; see remat_server.runtime.allocator.
    malloc_arena_max: int = 1
    limits: Limits = field(default_factory=Limits)
    # Several processes may bind the same port (remat serve --workers N).
    reuse_port: bool = False
    # Close each client connection after about this many seconds (gRPC sends GOAWAY,
    # +-10% jitter; 0: never), so long-lived clients reconnect, re-resolve DNS and
    # reach replicas started since: without it, a scaled-up Deployment's new pods get
    # no traffic from clients already connected. Calls still running on a closed
    # connection get `max_connection_age_grace_seconds` to finish (0: no limit).
    max_connection_age_seconds: float = 0.0
    max_connection_age_grace_seconds: float = 30.0
    # TLS: PEM file paths (never the keys themselves on a command line). With
    # `tls_client_ca_file`, clients must present a certificate it signed (mutual TLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Bearer tokens any of which authenticates a call (empty: no authentication).
    # Loaded from a file or the environment by `remat_server.auth.load_tokens`.
    auth_tokens: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file or self.tls_key_file)
