"""Results the backward pass does not read, computed last (`planners.deferred_results`):
a model that returns its logits beside the loss need not hold them through the
backward pass. The move adds no computation, lowers the peak, and Budget uses the room."""

from __future__ import annotations

import collections

import numpy as np

import remat
from remat_proto import policies as P
from remat_server.checkpoint.planners import plan
from remat_server.checkpoint.planners.bounds import simulated, store_all_peak
from remat_server.checkpoint.planners.deferred_results import deferred
from remat_server.checkpoint.planners.store_all import plan_store_all
from remat_server.checkpoint.problem import Problem
from remat_server.checkpoint.schedule import Compute
from remat_server.engine import Engine, RunRequest
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

ENGINE = Engine()
RNG = np.random.default_rng(3)
BATCH, HIDDEN, CLASSES = 8, 4, 64  # wide logits: holding them dominates the backward


def classifier(logits_read_by_backward: bool = False):
    """x -> tanh(x @ w1) -> logits = h @ w2; loss = sum(logits), or, with
    `logits_read_by_backward`, sum(logits * logits) (whose gradient reads them)."""
    g = remat.Graph("classifier")
    x = g.input("x", (BATCH, HIDDEN), "float64")
    w1 = g.input("w1", (HIDDEN, HIDDEN), "float64")
    w2 = g.input("w2", (HIDDEN, CLASSES), "float64")
    h = remat.tanh(remat.matmul(x, w1), name="h")
    logits = remat.matmul(h, w2, name="logits")
    g.output("logits", logits)
    g.output("loss", remat.sum(logits * logits if logits_read_by_backward else logits, name="loss"))
    spec = graph_from_proto(g.to_proto(), Limits())
    feeds = {i.name: RNG.standard_normal(i.shape) for i in spec.inputs}
    return spec, feeds


WRT = ("x", "w1", "w2")
FETCH = ("logits", "loss")


def problem_of(spec) -> Problem:
    planned = ENGINE.plan(spec, wrt=WRT, loss="loss", fetch=FETCH)
    return Problem(planned.joint.graph, planned.schedule.results, planned.joint.forward_nodes)


def computations(schedule) -> collections.Counter:
    return collections.Counter(s.node for s in schedule.steps if type(s) is Compute)


def test_logits_nobody_reads_move_to_the_end_and_lower_the_peak():
    spec, _ = classifier()
    p = problem_of(spec)
    base = plan_store_all(p)
    moved = deferred(p, base, store_all_peak(p))
    assert moved is not None
    assert computations(moved) == computations(base)  # moved, not added
    assert simulated(p, moved).peak_bytes < simulated(p, base).peak_bytes
    last = [s.node for s in moved.steps if type(s) is Compute][-3:]
    assert "logits" in last and "loss" in last


def test_a_result_the_backward_reads_stays_where_it_is():
    """The loss's gradient reads the logits: they stay (the loss may still move)."""
    spec, _ = classifier(logits_read_by_backward=True)
    p = problem_of(spec)
    base = plan_store_all(p)
    moved = deferred(p, base, store_all_peak(p)) or base
    assert moved.steps.index(Compute("logits")) == base.steps.index(Compute("logits"))


def test_budget_fits_without_recomputing_and_runs_as_store_all():
    """At a budget between the moved schedule's peak and store_all's, Budget recomputes
    nothing, and the run's outputs and gradients are store_all's, bit for bit."""
    spec, feeds = classifier()
    p = problem_of(spec)
    low = simulated(p, deferred(p, plan_store_all(p), store_all_peak(p))).peak_bytes
    limit = (low + store_all_peak(p)) // 2
    assert low <= limit < store_all_peak(p)
    schedule = plan(problem_of(spec), P.Budget(bytes=limit))
    assert simulated(p, schedule).recompute_flops == 0
    assert "results last" in schedule.report.chosen

    def run(policy):
        request = RunRequest(spec, feeds, fetch=FETCH, wrt=WRT, loss="loss", policy=policy)
        return ENGINE.run(request)

    ours, reference = run(P.Budget(bytes=limit)), run(P.StoreAll())
    assert ours.metrics.peak_bytes == ours.metrics.predicted_peak_bytes <= limit
    for name in ("logits", "loss"):
        assert np.array_equal(ours.outputs[name], reference.outputs[name]), name
    for name in WRT:
        assert np.array_equal(ours.grads[name], reference.grads[name]), name
