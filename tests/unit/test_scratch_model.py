"""Op temporaries in the memory model (issue 14): while a node is computed its declared
`scratch` sits on top of the live bytes, in the simulator, the executor's accounting,
DTR and the exact MILP alike; so a plan under a budget fits with its temporaries.

The tests give tanh a declared scratch (monkeypatched into the registry) on a chain of
tanh layers, where the effect of a temporary on every planner is easy to see."""

from __future__ import annotations

import dataclasses

import pytest
import support

from remat import models
from remat_proto.policies import DTR, Budget, Optimal, RecomputeAll, Sqrt, StoreAll
from remat_server.checkpoint.memory import memory_model
from remat_server.engine import Engine, RunRequest
from remat_server.graph.limits import Limits
from remat_server.ops import REGISTRY
from remat_server.service.codec import graph_from_proto

BATCH, WIDTH, LAYERS = 1024, 32, 6  # LAYERS linear layers, a tanh after all but the last
ACTIVATION = BATCH * WIDTH * 4  # bytes of one float32 activation


@pytest.fixture
def tanh_scratch(monkeypatch):
    """tanh declares `factor` activations of temporaries."""

    def declare(factor: float) -> None:
        op = REGISTRY["tanh"]
        rule = lambda out, x: int(factor * out.nbytes)  # noqa: E731
        monkeypatch.setitem(REGISTRY, "tanh", dataclasses.replace(op, scratch=rule))

    return declare


def chain_request(policy, layers: int = LAYERS):
    model = models.mlp(batch=BATCH, widths=(WIDTH,) * layers + (4,))
    spec = graph_from_proto(model.graph.to_proto(), Limits())
    return RunRequest(spec, model.inputs, wrt=tuple(model.wrt), loss=model.loss, policy=policy)


def test_the_model_collects_each_nodes_scratch(tanh_scratch):
    tanh_scratch(2.0)
    request = chain_request(StoreAll())
    graph = Engine().differentiate(request.graph, request.wrt, request.loss).graph
    model = memory_model(graph)
    tanhs = [node.name for node in graph if node.op == "tanh"]
    assert len(tanhs) == LAYERS - 1
    assert {name: model.scratch[name] for name in tanhs} == dict.fromkeys(tanhs, 2 * ACTIVATION)


@pytest.mark.parametrize("policy", [StoreAll(), Sqrt(), RecomputeAll()], ids=str)
def test_a_temporary_raises_the_peak_by_at_most_itself(tanh_scratch, policy):
    """The peak with scratch lies between the peak without and that plus the scratch;
    predicted equals accounted either way."""
    base = Engine().run(chain_request(policy)).metrics
    tanh_scratch(3.0)
    with_scratch = Engine().run(chain_request(policy)).metrics
    assert with_scratch.peak_bytes == with_scratch.predicted_peak_bytes
    assert base.peak_bytes < with_scratch.peak_bytes <= base.peak_bytes + 3 * ACTIVATION


# (planner, linear layers, tanh's scratch in activations, budget as a share of the way
# from the lowest peak to store_all's): each sized so that a planner ignoring the
# temporaries overruns its budget (checked by breaking each one's accounting).
BUDGETED = [
    *((Budget, 6, 6.0, share) for share in (0.1, 0.3, 0.6)),
    *((DTR, 6, 6.0, share) for share in (0.1, 0.3, 0.6)),
    (Optimal, 4, 1.0, 0.2),  # HiGHS 1.16 proves this one optimal in about 5 s
]


@pytest.mark.parametrize(
    "make, layers, factor, share",
    BUDGETED,
    ids=[f"{m.__name__}-{share}" for m, _, _, share in BUDGETED],
)
def test_budgeted_planners_fit_their_budget_with_temporaries(
    tanh_scratch, monkeypatch, make, layers, factor, share
):
    tanh_scratch(factor)
    if make is Optimal:  # the MILP's path, not Budget's schedule proven by the bound
        support.without_moment_bound(monkeypatch)
    store_all = Engine().run(chain_request(StoreAll(), layers)).metrics.peak_bytes
    lowest = Engine().run(chain_request(RecomputeAll(), layers)).metrics.peak_bytes
    lowest = min(lowest, store_all)  # with big temporaries recomputing can cost memory
    budget = int(lowest + share * (store_all - lowest)) if lowest < store_all else store_all
    budget = min(budget, int(0.97 * store_all))  # store_all itself must not fit
    result = Engine().run(chain_request(make(bytes=budget), layers))
    assert result.metrics.predicted_peak_bytes == result.metrics.peak_bytes <= budget
    if make is Optimal:  # the MILP itself, not a fallback, fitted the temporaries
        assert result.metrics.planner.chosen == "milp", result.metrics.planner
