"""Server configuration: one frozen dataclass, filled from flags or by tests."""
from __future__ import annotations

from dataclasses import dataclass, field

from .limits import Limits

MiB = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    # gRPC's default of 4 MiB is too small for tensors; bigger ones stream (later).
    max_message_bytes: int = 512 * MiB
    max_workers: int = 8
    graph_cache_bytes: int = 256 * MiB
    # Predicted peak bytes of all requests running at once (0: no shared budget);
    # requests over it wait in a FIFO queue of at most `max_queued_requests`.
    memory_budget_bytes: int = 0
    max_queued_requests: int = 64
    limits: Limits = field(default_factory=Limits)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"
