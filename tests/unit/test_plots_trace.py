"""remat.trace (Chrome Trace Event JSON) and remat.plots (the comparison figure) on
synthetic comparison rows, and the U-Net sample model (runs, gradients match centered
differences, memory planners see it)."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest

import remat
from remat import models
from remat.compare import ComparisonRow
from remat.plots import pareto_front, plot_comparison
from remat.results import TraceEvent
from remat.trace import PHASES, chrome_trace, write_chrome_trace

MIB = 1 << 20


def synthetic_row(
    policy: str,
    layers: int = 8,
    keep_every: int = 1,
    step_seconds=1e-4,
    base_peak: int = 0,
    error: str = "",
) -> ComparisonRow:
    """A chain of `layers` 1-MiB activations: forward keeps every `keep_every`-th one,
    the backward recomputes the others (from the kept one before) and frees as it goes."""
    if error:
        return ComparisonRow(
            policy,
            0,
            0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            error=error,
            error_code="RESOURCE_EXHAUSTED",
        )
    events, live, clock = [], 0, 0.0

    def step(node, phase, seconds=step_seconds, delta=MIB):
        nonlocal live, clock
        live += delta
        events.append(
            TraceEvent(
                node,
                "tanh" if phase != "free" else "",
                phase,
                clock,
                seconds if phase != "free" else 0.0,
                live,
            )
        )
        clock += seconds if phase != "free" else 0.0

    for i in range(layers):
        step(f"act{i}", "forward")
        if i % keep_every and i + 1 < layers:
            step(f"act{i}", "free", delta=-MIB)
    recomputed = 0
    for i in reversed(range(layers)):
        if i % keep_every and i + 1 < layers:
            step(f"act{i}", "recompute")
            recomputed += 1
        step(f"grad/act{i}", "backward", seconds=2 * step_seconds)
        step(f"act{i}", "free", delta=-MIB)
        step(f"grad/act{i}", "free", delta=-MIB)
    peak = max(e.live_bytes for e in events)
    forward, backward = layers * step_seconds, 2 * layers * step_seconds
    recompute = recomputed * step_seconds
    flops = 3 * layers + recomputed
    compute = forward + backward + recompute
    return ComparisonRow(
        policy,
        peak,
        peak,
        peak / (base_peak or peak),
        recompute / compute,
        recomputed / flops,
        forward,
        backward,
        recompute,
        compute,
        0.0,
        flops=flops,
        recompute_flops=recomputed,
        recomputed_nodes=recomputed,
        timeline=tuple(e.live_bytes for e in events),
        trace=tuple(events),
    )


@pytest.fixture(scope="module")
def rows():
    base = synthetic_row("store_all")
    return [
        base,
        synthetic_row("sqrt", keep_every=3, base_peak=base.peak_bytes),
        synthetic_row("every_k(2)", keep_every=2, base_peak=base.peak_bytes),
        synthetic_row("recompute_all", keep_every=100, base_peak=base.peak_bytes),
        synthetic_row("budget(10%)", error="nothing fits a budget of 0.8 MiB"),
    ]


# --- trace -----------------------------------------------------------------------------------
def test_chrome_trace_structure(rows, tmp_path):
    path = write_chrome_trace(tmp_path / "trace.json", rows, title="synthetic")
    document = json.loads((tmp_path / "trace.json").read_text())
    assert path == str(tmp_path / "trace.json")
    assert document == json.loads(json.dumps(chrome_trace(rows, title="synthetic")))
    events = document["traceEvents"]
    assert document["otherData"]["policies"] == ["store_all", "sqrt", "every_k(2)", "recompute_all"]
    assert document["otherData"]["skipped"][0]["policy"] == "budget(10%)"
    for event in events:
        assert {"name", "ph", "pid", "tid"} <= set(event), event
        assert event["ph"] in ("X", "M", "C")
        if event["ph"] == "X":
            assert event["dur"] >= 0 and event["ts"] >= 0
            assert event["cat"] in PHASES and event["tid"] == PHASES[event["cat"]]
        if event["ph"] == "C":
            assert set(event["args"]) == {"MiB"} and event["args"]["MiB"] >= 0
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert list(names.values()) == document["otherData"]["policies"]
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"
    }
    assert set(threads.values()) == set(PHASES)
    # Per track (process, thread or counter) timestamps never go back.
    tracks: dict = {}
    for event in events:
        if event["ph"] != "M":
            tracks.setdefault((event["pid"], event["tid"], event["ph"]), []).append(event["ts"])
    assert tracks and all(ts == sorted(ts) for ts in tracks.values())
    # One X event per computed step, one counter sample per step (frees included).
    for pid, row in zip(names, rows):
        computed = [e for e in row.trace if e.phase != "free"]
        assert len([e for e in events if e["ph"] == "X" and e["pid"] == pid]) == len(computed)
        counter = [e for e in events if e["ph"] == "C" and e["pid"] == pid]
        assert len(counter) == len(row.trace)
        assert max(e["args"]["MiB"] for e in counter) == pytest.approx(row.peak_bytes / MIB)
    recompute = [e for e in events if e["ph"] == "X" and e["cat"] == "recompute"]
    assert {e["pid"] for e in recompute} == {2, 3, 4}  # not store_all


def test_chrome_trace_other_inputs(rows):
    one = chrome_trace(rows[1].trace)
    assert [e["args"]["name"] for e in one["traceEvents"] if e["name"] == "process_name"] == [
        "remat"
    ]
    two = chrome_trace({"a": rows[0].trace, "b": rows[1].trace})
    assert len({e["pid"] for e in two["traceEvents"]}) == 2
    with pytest.raises(ValueError, match="trace=True"):
        chrome_trace([rows[4]])
    with pytest.raises(ValueError, match="unknown phase"):
        chrome_trace([TraceEvent("x", "tanh", "sideways", 0.0, 1.0, 0)])


# --- plots -----------------------------------------------------------------------------------
def test_pareto_front():
    assert pareto_front([(1, 10), (2, 5), (2.5, 6), (3, 1)]) == [0, 1, 3]
    assert pareto_front([(1, 1), (1, 1), (2, 2)]) == [0, 1]
    assert pareto_front([]) == []


@pytest.mark.parametrize("trace, cost", [(True, "flops"), (False, "time")])
def test_plot_writes_a_png(rows, tmp_path, trace, cost):
    if not trace:  # timelines only: x is the schedule progress
        rows = [ComparisonRow(**{**row.__dict__, "trace": ()}) for row in rows]
    path = plot_comparison(rows, tmp_path / "plot.png", title="synthetic chain", cost=cost)
    data = (tmp_path / "plot.png").read_bytes()
    assert path == str(tmp_path / "plot.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_needs_timelines(rows, tmp_path):
    bare = [ComparisonRow(**{**row.__dict__, "trace": (), "timeline": ()}) for row in rows]
    with pytest.raises(ValueError, match="timeline=True"):
        plot_comparison(bare, tmp_path / "plot.png")
    with pytest.raises(ValueError, match="cost"):
        plot_comparison(rows, tmp_path / "plot.png", cost="joules")


def test_plot_without_matplotlib_says_how_to_install(rows, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(RuntimeError, match=r'pip install "remat\[plot\]"'):
        plot_comparison(rows, tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()


# --- the U-Net sample model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    with remat.Client.in_process() as client:
        yield client


def test_unet_runs_and_has_the_u_shape(client):
    model = models.unet(batch=2, channels=(4, 8, 16), image=16, classes=3)
    ops = {node.name: node.op for node in model.graph.nodes}
    assert {"pool0", "pool1", "up0", "up1", "cat0", "cat1", "enc2", "dec0"} <= set(ops)
    assert ops["cat0"] == "concat" and ops["pool0"] == "max_pool2d"
    result = client.run(model.graph, model.inputs, wrt=model.wrt, loss=model.loss)
    loss = float(result.outputs["loss"])
    assert np.isfinite(loss) and abs(loss - np.log(3)) < 1.0  # near chance at init
    assert sorted(result.grads) == sorted(model.wrt)
    assert result.grads["dec0_w0"].shape == (4, 8 + 4, 3, 3)  # upsampled 8 + skip 4
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in result.grads.values())
    # Checkpointing pays off: recompute_all keeps less than store_all.
    base = client.plan(model.graph, wrt=model.wrt, loss=model.loss, policy="store_all")
    low = client.plan(model.graph, wrt=model.wrt, loss=model.loss, policy="recompute_all")
    assert low.peak_bytes < base.peak_bytes


def test_unet_gradcheck_tiny_float64(client):
    model = models.unet(
        batch=1, channels=(2, 3), image=4, classes=2, in_channels=1, dtype="float64", seed=1
    )
    rng = np.random.default_rng(3)
    inputs = {
        k: v + 0.1 * rng.standard_normal(v.shape) if k in model.wrt else v
        for k, v in model.inputs.items()
    }
    report = remat.gradcheck(client, model.graph, inputs, wrt=model.wrt, loss=model.loss)
    worst = max(report, key=report.get)
    assert report[worst] <= 1e-6, f"gradient of {worst} has relative error {report[worst]:.3g}"


def test_unet_is_deterministic_and_checks_sizes():
    first, second = models.unet(dtype="float64"), models.unet(dtype="float64")
    assert first.graph.to_proto() == second.graph.to_proto()
    for key in first.inputs:
        np.testing.assert_array_equal(first.inputs[key], second.inputs[key])
    with pytest.raises(ValueError, match="divisible"):
        models.unet(channels=(4, 8, 16, 32), image=12)
    with pytest.raises(ValueError, match="2 levels"):
        models.unet(channels=(4,))
