"""The graph registry and retries, for both clients (`kind`: remat.Client and
remat.AsyncClient run the same call flows, and each test checks both).

A graph's first use carries it inline (the server registers it), later calls send
its content id; an id the server does not know (evicted, or another replica) gets
the graph inline once. UNAVAILABLE is retried with backoff, everything else is not,
and a call's timeout is one deadline for all of its RPCs."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import support
from clients import KINDS, Recorder, connect, first, serving

import remat
from remat import calls, retries
from remat_server import ServerConfig, create_server
from remat_server.errors import NotFound

MiB = 1 << 20
INLINE, BY_ID = "graph", "graph_id"


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
def _run(client, g):
    _check(client.run(g, _inputs()))


def _run_stream(client, g):  # the same graph shape with an 8 MiB input: over RunStream
    _check(client.run(g, _inputs(MiB)), n=MiB)


def _plan(client, g):
    assert client.plan(g, wrt=["x"], loss="loss").peak_bytes > 0


def _differentiate(client, g):
    assert client.differentiate(g, wrt=["x"], loss="loss").output_names == ["y", "loss", "grad/x"]


FIRST_USES = {  # call -> (the RPC it makes, the graph it uses, how to make it)
    "run": ("Run", _graph, _run),
    "run_stream": ("RunStream", lambda: _graph("big", n=MiB), _run_stream),
    "plan": ("Plan", _graph, _plan),
    "differentiate": ("Differentiate", _graph, _differentiate),
}


@pytest.mark.parametrize("call", FIRST_USES)
def test_a_graphs_first_use_sends_it_inline_without_register_graph(kind, call):
    method, build, make = FIRST_USES[call]
    seen = Recorder()
    with serving(seen) as (server, address), connect(kind, address) as client:
        g = build()
        make(client, g)
        assert seen.refs(method) == [INLINE]
        assert seen.counts["RegisterGraph"] == 0
        assert server.store.get(g.graph_id) is not None  # the inline graph registered itself
        make(client, g)
        make(client, g)
        assert seen.refs(method) == [INLINE, BY_ID, BY_ID]
        assert seen.counts["RegisterGraph"] == 0 and len(server.store) == 1


def test_once_sent_every_kind_of_call_goes_by_id(kind):
    """The client remembers the graphs it sent, whatever call sent them."""
    seen = Recorder()
    with serving(seen) as (server, address), connect(kind, address) as client:
        g = _graph()
        for _ in range(3):
            _check(client.run(g, _inputs()))
        client.run(g, _inputs(), wrt=["x"], loss="loss")
        _plan(client, g)
        _differentiate(client, g)
        # Streamed runs use the id too: the graph with a big input.
        big = _graph("big", n=MiB)
        _run_stream(client, big)
        _run_stream(client, big)
    assert seen.refs("Run") == [INLINE, BY_ID, BY_ID, BY_ID]
    assert seen.refs("Plan") == seen.refs("Differentiate") == [BY_ID]
    assert seen.refs("RunStream") == [INLINE, BY_ID]
    assert seen.counts["RegisterGraph"] == 0
    assert len(server.store) == 2


def test_register_asks_the_server_and_later_calls_go_by_id(kind):
    seen = Recorder()
    with serving(seen) as (server, address), connect(kind, address) as client:
        g = _graph()
        graph_id = client.register(g)
        assert graph_id == g.graph_id and server.store.get(graph_id) is not None
        _run(client, g)
        assert client.register(g) == graph_id  # register() always asks the server
        _run(client, g)
    assert seen.counts["RegisterGraph"] == 2
    assert seen.refs("Run") == [BY_ID, BY_ID]


def _add_output(g):
    g.output("z", g["x"] * 3.0)


def _add_node(g):
    remat.exp(g["x"], name="unused")  # not an output, but part of the graph all the same


def _add_input(g):
    g.input("u", (2,), "float64")


@pytest.mark.parametrize(
    "change", [_add_output, _add_node, _add_input], ids=lambda f: f.__name__[1:]
)
def test_a_graph_changed_after_a_call_gets_a_new_id_and_goes_inline_again(kind, change):
    seen = Recorder()
    with serving(seen) as (server, address), connect(kind, address) as client:
        g = _graph()
        _run(client, g)
        _run(client, g)
        old_id = g.graph_id
        change(g)
        assert g.graph_id != old_id
        assert (
            g.graph_id
            == hashlib.sha256(g.to_proto().SerializeToString(deterministic=True)).hexdigest()
        )
        feeds = {**_inputs(), **({"u": np.zeros(2)} if "u" in g else {})}
        for _ in range(2):
            result = client.run(g, feeds)
            assert np.array_equal(result.outputs["y"], _inputs()["x"] * 2.0)
        assert seen.refs("Run") == [INLINE, BY_ID, INLINE, BY_ID]
        assert server.store.find(old_id) is not None
        assert server.store.find(g.graph_id) is not None
        assert seen.counts["RegisterGraph"] == 0


def test_an_evicted_graph_is_sent_again_transparently(kind):
    """graph_cache_bytes=1 holds one graph: sending B evicts A; running A again gets
    NOT_FOUND, and the SDK resends A inline, which caches it again (by Run and Plan;
    RunStream below), so the next call goes by id."""
    seen = Recorder()
    with serving(seen, graph_cache_bytes=1) as (server, address), connect(kind, address) as client:
        a, b = _graph("a", 2.0), _graph("b", 5.0)
        _check(client.run(a, _inputs()), 2.0)
        a_id = client.register(a)
        assert seen.counts["RegisterGraph"] == 1  # register() always asks the server
        _check(client.run(b, _inputs()), 5.0)  # inline: registers b, evicts a
        assert len(server.store) == 1
        with pytest.raises(NotFound):
            server.store.get(a_id)
        _check(client.run(a, _inputs()), 2.0)
        assert seen.refs("Run") == [INLINE, INLINE, BY_ID, INLINE]  # a, b, a (NOT_FOUND), a
        assert server.store.get(a_id) is not None  # the inline graph registered itself
        _check(client.run(a, _inputs()), 2.0)
        assert seen.refs("Run")[4:] == [BY_ID]
        assert client.plan(b, wrt=["x"], loss="loss").peak_bytes > 0
        assert client.plan(a, wrt=["x"], loss="loss").peak_bytes > 0
        assert client.plan(a, wrt=["x"], loss="loss").peak_bytes > 0
        assert seen.refs("Plan") == [BY_ID, INLINE, BY_ID, INLINE, BY_ID]
        assert seen.counts["RegisterGraph"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_an_evicted_graph_is_sent_again_over_run_stream(kind):
    """The same for big inputs: RunStream refuses an unknown id at the header (before
    the upload is read), and the SDK resends the graph inline."""
    seen = Recorder()
    rounds = 10
    with serving(seen, graph_cache_bytes=1) as (server, address), connect(kind, address) as client:
        graphs = {2.0: _graph("a", 2.0, MiB), 5.0: _graph("b", 5.0, MiB)}
        for _ in range(1 + rounds):  # each graph evicts the other
            for scale, g in graphs.items():
                _check(client.run(g, _inputs(MiB)), scale, MiB)
        assert seen.refs("RunStream") == [INLINE, INLINE] + [BY_ID, INLINE] * 2 * rounds
        assert seen.counts["Run"] == seen.counts["RegisterGraph"] == 0


def test_the_cache_evicts_the_least_recently_used_graph(kind):
    seen = Recorder()
    a, b, c = _graph("a", 2.0), _graph("b", 3.0), _graph("c", 4.0)
    size = support.stored_bytes(a.to_proto())
    assert support.stored_bytes(b.to_proto()) == support.stored_bytes(c.to_proto()) == size
    with (
        serving(seen, graph_cache_bytes=2 * size) as (server, address),
        connect(kind, address) as client,
    ):
        ids = {name: client.register(g) for name, g in (("a", a), ("b", b))}
        _check(client.run(a, _inputs()), 2.0)  # a is now the most recently used
        ids["c"] = client.register(c)  # evicts b, the least recently used
        assert len(server.store) == 2 and server.store.nbytes == 2 * size
        with pytest.raises(NotFound):
            server.store.get(ids["b"])
        _check(client.run(a, _inputs()), 2.0)
        _check(client.run(c, _inputs()), 4.0)
        assert seen.refs("Run") == [BY_ID] * 3  # both still there
        _check(client.run(b, _inputs()), 3.0)  # NOT_FOUND, then inline; evicts a
        assert seen.refs("Run")[3:] == [BY_ID, INLINE]
        assert seen.counts["RegisterGraph"] == 3
        with pytest.raises(NotFound):
            server.store.get(ids["a"])


def test_not_found_for_an_id_resends_the_graph_inline_once(kind):
    """NOT_FOUND for the id (say another replica answered): the retry carries the graph
    itself, without a RegisterGraph round trip, and the graph id stays remembered."""
    seen = Recorder(fail={"Run": [2]}, code=grpc.StatusCode.NOT_FOUND)
    with serving(seen) as (_, address), connect(kind, address) as client:
        g = _graph()
        _run(client, g)
        _run(client, g)
        assert seen.refs("Run") == [INLINE, BY_ID, INLINE]
        _run(client, g)
        assert seen.refs("Run") == [INLINE, BY_ID, INLINE, BY_ID]
    assert seen.counts["RegisterGraph"] == 0


def test_not_found_for_the_inline_graph_too_is_an_error_not_a_loop(kind):
    seen = Recorder(fail={"Run": [2, 3]}, code=grpc.StatusCode.NOT_FOUND)
    with serving(seen) as (_, address), connect(kind, address) as client:
        g = _graph()
        _run(client, g)
        with pytest.raises(remat.NotFoundError, match="injected NOT_FOUND #3"):
            client.run(g, _inputs())
        assert seen.refs("Run") == [INLINE, BY_ID, INLINE]
        _run(client, g)  # the id is forgotten: inline, then by id again
        _run(client, g)
        assert seen.refs("Run")[3:] == [INLINE, BY_ID]


def test_ids_are_content_addresses(kind):
    with serving(Recorder()) as (server, address), connect(kind, address) as client:
        first_build, again = _graph(), _graph()  # built twice by the same code
        assert first_build is not again
        graph_id = client.register(first_build)
        assert client.register(again) == graph_id == first_build.graph_id == again.graph_id
        assert (
            graph_id
            == hashlib.sha256(
                first_build.to_proto().SerializeToString(deterministic=True)
            ).hexdigest()
        )
        assert len(server.store) == 1  # registering the same content adds nothing
        different = {
            "scale": _graph(scale=3.0),
            "shape": _graph(n=4),
            "graph name": _graph(name="h"),
        }
        ids = {label: client.register(g) for label, g in different.items()}
        assert len({graph_id, *ids.values()}) == 1 + len(different), ids
        assert all(ids[label] == g.graph_id for label, g in different.items())
        assert len(server.store) == 1 + len(different)


def _summed(attrs: dict):
    g = remat.Graph("attrs")
    x = g.input("x", (2, 3))
    g.output("s", remat.op("sum", x, **attrs))  # one line: the same source either way
    return g


def test_attribute_order_does_not_change_the_id(kind):
    with serving(Recorder()) as (_, address), connect(kind, address) as client:
        one = client.register(_summed({"axes": [0], "keepdims": True}))
        two = client.register(_summed({"keepdims": True, "axes": [0]}))
        three = client.register(_summed({"keepdims": False, "axes": [0]}))
    assert one == two != three
    assert _summed({"keepdims": True, "axes": [0]}).graph_id == one


# --- retries -------------------------------------------------------------------------------
@pytest.fixture
def seeded(monkeypatch):
    """Deterministic jitter."""
    monkeypatch.setattr(retries, "random", random.Random(1234))


class _AtTheCap:
    """A `random` whose "full jitter" is no jitter: every delay is its cap."""

    @staticmethod
    def uniform(low, high):
        return high


@pytest.fixture
def at_cap(monkeypatch):
    monkeypatch.setattr(retries, "random", _AtTheCap())


@pytest.mark.parametrize("failures", [1, 3])
def test_unavailable_is_retried_until_it_succeeds(kind, seeded, failures):
    seen = Recorder(fail={"Run": first(failures)})
    retry = retries.Retry(attempts=failures + 1, initial_backoff=0.01)
    with serving(seen) as (_, address), connect(kind, address, retry=retry) as client:
        _run(client, _graph())
    assert seen.counts["Run"] == failures + 1
    assert seen.refs("Run") == [INLINE] * (failures + 1)  # not sent yet: inline each time


@pytest.mark.parametrize("failures", [1, 3])
def test_too_few_attempts_give_unavailable_error(kind, seeded, failures):
    seen = Recorder(fail={"Run": first(failures)})
    retry = retries.Retry(attempts=failures, initial_backoff=0.01)
    with serving(seen) as (_, address), connect(kind, address, retry=retry) as client:
        with pytest.raises(remat.UnavailableError, match=f"injected UNAVAILABLE #{failures}"):
            client.run(_graph(), _inputs())
    assert seen.counts["Run"] == failures


def test_no_retry_makes_one_attempt(kind, seeded):
    seen = Recorder(fail={"Run": [1]})
    with serving(seen) as (_, address), connect(kind, address, retry=retries.NO_RETRY) as client:
        with pytest.raises(remat.UnavailableError):
            client.run(_graph(), _inputs())
    assert seen.counts["Run"] == 1
    assert retries.NO_RETRY is remat.NO_RETRY and remat.Retry is retries.Retry


@pytest.mark.parametrize(
    "code, error",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, remat.InvalidArgumentError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, remat.ResourceExhaustedError),
        (grpc.StatusCode.INTERNAL, remat.InternalError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, remat.DeadlineExceededError),
        (grpc.StatusCode.UNAUTHENTICATED, remat.UnauthenticatedError),
    ],
)
def test_other_errors_are_never_retried(kind, seeded, code, error):
    seen = Recorder(fail={"Run": first(5)}, code=code)
    retry = retries.Retry(attempts=6, initial_backoff=0.01)
    with serving(seen) as (_, address), connect(kind, address, retry=retry) as client:
        with pytest.raises(error, match="injected"):
            client.run(_graph(), _inputs())
    assert seen.counts["Run"] == 1


def test_registration_is_retried_too(kind, seeded):
    seen = Recorder(fail={"RegisterGraph": first(2)})
    retry = retries.Retry(attempts=3, initial_backoff=0.01)
    with serving(seen) as (_, address), connect(kind, address, retry=retry) as client:
        g = _graph()
        assert client.register(g) == g.graph_id
        _run(client, g)
    assert seen.counts["RegisterGraph"] == 3 and seen.refs("Run") == [BY_ID]


# Many attempts, and long backoffs for a deadline of HANG_SECONDS: after 0.2 s (at the
# cap, `at_cap`: no jitter), the next delay is ten times that whole deadline.
LONG_BACKOFFS = retries.Retry(
    attempts=1000,
    initial_backoff=0.2,
    max_backoff=10 * support.HANG_SECONDS,
    multiplier=10 * support.HANG_SECONDS / 0.2,
)


@pytest.fixture
def delays(monkeypatch) -> list[float]:
    """The delays the client's retries decide on, each of which it then sleeps; one that
    would end past the call's deadline fails the test at once (not after sleeping it)."""
    decided: list[float] = []
    real = retries.Attempts.delay_after

    def delay_after(self, error):
        delay = real(self, error)  # raises when the call gives up instead
        decided.append(delay)
        assert self.deadline is None or time.monotonic() + delay < self.deadline, (
            f"a retry would sleep {delay} s, past the call's deadline"
        )
        return delay

    monkeypatch.setattr(retries.Attempts, "delay_after", delay_after)
    return decided


def test_the_deadline_bounds_retries(kind, at_cap, delays):
    """The call gives up when the next delay (10 x its deadline) would pass its deadline,
    instead of sleeping past it: it slept 0.2 s once, and gave up at the second failure.
    (Decided, not timed: a wall-clock bound is scheduling luck on a loaded machine.)"""
    seen = Recorder(fail={"Run": first(1000)})
    with serving(seen) as (_, address), connect(kind, address, retry=LONG_BACKOFFS) as client:
        start = time.monotonic()
        with pytest.raises(remat.UnavailableError, match="injected UNAVAILABLE #2"):
            client.run(_graph(), _inputs(), timeout=support.HANG_SECONDS)
        # Sleeping the second delay would take 10 x HANG_SECONDS.
        assert time.monotonic() - start < support.HANG_SECONDS
    assert delays == [0.2]
    assert seen.counts["Run"] == 2  # at 0 s and 0.2 s


def test_client_timeout_also_bounds_retries(kind, at_cap, delays):
    seen = Recorder(fail={"Run": first(1000)})
    with (
        serving(seen) as (_, address),
        connect(kind, address, retry=LONG_BACKOFFS, timeout=support.HANG_SECONDS) as client,
    ):
        start = time.monotonic()
        with pytest.raises(remat.UnavailableError, match="injected UNAVAILABLE #2"):
            client.run(_graph(), _inputs())
        assert time.monotonic() - start < support.HANG_SECONDS
    assert delays == [0.2]
    assert seen.counts["Run"] == 2


SLOW = 0.3  # seconds the server takes to answer each RPC in the deadline cases
SHOWN_TIMEOUT = 9.0  # under 10 s: gRPC sends it to the 10 ms
BROADCAST_N = (8 << 20) // 4  # 16 bytes in, 8 MiB out


def _broadcast():
    g = remat.Graph("spread")
    x = g.input("x", (4,), "float32")
    g.output("y", remat.broadcast_to(x, (BROADCAST_N // 4, 4)) * 3.0)
    return g


DEADLINE_CASES = {
    # case -> (the two RPCs of one call, recorder, server config, calls before the timed one)
    "unavailable retry": (
        ("Run", "Run"),
        lambda: Recorder(fail={"Run": [1, 3]}, delay={"Run": SLOW}),
        {},
        0,
    ),
    "not-found fallback": (
        ("Run", "Run"),
        lambda: Recorder(fail={"Run": [2, 4]}, code=grpc.StatusCode.NOT_FOUND, delay={"Run": SLOW}),
        {},
        1,
    ),
    "switch to RunStream": (
        ("Run", "RunStream"),
        lambda: Recorder(delay={"Run": SLOW, "RunStream": SLOW}),
        {"max_message_bytes": 2 * MiB},
        0,
    ),
}


@pytest.mark.parametrize("case", DEADLINE_CASES)
def test_one_deadline_covers_every_rpc_of_a_call(kind, seeded, case):
    """The second RPC of a call (a retry, the inline resend, the switch to RunStream)
    gets what is left of the call's deadline, not a fresh timeout: it arrives with at
    least SLOW seconds less left than the first, and with a timeout shorter than the
    two together, the call fails with DEADLINE_EXCEEDED."""
    (one, two), make, config, warmup = DEADLINE_CASES[case]
    seen = make()
    g = _broadcast() if two == "RunStream" else _graph()
    feeds = {"x": np.arange(4, dtype=np.float32)} if two == "RunStream" else _inputs()
    retry = retries.Retry(attempts=3, initial_backoff=0.01)
    with serving(seen, **config) as (_, address), connect(kind, address, retry=retry) as client:
        for _ in range(warmup):  # so that the timed call goes by id
            client.run(g, feeds, timeout=support.HANG_SECONDS)
        skip = {method: len(seen.remaining(method)) for method in (one, two)}
        # gRPC sends a timeout rounded up to 10 ms below 10 s (to 1 s near 30 s, too
        # coarse to see SLOW go by): the longest timeout that shows it
        result = client.run(g, feeds, timeout=SHOWN_TIMEOUT)
        assert result.outputs["y"].size == (BROADCAST_N if two == "RunStream" else 3)
        first_left = seen.remaining(one)[skip[one]]
        second_left = seen.remaining(two)[skip[two] + (one == two)]
        # (SLOW / 2: the server measures each deadline a moment after it starts it)
        assert first_left <= SHOWN_TIMEOUT + 0.01, first_left
        assert second_left < first_left - SLOW / 2, (first_left, second_left)
        # Too short for both RPCs: the call fails by its deadline. A retry may also give
        # up before it, with the last error, when its backoff would end past it (a
        # machine that stalls makes that happen).
        gave_up = (remat.DeadlineExceededError,)
        if case == "unavailable retry":
            gave_up += (remat.UnavailableError,)
        with pytest.raises(gave_up):
            client.run(g, feeds, timeout=SLOW + SLOW / 2)


def test_retry_delays_are_full_jitter_under_the_cap(monkeypatch):
    monkeypatch.setattr(retries, "random", random.Random(99))
    for retry in [
        retries.Retry(),
        retries.Retry(attempts=1),
        retries.Retry(attempts=2, initial_backoff=0.5),
        retries.Retry(attempts=12, initial_backoff=0.01, max_backoff=0.3, multiplier=3.0),
        retries.Retry(attempts=6, initial_backoff=1.0, max_backoff=1.0),
    ]:
        caps = [
            min(retry.initial_backoff * retry.multiplier**k, retry.max_backoff)
            for k in range(retry.attempts - 1)
        ]
        samples = [list(retry.delays()) for _ in range(400)]
        assert all(len(delays) == retry.attempts - 1 for delays in samples)
        for k, cap in enumerate(caps):
            column = [delays[k] for delays in samples]
            assert all(0.0 <= d <= cap for d in column)
            # Full jitter: spread over [0, cap], not bunched at the top or the bottom.
            assert min(column) < 0.1 * cap and max(column) > 0.9 * cap, retry
            assert 0.4 * cap < sum(column) / len(column) < 0.6 * cap, retry
    assert list(retries.NO_RETRY.delays()) == []


def test_reconnect_options_follow_the_retry_schedule():
    assert dict(calls.reconnect_options(retries.Retry(initial_backoff=0.05, max_backoff=0.5))) == {
        "grpc.initial_reconnect_backoff_ms": 50,
        "grpc.max_reconnect_backoff_ms": 500,
    }
    # Never zero, and the maximum never below the initial backoff.
    assert dict(calls.reconnect_options(retries.Retry(initial_backoff=0.0, max_backoff=0.0))) == {
        "grpc.initial_reconnect_backoff_ms": 1,
        "grpc.max_reconnect_backoff_ms": 1,
    }


def test_a_client_created_before_its_server_starts_reaches_it_within_the_retry_window(
    kind, at_cap, monkeypatch
):
    """The server starts once the first attempt has failed. gRPC's own reconnect backoff
    (1 s +-20%, then 1.6 s ...) would fail every retry of the 0.71 s retry window at
    once; the client paces reconnects by its Retry, so the call gets through."""
    # The port stays ours until the server takes it (both bind it with SO_REUSEPORT;
    # a socket that is bound but not listening refuses connections).
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    refused, started = threading.Event(), {}
    real_delay_after = retries.Attempts.delay_after

    def delay_after(self, error):
        refused.set()
        return real_delay_after(self, error)

    def start_once_refused():
        try:
            if refused.wait(30):
                server, _ = create_server(
                    ServerConfig(host="127.0.0.1", port=port, reuse_port=True)
                )
                server.start()
                started["server"] = server
        finally:
            probe.close()

    monkeypatch.setattr(retries.Attempts, "delay_after", delay_after)
    retry = retries.Retry(attempts=16, initial_backoff=0.02, max_backoff=0.05)
    assert sum(retries.Retry.delays(retry)) == pytest.approx(0.71)
    thread = threading.Thread(target=start_once_refused)
    with connect(kind, f"127.0.0.1:{port}", retry=retry) as client:
        thread.start()
        try:
            _run(client, _graph())
        finally:
            thread.join()
            if "server" in started:
                started["server"].stop(None).wait()
    assert refused.is_set() and "server" in started
