"""Prometheus metrics of a real server (port 0), its /metrics endpoint, multiprocess
aggregation, and promtool's lint of the exposition."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import remat
from remat_server import ServerConfig, create_server


def samples(text: str | bytes) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of an exposition."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(parsed, name: str, **labels) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def served():
    """A fresh server (its own registry: counts start at 0) after a fixed set of calls."""
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0))
    server.start()
    try:
        model = remat.models.mlp(batch=8, widths=(16, 32, 32, 4))
        with remat.Client(f"127.0.0.1:{port}") as client:
            client.run(
                model.graph, model.inputs, wrt=model.wrt, loss=model.loss, policy="store_all"
            )
            client.run(
                model.graph, model.inputs, wrt=model.wrt, loss=model.loss, policy="recompute_all"
            )
            client.register(model.graph)
            bad = dict(model.inputs, nope=np.zeros(3, np.float32))  # an input the graph lacks
            with pytest.raises(remat.InvalidArgumentError):
                client.run(model.graph, bad, wrt=model.wrt, loss=model.loss)
        yield server
    finally:
        server.metrics.close()
        server.stop(None).wait()


def test_rpc_durations_by_method_and_code(served):
    parsed = samples(served.metrics.exposition())
    assert value(parsed, "remat_rpc_duration_seconds_count", method="Run", code="OK") == 2
    # The SDK may register a graph before running it by id: at least our one call.
    assert value(parsed, "remat_rpc_duration_seconds_count", method="RegisterGraph", code="OK") >= 1
    assert (
        value(parsed, "remat_rpc_duration_seconds_count", method="Run", code="INVALID_ARGUMENT")
        == 1
    )
    assert (
        value(parsed, "remat_rpc_duration_seconds_bucket", method="Run", code="OK", le="+Inf") == 2
    )
    assert value(parsed, "remat_inflight_requests") == 0


@contextlib.contextmanager
def _plain_server():
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0))
    server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


@pytest.mark.parametrize("wrapped", [False, True], ids=["gated", "wrapped_by_later_interceptor"])
def test_each_call_is_timed_once(wrapped):
    """Executor handlers time themselves (the work-slot gate); an interceptor after ours
    that wraps them (here the tests' Recorder) or refuses a call in their place must
    leave one record per call, with its status."""
    from clients import Recorder, serving

    g = remat.Graph("timed_once")
    g.output("y", g.input("x", (2,), "float32") * 2.0)
    feed = {"x": np.ones(2, np.float32)}
    refused = grpc.StatusCode.FAILED_PRECONDITION
    serve = serving(Recorder(fail={"Run": [2]}, code=refused)) if wrapped else _plain_server()
    with serve as (server, address), remat.Client(address) as client:
        client.register(g)
        client.run(g, feed)
        if wrapped:  # the Recorder refuses the second Run before the gate sees it
            with pytest.raises(remat.RematError):
                client.run(g, feed)
        client.run(g, feed)
        parsed = samples(server.metrics.exposition())
    count = "remat_rpc_duration_seconds_count"
    assert value(parsed, count, method="Run", code="OK") == 2
    assert value(parsed, count, method="RegisterGraph", code="OK") == 1
    assert value(parsed, count, method="Run", code=refused.name) == (1 if wrapped else 0)
    assert value(parsed, "remat_inflight_requests") == 0


def test_rejections_by_reason(served):
    parsed = samples(served.metrics.exposition())
    assert value(parsed, "remat_rejected_requests_total", reason="invalid_argument") == 1
    # Every reason is exported from the start (at zero), and only those.
    reasons = {
        dict(labels)["reason"] for name, labels in parsed if name == "remat_rejected_requests_total"
    }
    assert reasons == {
        "invalid_argument",
        "resource_exhausted",
        "unauthenticated",
        "not_found",
        "failed_precondition",
        "unimplemented",
    }


def test_run_metrics_by_policy_family(served):
    parsed = samples(served.metrics.exposition())
    for name in ("forward", "backward", "recompute", "queue"):
        for policy in ("store_all", "recompute_all"):
            assert value(parsed, f"remat_{name}_seconds_count", policy=policy) == 1
    assert value(parsed, "remat_forward_seconds_sum", policy="store_all") > 0
    assert value(parsed, "remat_peak_bytes_count", policy="store_all") == 1
    assert (
        value(parsed, "remat_peak_bytes_sum", policy="store_all")
        > value(parsed, "remat_peak_bytes_sum", policy="recompute_all")
        > 0
    )
    assert value(parsed, "remat_recomputed_nodes_total", policy="store_all") == 0
    assert value(parsed, "remat_recomputed_nodes_total", policy="recompute_all") > 0


def test_graph_cache_gauges(served):
    parsed = samples(served.metrics.exposition())
    assert value(parsed, "remat_graph_cache_entries") == 1
    assert value(parsed, "remat_graph_cache_bytes") == served.store.nbytes > 0


def test_compile_cache_counts_hits_misses_and_evictions():
    """Through a real server: a repeated request is a hit and says so in its metrics; a
    cache too small for two graphs evicts; the gauges follow its size."""
    from remat_server.engine import Engine, RunRequest
    from remat_server.service.codec import graph_from_proto

    small = remat.models.mlp(batch=4, widths=(8, 8, 2))
    big = remat.models.mlp(batch=4, widths=(8, 16, 16, 16, 2))

    def compiled_bytes(model) -> int:
        engine = Engine()
        spec = graph_from_proto(model.graph.to_proto(), engine.limits)
        engine.run(
            RunRequest(
                spec, model.inputs, wrt=tuple(model.wrt), loss=model.loss, policy="store_all"
            )
        )
        return engine.cache.nbytes

    sizes = compiled_bytes(small), compiled_bytes(big)
    bound = max(sizes) + min(sizes) // 2  # room for either alone, not for both
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0, compile_cache_bytes=bound))
    server.start()
    try:
        with remat.Client(f"127.0.0.1:{port}") as client:

            def run(model):
                return client.run(
                    model.graph, model.inputs, wrt=model.wrt, loss=model.loss, policy="store_all"
                ).metrics.plan_cached

            assert [run(small), run(small)] == [False, True]
            parsed = samples(server.metrics.exposition())
            assert value(parsed, "remat_compile_cache_hits_total") >= 1
            misses = value(parsed, "remat_compile_cache_misses_total")
            assert misses >= 2  # the validated graph and the compiled request
            assert value(parsed, "remat_compile_cache_evictions_total") == 0
            assert 0 < value(parsed, "remat_compile_cache_bytes") <= bound
            assert value(parsed, "remat_compile_cache_entries") >= 1
            assert [run(big), run(small)] == [False, False]  # the big one pushed it out
            parsed = samples(server.metrics.exposition())
            assert value(parsed, "remat_compile_cache_misses_total") > misses
            assert value(parsed, "remat_compile_cache_evictions_total") >= 1
            assert value(parsed, "remat_compile_cache_bytes") <= bound
    finally:
        server.metrics.close()
        server.stop(None).wait()


def test_policy_label_is_the_family_only():
    from remat_server.engine import Metrics
    from remat_server.service.metrics import ServerMetrics, policy_family

    assert [
        policy_family(p) for p in ("every_k(4)", "budget(0.5,profile)", "store_all", "", "Weird!")
    ] == ["every_k", "budget", "store_all", "unknown", "other"]
    metrics = ServerMetrics()
    for k in (2, 3, 4):
        metrics.observe_run(Metrics(recomputed_nodes=k, policy=f"every_k({k})"))
    parsed = samples(metrics.exposition())
    assert value(parsed, "remat_recomputed_nodes_total", policy="every_k") == 9
    assert value(parsed, "remat_forward_seconds_count", policy="every_k") == 3


def test_unknown_method_and_health_are_recorded():
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, port = create_server(ServerConfig(host="127.0.0.1", port=0))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            missing = channel.unary_unary("/remat.v1.Executor/NoSuchMethod")
            with pytest.raises(grpc.RpcError) as error:
                missing(b"")
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        parsed = samples(server.metrics.exposition())
    finally:
        server.stop(None).wait()
    assert value(parsed, "remat_rpc_duration_seconds_count", method="Check", code="OK") == 1
    assert (
        value(parsed, "remat_rpc_duration_seconds_count", method="unknown", code="UNIMPLEMENTED")
        == 1
    )
    assert value(parsed, "remat_rejected_requests_total", reason="unimplemented") == 1
    assert not any(dict(labels).get("method") == "NoSuchMethod" for _, labels in parsed)


def test_bidi_stream_is_timed_until_it_ends():
    """Through the interceptor directly (the servicer's RunStream is another change)."""
    import grpc

    from remat_server.service.metrics import ServerMetrics

    class Context:  # the parts of grpc.ServicerContext the interceptor reads
        def code(self):
            return None

        def is_active(self):
            return True

    class Details:
        method = "/remat.v1.Executor/RunStream"

    def echo(requests, context):
        yield from requests

    metrics = ServerMetrics()
    handler = metrics.interceptor().intercept_service(
        lambda details: grpc.stream_stream_rpc_method_handler(echo), Details()
    )
    responses = handler.stream_stream(iter([1, 2, 3]), Context())
    assert next(responses) == 1
    assert value(samples(metrics.exposition()), "remat_inflight_requests") == 1
    assert list(responses) == [2, 3]
    parsed = samples(metrics.exposition())
    assert value(parsed, "remat_inflight_requests") == 0
    assert value(parsed, "remat_rpc_duration_seconds_count", method="RunStream", code="OK") == 1


def test_cancelled_stream_and_a_later_interceptors_refusal():
    """A real grpc server: metrics first, then an auth-like interceptor that refuses
    Check (as a handler that aborts); Watch is a server stream the client cancels."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from remat_server.service.metrics import ServerMetrics

    class RefuseCheck(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            if details.method.endswith("/Check"):

                def refuse(request, context):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")

                return grpc.unary_unary_rpc_method_handler(refuse)
            return continuation(details)

    metrics = ServerMetrics()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[metrics.interceptor(), RefuseCheck()],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Check(health_pb2.HealthCheckRequest())
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            watch = stub.Watch(health_pb2.HealthCheckRequest())
            next(watch)
            assert value(samples(metrics.exposition()), "remat_inflight_requests") == 1
            watch.cancel()
            deadline = time.monotonic() + 5  # the server learns of the cancel shortly
            while (
                value(samples(metrics.exposition()), "remat_inflight_requests")
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
        parsed = samples(metrics.exposition())
    finally:
        server.stop(None).wait()
    assert value(parsed, "remat_inflight_requests") == 0
    assert (
        value(parsed, "remat_rpc_duration_seconds_count", method="Check", code="UNAUTHENTICATED")
        == 1
    )
    assert value(parsed, "remat_rejected_requests_total", reason="unauthenticated") == 1
    assert value(parsed, "remat_rpc_duration_seconds_count", method="Watch", code="CANCELLED") == 1


def test_http_endpoint_serves_the_same_text(served):
    port = served.metrics.start_http_server(0, host="127.0.0.1")
    assert port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read()
    assert samples(body) == samples(served.metrics.exposition())


def promtool_problems(text: bytes) -> str | None:
    """promtool's complaints about an exposition ("" if none); None if promtool is
    missing (a failure when REMAT_REQUIRE_PROMTOOL=1, as in CI)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("REMAT_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is not on PATH but REMAT_REQUIRE_PROMTOOL=1")
        return None
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    return (checked.stdout + checked.stderr).decode().strip() or (
        "" if checked.returncode == 0 else f"exit code {checked.returncode}"
    )


def test_promtool_accepts_the_exposition(served):
    problems = promtool_problems(served.metrics.exposition())
    if problems is None:
        pytest.skip("promtool is not installed")
    assert problems == ""


MULTIPROCESS_SCRIPT = textwrap.dedent("""
    # Like `remat serve --workers 2`: PROMETHEUS_MULTIPROC_DIR is set before the import,
    # workers are forked and record, the parent aggregates and marks one dead.
    import os, sys
    from remat_server.engine import Metrics
    from remat_server.service.graph_store import GraphStore
    from remat_server.service.metrics import ServerMetrics, mark_process_dead, multiprocess_mode

    assert multiprocess_mode()
    pids = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:  # a worker: what one server process records
            metrics, store = ServerMetrics(), GraphStore(1 << 20)
            metrics.track_cache(store)
            store.put(f"graph{i}", None, 100)
            metrics.observe_run(Metrics(forward_seconds=0.5, recomputed_nodes=3,
                                        policy="every_k(4)"))
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    sys.stdout.write(ServerMetrics().exposition().decode() + "\\0")
    mark_process_dead(pids[0])
    sys.stdout.write(ServerMetrics().exposition().decode())
""")


def test_multiprocess_aggregate(tmp_path):
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    texts = done.stdout.split("\0")
    before, after = (samples(text) for text in texts)
    assert promtool_problems(texts[0].encode()) in ("", None)

    assert value(before, "remat_recomputed_nodes_total", policy="every_k") == 6
    assert value(before, "remat_forward_seconds_count", policy="every_k") == 2
    assert value(before, "remat_forward_seconds_sum", policy="every_k") == 1.0
    assert value(before, "remat_graph_cache_entries") == 2
    assert value(before, "remat_graph_cache_bytes") == 200
    # A dead worker's live gauges leave the sum; its counters stay.
    assert value(after, "remat_graph_cache_entries") == 1
    assert value(after, "remat_recomputed_nodes_total", policy="every_k") == 6
