"""bench/models.py runs end to end in its tiniest mode (one zoo model at a tiny batch:
fresh memory workers, the torch helper process, the in-process server) and returns a
report of the promised shape."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch):
    """Import a bench script by name (bench/ is not a package)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


@pytest.mark.slow
def test_models_smoke(bench, capsys):
    models = bench("models")
    report = models.main(models.parse_args(["--quick", "--models", "llama"]))
    assert report["failed"] == [] and report["repeats"] == 1
    (row,) = report["rows"]
    assert row["model"] == "llama" and row["batch"] == models.QUICK_BATCHES["llama"]
    assert row["losses_agree"] and row["blocks"] == "4 LlamaBlock"
    assert {"torch eager", "torch checkpoint", "store_all"} <= set(row["times"])
    assert all(t["seconds"] > 0 for t in row["times"].values())
    memory = row["memory"]
    for label in ("torch eager", "torch checkpoint", "store_all", "engine store_all"):
        assert memory[label]["peak"] >= memory[label]["rss_before"] > 0, label
    assert memory["store_all"]["peak_bytes"] == memory["store_all"]["predicted_peak_bytes"]
    assert 0 < row["floor"] <= 1
    assert row["fits"] == ("budget:0.5" in row["times"])
    out = capsys.readouterr().out
    assert "| llama | 16 |" in out and "## budget:0.5 against torch.utils.checkpoint" in out


def test_budget_table_reports_does_not_fit_and_the_floor(bench):
    models = bench("models")
    mib = models.MiB
    worker = dict(rss_built=100 * mib, rss_before=110 * mib, peak=140 * mib)
    row = dict(
        model="resnet",
        blocks="2 BasicBlock",
        fits=False,
        floor=0.67,
        memory={"torch eager": worker, "torch checkpoint": dict(worker, peak=120 * mib)},
        times={"torch eager": dict(seconds=0.1), "torch checkpoint": dict(seconds=0.12)},
    )
    line = models.budget_table([row]).splitlines()[-1]
    assert line.startswith("| resnet | 2 BasicBlock | 120.0 | 1.20 | 20.0 | 0.50 | does not fit |")
    assert line.endswith("| 0.67 |")


@pytest.mark.slow
def test_zoo_planners_smoke(bench, capsys):
    """bench/zoo_planners.py: every row's contenders fit their budget, each shown
    schedule was timed, and torch's checkpointing has its row."""
    zoo_planners = bench("zoo_planners")
    args = zoo_planners.parse_args(["--quick", "--models", "llama", "--optimal-time-limit", "1"])
    (result,) = zoo_planners.main(args)
    base = result["store_all"]["peak"]
    assert set(result["rows"]) >= {"70%", "50%", "30%", "min"}
    for key, row in result["rows"].items():
        if key == "torch":  # remat at torch's measured memory: one plan's figures
            assert row["peak"] <= result["budget_at_torch"]
            continue
        for label, entry in row.items():
            if key.endswith("%"):
                assert entry["peak"] <= int(float(key[:-1]) / 100 * base), (key, label)
            if "policy" in entry:
                assert result["seconds"][entry["policy"]] > 0, (key, label)
    assert sum(label.startswith("every_k") for label in result["rows"]["70%"]) <= 1
    assert result["seconds"]["torch checkpoint"] > 0 and result["seconds"]["store_all"] > 0
    out = capsys.readouterr().out
    assert "| llama (" in out and "## torch.utils.checkpoint per block" in out


@pytest.mark.slow
def test_bounds_smoke(bench, capsys):
    """bench/bounds.py: both bounds hold for Budget's schedule and Optimal's, the
    chain's is the higher, Optimal recomputes no more than Budget, and the verdict
    follows the ratio."""
    bounds = bench("bounds")
    rows = bounds.main(
        ["--quick", "--models", "resnet", "--fractions", "0.9,0.7", "--seconds", "2"]
        + ["--optimal", "2"]
    )
    assert [(r["model"], r["fraction"]) for r in rows] == [("resnet", 0.9), ("resnet", 0.7)]
    for r in rows:
        assert r["budget"] is not None and 0 <= r["moment"] <= r["chain"] <= r["budget"]
        assert r["chain"] <= r["optimal"] <= r["budget"]
        proven = r["budget"] == 0 or r["budget"] <= bounds.GOAL * r["chain"]
        assert r["verdict"] == ("proven" if proven else "open")
    assert "| resnet | 70% |" in capsys.readouterr().out
