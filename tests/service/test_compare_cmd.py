"""`remat compare` (and `remat plan --graph / --model unet`) run as subprocesses: the
table, --json, --plot and --trace files, saved graphs in binary and JSON form, the
budget sweep, and clear failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import remat
from remat_proto.units import format_bytes

CLI = [sys.executable, "-m", "remat.cli"]
SMALL = ["--layers", "8", "--batch", "512"]  # fast; activations outweigh the weights
DEFAULT_ROWS = [
    "store_all",
    "sqrt",
    "revolve(4)",
    "budget(0.5)",
    "budget(0.4)",
    "dtr(0.5)",
    "recompute_all",
]
# Not a terminal, whatever the environment says: rich would otherwise colour the output.
PIPED = {
    k: v
    for k, v in os.environ.items()
    if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_cli(*args: str, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env or PIPED
    )


def table(out: str) -> dict[str, dict[str, str]]:
    """The comparison table's rows by policy, each {header: cell} (an error row shows its
    status code as the peak). The header is the line starting with "policy" above a
    rule; cells are two or more spaces apart; the table ends at the first line that is
    not a full row (the error reasons below it)."""
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


def is_error(row: dict) -> bool:
    """An error row shows its status code (e.g. RESOURCE_EXHAUSTED) where the peak goes."""
    return re.fullmatch(r"[A-Z_]+", row["peak"]) is not None


def compare_json(*args: str) -> dict:
    done = run_cli("compare", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def target(server_port) -> list[str]:
    return ["--target", f"127.0.0.1:{server_port}"]


def test_default_policies_table_and_progress():
    done = run_cli("compare", *SMALL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("remat compare: mlp (8 layers), batch 512; 7 policies")
    rows = table(done.stdout)
    assert list(rows) == DEFAULT_ROWS, done.stdout
    ok = {name: row for name, row in rows.items() if not is_error(row)}
    assert {"store_all", "sqrt", "recompute_all"} <= set(ok)
    assert ok["store_all"]["vs store_all"] == "100.0%"
    for name, row in ok.items():
        assert row["peak"] == row["predicted"], name
        assert row["max grad diff"] == "0", name
        assert all(float(row[c]) >= 0 for c in ("forward ms", "backward ms", "total ms"))
    assert float(ok["recompute_all"]["vs store_all"].rstrip("%")) < 100
    for name, row in rows.items():  # every error row is explained below the table
        if is_error(row):
            assert re.search(rf"^{re.escape(name)}: [A-Z_]+: .+", done.stdout, re.MULTILINE)
    # Not a terminal: no live display and no escape codes, one progress line per
    # policy, in order, on stderr (none on stdout).
    progress = re.findall(r"^remat compare: \[(\d)/7\] (\S+): ", done.stderr, re.MULTILINE)
    assert progress == [(str(i + 1), name) for i, name in enumerate(DEFAULT_ROWS)]
    assert "[1/7]" not in done.stdout
    assert "\x1b" not in done.stdout + done.stderr and "\r" not in done.stderr


def test_on_a_terminal_a_progress_bar_and_a_table_that_fits():
    """On a (forced) 120-column terminal: a live progress bar on stderr, one step per
    policy, instead of the progress lines; the table on stdout fits the width with
    every figure whole (rich alone would cut them short: "4.…")."""
    policies = ["--policies", "sqrt", "recompute_all"]
    rows = compare_json(*SMALL, *policies)["rows"]
    terminal = {**PIPED, "FORCE_COLOR": "1", "COLUMNS": "120", "TERM": "xterm"}
    done = run_cli("compare", *SMALL, *policies, env=terminal)
    assert done.returncode == 0, done.stderr
    err, out = ANSI.sub("", done.stderr), ANSI.sub("", done.stdout)
    assert "[1/3]" not in err
    for step in ("1/3", "2/3", "3/3"):
        assert step in err, err
    assert "running sqrt" in err and "running recompute_all" in err
    assert max(map(len, out.splitlines())) <= 120, out
    assert "…" not in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for row in rows:
        size = format_bytes(row["peak_bytes"])
        assert re.search(
            rf"^{re.escape(row['policy'])}\s+{size}\s+{size}\s+"
            rf"{row['peak_ratio']:.1%}\s",
            lines[row["policy"]],
        ), out


def test_json_plot_and_trace(tmp_path, target):
    plot, trace = tmp_path / "policies.png", tmp_path / "policies.json"
    document = compare_json(
        *SMALL, *target, "--policies", "sqrt", "recompute_all", "--plot", plot, "--trace", trace
    )
    assert document["workload"] == "mlp (8 layers), batch 512" and document["loss"] == "loss"
    rows = document["rows"]
    assert [row["policy"] for row in rows] == ["store_all", "sqrt", "recompute_all"]
    for row in rows:
        assert "timeline" not in row and "trace" not in row and not row["error"]
        assert row["peak_bytes"] == row["predicted_peak_bytes"] > 0
        assert row["max_grad_diff"] == 0.0
    assert rows[2]["peak_bytes"] < rows[0]["peak_bytes"]
    assert rows[2]["recompute_flops"] > 0 == rows[0]["recompute_flops"]

    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    events = json.loads(trace.read_text())["traceEvents"]
    names = [e["args"]["name"] for e in events if e["name"] == "process_name"]
    assert names == ["store_all", "sqrt", "recompute_all"]
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all(
        e["dur"] >= 0 and e["cat"] in ("forward", "recompute", "backward") for e in spans
    )
    assert {e["cat"] for e in spans if e["pid"] == 3} == {"forward", "recompute", "backward"}
    assert any(e["ph"] == "C" for e in events)


@pytest.mark.parametrize("form", ["binary", "json"])
def test_saved_graph(tmp_path, target, form):
    g = remat.Graph("tanh_chain")
    h = g.input("x", (-1, 16))
    labels = g.input("labels", (-1,), "int64")
    for i in range(6):
        h = remat.tanh(h @ g.input(f"w{i}", (16, 16)), name=f"act{i}")
    g.output("loss", remat.cross_entropy(h, labels))
    g.output("features", h)
    path = tmp_path / ("chain.pb" if form == "binary" else "chain.json")
    if form == "binary":
        path.write_bytes(g.to_proto().SerializeToString())
    else:
        path.write_text(g.to_json())
    document = compare_json(
        "--graph", path, "--batch", "32", *target, "--policies", "sqrt", "recompute_all"
    )
    assert (
        document["workload"] == f"graph 'tanh_chain' from {path} (13 nodes, batch 32), loss 'loss'"
    )
    assert document["wrt"] == ["x"] + [f"w{i}" for i in range(6)]  # every float input
    rows = document["rows"]
    assert all(not row["error"] and row["max_grad_diff"] == 0.0 for row in rows)
    assert rows[2]["recompute_flops"] > 0

    done = run_cli("plan", "--graph", path, "--wrt", "w0", "--policy", "sqrt", *target)
    assert done.returncode == 0, done.stderr
    assert "graph 'tanh_chain'" in done.stdout and "policy sqrt" in done.stdout


def test_sweep_keeps_each_budget(target):
    document = compare_json(*SMALL, *target, "--sweep")
    rows = document["rows"]
    assert [row["policy"] for row in rows] == ["store_all"] + [
        f"budget({f})" for f in (0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1)
    ]
    base = rows[0]["peak_bytes"]
    fitted = 0
    for row in rows[1:]:
        fraction = float(row["policy"][len("budget(") : -1])
        if row["error"]:
            assert row["error_code"] == "RESOURCE_EXHAUSTED", row
            continue
        fitted += 1
        assert row["peak_bytes"] <= fraction * base, row
        assert row["planner"]["budget_bytes"] <= fraction * base + 1
    assert fitted >= 2  # 0.9 and 0.7 at least; recompute_all keeps ~60% here
    # The table shows the rows that did not fit too, with their reason.
    done = run_cli("compare", *SMALL, *target, "--sweep")
    assert done.returncode == 0, done.stderr
    assert len(table(done.stdout)) == 9
    assert "budgets are fractions of store_all's peak" in done.stdout


def test_unet_model_compares_and_plans(target):
    document = compare_json(
        "--model", "unet", "--batch", "2", *target, "--policies", "recompute_all"
    )
    store_all, recompute_all = document["rows"]
    assert document["workload"].startswith("unet")
    assert recompute_all["peak_bytes"] < store_all["peak_bytes"]
    assert recompute_all["max_grad_diff"] == 0.0
    done = run_cli("plan", "--model", "unet", "--batch", "2", "--policy", "sqrt", *target)
    assert done.returncode == 0, done.stderr
    assert "unet (3 levels, 32x32), batch 2" in done.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not a graph\n\x00\xff", "is not a remat graph (binary protobuf"),
        (b'{"nodes": [1, 2]}', "is not a remat graph (JSON"),
        (b"", "is empty"),
    ],
)
def test_bad_graph_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.pb"
    path.write_bytes(content)
    done = run_cli("compare", "--graph", path)
    assert done.returncode == 1
    assert done.stderr.startswith("remat compare: error:") and message in done.stderr
    assert "Traceback" not in done.stderr


def test_usage_and_missing_file_errors(tmp_path):
    done = run_cli("compare", "--graph", tmp_path / "missing.pb")
    assert done.returncode == 1 and "cannot read graph file" in done.stderr
    for args, message in [
        (("--model", "cnn", "--layers", "3"), "--layers applies to"),
        (("--plot", "out.txt"), "--plot FILE must end in"),
        (("--policies", "budget:lots"), "argument --policies"),
        (("--model", "mlp", "--graph", "g.pb"), "not allowed with"),
        (("--loss", "loss"), "--loss applies to --graph, --onnx and --torch only"),
    ]:
        done = run_cli("compare", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)


def test_plot_without_matplotlib_fails_before_running(tmp_path):
    hide = (
        "import sys; sys.modules['matplotlib'] = None; from remat.cli import main; "
        f"sys.exit(main(['compare', '--plot', {str(tmp_path / 'out.png')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert 'pip install "remat[plot]"' in done.stderr
    assert "[1/" not in done.stderr  # nothing ran
