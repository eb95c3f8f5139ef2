"""`remat demo`'s policy comparison and `remat plan`, run as subprocesses."""
from __future__ import annotations

import re
import subprocess
import sys

CLI = [sys.executable, "-m", "remat.cli"]
DEMO_POLICIES = ["store_all", "sqrt", "revolve(4)", "recompute_all"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def table(out: str) -> dict[str, list[str]]:
    """The comparison table's rows by policy, from the header line on."""
    lines = out[out.index("\npolicy "):].strip().splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    return {line.split()[0]: dict(zip(header[1:], re.split(r"\s{2,}", line.strip())[1:]))
            for line in lines[1:]}


def test_demo_prints_the_comparison_table():
    done = run_cli("demo", "--batch", "8")
    assert done.returncode == 0, done.stderr
    assert "16 layers" in done.stdout and "batch 8" in done.stdout
    rows = table(done.stdout)
    assert list(rows) == DEMO_POLICIES, done.stdout
    assert rows["store_all"]["vs store_all"] == "100.0%"
    assert rows["store_all"]["recompute time"] == "0.0%"
    for name, row in rows.items():
        assert row["peak"] == row["predicted"], name
        assert row["max grad diff"] == "0", name
        for column in ("forward ms", "recompute ms", "backward ms", "total ms"):
            assert float(row[column]) >= 0
    assert float(rows["recompute_all"]["recompute flops"].rstrip("%")) > 50


def test_demo_default_batch_shows_memory_savings():
    done = run_cli("demo", "--policies", "sqrt", "every_k:4", "recompute_all")
    assert done.returncode == 0, done.stderr
    rows = table(done.stdout)
    assert list(rows) == ["store_all", "sqrt", "every_k(4)", "recompute_all"]
    ratios = {name: float(row["vs store_all"].rstrip("%")) for name, row in rows.items()}
    assert ratios["sqrt"] < 70 and ratios["recompute_all"] < ratios["sqrt"]


def test_plan_prints_the_dry_run_figures():
    done = run_cli("plan", "--policy", "sqrt")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "policy sqrt" in out and "no tensors sent" in out
    peak = re.search(r"peak bytes\s+([\d,]+)\s+\(.*?([\d.]+)% of store_all", out)
    assert peak and int(peak.group(1).replace(",", "")) > 0 and float(peak.group(2)) < 100
    flops = int(re.search(r"^\s+flops\s+([\d,]+)", out, re.MULTILINE).group(1).replace(",", ""))
    recompute = re.search(r"recompute flops\s+([\d,]+)", out).group(1).replace(",", "")
    assert flops > int(recompute) > 0
    evaluations = re.search(r"node evaluations\s+(\d+)\s+nodes: (\d+) computed once, "
                            r"(\d+) recomputed \(2x\)", out)
    assert evaluations, out
    total, once, again = map(int, evaluations.groups())
    assert total == once + again and again > 0
    assert "most recomputed" in out


def test_plan_other_models_and_policy_forms():
    done = run_cli("plan", "--policy", "store_all", "--layers", "4", "--batch", "16")
    assert done.returncode == 0, done.stderr
    assert "mlp (4 layers), batch 16" in done.stdout
    assert re.search(r"nodes: \d+ computed once$", done.stdout, re.MULTILINE)
    assert "100.0% of store_all" in done.stdout
    done = run_cli("plan", "--model", "transformer", "--policy", "checkpoints:ln1,attn")
    assert done.returncode == 0, done.stderr
    assert "checkpoints(ln1,attn)" in done.stdout


def test_plan_reports_bad_policies_clearly():
    done = run_cli("plan", "--policy", "every_k:four")
    assert done.returncode == 2
    assert "argument --policy: policy 'every_k': 'four' is not an integer" in done.stderr
    done = run_cli("plan", "--policy", "checkpoints:nope")
    assert done.returncode == 1
    assert "error: policy checkpoints: 'nope' is not a node of the forward graph" in done.stderr
