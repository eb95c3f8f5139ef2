"""Liveness under saturation: with every work slot busy and more calls waiting for one,
health checks and the metrics endpoint still answer at once (a Kubernetes probe must
not restart a pod that is only busy)."""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from served import Served, slow_tanh_graph

import remat

SIDE, STEPS = 1024, 20000  # tanh steps on 8 MiB: far longer than the checks take
RUNS, THREADS = 4, 2
CHECKS = 20
# Each check must answer well inside this; a check queued behind the runs would wait
# for seconds. (The answer takes milliseconds: the deadline only bounds a failure.)
CHECK_DEADLINE = 2.0


def slow_graph() -> remat.Graph:
    return slow_tanh_graph("slow-liveness", SIDE, STEPS)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout} s")
        time.sleep(0.05)


def in_flight(server: Served, runs) -> bool:
    for run in runs:
        if run.done():  # a run must not end (fail) before the checks: say why it did
            pytest.fail(f"a run ended early: {run.exception() or run.result()}")
    return server.inflight() >= len(runs)


def test_health_and_metrics_answer_while_every_handler_is_busy():
    g = slow_graph()
    feed = {"x": np.full((1, SIDE), 0.5, dtype=np.float32)}
    with Served("--threads", str(THREADS), "--metrics-port", "0") as server:
        with (
            remat.Client(server.target, timeout=600) as client,
            grpc.insecure_channel(server.target) as channel,
            ThreadPoolExecutor(RUNS) as pool,
        ):
            client.register(g)
            runs = [pool.submit(client.run, g, feed, policy="store_all") for _ in range(RUNS)]
            # Two runs hold the two work slots, two wait for one: all four are in flight.
            wait_for(lambda: in_flight(server, runs), 120, f"{RUNS} runs were not in flight")
            health = health_pb2_grpc.HealthStub(channel)
            seconds = []
            for _ in range(CHECKS):
                start = time.monotonic()
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=CHECK_DEADLINE)
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=CHECK_DEADLINE
                ) as page:
                    assert b"remat_inflight_requests" in page.read()
                seconds.append(time.monotonic() - start)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            # Still saturated: the checks were answered while every slot was busy.
            assert server.inflight() >= RUNS, "the runs ended before the checks did"
            assert not any(run.done() for run in runs)
            print(f"health + metrics under saturation: max {max(seconds) * 1e3:.1f} ms")
            server.kill()  # the runs would take minutes; their errors are expected
            for run in runs:
                with pytest.raises(remat.RematError):
                    run.result(timeout=60)
