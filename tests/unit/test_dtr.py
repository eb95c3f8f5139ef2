"""The DTR planner (Kirisame et al. 2021, replayed at plan time) through the engine.

Every schedule passes the simulator within its budget, executes to outputs and
gradients bit-identical to store-all's, and recomputes only forward values; a generous
budget recomputes nothing; a budget below what DTR can reach is RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import support

import remat
from remat import models
from remat_proto.policies import DTR, Sqrt
from remat_server.checkpoint.memory import LiveBytes
from remat_server.checkpoint.planners import bounds
from remat_server.checkpoint.planners.dtr import plan_dtr
from remat_server.checkpoint.problem import Problem
from remat_server.checkpoint.schedule import Compute
from remat_server.engine import Engine, RunRequest
from remat_server.errors import ResourceExhausted
from remat_server.graph.ir import GraphSpec
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

ENGINE = Engine()


def chain(length: int = 24, width: int = 32) -> models.Model:
    x = np.random.default_rng(0).standard_normal(width)
    return models.Model(support.tanh_chain(length, width, loss=True), {"x": x}, ["x"])


def skip(blocks: int = 12, batch: int = 128, width: int = 8, seed: int = 0) -> models.Model:
    """h_{k+1} = h_k + transpose(dropout(tanh(W_k @ transpose(h_k)))): skip connections,
    views of forward values (transpose), seeded dropout masks, and a middle block that
    is an output, so it must stay live across the chain."""
    rng = np.random.default_rng(seed)
    g = remat.Graph("skip")
    inputs = {"x": rng.standard_normal((batch, width))}
    h = g.input("x", (batch, width), "float64")
    for k in range(blocks):
        inputs[f"w{k}"] = rng.standard_normal((width, width)) / np.sqrt(width)
        w = g.input(f"w{k}", (width, width), "float64")
        t = remat.tanh(w @ remat.transpose(h, name=f"ht{k}"), name=f"t{k}")
        d = remat.dropout(t, p=0.25, seed=k, name=f"d{k}")
        h = remat.add(h, remat.transpose(d, name=f"dt{k}"), name=f"h{k}")
        if k == 2:
            g.output("mid", h)
    g.output("loss", remat.sum(h * h, name="loss"))
    return models.Model(g, inputs, list(inputs))


GRAPHS = {  # activations dominate, so low fractions of store-all's peak are reachable
    "chain": chain,
    "mlp": lambda: models.mlp(batch=256, widths=(8,) * 16 + (4,), dtype="float64"),
    "skip": skip,
}
FRACTIONS = (1.0, 0.9, 0.6, 0.4)
CASES = [(name, fraction) for name in GRAPHS for fraction in FRACTIONS]


def spec_of(model: models.Model) -> GraphSpec:  # the chain is built as a spec already
    graph = model.graph
    return graph if isinstance(graph, GraphSpec) else graph_from_proto(graph.to_proto(), Limits())


def request(model, spec, policy="store_all") -> RunRequest:
    return RunRequest(spec, model.inputs, wrt=tuple(model.wrt), loss=model.loss, policy=policy)


@functools.cache
def reference(name: str):
    model = GRAPHS[name]()
    spec = spec_of(model)
    return model, spec, ENGINE.run(request(model, spec))


def problem_of(model, spec) -> Problem:
    plan = ENGINE.plan(spec, wrt=tuple(model.wrt), loss=model.loss)
    return Problem(plan.joint.graph, plan.schedule.results, plan.joint.forward_nodes)


def assert_no_buffer_is_recomputed_under_its_views(plan) -> None:
    """Recomputing a buffer owner while a view of its old buffer is live would hold two
    buffers in NumPy where the byte model counts one."""
    live = LiveBytes(plan.model, [node.name for node in plan.joint.graph.inputs])
    for step in plan.schedule.steps:
        if isinstance(step, Compute):
            if not plan.model.is_view(step.node):
                assert not live.in_use(step.node), f"'{step.node}' recomputed under a view"
            live.add(step.node)
        else:
            live.remove(step.node)


@pytest.mark.parametrize("name,fraction", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_schedule_fits_budget_and_is_bit_identical_to_store_all(name, fraction):
    model, spec, expected = reference(name)
    policy = DTR(fraction=fraction)
    budget = int(fraction * expected.metrics.peak_bytes)
    plan = ENGINE.plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy=policy)
    sim, report = plan.simulation, plan.schedule.report
    assert plan.policy == plan.schedule.policy == f"dtr({fraction:g})"
    assert sim.peak_bytes <= budget == report.budget_bytes
    assert report.status == "feasible"
    evictions, remats = (int(w) for w in report.detail.replace(",", "").split()[::2])
    assert report.detail == f"{evictions} evictions, {remats} rematerializations"
    assert remats == sim.recomputed_nodes
    problem = problem_of(model, spec)
    assert all(
        count == 1 for node, count in sim.evaluations.items() if not problem.is_forward(node)
    ), "a backward node was computed twice"
    if fraction == 1.0:  # store-all fits: DTR never evicts
        assert evictions == remats == sim.recompute_flops == 0
    elif fraction <= 0.6:
        assert evictions > 0 and sim.recompute_flops > 0

    assert_no_buffer_is_recomputed_under_its_views(plan)

    result = ENGINE.run(request(model, spec, policy))
    assert result.metrics.peak_bytes == result.metrics.predicted_peak_bytes == sim.peak_bytes
    assert set(result.outputs) == set(expected.outputs)
    for key, value in expected.outputs.items():
        assert np.array_equal(result.outputs[key], value), f"output {key}"
    assert set(result.grads) == set(model.wrt)
    for key, value in expected.grads.items():
        assert np.array_equal(result.grads[key], value), f"gradient of {key}"


@pytest.mark.parametrize("fraction", [0.9, 0.75])
def test_transformer_block_with_views_is_bit_identical(fraction):
    # Reshapes and transposes share buffers; its lowest peak is ~0.73 of store-all's.
    model = models.transformer_block(batch=2, seq=8, d_model=8, heads=2, d_ff=16, dtype="float64")
    spec = spec_of(model)
    expected = ENGINE.run(request(model, spec))
    policy = DTR(fraction=fraction)
    plan = ENGINE.plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy=policy)
    assert plan.simulation.recomputed_nodes > 0
    assert_no_buffer_is_recomputed_under_its_views(plan)
    result = ENGINE.run(request(model, spec, policy))
    assert result.metrics.peak_bytes <= int(fraction * expected.metrics.peak_bytes)
    for key, value in (*expected.outputs.items(), *expected.grads.items()):
        got = result.outputs.get(key, result.grads.get(key))
        assert np.array_equal(got, value), key


@pytest.mark.parametrize("policy", [DTR(fraction=0.05), DTR(bytes=1000)], ids=str)
def test_budget_below_reach_is_resource_exhausted(policy):
    model, spec, _ = reference("chain")
    with pytest.raises(ResourceExhausted, match="the lowest peak") as info:
        ENGINE.plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy=policy)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert "policy dtr(" in str(info.value) and "nothing left to evict" in str(info.value)
    with pytest.raises(ResourceExhausted, match="the lowest peak"):
        ENGINE.run(request(model, spec, policy))


def test_chain_at_sqrt_memory_recomputes_about_as_much_as_sqrt():
    # A 32-layer chain: at sqrt's own peak, DTR's greedy evictions recompute no more
    # than twice what sqrt's segments do (on this chain it is within a few percent).
    model = chain(32, 64)
    spec = spec_of(model)
    sqrt = ENGINE.plan(spec, wrt=("x",), loss="loss", policy=Sqrt()).simulation
    dtr = ENGINE.plan(spec, wrt=("x",), loss="loss", policy=DTR(bytes=sqrt.peak_bytes)).simulation
    assert dtr.peak_bytes <= sqrt.peak_bytes
    assert 0 < dtr.recompute_flops <= 2 * sqrt.recompute_flops


def test_plan_is_deterministic():
    model, spec, _ = reference("skip")
    steps = [plan_dtr(problem_of(model, spec), DTR(fraction=0.4)).steps for _ in range(2)]
    assert steps[0] == steps[1]


def test_a_2000_node_graph_plans(capsys):
    model = chain(1100, 64)  # about 2,200 joint-graph nodes
    problem = problem_of(model, spec_of(model))
    assert len(problem.graph) > 2000
    start = time.perf_counter()
    schedule = plan_dtr(problem, DTR(fraction=0.3))
    seconds = time.perf_counter() - start
    sim = bounds.simulated(problem, schedule)
    assert sim.peak_bytes <= schedule.report.budget_bytes
    with capsys.disabled():
        print(
            f"\nDTR planned {len(problem.graph)} nodes in {seconds:.3f}s ({schedule.report.detail})"
        )


def test_sampled_evictions_are_valid_and_do_not_depend_on_string_hashing(monkeypatch):
    """Past `SAMPLE` resident values an eviction ranks a seeded sample of them (and
    every dead one). Forced here with a sample of 4: the schedule fits, gives store_all's
    gradients, and is the same in processes with different hash seeds."""
    from remat_server.checkpoint.planners import dtr

    monkeypatch.setattr(dtr, "SAMPLE", 4)
    model, spec, expected = reference("skip")
    policy = DTR(fraction=0.4)
    result = ENGINE.run(request(model, spec, policy))
    assert 0 < result.metrics.peak_bytes <= int(0.4 * expected.metrics.peak_bytes)
    for key, value in expected.grads.items():
        assert np.array_equal(result.grads[key], value), key
    script = (
        "import sys, hashlib; sys.path[:0] = sys.argv[1:]\n"
        "import test_dtr\n"
        "from remat_server.checkpoint.planners import dtr\n"
        "dtr.SAMPLE = 4\n"
        "model, spec, _ = test_dtr.reference('skip')\n"
        "steps = dtr.plan_dtr(test_dtr.problem_of(model, spec), dtr.DTR(fraction=0.4)).steps\n"
        "print(hashlib.sha256(repr(steps).encode()).hexdigest())\n"
    )
    here = str(Path(__file__).parent)
    digests = {
        subprocess.run(
            [sys.executable, "-c", script, here, str(Path(here).parent)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(digests) == 1, digests
