"""Deadlines and cancellation are honoured mid-run, and the memory is freed.

An in-process server whose executor is observed: every array a step produces is
tracked by a weak reference (so "released" means no reference is left, checked with
the cyclic garbage collector off: freed by reference counting, at once, not at some
later collection), and the memory admission object is kept to read its accounting.

No test here depends on timing: a run is held after a given step (`Hold`) while the
test cancels it, lets its deadline pass or sends another request, so the run is surely
under way and unfinished then; it goes on only once the server has seen its call end
(`work_slots.CallEnd`), and must stop at that very step.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
import weakref
from unittest import mock

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import HANG_SECONDS

import remat
from remat import calls, streaming
from remat_proto import chunks
from remat_proto.v1 import executor_pb2, executor_pb2_grpc
from remat_server import ServerConfig, create_server
from remat_server.runtime import executor
from remat_server.service import app, work_slots

MiB = 1 << 20
BUDGET = 128 * MiB
SIDE, STEPS = 2048, 1500  # tanh steps on 16 MiB: 1.5 s or more (never run to the end); peak 32 MiB


class Hold:
    """The run of the graph whose node names start with `prefix` (see `_slow`) waits
    after its `steps`-th step until `release` is set (at most HANG_SECONDS). `end` is
    that call's `work_slots.CallEnd`; `count` the graph's steps evaluated so far."""

    def __init__(self, prefix: str, steps: int):
        self.prefix, self.steps, self.count = prefix, steps, 0
        self.reached = threading.Event()  # the run waits at the hold (or did)
        self.release = threading.Event()
        self.over = threading.Event()  # the run went on
        self.end = None

    def go_on_once_ended(self) -> None:
        """Release the run once the server has seen its call end (cancelled or past its
        deadline), so that it must stop before its next step."""
        try:
            assert self.end is not None, "no CallEnd was made on the held run's thread"
            assert _wait_until(self.end.ended), "the server never saw the call end"
        finally:
            self.release.set()


class Observed:
    """What the server's executor did: steps run, weak references to their arrays, the
    end of each handler thread's latest call, and the current `Hold`, if any."""

    def __init__(self):
        self.lock = threading.Lock()
        self.steps = 0
        self.arrays: list[weakref.ref] = []
        self.admissions: list = []
        self.ends: dict[int, work_slots.CallEnd] = {}  # thread id -> its call's end
        self.hold: Hold | None = None

    def reset(self, hold: Hold | None = None) -> Hold | None:
        with self.lock:
            self.steps, self.arrays, self.hold = 0, [], hold
        return hold

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.arrays)


@pytest.fixture(scope="module")
def observed():
    seen = Observed()
    real_run_node = executor._run_node

    def run_node(node, *args):
        result = real_run_node(node, *args)
        with seen.lock:
            seen.steps += 1
            seen.arrays.append(weakref.ref(result))
            hold = seen.hold
            if hold is not None and node.name.startswith(hold.prefix):
                hold.count += 1
                if hold.count == hold.steps:
                    hold.end = seen.ends.get(threading.get_ident())
                    hold.reached.set()
                else:
                    hold = None
            else:
                hold = None
        if hold is not None:
            hold.release.wait(HANG_SECONDS)
            hold.over.set()
        return result

    class KeptAdmission(app.MemoryAdmission):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.admissions.append(self)

    class KeptCallEnd(work_slots.CallEnd):
        """Made on the handler's thread, which also runs the executor."""

        __slots__ = ()

        def __init__(self, context):
            super().__init__(context)
            with seen.lock:
                seen.ends[threading.get_ident()] = self

    with (
        mock.patch.object(executor, "_run_node", run_node),
        mock.patch.object(app, "MemoryAdmission", KeptAdmission),
        mock.patch.object(work_slots, "CallEnd", KeptCallEnd),
    ):
        yield seen


@pytest.fixture(scope="module")
def served(observed):
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0, memory_budget_bytes=BUDGET))
    server.start()
    (admission,) = observed.admissions
    yield server, f"127.0.0.1:{port}", admission
    server.stop(None).wait()


@pytest.fixture(scope="module")
def client(served):
    with remat.Client(served[1]) as c:
        yield c


@pytest.fixture
def no_gc():
    """Only reference counting may free the arrays while the test looks."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _slow(prefix="slow", side=SIDE, steps=STEPS):
    """Every node's name starts with `prefix` + "/" (a `Hold` tells its runs apart)."""
    g = remat.Graph(prefix)
    x = g.input("x", (1, side))
    h = remat.broadcast_to(x, (side, side), name=f"{prefix}/broadcast")
    for i in range(1, steps + 1):
        h = remat.tanh(h, name=f"{prefix}/t{i}")
    g.output("s", remat.sum(h, name=f"{prefix}/sum"))
    return g


SLOW = _slow()
SLOW_INPUTS = {"x": np.full((1, SIDE), 0.5, dtype=np.float32)}
TOTAL_STEPS = STEPS + 2  # the broadcast, the tanh chain and the sum
HELD_STEPS = 3  # where a `Hold` stops a run: well under way, far from its end


def _big():
    """Predicted peak 120 MiB of the 128 MiB budget: admitted at once only if every
    earlier reservation was given back."""
    g = remat.Graph("big")
    x = g.input("x", (1,))
    g.output("s", remat.sum(remat.exp(remat.broadcast_to(x, (15 << 20,))) * 2))
    return g


def _rpc(server, method: str) -> dict[str, tuple[float, float]]:
    """code -> (count, seconds) of remat_rpc_duration_seconds for `method`."""
    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(server.metrics.exposition().decode()):
        for sample in family.samples:
            if sample.labels.get("method") != method:
                continue
            entry = found.setdefault(sample.labels["code"], [0.0, 0.0])
            if sample.name == "remat_rpc_duration_seconds_count":
                entry[0] = sample.value
            elif sample.name == "remat_rpc_duration_seconds_sum":
                entry[1] = sample.value
    return {code: (count, seconds) for code, (count, seconds) in found.items()}


def _wait_for_end(
    server, method: str, before: dict, calls: int = 1, timeout: float = HANG_SECONDS
) -> tuple[str, float]:
    """Wait until the server has recorded `calls` more `method` calls that did not end
    OK; returns (the last one's code, their server-side seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended, seconds, codes = 0, 0.0, []
        for code, (count, total) in _rpc(server, method).items():
            old_count, old_total = before.get(code, (0.0, 0.0))
            if code != "OK" and count > old_count:
                ended += int(count - old_count)
                seconds += total - old_total
                codes.append(code)
        if ended >= calls:
            return codes[-1], seconds
        time.sleep(0.01)
    raise AssertionError(f"the server never finished the {method} call")


def _wait_until(predicate, timeout: float = HANG_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _assert_freed(observed, admission):
    assert _wait_until(lambda: observed.alive() == 0), (
        f"{observed.alive()} of {len(observed.arrays)} step results still referenced"
    )
    assert _wait_until(lambda: admission.in_use == 0 and admission.queued == 0), (
        admission.in_use,
        admission.queued,
    )


def _assert_whole_budget_admitted_at_once(client, admission):
    result = client.run(_big(), {"x": np.zeros(1, np.float32)}, timeout=HANG_SECONDS)
    assert result.metrics.predicted_peak_bytes > BUDGET - 32 * MiB
    assert result.metrics.queue_seconds == 0.0
    assert float(result.outputs["s"]) == 2.0 * (15 << 20)
    assert admission.in_use == 0


def test_the_slow_request_is_what_the_tests_assume(client):
    planned = client.plan(SLOW)
    assert planned.peak_bytes <= 40 * MiB
    assert sum(planned.node_evaluations.values()) == TOTAL_STEPS


def test_deadline_mid_run_stops_the_executor_and_frees_memory(served, client, observed, no_gc):
    """The deadline passes while the run is held after HELD_STEPS steps: the client's
    error comes while it is still held (so the client does not wait for the run), and
    the executor stops at that step. A loaded machine may not get the run that far
    before the deadline; then the attempt proves nothing, and is made again (with a
    graph of its own, so that the late steps of the last one count for nothing) with
    twice the timeout."""
    server, _, admission = served
    timeout = None
    for attempt in itertools.count():
        prefix = f"deadline{attempt}"
        slow = _slow(prefix)
        client.register(slow)  # so the deadline is all Run's
        start = time.monotonic()
        client.plan(slow)  # compiled too
        if timeout is None:
            timeout = 0.25 + (time.monotonic() - start)  # to get the run under way
        before = _rpc(server, "Run")
        hold = observed.reset(Hold(prefix + "/", HELD_STEPS))
        try:
            with pytest.raises(remat.DeadlineExceededError):
                client.run(slow, SLOW_INPUTS, timeout=timeout)
            assert not hold.over.is_set(), "the client answered only after the run went on"
            if hold.reached.is_set():
                hold.go_on_once_ended()
                break
        finally:
            hold.release.set()
        assert timeout < HANG_SECONDS, f"the run never got under way in {attempt + 1} tries"
        timeout *= 2
    code, _ = _wait_for_end(server, "Run", before)
    assert code in ("CANCELLED", "DEADLINE_EXCEEDED"), code
    _assert_freed(observed, admission)
    # The executor stopped at the step it was held after, long before the end.
    assert hold.count == HELD_STEPS, hold.count
    _assert_whole_budget_admitted_at_once(client, admission)


def _unary_call(served):
    channel = grpc.insecure_channel(served[1])
    stub = executor_pb2_grpc.ExecutorStub(channel)
    request, _ = calls.run_request(
        executor_pb2.GraphRef(graph=SLOW.to_proto()), SLOW, SLOW_INPUTS, stream=False
    )
    return channel, stub.Run.future(request, timeout=HANG_SECONDS)


def _stream_call(served):
    channel = grpc.insecure_channel(served[1])
    call = channel.stream_stream(
        "/remat.v1.Executor/RunStream",
        request_serializer=chunks.encode,
        response_deserializer=streaming.decode_response,
    )
    request, chunked = calls.run_request(
        executor_pb2.GraphRef(graph=SLOW.to_proto()),
        SLOW,
        SLOW_INPUTS,
        stream=True,
        chunk_bytes=1024,
    )
    assert chunked  # 8 KiB in 1 KiB chunks
    responses = call(streaming.upload(request, chunked, chunk_bytes=1024), timeout=HANG_SECONDS)
    return channel, responses


@pytest.mark.parametrize("method, start_call", [("Run", _unary_call), ("RunStream", _stream_call)])
def test_explicit_cancellation_mid_run(served, client, observed, no_gc, method, start_call):
    """Cancelled while held after HELD_STEPS steps, the run stops at that step."""
    server, _, admission = served
    before = _rpc(server, method)
    hold = observed.reset(Hold("slow/", HELD_STEPS))
    channel, call = start_call(served)
    try:
        try:
            assert hold.reached.wait(HANG_SECONDS), "the run never started"
            assert call.cancel()
            hold.go_on_once_ended()
        finally:
            hold.release.set()
        code, _ = _wait_for_end(server, method, before)
    finally:
        channel.close()
    assert code == "CANCELLED"
    # Stopped at the first step after the cancellation, long before the end.
    assert hold.count == HELD_STEPS, hold.count
    if method == "Run":
        assert call.cancelled()
    else:
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert caught.value.code() == grpc.StatusCode.CANCELLED
    _assert_freed(observed, admission)
    _assert_whole_budget_admitted_at_once(client, admission)


def test_a_request_waiting_for_memory_leaves_the_queue_at_its_deadline(
    served, client, observed, no_gc
):
    """The slow run holds 32 MiB; the big one (120 MiB) waits for it in the queue and
    gives up at its deadline; cancelling the slow one then frees everything. The slow
    run is held after its first step until then, so the big one cannot have waited for
    its end."""
    _, _, admission = served
    hold = observed.reset(Hold("slow/", 1))
    channel, slow_call = _unary_call(served)
    try:
        try:
            assert hold.reached.wait(HANG_SECONDS), "the slow run never started"
            assert admission.in_use > 0
            client.register(_big())
            with pytest.raises(remat.DeadlineExceededError):
                client.run(_big(), {"x": np.zeros(1, np.float32)}, timeout=0.3)
            # The server's waiter leaves the queue too, while the slow run still holds.
            assert _wait_until(lambda: admission.queued == 0)
            assert not hold.over.is_set() and admission.in_use > 0
            assert slow_call.cancel()
            hold.go_on_once_ended()
        finally:
            hold.release.set()
    finally:
        channel.close()
    _assert_freed(observed, admission)  # waits for the slow run's end
    assert hold.count == 1, hold.count
    _assert_whole_budget_admitted_at_once(client, admission)
