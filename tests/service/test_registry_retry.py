"""The graph registry (register once, run by id, resend when evicted; ids are content
addresses) and retries (UNAVAILABLE only, with backoff, within the deadline)."""
from __future__ import annotations

import collections
import contextlib
import hashlib
import random
import socket
import threading
import time
from unittest import mock

import grpc
import numpy as np
import pytest

import remat
from remat import calls
from remat_server import ServerConfig, create_server
from remat_server.errors import NotFound

MiB = 1 << 20


class Calls(grpc.ServerInterceptor):
    """Counts calls by method; answers `code` to the first `fail[method]` of them."""

    def __init__(self, fail: dict[str, int] | None = None,
                 code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.counts: collections.Counter[str] = collections.Counter()
        self.fail = dict(fail or {})
        self.code = code
        self._lock = threading.Lock()

    def intercept_service(self, continuation, details):
        method = details.method.rsplit("/", 1)[-1]
        with self._lock:
            self.counts[method] += 1
            refuse = self.counts[method] <= self.fail.get(method, 0)
        if not refuse:
            return continuation(details)
        code, number = self.code, self.counts[method]

        def abort(request, context):
            context.abort(code, f"injected {code.name} #{number}")
        return grpc.unary_unary_rpc_method_handler(abort)


@contextlib.contextmanager
def serving(calls: Calls, **config):
    """A real server (create_server) with `calls` after its own interceptors."""
    real = grpc.server

    def with_calls(*args, interceptors=(), **kwargs):
        return real(*args, interceptors=[*interceptors, calls], **kwargs)

    with mock.patch.object(grpc, "server", with_calls):
        server, port = create_server(ServerConfig(host="127.0.0.1", **{"port": 0, **config}))
    server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


def _graph(name="g", scale=2.0, n=3):
    g = remat.Graph(name)
    x = g.input("x", (n,), dtype="float64")
    g.output("y", x * scale)
    g.output("loss", remat.sum(x * x))
    return g


def _check(result, scale=2.0, n=3):
    x = np.arange(n, dtype=np.float64)
    assert np.array_equal(result.outputs["y"], x * scale)


def _inputs(n=3):
    return {"x": np.arange(n, dtype=np.float64)}


# --- the registry ------------------------------------------------------------------------
def test_run_registers_the_graph_once_then_runs_it_by_id():
    calls = Calls()
    with serving(calls) as (server, address), remat.Client(address) as client:
        g = _graph()
        for _ in range(3):
            _check(client.run(g, _inputs()))
        client.run(g, _inputs(), wrt=["x"], loss="loss")
        client.plan(g, wrt=["x"], loss="loss")
        client.differentiate(g, wrt=["x"], loss="loss")
        # Streamed runs use the id too: the graph with a big input.
        big = _graph("big", n=MiB)
        _check(client.run(big, _inputs(MiB)), n=MiB)
        _check(client.run(big, _inputs(MiB)), n=MiB)
    assert calls.counts["RegisterGraph"] == 2
    assert calls.counts["Run"] == 4 and calls.counts["RunStream"] == 2
    assert len(server.store) == 2


def test_an_evicted_graph_is_sent_again_transparently():
    """graph_cache_bytes=1 holds one graph: registering B evicts A; running A again
    gets NOT_FOUND, and the SDK resends A inline, which caches it again (by Run and
    RunStream), so the next run goes by id."""
    calls = Calls()
    with serving(calls, graph_cache_bytes=1) as (server, address), \
            remat.Client(address) as client:
        a, b = _graph("a", 2.0), _graph("b", 5.0)
        _check(client.run(a, _inputs()), 2.0)
        a_id = client.register(a)
        assert calls.counts["RegisterGraph"] == 2  # register() always asks the server
        _check(client.run(b, _inputs()), 5.0)
        assert len(server.store) == 1
        with pytest.raises(NotFound):
            server.store.get(a_id)
        _check(client.run(a, _inputs()), 2.0)
        assert calls.counts["RegisterGraph"] == 3  # a, a, b
        assert calls.counts["Run"] == 4  # a, b, a (NOT_FOUND), a inline
        assert server.store.get(a_id) is not None  # the inline graph registered itself
        _check(client.run(a, _inputs()), 2.0)
        assert calls.counts["Run"] == 5 and calls.counts["RegisterGraph"] == 3  # by id
        # The same through RunStream, and for Plan.
        big_a, big_b = _graph("a", 2.0, MiB), _graph("b", 5.0, MiB)
        _check(client.run(big_a, _inputs(MiB)), 2.0, MiB)
        _check(client.run(big_b, _inputs(MiB)), 5.0, MiB)
        _check(client.run(big_a, _inputs(MiB)), 2.0, MiB)
        assert calls.counts["RunStream"] == 4  # big_a, big_b, big_a (NOT_FOUND), inline
        assert client.plan(a, wrt=["x"], loss="loss").peak_bytes > 0
        assert client.plan(b, wrt=["x"], loss="loss").peak_bytes > 0


def test_the_cache_evicts_the_least_recently_used_graph():
    calls = Calls()
    a, b, c = _graph("a", 2.0), _graph("b", 3.0), _graph("c", 4.0)
    size = a.to_proto().ByteSize()
    assert b.to_proto().ByteSize() == c.to_proto().ByteSize() == size
    with serving(calls, graph_cache_bytes=2 * size) as (server, address), \
            remat.Client(address) as client:
        ids = {name: client.register(g) for name, g in (("a", a), ("b", b))}
        _check(client.run(a, _inputs()), 2.0)  # a is now the most recently used
        ids["c"] = client.register(c)  # evicts b, the least recently used
        assert len(server.store) == 2 and server.store.nbytes == 2 * size
        with pytest.raises(NotFound):
            server.store.get(ids["b"])
        registered = calls.counts["RegisterGraph"]
        _check(client.run(a, _inputs()), 2.0)
        _check(client.run(c, _inputs()), 4.0)
        assert calls.counts["RegisterGraph"] == registered  # both still there
        runs = calls.counts["Run"]
        _check(client.run(b, _inputs()), 3.0)  # NOT_FOUND, then inline; evicts a
        assert calls.counts["RegisterGraph"] == registered
        assert calls.counts["Run"] == runs + 2
        with pytest.raises(NotFound):
            server.store.get(ids["a"])


def test_not_found_sends_the_graph_inline_once():
    """NOT_FOUND for the id (say another replica answered): the retry carries the graph
    itself, without a RegisterGraph round trip, and the graph id stays remembered."""
    calls = Calls(fail={"Run": 1}, code=grpc.StatusCode.NOT_FOUND)
    with serving(calls) as (_, address), remat.Client(address) as client:
        _check(client.run(_graph(), _inputs()))
        assert calls.counts["RegisterGraph"] == 1 and calls.counts["Run"] == 2
        _check(client.run(_graph(), _inputs()))
        assert calls.counts["RegisterGraph"] == 1 and calls.counts["Run"] == 3


def test_ids_are_content_addresses():
    with serving(Calls()) as (server, address), remat.Client(address) as client:
        first, again = _graph(), _graph()  # built twice by the same code
        assert first is not again
        graph_id = client.register(first)
        assert client.register(again) == graph_id
        assert graph_id == hashlib.sha256(
            first.to_proto().SerializeToString(deterministic=True)).hexdigest()
        assert len(server.store) == 1  # registering the same content adds nothing
        different = {
            "scale": _graph(scale=3.0),
            "shape": _graph(n=4),
            "graph name": _graph(name="h"),
        }
        ids = {label: client.register(g) for label, g in different.items()}
        assert len({graph_id, *ids.values()}) == 1 + len(different), ids
        assert len(server.store) == 1 + len(different)


def _summed(attrs: dict):
    g = remat.Graph("attrs")
    x = g.input("x", (2, 3))
    g.output("s", remat.op("sum", x, **attrs))  # one line: the same source either way
    return g


def test_attribute_order_does_not_change_the_id():
    with serving(Calls()) as (_, address), remat.Client(address) as client:
        one = client.register(_summed({"axes": [0], "keepdims": True}))
        two = client.register(_summed({"keepdims": True, "axes": [0]}))
        three = client.register(_summed({"keepdims": False, "axes": [0]}))
    assert one == two != three


# --- retries -------------------------------------------------------------------------------
@pytest.fixture
def seeded(monkeypatch):
    """Deterministic jitter."""
    monkeypatch.setattr(rpc, "random", random.Random(1234))


@pytest.mark.parametrize("failures", [1, 3])
def test_unavailable_is_retried_until_it_succeeds(seeded, failures):
    calls = Calls(fail={"Run": failures})
    retry = calls.Retry(attempts=failures + 1, initial_backoff=0.01)
    with serving(calls) as (_, address), remat.Client(address, retry=retry) as client:
        _check(client.run(_graph(), _inputs()))
    assert calls.counts["Run"] == failures + 1


@pytest.mark.parametrize("failures", [1, 3])
def test_too_few_attempts_give_unavailable_error(seeded, failures):
    calls = Calls(fail={"Run": failures})
    retry = calls.Retry(attempts=failures, initial_backoff=0.01)
    with serving(calls) as (_, address), remat.Client(address, retry=retry) as client:
        with pytest.raises(remat.UnavailableError, match=f"injected UNAVAILABLE #{failures}"):
            client.run(_graph(), _inputs())
    assert calls.counts["Run"] == failures


def test_no_retry_makes_one_attempt(seeded):
    calls = Calls(fail={"Run": 1})
    with serving(calls) as (_, address), remat.Client(address, retry=calls.NO_RETRY) as client:
        with pytest.raises(remat.UnavailableError):
            client.run(_graph(), _inputs())
    assert calls.counts["Run"] == 1


@pytest.mark.parametrize("code, error", [
    (grpc.StatusCode.INVALID_ARGUMENT, remat.InvalidArgumentError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, remat.ResourceExhaustedError),
    (grpc.StatusCode.INTERNAL, remat.InternalError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, remat.DeadlineExceededError),
])
def test_other_errors_are_never_retried(seeded, code, error):
    calls = Calls(fail={"Run": 5}, code=code)
    retry = calls.Retry(attempts=6, initial_backoff=0.01)
    with serving(calls) as (_, address), remat.Client(address, retry=retry) as client:
        with pytest.raises(error, match="injected"):
            client.run(_graph(), _inputs())
    assert calls.counts["Run"] == 1


def test_registration_is_retried_too(seeded):
    calls = Calls(fail={"RegisterGraph": 2})
    retry = calls.Retry(attempts=3, initial_backoff=0.01)
    with serving(calls) as (_, address), remat.Client(address, retry=retry) as client:
        _check(client.run(_graph(), _inputs()))
    assert calls.counts["RegisterGraph"] == 3 and calls.counts["Run"] == 1


def test_the_deadline_bounds_retries():
    """Long backoffs and many attempts, but timeout=0.3: the call gives up in time
    (it does not sleep past its deadline)."""
    calls = Calls(fail={"Run": 1000})
    retry = calls.Retry(attempts=1000, initial_backoff=0.2, max_backoff=5.0, multiplier=3.0)
    with serving(calls) as (_, address), remat.Client(address, retry=retry) as client:
        client.register(_graph())
        for _ in range(5):  # jitter varies: several tries, none may overrun
            start = time.monotonic()
            with pytest.raises((remat.UnavailableError, remat.DeadlineExceededError)):
                client.run(_graph(), _inputs(), timeout=0.3)
            assert time.monotonic() - start < 0.5
    assert calls.counts["Run"] >= 5


def test_client_timeout_also_bounds_retries():
    calls = Calls(fail={"Run": 1000})
    retry = calls.Retry(attempts=1000, initial_backoff=0.2, max_backoff=5.0)
    with serving(calls) as (_, address), \
            remat.Client(address, retry=retry, timeout=0.3) as client:
        client.register(_graph())
        start = time.monotonic()
        with pytest.raises((remat.UnavailableError, remat.DeadlineExceededError)):
            client.run(_graph(), _inputs())
        assert time.monotonic() - start < 0.5


@pytest.mark.parametrize("retry", [
    calls.Retry(),
    calls.Retry(attempts=1),
    calls.Retry(attempts=2, initial_backoff=0.5),
    calls.Retry(attempts=12, initial_backoff=0.01, max_backoff=0.3, multiplier=3.0),
    calls.Retry(attempts=6, initial_backoff=1.0, max_backoff=1.0),
], ids=repr)
def test_retry_delays_are_full_jitter_under_the_cap(retry, monkeypatch):
    monkeypatch.setattr(rpc, "random", random.Random(99))
    caps = [min(retry.initial_backoff * retry.multiplier ** k, retry.max_backoff)
            for k in range(retry.attempts - 1)]
    samples = [list(retry.delays()) for _ in range(400)]
    assert all(len(delays) == retry.attempts - 1 for delays in samples)
    for k, cap in enumerate(caps):
        column = [delays[k] for delays in samples]
        assert all(0.0 <= d <= cap for d in column)
        # Full jitter: spread over [0, cap], not bunched at the top or the bottom.
        assert min(column) < 0.1 * cap and max(column) > 0.9 * cap
        assert 0.4 * cap < sum(column) / len(column) < 0.6 * cap
    assert list(calls.NO_RETRY.delays()) == []


def test_reconnect_options_follow_the_retry_schedule():
    assert dict(calls.reconnect_options(calls.Retry(initial_backoff=0.05, max_backoff=0.5))) == {
        "grpc.initial_reconnect_backoff_ms": 50, "grpc.max_reconnect_backoff_ms": 500}
    # Never zero, and the maximum never below the initial backoff.
    assert dict(calls.reconnect_options(calls.Retry(initial_backoff=0.0, max_backoff=0.0))) == {
        "grpc.initial_reconnect_backoff_ms": 1, "grpc.max_reconnect_backoff_ms": 1}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_client_created_before_its_server_starts_reaches_it_within_the_retry_window(seeded):
    """The server comes up 0.2 s after the first call failed. gRPC's own reconnect
    backoff (1 s, then 1.6 s ...) would keep failing the retries at once; the client
    sets it from its Retry, so the call succeeds soon after the server is up."""
    port = _free_port()
    started: dict = {}

    def start_later():
        time.sleep(0.2)
        server, _ = create_server(ServerConfig(host="127.0.0.1", port=port))
        server.start()
        started["server"], started["at"] = server, time.monotonic()

    retry = calls.Retry(attempts=40, initial_backoff=0.02, max_backoff=0.1)
    thread = threading.Thread(target=start_later)
    with remat.Client(f"127.0.0.1:{port}", retry=retry) as client:
        began = time.monotonic()
        thread.start()
        try:
            _check(client.run(_graph(), _inputs()))
            done = time.monotonic()
        finally:
            thread.join()
            started["server"].stop(None).wait()
    assert started["at"] - began >= 0.2
    # Without reconnect_options the first reconnection comes 0.8-1.2 s after the failure.
    assert done - began < 0.8, (done - began, started["at"] - began)
