"""Assemble the gRPC server: executor service, health checking, reflection.

Example:
    >>> from remat_server.app import create_server
    >>> from remat_server.config import ServerConfig
    >>> server, port = create_server(ServerConfig(port=0))
    >>> server.start(); port > 0
    True
    >>> server.stop(None).wait()
    True
"""
from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from remat.v1 import executor_pb2, executor_pb2_grpc

from .admission import MemoryAdmission
from .config import ServerConfig
from .engine import Engine
from .graph_store import GraphStore
from .servicer import ExecutorServicer

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name


def create_server(config: ServerConfig | None = None) -> tuple[grpc.Server, int]:
    """Build (not start) a server bound to `config.address`; returns it and its port."""
    config = config or ServerConfig()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="remat"),
        options=[("grpc.max_receive_message_length", config.max_message_bytes),
                 ("grpc.max_send_message_length", config.max_message_bytes),
                 ("grpc.so_reuseport", 0)])
    servicer = ExecutorServicer(
        Engine(config.limits, config.memory_budget_bytes), GraphStore(config.graph_cache_bytes),
        MemoryAdmission(config.memory_budget_bytes, config.max_queued_requests))
    executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, server)

    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(config.address)
    if port == 0:
        raise OSError(f"could not bind {config.address}")
    return server, port
