"""Memory admission, auto and the streaming Compare RPC against a real server.

Admission: with a server budget that holds one request's predicted peak but not two,
concurrent requests queue and are all served, one at a time (the admission's
high-water mark never exceeds the budget); with no queue they are rejected with
RESOURCE_EXHAUSTED naming the flag. The budget is set by the flag, or left to the
machine (the default) with the machine's memory overridden, so the default budget is
shown to hold requests as it says.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import remat
from remat_server import ServerConfig, create_server
from remat_server.service import app
from remat_server.service.admission import MemoryAdmission


def model():
    return remat.models.mlp(batch=256, widths=(32,) * 8 + (4,), dtype="float64")


@pytest.fixture
def budget_server(monkeypatch):
    """Start a server with a given memory budget and queue; yields (client, admission)."""
    made, started = [], []

    class Recording(MemoryAdmission):
        """Records itself; with `hold_for = n`, the first request admitted keeps its
        reservation until n others wait in the queue, so that they do wait: the test
        then does not depend on how the requests happen to interleave."""

        hold_for = 0

        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

        # Both ways in: at once (`try_acquire`, the servicer's fast path) or queued.
        def try_acquire(self, amount):
            granted = super().try_acquire(amount)
            if granted:
                self._hold()
            return granted

        def acquire(self, amount, timeout, cancelled):
            waited = super().acquire(amount, timeout, cancelled)
            self._hold()
            return waited

        def _hold(self):
            holding, self.hold_for = self.hold_for, 0
            deadline = time.monotonic() + 60  # only a failure waits this long
            while holding and self.queued < holding and time.monotonic() < deadline:
                time.sleep(0.001)

    monkeypatch.setattr(app, "MemoryAdmission", Recording)

    def start(budget: int, queued: int, source: str = "flag"):
        if source == "flag":
            config = ServerConfig(port=0, memory_budget_bytes=budget, max_queued_requests=queued)
        else:  # the default budget: half the machine's memory, less caches (none here)
            config = ServerConfig(
                port=0,
                machine_memory_bytes=2 * budget,
                memory_budget_fraction=0.5,
                graph_cache_bytes=0,
                compile_cache_bytes=0,
                buffer_pool_bytes=0,
                max_queued_requests=queued,
            )
        server, port = create_server(config)
        assert server.config.memory_budget_bytes == budget
        assert gauge(server, "remat_memory_budget_bytes") == budget
        server.start()
        client = remat.Client(f"127.0.0.1:{port}")
        started.append((server, client))
        return client, made[-1]

    yield start
    for server, client in started:
        client.close()
        server.stop(grace=None).wait()


def gauge(server, name: str) -> float:
    text = server.metrics.exposition().decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == name]
    return family.samples[0].value


def store_all_peak(client, m) -> int:
    return client.plan(m.graph, wrt=m.wrt, loss=m.loss, policy="store_all").peak_bytes


def run_concurrently(client, m, count: int):
    barrier = threading.Barrier(count)

    def one(_):
        barrier.wait()
        try:
            return client.run(
                m.graph, m.inputs, wrt=m.wrt, loss=m.loss, policy="store_all", timeout=60
            )
        except remat.RematError as error:
            return error

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


BUDGET_SOURCES = ["flag", "machine"]


@pytest.mark.parametrize("source", BUDGET_SOURCES)
def test_concurrent_requests_over_the_budget_queue_then_all_run(budget_server, source):
    m = model()
    with remat.Client.in_process() as probe:
        peak = store_all_peak(probe, m)
        expected = probe.run(m.graph, m.inputs, wrt=m.wrt, loss=m.loss, policy="store_all")
    client, admission = budget_server(budget=peak * 3 // 2, queued=8, source=source)
    admission.hold_for = 3  # the first admitted waits until the three others queue
    results = run_concurrently(client, m, 4)
    assert all(isinstance(r, remat.RunResult) for r in results), results
    assert admission.peak_in_use == peak  # one at a time: two would exceed the budget
    assert admission.in_use == 0 and admission.queued == 0
    assert sum(r.metrics.queue_seconds > 0 for r in results) == 3
    for r in results:
        assert r.metrics.predicted_peak_bytes == peak
        for name, grad in expected.grads.items():
            assert np.array_equal(r.grads[name], grad)


@pytest.mark.parametrize("source", BUDGET_SOURCES)
def test_without_a_queue_the_overflow_is_rejected_with_the_flag(budget_server, source):
    m = model()
    with remat.Client.in_process() as probe:
        peak = store_all_peak(probe, m)
    client, admission = budget_server(budget=peak * 3 // 2, queued=0, source=source)
    results = run_concurrently(client, m, 6)
    served = [r for r in results if isinstance(r, remat.RunResult)]
    rejected = [r for r in results if not isinstance(r, remat.RunResult)]
    assert served and all(isinstance(r, remat.ResourceExhaustedError) for r in rejected), results
    assert all("--max-queued-requests" in str(r) for r in rejected)
    assert admission.peak_in_use <= peak * 3 // 2
    # The server still serves after rejecting.
    assert isinstance(run_concurrently(client, m, 1)[0], remat.RunResult)


def test_auto_plans_under_the_server_budget(budget_server):
    m = model()
    with remat.Client.in_process() as probe:
        peak = store_all_peak(probe, m)
    client, admission = budget_server(budget=int(peak * 0.7), queued=4)
    result = client.run(m.graph, m.inputs, wrt=m.wrt, loss=m.loss)  # the default: auto
    assert result.metrics.policy == "auto" and result.metrics.recompute_flops > 0
    assert result.metrics.peak_bytes <= int(peak * 0.7)
    assert result.metrics.planner.status == "feasible" and result.metrics.planner.chosen
    with pytest.raises(remat.ResourceExhaustedError, match="--memory-budget-bytes"):
        client.run(m.graph, m.inputs, wrt=m.wrt, loss=m.loss, policy="store_all")


@pytest.mark.parametrize("source", BUDGET_SOURCES)
def test_one_request_over_the_whole_budget_is_refused_before_it_runs(budget_server, source):
    m = model()
    with remat.Client.in_process() as probe:
        peak = store_all_peak(probe, m)
    client, admission = budget_server(budget=peak - 1, queued=4, source=source)
    with pytest.raises(remat.ResourceExhaustedError, match=f"{peak - 1:,}"):
        client.run(m.graph, m.inputs, wrt=m.wrt, loss=m.loss, policy="store_all")
    assert admission.peak_in_use == 0


def test_auto_nothing_fits_is_resource_exhausted_with_the_minimum(budget_server):
    m = model()
    client, admission = budget_server(budget=10_000, queued=4)
    with pytest.raises(
        remat.ResourceExhaustedError, match="the lowest peak (found|any schedule reaches) is"
    ):
        client.run(m.graph, m.inputs, wrt=m.wrt, loss=m.loss)
    assert admission.peak_in_use == 0  # rejected before anything ran


def test_compare_streams_rows_in_order_with_budgets_and_errors(client):
    m = model()
    policies = [
        "sqrt",
        remat.policies.Budget(fraction=0.8),
        remat.policies.DTR(fraction=0.8),
        remat.policies.Budget(fraction=0.01),
    ]
    rows = []
    for row in client.compare_stream(
        m.graph, m.inputs, wrt=m.wrt, loss=m.loss, policies=policies, timeline=True, trace=True
    ):
        rows.append(row)
    assert [r.policy for r in rows] == [
        "store_all",
        "sqrt",
        "budget(0.8)",
        "dtr(0.8)",
        "budget(0.01)",
    ]
    base = rows[0]
    for row in rows[1:4]:
        assert not row.error and row.max_grad_diff == 0.0
        assert len(row.timeline) == len([e for e in row.trace])
        assert max(row.timeline) == row.peak_bytes == row.predicted_peak_bytes
    for row in rows[2:4]:
        assert row.peak_bytes <= 0.8 * base.peak_bytes and row.planner.budget_bytes
    assert rows[4].error_code == "RESOURCE_EXHAUSTED" and "the lowest peak" in rows[4].error
    phases = {e.phase for e in rows[2].trace}
    assert {"forward", "recompute", "backward", "free"} <= phases
