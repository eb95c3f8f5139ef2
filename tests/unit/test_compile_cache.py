"""The compile cache: a repeated request reuses its compiled plan, anything that changes
the plan changes the key, results are bit-identical cached or not, the cache stays
within its byte bound, concurrent first requests compile once, and its size estimates
are honest."""

from __future__ import annotations

import gc
import threading
import tracemalloc
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from remat import models
from remat_proto import policies
from remat_proto.spec import GraphSpec, InputSpec, NodeSpec
from remat_server.engine import Engine, LRUCache, RunRequest, gc_pause
from remat_server.engine import compile as compile_module
from remat_server.engine import run as run_module
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

RNG = np.random.default_rng(12)


def mlp_request(**overrides) -> tuple[RunRequest, models.Model]:
    # Activations outweigh the parameters, so fractions of store_all's peak are feasible.
    model = models.mlp(batch=128, widths=(6,) + (16,) * 8 + (3,), dtype="float64")
    spec = graph_from_proto(model.graph.to_proto(), Limits())
    fields = dict(
        graph=spec,
        inputs=model.inputs,
        wrt=tuple(model.wrt),
        loss=model.loss,
        policy="store_all",
        graph_id="mlp",
    )
    fields.update(overrides)
    return RunRequest(**fields), model


def two_output_spec(batch: int = -1) -> GraphSpec:
    """y = tanh(x @ w), z = sum(y * y): a batched input, two outputs."""
    return GraphSpec(
        "two",
        (InputSpec("x", (batch, 3), "float64"), InputSpec("w", (3, 2), "float64")),
        (
            NodeSpec("h", "matmul", ("x", "w")),
            NodeSpec("y", "tanh", ("h",)),
            NodeSpec("yy", "mul", ("y", "y")),
            NodeSpec("z", "sum", ("yy",)),
        ),
        (("y", "y"), ("z", "z")),
    )


def feeds(batch: int) -> dict:
    return {"x": RNG.standard_normal((batch, 3)), "w": RNG.standard_normal((3, 2))}


def assert_same(a, b) -> None:
    assert a.outputs.keys() == b.outputs.keys() and a.grads.keys() == b.grads.keys()
    for name in a.outputs:
        assert np.array_equal(a.outputs[name], b.outputs[name]), name
    for name in a.grads:
        assert np.array_equal(a.grads[name], b.grads[name]), name


# --- keys ------------------------------------------------------------------------------------
SPEC = two_output_spec()
BASE = dict(graph=SPEC, graph_id="two", wrt=("w",), loss="z", policy="store_all")
VARIANTS = {  # each changes what must be planned; every one must miss, then hit
    "graph": dict(graph_id="other"),
    "input shapes": dict(batch=5),
    "wrt": dict(wrt=("x", "w")),
    "loss": dict(loss="", cotangents=("z",)),
    "cotangent set": dict(loss="", cotangents=("y", "z")),
    "fetch": dict(fetch=("y",)),
    "policy": dict(policy="recompute_all"),
    "policy parameter": dict(policy=policies.EveryK(2)),
}


def request_of(batch: int = 4, cotangents=(), **fields) -> RunRequest:
    inputs = feeds(batch)
    cot = {"y": RNG.standard_normal((batch, 2)), "z": np.array(1.0)}
    merged = {**BASE, **fields}
    return RunRequest(inputs=inputs, cotangents={k: cot[k] for k in cotangents}, **merged)


@pytest.mark.parametrize("field", sorted(VARIANTS))
def test_every_field_that_changes_the_plan_changes_the_key(field):
    engine = Engine()
    assert not engine.run(request_of()).metrics.plan_cached
    assert engine.run(request_of()).metrics.plan_cached  # same key, new tensors: a hit
    variant = VARIANTS[field]
    first = engine.run(request_of(**variant))
    assert not first.metrics.plan_cached, field
    again = engine.run(request_of(**variant))
    assert again.metrics.plan_cached, field
    # The variant's result is its own, not the base plan's: a fresh engine agrees.
    fresh = Engine(cache_bytes=0)
    request = request_of(**variant)
    assert_same(engine.run(request), fresh.run(request))


def test_tensors_flags_and_deadlines_do_not_enter_the_key():
    engine = Engine()
    engine.run(request_of())
    for extra in (dict(timeline=True), dict(trace=True), dict(measure_memory=True)):
        assert engine.run(request_of(**extra)).metrics.plan_cached, extra


def test_a_spec_without_an_id_is_keyed_by_the_object():
    engine = Engine()
    spec = two_output_spec()
    request = dict(inputs=feeds(4), wrt=("w",), loss="z")
    assert not engine.run(RunRequest(spec, **request)).metrics.plan_cached
    assert engine.run(RunRequest(spec, **request)).metrics.plan_cached
    # An equal but distinct spec object is not assumed to be the same graph.
    assert not engine.run(RunRequest(two_output_spec(), **request)).metrics.plan_cached


# --- results ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "policy",
    [
        "store_all",
        "sqrt",
        "recompute_all",
        policies.Budget(fraction=0.7),
        policies.DTR(fraction=0.8),
    ],
    ids=str,
)
def test_cached_and_uncached_results_are_bit_identical(policy):
    cached, uncached = Engine(), Engine(cache_bytes=0)
    request, _ = mlp_request(policy=policy)
    first = cached.run(request)
    for _ in range(2):
        again, cold = cached.run(request), uncached.run(request)
        assert again.metrics.plan_cached and not cold.metrics.plan_cached
        assert_same(again, first)
        assert_same(cold, first)
        assert again.metrics.predicted_peak_bytes == cold.metrics.predicted_peak_bytes


def test_a_profiled_budget_is_profiled_and_planned_once():
    """The first Run times the ops on its inputs; later ones, whatever their values,
    reuse that plan (a training loop must not profile every step)."""
    engine = Engine()
    request, _ = mlp_request(policy=policies.Budget(fraction=0.7, profile=True))
    first = engine.run(request)
    scaled = replace(
        request,
        inputs={k: v * 2 if v.dtype.kind == "f" else v for k, v in request.inputs.items()},
    )
    again = [engine.run(request), engine.run(scaled)]
    assert [r.metrics.plan_cached for r in (first, *again)] == [False, True, True]
    assert "seconds" in again[0].metrics.planner.detail  # priced by time, not FLOPs
    assert_same(again[0], first)
    # A profiled plan is its own: the same fraction by FLOPs is planned apart.
    by_flops = engine.run(replace(request, policy=policies.Budget(fraction=0.7)))
    assert not by_flops.metrics.plan_cached


def test_plan_and_run_share_the_compiled_request():
    engine = Engine()
    request, model = mlp_request(policy="sqrt")
    planned = engine.plan(
        request.graph, graph_id="mlp", wrt=request.wrt, loss=request.loss, policy="sqrt"
    )
    assert not planned.cached
    run = engine.run(request)
    assert run.metrics.plan_cached
    assert run.metrics.predicted_peak_bytes == planned.simulation.peak_bytes
    assert engine.plan(
        request.graph, graph_id="mlp", wrt=request.wrt, loss=request.loss, policy="sqrt"
    ).cached


# --- bounds ----------------------------------------------------------------------------------
def test_the_lru_evicts_within_its_byte_bound_coldest_first():
    class Item:
        def __init__(self, nbytes):
            self.nbytes = nbytes

    cache = LRUCache(max_bytes=100)
    for key in "abcd":
        cache.get_or_build(key, lambda: Item(30))
        assert cache.nbytes <= 100
    assert len(cache) == 3 and cache.stats.evictions == 1  # "a" went
    cache.get_or_build("b", lambda: Item(30))  # a hit makes "b" the hottest
    cache.get_or_build("e", lambda: Item(30))
    assert cache.get_or_build("b", lambda: Item(30))[1]  # still there
    assert not cache.get_or_build("c", lambda: Item(30))[1]  # "c" was the coldest
    too_big, hit = cache.get_or_build("huge", lambda: Item(500))
    assert not hit and too_big.nbytes == 500 and cache.nbytes <= 100  # returned, not kept
    assert (cache.stats.hits, cache.stats.misses) == (2, 7)


def test_an_entry_that_grows_is_re_measured():
    class Item:
        nbytes = 40

    cache = LRUCache(max_bytes=100)
    first, _ = cache.get_or_build("a", Item)
    cache.get_or_build("b", Item)
    first.nbytes = 80  # "a" gained a plan
    cache.resize("a")
    assert cache.nbytes <= 100 and cache.stats.evictions == 1


def test_the_engine_cache_stays_within_its_bound():
    bound = 200_000
    engine = Engine(cache_bytes=bound)
    for k in range(12):
        request, _ = mlp_request(graph_id=f"mlp{k}", policy=["store_all", "sqrt"][k % 2])
        engine.run(request)
        assert engine.cache.nbytes <= bound
    assert engine.cache.stats.evictions > 0


def chain(n: int, name: str = "chain") -> GraphSpec:
    """x + x + ... (n adds), summed: a spec built directly (no SDK graph, whose nodes
    and graph refer to each other, to leave cyclic garbage behind)."""
    nodes = [NodeSpec(f"a{i}", "add", ("x" if i == 0 else f"a{i - 1}", "x")) for i in range(n)]
    return GraphSpec(
        name,
        (InputSpec("x", (1,), "float32"),),
        (*nodes, NodeSpec("s", "sum", (f"a{n - 1}",))),
        (("loss", "s"),),
    )


def test_estimates_are_within_a_factor_of_two_of_what_is_retained():
    mlp, model = mlp_request()
    cases = [
        RunRequest(
            chain(3000),
            {"x": np.ones(1, np.float32)},
            wrt=("x",),
            loss="loss",
            policy="store_all",
            graph_id="chain",
        ),
        mlp,
    ]
    for request in cases:
        engine = Engine(cache_bytes=1 << 40)
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            engine.run(request)
            gc.collect()
            retained = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert retained / 2 <= engine.cache.nbytes <= retained * 2, (retained, engine.cache.nbytes)


def big_chain_request(name: str) -> RunRequest:
    """A store_all gradient of a 20k-node chain: big enough for its compile's objects to
    be frozen (`gc_pause.FREEZE_AFTER`)."""
    return RunRequest(
        chain(20_000, name),
        {"x": np.ones(1, np.float32)},
        wrt=("x",),
        loss="loss",
        policy="store_all",
        graph_id=name,
    )


def test_an_evicted_big_compile_is_freed_though_its_objects_were_frozen(monkeypatch):
    """A big compile pauses the garbage collector and freezes what it built
    (`engine.gc_pause`); only reference counting frees it once evicted, so nothing it
    holds may form a cycle. Autodiff's emitter once did (its constants' handles referred
    back to it, and through its builder to every node): each evicted 20k-node compile
    left 60,000 objects frozen for good."""
    engine = Engine(cache_bytes=1)  # keeps nothing: each compile is evicted at once
    # No full collection meanwhile (what earlier tests froze could have doubled the
    # frozen set): it would thaw, collect and freeze again, and move the counts.
    monkeypatch.setattr(gc_pause, "_collected_at", 10**12)
    grown = []  # objects each freeze took
    freeze = gc_pause._freeze

    def counted_freeze():
        before = gc.get_freeze_count()
        freeze()
        grown.append(gc.get_freeze_count() - before)

    monkeypatch.setattr(gc_pause, "_freeze", counted_freeze)
    frozen = []
    for k in range(3):
        engine.run(big_chain_request(f"chain{k}"))
        frozen.append(gc.get_freeze_count())
    assert len(grown) == 3 and min(grown) > 10_000, grown  # each compile's objects frozen
    assert frozen[2] - frozen[0] < 1_000, frozen  # and the evicted ones' freed


def test_cyclic_garbage_frozen_with_a_big_compile_is_reclaimed_later(monkeypatch):
    """A freeze takes every object alive, the caller's too (an in-process client's SDK
    graph is a cycle: its nodes refer to it). Once the frozen objects have doubled since
    the last full collection, the next freeze thaws and collects them first."""

    class Cycle:
        pass

    def run(k: int) -> None:
        engine.run(big_chain_request(f"cycle{k}"))

    engine = Engine(cache_bytes=1)
    garbage = Cycle()
    garbage.itself = garbage
    alive = weakref.ref(garbage)
    run(0)  # freezes `garbage` with the compile's objects
    assert gc.get_freeze_count() > 10_000
    del garbage
    gc.collect()
    assert alive() is not None  # frozen: the collector does not see it
    monkeypatch.setattr(gc_pause, "_collected_at", 0)  # as if the frozen set had doubled
    run(1)
    assert alive() is None


def test_a_doubling_leaves_the_full_collection_to_an_idle_moment(monkeypatch):
    """Frozen objects doubled since the last full collection make one owed: the request
    path does not pay it (until they grow fourfold); an idle server does, through
    `collect_if_owed`, which reclaims the cyclic garbage frozen meanwhile."""

    class Cycle:
        pass

    engine = Engine(cache_bytes=1)
    garbage = Cycle()
    garbage.itself = garbage
    alive = weakref.ref(garbage)
    engine.run(big_chain_request("owed0"))  # freezes `garbage` with the compile's objects
    del garbage
    frozen = gc.get_freeze_count()
    # As if the last full collection had left a third of what is frozen now: the next
    # freeze finds them grown about threefold, over OWED_AFTER, under DUE_AFTER.
    monkeypatch.setattr(gc_pause, "_collected_at", frozen // 3)
    monkeypatch.setattr(gc_pause, "_frozen_since", frozen)
    monkeypatch.setattr(gc_pause, "_owed", False)
    engine.run(big_chain_request("owed1"))
    assert gc_pause._owed and alive() is not None  # owed, not paid on the request path
    assert gc_pause.collect_if_owed()
    assert alive() is None and not gc_pause._owed
    assert not gc_pause.collect_if_owed()  # paid: nothing owed


def test_the_frozen_objects_are_counted_only_when_they_may_have_doubled(monkeypatch):
    """`gc.get_freeze_count()` walks every frozen object (20-70 ms once a few 100k-node
    compiles are frozen), so a freeze asks it only when the objects frozen since the
    last full collection could have doubled the frozen set: not while they total less
    than what that collection left, and then once, to decide."""
    counted = []
    real = gc.get_freeze_count

    class CountingGc:
        def __getattr__(self, name):
            return getattr(gc, name)

        def get_freeze_count(self):
            counted.append(1)
            return real()

    monkeypatch.setattr(gc_pause, "gc", CountingGc())
    monkeypatch.setattr(gc_pause, "_owed", False)
    monkeypatch.setattr(gc_pause, "_collected_at", 10**9)  # as if a big set was frozen
    monkeypatch.setattr(gc_pause, "_frozen_since", 0)
    kept = []
    for _ in range(3):
        with gc_pause.paused(gc_pause.PAUSE_AFTER_NODES):
            kept.append([[i] for i in range(gc_pause.FREEZE_AFTER + 1000)])
    assert counted == [] and gc_pause._frozen_since >= 3 * gc_pause.FREEZE_AFTER
    # Now they may have: as many frozen since as the last collection left (the frozen
    # set as it is; so it has not doubled, and no collection follows).
    monkeypatch.setattr(gc_pause, "_collected_at", real())
    monkeypatch.setattr(gc_pause, "_frozen_since", real())
    with gc_pause.paused(gc_pause.PAUSE_AFTER_NODES):
        kept.append([[i] for i in range(gc_pause.FREEZE_AFTER + 1000)])
    assert counted == [1]


# --- concurrency -----------------------------------------------------------------------------
def test_concurrent_first_requests_compile_and_plan_once(monkeypatch):
    request, _ = mlp_request(policy="sqrt")
    reference = Engine(cache_bytes=0).run(request)
    counts = {"validate": 0, "compile": 0, "plan": 0}
    lock = threading.Lock()

    def counting(name, function):
        def counted(*args, **kwargs):
            with lock:
                counts[name] += 1
            return function(*args, **kwargs)

        return counted

    monkeypatch.setattr(run_module, "validate", counting("validate", run_module.validate))
    monkeypatch.setattr(
        run_module, "compile_request", counting("compile", run_module.compile_request)
    )
    monkeypatch.setattr(compile_module, "_plan", counting("plan", compile_module._plan))
    engine = Engine()
    start = threading.Barrier(8)

    def run_once(_):
        start.wait()  # all eight ask at (about) the same moment
        return engine.run(request)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run_once, range(8)))
    assert counts == {"validate": 1, "compile": 1, "plan": 1}
    for result in results:
        assert_same(result, reference)
    # Whatever the interleaving, exactly one of them planned.
    assert sum(not r.metrics.plan_cached for r in results) >= 1


def test_a_failed_compile_is_not_cached_and_reaches_every_waiter():
    engine = Engine()
    bad = GraphSpec(
        "bad",
        (InputSpec("x", (2,), "float64"),),
        (NodeSpec("y", "matmul", ("x", "x", "x")),),
        (("y", "y"),),
    )
    for _ in range(2):  # raised each time: the failure was not kept
        with pytest.raises(Exception, match="takes 2 inputs"):
            engine.run(RunRequest(bad, {"x": np.ones(2)}, graph_id="bad"))
    assert len(engine.cache) == 0


def test_a_response_too_big_for_one_message_is_refused_before_planning(monkeypatch):
    """Run refuses results too big for one message (the SDK then resends over
    RunStream) before planning: the stream's request plans the policy, once."""
    from remat_server.errors import ResponseTooLarge

    planned = []
    real = compile_module._plan
    monkeypatch.setattr(compile_module, "_plan", lambda *a: planned.append(1) or real(*a))
    engine = Engine()
    request, _ = mlp_request(policy="sqrt")
    with pytest.raises(ResponseTooLarge, match="RunStream"):
        engine.run(request, max_response_bytes=64)
    assert planned == []
    assert not engine.run(request).metrics.plan_cached  # the stream's turn: planned now
    assert engine.run(request).metrics.plan_cached and planned == [1]


def test_a_big_compile_is_frozen_out_of_the_collectors_way():
    """After a pause that built many objects (a big compile, which the cache keeps), the
    collector no longer traverses them; a small one leaves the collector alone; the
    pause restores the collector's state. A small graph does not pause it at all."""
    from remat_server.engine import gc_pause

    was = gc.isenabled()
    frozen = gc.get_freeze_count()
    big_graph = gc_pause.PAUSE_AFTER_NODES
    with gc_pause.paused(big_graph - 1):
        assert gc.isenabled() == was
    with gc_pause.paused(big_graph):
        assert not gc.isenabled()
        small = [[i] for i in range(100)]
    assert gc.get_freeze_count() == frozen and gc.isenabled() == was
    with gc_pause.paused(big_graph):
        big = [[i] for i in range(gc_pause.FREEZE_AFTER + 1000)]
    assert gc.get_freeze_count() >= frozen + len(big) and gc.isenabled() == was
    assert small and big
