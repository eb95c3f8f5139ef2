"""`remat demo`'s policy comparison and `remat plan`, run as subprocesses."""

from __future__ import annotations

import os
import re
import subprocess
import sys

CLI = [sys.executable, "-m", "remat.cli"]
DEMO_POLICIES = ["store_all", "sqrt", "revolve(4)", "recompute_all"]
# Not a terminal, whatever the environment says: rich would otherwise colour the output.
PIPED = {
    k: v
    for k, v in os.environ.items()
    if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
}


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=PIPED)


def table(out: str) -> dict[str, dict[str, str]]:
    """The comparison table's rows by policy, each {header: cell}. The header is the line
    starting with "policy" above a rule; cells are two or more spaces apart."""
    lines = out.splitlines()
    start = next(
        i
        for i, line in enumerate(lines[:-1])
        if line.split()[:1] == ["policy"] and re.fullmatch("[─-]+", lines[i + 1].strip())
    )  # the rule under it
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 2 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(header):
            break
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def figures(out: str) -> dict[str, str]:
    """`remat plan`'s figures, {name: value and detail}: a line of the table below the
    title line, its name and value two or more spaces apart."""
    return dict(
        re.split(r"\s{2,}", line.strip(), maxsplit=1)
        for line in out.splitlines()[1:]
        if re.search(r"\S\s{2,}\S", line)
    )


def test_demo_prints_the_comparison_table():
    done = run_cli("demo", "--batch", "8")
    assert done.returncode == 0, done.stderr
    assert "16 layers" in done.stdout and "batch 8" in done.stdout
    assert "\x1b" not in done.stdout  # piped: no colour codes
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
    assert "\x1b" not in out
    rows = figures(out)
    peak = re.fullmatch(r"([\d,]+)\s+.*?([\d.]+)% of store_all's .*", rows["peak bytes"])
    assert peak and int(peak.group(1).replace(",", "")) > 0 and float(peak.group(2)) < 100
    flops = int(rows["flops"].split()[0].replace(",", ""))
    recompute = int(rows["recompute flops"].split()[0].replace(",", ""))
    assert flops > recompute > 0
    evaluations = re.fullmatch(
        r"(\d+)\s+nodes: (\d+) computed once, (\d+) recomputed "
        r"\(2x\)\s*",
        rows["node evaluations"],
    )
    assert evaluations, out
    total, once, again = map(int, evaluations.groups())
    assert total == once + again and again > 0
    assert re.fullmatch(r"(\S+ \(2x\), )+\S+ \(2x\)\s*", rows["most recomputed"]), out


def test_plan_other_models_and_policy_forms():
    done = run_cli("plan", "--policy", "store_all", "--layers", "4", "--batch", "16")
    assert done.returncode == 0, done.stderr
    assert "mlp (4 layers), batch 16" in done.stdout
    rows = figures(done.stdout)
    assert re.fullmatch(r"\d+\s+nodes: \d+ computed once\s*", rows["node evaluations"])
    assert "most recomputed" not in rows
    assert "100.0% of store_all" in rows["peak bytes"]
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
