"""Memory: what each policy saves on a deep MLP (dry runs), that the accounted peak is
what NumPy really allocates (tracemalloc, within 10% on tensors of 1 MiB and more),
that views cost nothing, and that a cancelled run gives its memory back."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from remat import models
from remat_proto.policies import Checkpoints, EveryK, RecomputeAll, Revolve, SaveOps, Sqrt, StoreAll
from remat_server.engine import Engine, RunRequest
from remat_server.errors import Cancelled
from remat_server.graph.ir import GraphSpec, InputSpec, NodeSpec
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

ENGINE = Engine()
MiB = 1 << 20


def mlp(layers: int):
    """Tanh MLP, batch 4096 x width 64 float32: every activation is exactly 1 MiB."""
    model = models.mlp(batch=4096, widths=(64,) * (layers + 1) + (10,))
    return model, graph_from_proto(model.graph.to_proto(), Limits())


# --- the 64-layer MLP (issue 3's acceptance), dry runs ---------------------------------------
@pytest.fixture(scope="module")
def deep():
    model, spec = mlp(64)
    assert model.inputs["x"].nbytes == MiB

    def peak(policy) -> int:
        return ENGINE.plan(
            spec, wrt=tuple(model.wrt), loss=model.loss, policy=policy
        ).simulation.peak_bytes

    return peak


POLICIES = [
    StoreAll(),
    RecomputeAll(),
    Sqrt(),
    *(EveryK(k) for k in (1, 2, 4, 8, 16)),
    *(Revolve(c) for c in (1, 2, 3, 4, 8)),
    SaveOps(("matmul",)),
    SaveOps(("tanh",)),
    Checkpoints(tuple(f"act{i}" for i in range(7, 63, 8))),
]


def test_sqrt_is_at_most_30_percent_of_store_all(deep):
    store, sqrt = deep(StoreAll()), deep(Sqrt())
    assert store > 64 * MiB  # 64 activations of 1 MiB are really held
    assert sqrt <= 0.30 * store, f"sqrt {sqrt / MiB:.2f} MiB vs store_all {store / MiB:.2f} MiB"


def test_recompute_all_and_revolve_1_have_the_lowest_peaks(deep):
    # Revolve(1) keeps less than recompute_all: reversing a step from its state, it
    # records only what the step's backward reads.
    lowest = deep(Revolve(1))
    assert lowest <= deep(RecomputeAll())
    for policy in POLICIES:
        if policy not in (RecomputeAll(), Revolve(1)):
            assert deep(RecomputeAll()) <= deep(policy), policy
    assert lowest < 12 * MiB  # inputs (~2 MiB) plus a few activations, not 64


def test_every_k_follows_n_over_k_plus_k(deep):
    # Chen et al.: n/k checkpoints held through the backward, plus one segment of k
    # activations recomputed and held; everything else is the same for every k.
    peaks = {k: deep(EveryK(k)) for k in (1, 2, 4, 8, 16, 32)}
    assert peaks[1] > peaks[2] > peaks[4] > peaks[8]  # falls with k up to sqrt(64)...
    assert peaks[16] > peaks[8] and peaks[32] > peaks[16]  # ...then segments dominate
    for k in (2, 4, 16, 32):
        assert peaks[k] - peaks[8] == (64 // k + k - 16) * MiB, k
    assert peaks[1] == deep(StoreAll())  # every candidate kept: nothing to save
    assert deep(Sqrt()) == peaks[8]  # sqrt(64) = 8


def test_revolve_trades_slots_for_memory(deep):
    peaks = [deep(Revolve(c)) for c in (1, 2, 3, 4, 8)]
    assert peaks == sorted(peaks)
    assert peaks[-1] < deep(Sqrt()) < deep(StoreAll())


# --- measured (tracemalloc) against predicted ------------------------------------------------
@pytest.fixture(scope="module")
def medium():
    return mlp(16)


@pytest.mark.parametrize(
    "policy", [StoreAll(), Sqrt(), EveryK(4), Revolve(3), RecomputeAll()], ids=str
)
def test_measured_peak_is_within_10_percent_of_prediction(medium, policy):
    model, spec = medium
    result = ENGINE.run(
        RunRequest(
            spec,
            model.inputs,
            wrt=tuple(model.wrt),
            loss=model.loss,
            policy=policy,
            measure_memory=True,
        )
    )
    m = result.metrics
    assert m.peak_bytes == m.predicted_peak_bytes > 5 * MiB
    ratio = m.measured_peak_bytes / m.predicted_peak_bytes
    assert 0.9 <= ratio <= 1.1, (
        f"{policy}: measured {m.measured_peak_bytes}, "
        f"predicted {m.predicted_peak_bytes} (ratio {ratio:.3f})"
    )


def test_measured_peaks_order_like_the_predictions(medium):
    model, spec = medium
    measured = {}
    for policy in (StoreAll(), Sqrt(), RecomputeAll()):
        measured[policy] = ENGINE.run(
            RunRequest(
                spec,
                model.inputs,
                wrt=tuple(model.wrt),
                loss=model.loss,
                policy=policy,
                measure_memory=True,
            )
        ).metrics.measured_peak_bytes
    assert measured[StoreAll()] > measured[Sqrt()] > measured[RecomputeAll()]
    # The saving is real: sqrt allocates several MiB less than store_all.
    assert measured[StoreAll()] - measured[Sqrt()] > 5 * MiB


# --- views ----------------------------------------------------------------------------------
def N(name, op, *inputs, **attrs):
    return NodeSpec(name, op, tuple(inputs), attrs)


def test_views_cost_nothing():
    # x (512, 256) float64 = 1 MiB. a = reshape(x) of a contiguous array, b = transpose(a)
    # and c = broadcast_to(b, (4, 512, 256)) are views (c would be 4 MiB as a copy);
    # d = reshape(b) of a transposed array must copy: 1 MiB.
    x = np.random.default_rng(0).standard_normal((512, 256))
    spec = GraphSpec(
        "views",
        (InputSpec("x", (512, 256), "float64"),),
        (
            N("a", "reshape", "x", shape=[256, 512]),
            N("b", "transpose", "a", axes=[1, 0]),
            N("c", "broadcast_to", "b", shape=[4, 512, 256]),
            N("s", "sum", "c"),
            N("d", "reshape", "b", shape=[131072]),
            N("s2", "sum", "d"),
        ),
        (("s", "s"), ("s2", "s2")),
    )
    X, scalar = MiB, 8
    plan = ENGINE.plan(spec)
    assert [type(step).__name__[0] + step.node for step in plan.schedule.steps] == [
        "Ca",
        "Cb",
        "Fa",
        "Cc",
        "Cs",
        "Fc",
        "Cd",
        "Fb",
        "Cs2",
        "Fd",
    ]
    assert plan.simulation.timeline == (
        X,
        X,
        X,
        X,  # a, b, c: views of x
        X + scalar,
        X + scalar,  # s
        2 * X + scalar,
        2 * X + scalar,  # d, a copy
        2 * X + 2 * scalar,
        X + 2 * scalar,
    )  # s2, then d goes
    assert plan.simulation.peak_bytes == 2 * X + 2 * scalar

    result = ENGINE.run(RunRequest(spec, {"x": x}, measure_memory=True))
    m = result.metrics
    assert m.peak_bytes == m.predicted_peak_bytes == 2 * X + 2 * scalar
    assert 0.9 <= m.measured_peak_bytes / m.predicted_peak_bytes <= 1.1
    np.testing.assert_allclose(result.outputs["s"], 4 * x.sum(), rtol=1e-12)
    np.testing.assert_allclose(result.outputs["s2"], x.sum(), rtol=1e-12)


def test_live_bytes_of_a_set_do_not_depend_on_its_order():
    """A view added before the value it views counted the buffer twice (the value took a
    new generation of it): the total of a set of live values, and so Budget's chain
    plans, depended on the string hash's seed. Values already live count no temporaries."""
    from remat_server.checkpoint.memory import LiveBytes, memory_model
    from remat_server.graph.validate import build_graph

    spec = GraphSpec(
        "views",
        (InputSpec("x", (64, 32), "float64"),),
        (
            N("y", "tanh", "x"),
            N("a", "reshape", "y", shape=[32, 64]),
            N("b", "transpose", "a", axes=[1, 0]),
            N("z", "softmax", "y", axis=-1),
        ),
        (("b", "b"), ("z", "z")),
    )
    graph = build_graph(spec, Limits())
    model = memory_model(graph)
    one = model.nbytes["y"]
    for order in (["y", "a", "b"], ["b", "a", "y"], ["a", "b", "y"]):
        live = LiveBytes(model, order)
        assert (live.total, live.peak) == (one, one), order
    assert model.scratch.get("z", 0) > 0  # a value with temporaries, already live
    assert LiveBytes(model, ["z", "y"]).peak == 2 * one


# --- cancellation ------------------------------------------------------------------------------
def test_a_cancelled_run_frees_its_memory(medium):
    model, spec = medium
    request = RunRequest(spec, model.inputs, wrt=tuple(model.wrt), loss=model.loss)
    timeline = ENGINE.plan(spec, wrt=tuple(model.wrt), loss=model.loss).simulation.timeline
    k = int(np.argmax(timeline)) + 1  # stop right after the step that reaches the peak
    inputs = sum(a.nbytes for a in model.inputs.values())
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > k

    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        gc.collect()
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        cancelled = False
        try:
            ENGINE.run(request, should_stop=should_stop)
        except Cancelled as exc:  # `exc` (and the frames its traceback holds) die here
            cancelled = "cancelled" in str(exc)
        peak = tracemalloc.get_traced_memory()[1] - baseline
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        if not was_tracing:
            tracemalloc.stop()
    assert cancelled
    assert len(calls) == k + 1  # stopped at the first poll that said so
    # The run really held its activations (what the plan says is live at step k, less
    # the inputs, which the caller owns) ...
    assert peak >= 0.95 * (timeline[k - 1] - inputs) > 10 * MiB
    # ... and gave them all back.
    assert after < 64 * 1024, f"{after} bytes still allocated after the cancelled run"
