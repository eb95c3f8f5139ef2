"""bench/transfer.py and bench/load.py run end to end in their tiniest mode (real server
processes, a few seconds) and return reports of the promised shape."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch):
    """Import a bench script by name (bench/ is not a package)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


def test_transfer_smoke(bench, capsys):
    transfer = bench("transfer")
    report = transfer.main(["--sizes", "1,3", "--repeats", "1"])
    rows = report["rows"]
    fresh, reusing = "raw tcp, fresh receive buffer", "remat auto, out= (reused result)"
    assert [(r["size_mib"], r["path"]) for r in rows] == [
        (1, "raw tcp"),
        (1, "grpc echo"),
        (1, fresh),
        (1, "remat auto (unary)"),
        (1, reusing),
        (1, "remat stream (forced)"),
        (3, "raw tcp"),
        (3, "grpc echo"),
        (3, fresh),
        (3, "remat auto (stream)"),
        (3, reusing),
        (3, "remat unary (forced)"),
    ]
    for r in rows:
        assert r["seconds"] > 0 and r["gb_per_s"] > 0 and len(r["samples"]) == 1
        assert r["nbytes"] == r["size_mib"] * (1 << 20)
        assert (r["server_seconds"] is None) == (not r["path"].startswith("remat"))
    assert all(r["ratio_to_tcp"] == 1 for r in rows if r["path"] == "raw tcp")
    assert report["goal_met"] is None  # no size >= 64 MiB
    out = capsys.readouterr().out
    assert "| 3 MiB | remat auto (stream) |" in out and "goal not evaluated" in out


def test_transfer_goal_is_judged_like_for_like_at_64_mib_and_up(bench):
    """Reusing remat against raw TCP (both receive into memory they have); the default
    path against raw TCP receiving into fresh memory, reported beside it."""
    transfer = bench("transfer")

    def row(size, path, seconds):
        return dict(size_mib=size, path=path, seconds=seconds)

    rows = [
        row(16, "raw tcp", 1.0),
        row(16, transfer.REUSING, 10.0),
        row(64, "raw tcp", 1.0),
        row(64, transfer.FRESH_TCP, 2.0),
        row(64, "remat auto (stream)", 3.0),
        row(64, transfer.REUSING, 1.6),
        row(64, "remat unary (forced)", 20.0),
        row(256, "raw tcp", 4.0),
        row(256, transfer.FRESH_TCP, 8.0),
        row(256, "remat auto (stream)", 10.0),
        row(256, transfer.REUSING, 7.0),
    ]
    met, line = transfer.summary(rows)
    assert met is True, line
    assert "64 MiB 62%, 256 MiB 57% of raw TCP; goal >= 50%: MET" in line
    assert "(a new result array per call): 64 MiB 67%, 256 MiB 80% of raw TCP receiving" in line
    rows[-1]["seconds"] = 9.0  # 44% at 256 MiB
    met, line = transfer.summary(rows)
    assert met is False and "NOT MET" in line


def test_load_smoke(bench, capsys):
    load = bench("load")
    report = load.main(
        [
            "--clients",
            "2",
            "--seconds",
            "0.6",
            "--warmup",
            "0.3",
            "--settle",
            "0.1",
            "--checks",
            "2",
        ]
    )
    summary, memory = report["summary"], report["memory"]
    assert report["clients"] == 2 and report["unexpected"] == 0
    assert summary["requests"] > 0 and summary["throughput"] > 0
    assert set(summary["kinds"]) == set(load.KINDS)
    assert sum(k["requests"] for k in summary["kinds"].values()) == summary["requests"]
    assert sum(summary["statuses"].values()) == summary["requests"]
    for kind in summary["kinds"].values():
        if kind["requests"]:
            assert 0 < kind["p50_ms"] <= kind["p99_ms"]
    assert memory["baseline"] > 0 and memory["final"] > 0 and memory["peak"] > 0
    assert memory["growth"] == pytest.approx(memory["final"] / memory["baseline"] - 1)
    assert len(memory["idle"]) == 3 and memory["idle"][0] == memory["baseline"]
    assert memory["idle"][-1] == memory["final"]
    out = capsys.readouterr().out
    assert "| **all** |" in out and "server RSS, idle" in out


def test_load_percentile_and_summary(bench):
    load = bench("load")
    assert load.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert load.percentile(list(range(1, 101)), 0.99) == 99
    phase = {
        "records": [
            ("run_small", "OK", 0.01, True),
            ("invalid", "OK", 0.02, False),
            ("invalid", "INVALID_ARGUMENT", 0.03, True),
        ],
        "details": ["invalid: OK, expected INVALID_ARGUMENT"],
        "elapsed": 2.0,
    }
    summary = load.summarize(phase)
    assert summary["requests"] == 3 and summary["throughput"] == 1.5
    assert summary["unexpected"] == 1 and summary["kinds"]["invalid"]["unexpected"] == 1
    assert summary["statuses"] == {"OK": 2, "INVALID_ARGUMENT": 1}
    assert summary["kinds"]["plan"]["requests"] == 0 and summary["kinds"]["plan"]["p50_ms"] is None


def test_overhead_smoke(bench, capsys):
    """bench/overhead.py's tiniest run: every workload's first request compiles and
    plans, its repeated requests neither compile nor plan (exactly: the server looks the
    plan up), and every goal is reported."""
    overhead = bench("overhead")
    report = overhead.main(overhead.parse_args(["--smoke", "--no-torch"]))
    names = [row.name for row in report["rows"]]
    assert names == [
        "chain 200",
        "chain 1k",
        "chain 500",
        "mlp 16 layers, store_all",
        "mlp 16 layers, budget:0.5",
    ]
    for row in report["rows"]:
        assert row.first and row.repeated, row.name
        assert all(run["compile"] + run["plan"] > 0 for run in row.first), row.name
        assert all(run["compile"] == run["plan"] == 0 for run in row.repeated), row.name
        for run in row.first + row.repeated:
            assert run["total"] > 0 and run["execute"] > 0
            assert all(run[phase] >= 0 for phase in overhead.PHASES if phase != "transport")
    goals = [name for name, *_ in report["goals"]]
    assert "chain 1k first request, µs per graph node" in goals
    assert "smallest Run / bare gRPC echo, p50" in goals
    assert report["smallest"]["run_p50"] > 0 and report["smallest"]["echo_p50"] > 0
    out = capsys.readouterr().out
    assert "| chain 1k | repeated |" in out and "| goal | measured | target | met |" in out
