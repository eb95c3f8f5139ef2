"""Assemble the gRPC server: executor service, health checking, reflection, metrics,
authentication and TLS.

Example:
    >>> from remat_server.service.app import create_server
    >>> from remat_server.service.config import ServerConfig
    >>> server, port = create_server(ServerConfig(port=0))
    >>> server.start(); port > 0
    True
    >>> server.stop(None).wait()
    True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from remat_proto.v1 import executor_pb2, executor_pb2_grpc

from ..engine import Engine
from ..runtime import allocator
from ..runtime.buffers import BufferPool
from . import auth, memory_budget, streaming, work_slots
from .admission import FifoLimiter, MemoryAdmission
from .config import ServerConfig
from .graph_store import GraphStore
from .interceptors import Drain, tolerant
from .metrics import ServerMetrics
from .servicer import ExecutorServicer

log = logging.getLogger(__name__)

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class RematServer:
    """A `grpc.Server` (start, stop, wait_for_termination) plus what remat adds:
    `metrics`, `health`, `store`, the upload `buffers` and a graceful `shutdown`."""

    def __init__(
        self,
        server: grpc.Server,
        health_servicer: health.HealthServicer,
        metrics: ServerMetrics,
        store: GraphStore,
        drain: Drain,
        buffers: BufferPool,
        config: ServerConfig,
        budget: memory_budget.Budget | None,
        engine: Engine,
    ):
        self._server = server
        self._drain = drain
        self.health = health_servicer
        self.metrics = metrics
        self.store = store
        self.buffers = buffers
        self.config = config  # with its memory budget decided
        self.budget = budget  # how the default budget was computed (None: a flag set it)
        self.engine = engine  # its compile cache and solve slots, for tests and tools

    def describe_budget(self) -> str:
        """The memory budget, for the start log: its size and where it came from."""
        if self.budget is not None:
            return f"memory budget {self.budget.explain()}"
        if self.config.memory_budget_bytes > 0:
            return (
                f"memory budget {self.config.memory_budget_bytes:,} bytes (--memory-budget-bytes)"
            )
        return "no memory budget (--memory-budget-bytes 0)"

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None):
        return self._server.stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def shutdown(self, grace: float) -> None:
        """Graceful stop: health says NOT_SERVING (so balancers drain us), new RPCs are
        refused with UNAVAILABLE (clients retry elsewhere), in-flight ones get `grace`
        seconds to finish, then gRPC stops. Blocks until done."""
        self.health.enter_graceful_shutdown()
        left = self._drain.drain(grace)
        self._server.stop(left).wait()
        self.metrics.close()


class _Handlers:
    """Stands in for a server to collect the generated code's method handlers (of one
    service)."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def _register(server: grpc.Server, service: str, handlers: dict) -> None:
    """What the generated `add_..._to_server` does with a service's handlers."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def _add_timed(add_to, server: grpc.Server, metrics: ServerMetrics) -> None:
    """The service `add_to(server)` adds, each of its handlers timing its calls."""
    collected = _Handlers()
    add_to(collected)
    if not hasattr(collected, "handlers"):  # generated code of another kind: untimed
        add_to(server)
        return
    _register(
        server,
        collected.service,
        {name: metrics.timed(name, handler) for name, handler in collected.handlers.items()},
    )


def _add_executor(
    servicer: ExecutorServicer,
    server: grpc.Server,
    slots: FifoLimiter,
    drain: Drain,
    metrics: ServerMetrics,
) -> None:
    """The generated handlers, tolerant of unparseable requests (INVALID_ARGUMENT, not
    INTERNAL), except RunStream's, which frames chunks itself; each runs holding one
    of the work `slots`, counted by `drain` (and refused once it drains), and times
    itself for `metrics` (one wrapper around every executor call, not three)."""
    collected = _Handlers()
    executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, collected)
    service = executor_pb2.DESCRIPTOR.services_by_name["Executor"]
    handlers = {
        name: tolerant(handler, service.methods_by_name[name].input_type.name)
        for name, handler in collected.handlers.items()
    }
    handlers["RunStream"] = grpc.stream_stream_rpc_method_handler(
        servicer.RunStream,
        request_deserializer=streaming.decode_request,
        response_serializer=streaming.encode_response,
    )
    for name, handler in handlers.items():
        handlers[name] = work_slots.gated(handler, slots, drain, metrics.call_timer(name))
        metrics.times_itself(handlers[name])
    _register(server, SERVICE_NAME, handlers)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The `grpc.server` channel arguments `config` asks for.

    >>> options = dict(server_options(ServerConfig(max_connection_age_seconds=300)))
    >>> options["grpc.max_connection_age_ms"], options["grpc.max_connection_age_grace_ms"]
    (300000, 30000)
    """
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", int(config.reuse_port)),
    ]
    if config.max_connection_age_seconds > 0:  # gRPC's default: connections live forever
        options.append(("grpc.max_connection_age_ms", _ms(config.max_connection_age_seconds)))
        if config.max_connection_age_grace_seconds > 0:  # else: in-flight calls may finish
            options.append(
                ("grpc.max_connection_age_grace_ms", _ms(config.max_connection_age_grace_seconds))
            )
    return options


def _ms(seconds: float) -> int:
    """Milliseconds for a gRPC integer channel argument (a C int: at most 2**31 - 1)."""
    return min(max(1, round(seconds * 1000)), 2**31 - 1)


def create_server(
    config: ServerConfig | None = None, interceptors: Sequence[grpc.ServerInterceptor] = ()
) -> tuple[RematServer, int]:
    """Build (not start) a server bound to `config.address`; returns it and its port.
    A memory budget left to the machine (the default) is decided here, for one process
    (`remat serve --workers N` decides it for N before it forks). `interceptors` run
    after remat's own (token checks), in order; the calls they refuse are in the
    metrics too."""
    config, budget = memory_budget.resolve(config or ServerConfig())
    if budget is not None:
        log.info("remat server: memory budget %s", budget.explain())
    allocator.tune_for_serving(
        config.malloc_mmap_threshold_bytes,
        config.malloc_trim_threshold_bytes,
        config.malloc_arena_max,
    )
    metrics = ServerMetrics()
    drain = Drain()
    # Handlers time themselves (`metrics.timed`): an interceptor costs every call, so
    # the metrics one is there only to time the refusals of later ones.
    later = [auth.TokenInterceptor(config.auth_tokens)] if config.auth_tokens else []
    later += interceptors
    # Every admitted call gets a thread at once; executor calls then wait for one of
    # `max_workers` work slots (`work_slots`), so health checks never queue behind them.
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=work_slots.pool_threads(config.max_concurrent_rpcs),
            thread_name_prefix="remat",
        ),
        interceptors=[metrics.interceptor(), *later] if later else [],
        options=server_options(config),
        maximum_concurrent_rpcs=work_slots.grpc_call_limit(config.max_concurrent_rpcs),
    )
    store = GraphStore(config.graph_cache_bytes)
    buffers = BufferPool(config.buffer_pool_bytes)
    metrics.track_cache(store)
    solves = work_slots.Lending(
        FifoLimiter(
            config.max_concurrent_solves,
            config.max_queued_requests,
            "exact solves or budget searches",
            "--max-concurrent-solves",
        )
    )
    engine = Engine(
        config.limits, config.memory_budget_bytes, config.compile_cache_bytes, solve_slots=solves
    )
    metrics.track_compile_cache(engine.cache)
    metrics.set_memory_budget(max(0, config.memory_budget_bytes))
    servicer = ExecutorServicer(
        engine,
        store,
        work_slots.Lending(MemoryAdmission(config.memory_budget_bytes, config.max_queued_requests)),
        metrics=metrics,
        chunk_bytes=config.stream_chunk_bytes,
        max_message_bytes=config.max_message_bytes,
        max_upload_seconds=config.max_upload_seconds,
        buffers=buffers,
    )
    _add_executor(
        servicer,
        server,
        work_slots.work_limiter(config.max_workers, config.max_concurrent_rpcs),
        drain,
        metrics,
    )

    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _add_timed(
        lambda to: health_pb2_grpc.add_HealthServicer_to_server(health_servicer, to),
        server,
        metrics,
    )
    _add_timed(
        lambda to: reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), to
        ),
        server,
        metrics,
    )
    server.add_generic_rpc_handlers((metrics.unknown_methods(),))  # last: the fallback
    credentials = auth.server_credentials(config)
    if credentials is None:
        port = server.add_insecure_port(config.address)
    else:
        port = server.add_secure_port(config.address, credentials)
    if port == 0:
        raise OSError(f"could not bind {config.address}")
    remat = RematServer(
        server, health_servicer, metrics, store, drain, buffers, config, budget, engine
    )
    return remat, port
