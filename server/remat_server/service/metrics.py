"""Prometheus metrics: every RPC, every run (engine metrics), and the graph cache.

Every handler times its own calls, wrapped once when it is registered (`timed`,
`unknown_methods`, and the work-slot gate's `call_timer`): a gRPC server interceptor
runs Python on every call (a gRPC echo behind the metrics interceptor took 1.05-1.09x
a bare echo's time). The interceptor (`rpc_timing`) remains for what comes before the
handlers: when another interceptor (auth) may refuse a call, the metrics one goes first
and times those refusals.

Two modes, chosen by prometheus_client when it is first imported:
- single process: each `ServerMetrics` owns a `CollectorRegistry`, so many servers in
  one process (the tests) never collide;
- multiprocess (PROMETHEUS_MULTIPROC_DIR set before the import, as `remat serve
  --workers N` does): values go to per-process files in that directory and every
  exposition is the aggregate over all workers (`MultiProcessCollector`). Gauges use
  "livesum": the sum over live workers; the parent calls `mark_process_dead(pid)` when
  a worker exits.

Labels are low-cardinality by construction: RPC method (short name) and status code,
rejection reason (a fixed set), policy family ("every_k", never "every_k(4)").
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import grpc
import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from .counters import LocalCounter, LocalGauge
from .histogram import LocalHistogram
from .interceptors import wrap_handler
from .rpc_timing import REJECTED_CODES, UNTIMED, Call, MetricsInterceptor, UnknownMethods

# ~0.5 ms (a health check) to 60 s (a big recompute_all run).
SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Powers of 4 from 1 KiB to 64 GiB.
BYTES_BUCKETS = tuple(float(1024 * 4**k) for k in range(14))

# Policy labels ("every_k(4)") whose metric children are memoized.
MAX_POLICY_LABELS = 256

_POLICY_FAMILY = re.compile(r"[a-z][a-z0-9_]*")


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes to PROMETHEUS_MULTIPROC_DIR (decided at its import)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def policy_family(policy: str) -> str:
    """ "every_k(4)" -> "every_k", "budget(0.5)" -> "budget"; never a parameter."""
    family = policy.split("(", 1)[0].strip()
    if not family:
        return "unknown"
    return family if _POLICY_FAMILY.fullmatch(family) else "other"


class _Instruments:
    """The metric objects; `registry=None` registers nowhere (multiprocess mode, whose
    histograms and counters are prometheus_client's; a single process's are
    `LocalHistogram`s, and `LocalCounter`s and `LocalGauge`s for those updated on every
    request)."""

    def __init__(self, registry: CollectorRegistry | None):
        local = registry is not None and not multiprocess_mode()

        def hist(name, doc, labels, buckets=SECONDS_BUCKETS):
            if not local:
                return Histogram(name, doc, labels, buckets=buckets, registry=registry)
            return LocalHistogram(name, doc, labels, buckets, registry)

        def counter(name, doc):  # unlabelled, counted on every request
            if not local:
                return Counter(name, doc, registry=registry)
            return LocalCounter(name, doc, registry)

        def gauge(name, doc):  # unlabelled, moved by every RPC
            if not local:
                return Gauge(name, doc, registry=registry, multiprocess_mode="livesum")
            return LocalGauge(name, doc, registry)

        self.rpc_duration = hist(
            "remat_rpc_duration_seconds",
            "Time from the start of an RPC to its status (streams: until "
            "the stream ends), by method and gRPC status code.",
            ["method", "code"],
        )
        self.durations: dict[tuple, object] = {}  # (method, code) -> rpc_duration's child
        self.inflight = gauge("remat_inflight_requests", "RPCs being handled now.")
        self.rejected = Counter(
            "remat_rejected_requests_total",
            "RPCs refused with a client-side status code "
            "(invalid_argument, resource_exhausted, unauthenticated, "
            "not_found, failed_precondition, unimplemented).",
            ["reason"],
            registry=registry,
        )
        for code in REJECTED_CODES:  # export zeros, so rate() works before the first one
            self.rejected.labels(code.name.lower())
        self.forward = hist(
            "remat_forward_seconds",
            "Time in the first forward pass of a run, by policy family.",
            ["policy"],
        )
        self.backward = hist(
            "remat_backward_seconds",
            "Time in the backward pass of a run (recomputation excluded), by policy family.",
            ["policy"],
        )
        self.recompute = hist(
            "remat_recompute_seconds",
            "Time spent recomputing forward values during a run, by policy family.",
            ["policy"],
        )
        self.queue = hist(
            "remat_queue_seconds",
            "Time a run waited for memory admission, by policy family.",
            ["policy"],
        )
        self.peak = hist(
            "remat_peak_bytes",
            "Peak live tensor bytes of a run, by policy family.",
            ["policy"],
            buckets=BYTES_BUCKETS,
        )
        self.recomputed = Counter(
            "remat_recomputed_nodes_total",
            "Node evaluations beyond the first (recomputations), by policy family.",
            ["policy"],
            registry=registry,
        )
        self.cache_entries = Gauge(
            "remat_graph_cache_entries",
            "Graphs in the graph cache.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.cache_bytes = Gauge(
            "remat_graph_cache_bytes",
            "Wire size of the graphs in the graph cache.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.memory_budget = Gauge(
            "remat_memory_budget_bytes",
            "The shared memory budget: predicted peak bytes of all requests running at "
            "once (0: none). Decided at start from the machine unless --memory-budget-bytes "
            "sets it; summed over workers.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.compile_hits = counter(
            "remat_compile_cache_hits_total",
            "Lookups the compile cache answered (a validated graph, a compiled request).",
        )
        self.compile_misses = counter(
            "remat_compile_cache_misses_total",
            "Lookups that compiled (validated, differentiated).",
        )
        self.compile_evictions = counter(
            "remat_compile_cache_evictions_total",
            "Entries the compile cache dropped to stay within --compile-cache-bytes.",
        )
        self.compile_entries = Gauge(
            "remat_compile_cache_entries",
            "Entries in the compile cache.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.compile_bytes = Gauge(
            "remat_compile_cache_bytes",
            "Estimated bytes of the compile cache's entries.",
            registry=registry,
            multiprocess_mode="livesum",
        )


# In multiprocess mode values live in per-process files keyed by metric and labels, so
# two sets of metric objects in one process would overwrite each other: share one.
_shared: _Instruments | None = None
_shared_lock = threading.Lock()


def _process_instruments() -> _Instruments:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = _Instruments(registry=None)
        return _shared


class ServerMetrics:
    """A server's Prometheus metrics: register each service's handlers `timed` (or
    `call_timer` for a handler that times itself) and `unknown_methods()` last; wire
    `interceptor()` first in the server's chain when it has interceptors; call
    `observe_run` after each run and `track_cache` once; scrape `exposition()` or
    `start_http_server(port)`.

        >>> from remat_proto.results import Metrics
        >>> metrics = ServerMetrics()
        >>> metrics.observe_run(Metrics(forward_seconds=0.01, recomputed_nodes=3,
        ...                             policy="every_k(4)"))
        >>> b'remat_recomputed_nodes_total{policy="every_k"} 3.0' in metrics.exposition()
        True

    In multiprocess mode the metric objects are per process (shared by every instance
    in it) and `registry` (default: a new one) collects the aggregate of all workers.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        if multiprocess_mode():
            multiprocess.MultiProcessCollector(self.registry)
            self._m = _process_instruments()
        else:
            self._m = _Instruments(self.registry)
        self._http_servers: list = []
        self._interceptor = MetricsInterceptor(self._m)
        # Policy label -> its family's labelled metrics (label lookups take a lock).
        self._run_children: dict[str, tuple] = {}

    def interceptor(self) -> grpc.ServerInterceptor:
        """Put it first: it then also sees refusals made by later interceptors."""
        return self._interceptor

    def call_timer(self, method: str) -> Callable[[object], Call | None]:
        """For a handler that times its calls itself (the work-slot gate: one wrapper
        fewer on every executor call): the factory of `method`'s call timers, a context
        manager per call, or None for a call the interceptor times already (a later
        interceptor wrapped the handler). Name the handler with `times_itself`."""
        m, label = self._m, self._interceptor.method_label(method)
        timed = self._interceptor.timing

        def timer(context) -> Call | None:
            return None if id(context) in timed else Call(m, label, context)

        return timer

    def timed(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler`, timing its own calls as `method` (a short name, e.g. "Check")."""
        timer = self.call_timer(method)
        wrapped = wrap_handler(handler, lambda context: timer(context) or UNTIMED)
        self.times_itself(wrapped)
        return wrapped

    def unknown_methods(self) -> grpc.GenericRpcHandler:
        """Register it last: it answers every method no service has with UNIMPLEMENTED,
        recorded as method "unknown" (the path is the client's invention). gRPC would
        answer those without calling any handler."""
        unknown = UnknownMethods(self._m)
        self.times_itself(unknown.refuse)
        return unknown

    def times_itself(self, handler: grpc.RpcMethodHandler) -> None:
        """The interceptor passes `handler` through unwrapped (it uses `call_timer`); a
        later interceptor's refusal in its place is timed as usual."""
        self._interceptor.self_timed.add(id(handler))
        self._interceptor.keep.append(handler)  # held: its id stays its own

    def observe_run(self, metrics) -> None:
        """Record one run's `remat_proto.results.Metrics`."""
        children = self._run_children.get(metrics.policy)
        if children is None:
            family, m = policy_family(metrics.policy), self._m
            children = tuple(
                metric.labels(family)
                for metric in (m.forward, m.backward, m.recompute, m.queue, m.peak, m.recomputed)
            )
            if len(self._run_children) < MAX_POLICY_LABELS:  # labels vary: bound the memo
                self._run_children[metrics.policy] = children
        forward, backward, recompute, queue, peak, recomputed = children
        forward.observe(metrics.forward_seconds)
        backward.observe(metrics.backward_seconds)
        recompute.observe(metrics.recompute_seconds)
        queue.observe(metrics.queue_seconds)
        peak.observe(metrics.peak_bytes)
        if metrics.recomputed_nodes:  # adding 0 changes nothing, and takes a lock
            recomputed.inc(metrics.recomputed_nodes)

    def track_cache(self, store) -> None:
        """Follow a `GraphStore`'s size. Updated on change (not read at scrape time),
        which is what multiprocess gauges support."""

        def update(entries: int, nbytes: int) -> None:
            self._m.cache_entries.set(entries)
            self._m.cache_bytes.set(nbytes)

        store.on_change(update)

    def set_memory_budget(self, nbytes: int) -> None:
        self._m.memory_budget.set(nbytes)

    def track_compile_cache(self, cache) -> None:
        """Count an engine `LRUCache`'s hits, misses and evictions, and follow its size."""
        m = self._m
        counters = {"hit": m.compile_hits, "miss": m.compile_misses, "evict": m.compile_evictions}

        def update(event: str, entries: int, nbytes: int) -> None:
            counter = counters.get(event)
            if counter is not None:
                counter.inc()
            else:
                m.compile_entries.set(entries)
                m.compile_bytes.set(nbytes)

        cache.on_change(update)

    def exposition(self) -> bytes:
        """The Prometheus text format of this server's metrics (all workers' aggregate
        in multiprocess mode)."""
        return generate_latest(self.registry)

    def start_http_server(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics on its own port in a daemon thread (0 picks a free port);
        returns the bound port."""
        httpd = _serve(port, host, self.registry)
        self._http_servers.append(httpd)
        return httpd.server_address[1]

    def close(self) -> None:
        """Stop the HTTP servers started by `start_http_server`."""
        for httpd in self._http_servers:
            httpd.shutdown()
            httpd.server_close()
        self._http_servers.clear()


def start_multiprocess_http_server(port: int, host: str = "0.0.0.0") -> int:
    """For the parent of `--workers N`: serve the aggregate of every worker's metrics
    (the files in PROMETHEUS_MULTIPROC_DIR) on /metrics; returns the bound port."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # ValueError if the env var is missing
    return _serve(port, host, registry).server_address[1]


def mark_process_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (inflight, cache) from the aggregate; its
    counters and histograms are kept, as Prometheus expects."""
    multiprocess.mark_process_dead(pid)


def _serve(port: int, host: str, registry: CollectorRegistry):
    started = prometheus_client.start_http_server(port, addr=host, registry=registry)
    # (server, thread) since prometheus_client 0.19; None before.
    if not isinstance(started, tuple):
        raise RuntimeError("prometheus_client >= 0.19 is required to learn the bound port")
    return started[0]
