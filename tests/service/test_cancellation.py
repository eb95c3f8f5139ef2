"""Deadlines and cancellation are honoured mid-run, and the memory is freed.

An in-process server whose executor is observed: every array a step produces is
tracked by a weak reference (so "released" means no reference is left, checked with
the cyclic garbage collector off: freed by reference counting, at once, not at some
later collection), and the memory admission object is kept to read its accounting.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from unittest import mock

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import remat
from remat import calls, streaming
from remat_proto import chunks
from remat_proto.v1 import executor_pb2, executor_pb2_grpc
from remat_server import ServerConfig, create_server
from remat_server.runtime import executor
from remat_server.service import app

MiB = 1 << 20
BUDGET = 128 * MiB
SIDE, STEPS = 2048, 1500  # tanh steps on 16 MiB: 1.5 s or more (never run to the end); peak 32 MiB


class Observed:
    """What the server's executor did: steps run, and weak references to their arrays."""

    def __init__(self):
        self.lock = threading.Lock()
        self.steps = 0
        self.arrays: list[weakref.ref] = []
        self.admissions: list = []

    def reset(self):
        with self.lock:
            self.steps, self.arrays = 0, []

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.arrays)


@pytest.fixture(scope="module")
def observed():
    seen = Observed()
    real_run_node = executor._run_node

    def run_node(*args):
        result = real_run_node(*args)
        with seen.lock:
            seen.steps += 1
            seen.arrays.append(weakref.ref(result))
        return result

    class KeptAdmission(app.MemoryAdmission):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.admissions.append(self)

    with (
        mock.patch.object(executor, "_run_node", run_node),
        mock.patch.object(app, "MemoryAdmission", KeptAdmission),
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


def _slow(side=SIDE, steps=STEPS):
    g = remat.Graph("slow")
    x = g.input("x", (1, side))
    h = remat.broadcast_to(x, (side, side))
    for _ in range(steps):
        h = remat.tanh(h)
    g.output("s", remat.sum(h))
    return g


SLOW = _slow()
SLOW_INPUTS = {"x": np.full((1, SIDE), 0.5, dtype=np.float32)}
TOTAL_STEPS = STEPS + 2  # the broadcast, the tanh chain and the sum


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
    server, method: str, before: dict, calls: int = 1, timeout: float = 5.0
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


def _wait_until(predicate, timeout: float = 3.0) -> bool:
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
    assert admission.in_use == 0 and admission.queued == 0


def _assert_whole_budget_admitted_at_once(client, admission):
    result = client.run(_big(), {"x": np.zeros(1, np.float32)}, timeout=30)
    assert result.metrics.predicted_peak_bytes > BUDGET - 32 * MiB
    assert result.metrics.queue_seconds == 0.0
    assert float(result.outputs["s"]) == 2.0 * (15 << 20)
    assert admission.in_use == 0


def test_the_slow_request_is_what_the_tests_assume(client):
    planned = client.plan(SLOW)
    assert planned.peak_bytes <= 40 * MiB
    assert sum(planned.node_evaluations.values()) == TOTAL_STEPS


def test_deadline_mid_run_stops_the_executor_and_frees_memory(served, client, observed, no_gc):
    server, _, admission = served
    client.register(SLOW)  # so the deadline is all Run's
    start = time.monotonic()
    client.plan(SLOW)
    timeout = 0.25 + (time.monotonic() - start)  # so that the run is under way by then
    before = _rpc(server, "Run")
    observed.reset()
    start = time.monotonic()
    with pytest.raises(remat.DeadlineExceededError):
        client.run(SLOW, SLOW_INPUTS, timeout=timeout)
    assert time.monotonic() - start < timeout + 0.5  # the client does not wait for the run
    code, server_seconds = _wait_for_end(server, "Run", before)
    assert code in ("CANCELLED", "DEADLINE_EXCEEDED"), code
    # The executor stopped between steps, long before the end of the schedule.
    assert server_seconds < timeout + 0.5
    assert 0 < observed.steps < TOTAL_STEPS // 2, observed.steps
    _assert_freed(observed, admission)
    _assert_whole_budget_admitted_at_once(client, admission)


def _unary_call(served):
    channel = grpc.insecure_channel(served[1])
    stub = executor_pb2_grpc.ExecutorStub(channel)
    request, _ = calls.run_request(
        executor_pb2.GraphRef(graph=SLOW.to_proto()), SLOW, SLOW_INPUTS, stream=False
    )
    return channel, stub.Run.future(request, timeout=30)


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
    responses = call(streaming.upload(request, chunked, chunk_bytes=1024), timeout=30)
    return channel, responses


@pytest.mark.parametrize("method, start_call", [("Run", _unary_call), ("RunStream", _stream_call)])
def test_explicit_cancellation_mid_run(served, client, observed, no_gc, method, start_call):
    server, _, admission = served
    before = _rpc(server, method)
    observed.reset()
    channel, call = start_call(served)
    try:
        assert _wait_until(lambda: observed.steps >= 3, timeout=10), "the run never started"
        cancelled_at = time.monotonic()
        assert call.cancel()
        code, server_seconds = _wait_for_end(server, method, before)
        ended_at = time.monotonic()
    finally:
        channel.close()
    assert code == "CANCELLED"
    assert ended_at - cancelled_at < 0.5  # within a step or two of the cancellation
    assert observed.steps < TOTAL_STEPS // 2, observed.steps
    assert server_seconds < 1.5
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
    gives up at its deadline; cancelling the slow one then frees everything."""
    server, _, admission = served
    before = _rpc(server, "Run")
    observed.reset()
    channel, slow_call = _unary_call(served)
    try:
        assert _wait_until(lambda: observed.steps >= 1, timeout=10)
        assert admission.in_use > 0
        client.register(_big())
        start = time.monotonic()
        with pytest.raises(remat.DeadlineExceededError):
            client.run(_big(), {"x": np.zeros(1, np.float32)}, timeout=0.3)
        assert time.monotonic() - start < 0.3 + 0.5
        assert _wait_until(lambda: admission.queued == 0, timeout=2)
        assert slow_call.cancel()
        _wait_for_end(server, "Run", before, calls=2)  # the big one and the slow one
    finally:
        channel.close()
    _assert_freed(observed, admission)
    _assert_whole_budget_admitted_at_once(client, admission)
