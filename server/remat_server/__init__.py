"""remat's server, grouped by pipeline stage: `graph` (IR, validation, limits), `ops`,
`autodiff`, `checkpoint` (schedule, simulation, memory, planners), `runtime`
(executor, allocator, buffers), `engine` (compile once, cache, run) and `service`
(the gRPC server around the engine).

    >>> from remat_server import ServerConfig, create_server
    >>> server, port = create_server(ServerConfig(port=0))

The names below load lazily, so the domain stages import without gRPC.
"""

from __future__ import annotations

import importlib

__all__ = ["Limits", "ServerConfig", "create_server"]
_WHERE = {
    "Limits": ".graph.limits",
    "ServerConfig": ".service.config",
    "create_server": ".service.app",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'remat_server' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
