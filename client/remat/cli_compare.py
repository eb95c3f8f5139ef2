"""`remat compare`, and the workloads `remat compare` and `remat plan` run.

    remat compare                                   # sample MLP, default policies
    remat compare --model unet --plot out.png --trace out.json
    remat compare --sweep                           # budget at fractions 0.9 ... 0.1
    remat compare --graph model.pb --loss loss --policies sqrt dtr:0.4
    remat compare --json > rows.json

A workload is a sample model (`--model`) or a saved graph (`--graph FILE`, the
`remat.v1.Graph` message in binary or JSON form, told apart by content). A saved graph
runs on seeded random inputs of its declared shapes: float inputs standard normal,
integer inputs zeros, bool inputs False, a leading -1 dimension bound to `--batch`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from remat_proto.arguments import positive

from .cli_output import Progress, print_table

MODELS = ("mlp", "transformer", "cnn", "unet")
MLP_LAYERS, MLP_WIDTH, MLP_BATCH = 16, 64, 1024
DEFAULT_BATCH = {"mlp": MLP_BATCH, "transformer": 4, "cnn": 8, "unet": 8}
GRAPH_BATCH = 8  # a saved graph's leading -1 dimension, unless --batch
DEFAULT_POLICIES = (
    "store_all",
    "sqrt",
    "revolve:4",
    "budget:0.5",
    "budget:0.4",
    "dtr:0.5",
    "recompute_all",
)
SWEEP = (0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1)


class WorkloadError(Exception):
    """The workload cannot be built (unreadable graph file, no loss...): exit 1."""


@dataclass
class Workload:
    graph: Any  # remat.Graph
    inputs: dict[str, np.ndarray]
    wrt: list[str]
    loss: str
    description: str


# --- workloads -----------------------------------------------------------------------------
def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=MODELS, default=None, help="sample model (default mlp)")
    source.add_argument(
        "--graph",
        metavar="FILE",
        help="a saved graph: the remat.v1.Graph message, binary "
        "(graph.to_proto().SerializeToString()) or JSON (graph.to_json())",
    )
    parser.add_argument(
        "--batch",
        type=positive,
        metavar="N",
        help=f"batch size (default: mlp {MLP_BATCH}, transformer 4, cnn 8, unet 8; "
        f"a saved graph's leading -1 dimension: {GRAPH_BATCH})",
    )
    parser.add_argument(
        "--layers", type=positive, metavar="N", help=f"mlp linear layers (default {MLP_LAYERS})"
    )
    parser.add_argument(
        "--wrt",
        nargs="+",
        metavar="INPUT",
        help="--graph: inputs to differentiate (default: every float input)",
    )
    parser.add_argument(
        "--loss",
        metavar="OUTPUT",
        help="--graph: the scalar output to differentiate (default: the only "
        "output, or the one named 'loss')",
    )


def mlp(batch: int, layers: int = MLP_LAYERS, width: int = MLP_WIDTH):
    """A deep, narrow tanh MLP: activations, not weights, dominate its memory, so the
    checkpoint policies differ visibly."""
    import remat

    return remat.models.mlp(batch=batch, widths=(width,) * layers + (10,))


def workload(args, parser: argparse.ArgumentParser) -> Workload:
    """The graph, inputs, wrt and loss the arguments name; usage errors exit 2 through
    `parser.error`, a bad graph file raises WorkloadError."""
    import remat

    if args.graph is None:
        for flag in ("wrt", "loss"):
            if getattr(args, flag):
                parser.error(f"--{flag} applies to --graph only")
    model_name = args.model or "mlp"
    if args.layers is not None and (args.graph or model_name != "mlp"):
        parser.error("--layers applies to --model mlp only")
    if args.graph is not None:
        return graph_workload(args.graph, batch=args.batch, wrt=args.wrt, loss=args.loss)
    batch = args.batch or DEFAULT_BATCH[model_name]
    if model_name == "mlp":
        layers = args.layers or MLP_LAYERS
        model, what = mlp(batch, layers), f"mlp ({layers} layers)"
    elif model_name == "transformer":
        model, what = remat.models.transformer_block(batch=batch), "transformer block"
    elif model_name == "cnn":
        model, what = remat.models.cnn(batch=batch), "cnn"
    else:
        model, what = remat.models.unet(batch=batch, image=32), "unet (3 levels, 32x32)"
    return Workload(model.graph, model.inputs, model.wrt, model.loss, f"{what}, batch {batch}")


def load_graph(path: str):
    """A remat.Graph from a file holding the Graph message, binary or JSON."""
    from remat import wire

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise WorkloadError(f"cannot read graph file {path}: {error.strerror}") from None
    if not data.strip():
        raise WorkloadError(f"graph file {path} is empty")
    try:
        return wire.graph_from_bytes(data)
    except ValueError as error:
        raise WorkloadError(f"{path} {error}") from None


def random_inputs(graph, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the declared shapes: floats standard normal, integers zeros
    (valid labels and indices), bools False; a leading -1 dimension is `batch`."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for item in graph.inputs:
        shape = tuple(batch if (i == 0 and d == -1) else d for i, d in enumerate(item.shape))
        if any(d < 0 for d in shape):
            raise WorkloadError(
                f"input {item.name!r} has shape {item.shape}: only a leading "
                "-1 (batch) dimension can be bound"
            )
        if item.dtype.startswith("float"):
            inputs[item.name] = rng.standard_normal(shape).astype(item.dtype)
        else:
            inputs[item.name] = np.zeros(shape, item.dtype)
    return inputs


def graph_workload(path: str, *, batch: int | None, wrt, loss) -> Workload:
    graph = load_graph(path)
    declared = {item.name: item.dtype for item in graph.inputs}
    if wrt:
        unknown = [name for name in wrt if name not in declared]
        if unknown:
            raise WorkloadError(
                f"--wrt {', '.join(unknown)}: not an input of the graph "
                f"(inputs: {', '.join(declared) or 'none'})"
            )
    else:
        wrt = [name for name, dtype in declared.items() if dtype.startswith("float")]
        if not wrt:
            raise WorkloadError(f"graph {graph.name!r} has no float input to differentiate")
    outputs = graph.output_names
    if loss is None:
        if len(outputs) == 1:
            loss = outputs[0]
        elif "loss" in outputs:
            loss = "loss"
        else:
            raise WorkloadError(
                f"graph {graph.name!r} has outputs {', '.join(outputs)}: "
                "choose the loss with --loss"
            )
    elif loss not in outputs:
        raise WorkloadError(
            f"--loss {loss}: not an output of the graph (outputs: {', '.join(outputs)})"
        )
    batch = batch or GRAPH_BATCH
    batched = any(item.shape[:1] == (-1,) for item in graph.inputs)
    description = (
        f"graph {graph.name!r} from {path} ({len(graph.nodes)} nodes"
        + (f", batch {batch}" if batched else "")
        + f"), loss {loss!r}"
    )
    return Workload(graph, random_inputs(graph, batch), list(wrt), loss, description)


# --- remat compare -------------------------------------------------------------------------
def _row_json(row) -> dict:
    """A row as JSON: every field but the bulky per-step `timeline` and `trace`."""
    data = {
        f.name: getattr(row, f.name)
        for f in dataclasses.fields(row)
        if f.name not in ("timeline", "trace", "planner")
    }
    data["planner"] = dataclasses.asdict(row.planner) if row.planner else None
    return data


def run(args) -> int:
    import remat
    from remat import policies as _policies
    from remat.compare import format_bytes, policy_list

    parser = args.parser
    if args.plot and not args.plot.lower().endswith((".png", ".svg", ".pdf")):
        parser.error("--plot FILE must end in .png, .svg or .pdf")
    if args.plot:  # before the (possibly long) comparison, not after it
        try:
            from remat.plots import require_matplotlib

            require_matplotlib()
        except RuntimeError as error:
            print(f"remat compare: error: {error}", file=sys.stderr)
            return 1
    chosen = list(args.policies or ())
    if args.sweep:
        chosen += [_policies.Budget(fraction=f) for f in SWEEP]
    elif not chosen:
        chosen = [_policies.parse(p) for p in DEFAULT_POLICIES]
    try:
        load = workload(args, parser)
    except WorkloadError as error:
        print(f"remat compare: error: {error}", file=sys.stderr)
        return 1
    resolved = policy_list(chosen)
    labels = [_policies.label(p) for p in resolved]
    where = f"server {args.target}" if args.target else "in-process server"
    if not args.json:
        print(f"remat compare: {load.description}; {len(resolved)} policies, {where}", flush=True)
    progress, rows, failure = Progress(labels), [], None
    try:
        with remat.Client(args.target) if args.target else remat.Client.in_process() as client:
            for row in client.compare_stream(
                load.graph,
                load.inputs,
                wrt=load.wrt,
                loss=load.loss,
                policies=resolved,
                repeats=args.repeats,
                timeline=bool(args.plot),
                trace=bool(args.trace),
            ):
                rows.append(row)
                progress.advance(row)
    except remat.RematError as error:
        failure = error
    finally:
        progress.close()  # clear the bar before anything else is printed
    if failure is not None:
        print(f"remat compare: error: {failure}", file=sys.stderr)
        return 1

    if args.json:
        json.dump(
            {
                "workload": load.description,
                "graph": load.graph.name,
                "loss": load.loss,
                "wrt": load.wrt,
                "repeats": args.repeats,
                "rows": [_row_json(row) for row in rows],
            },
            sys.stdout,
            indent=2,
        )
        print()
    else:
        from remat.compare import comparison_table

        print_table(comparison_table(rows))
        base = rows[0]
        for row in rows:
            if row.error:
                print(f"{row.policy}: {row.error_code or 'error'}: {row.error}")
        if args.sweep and not base.error:
            print(f"(budgets are fractions of store_all's peak, {format_bytes(base.peak_bytes)})")
    title = f"remat compare: {load.description}"
    try:
        if args.plot:
            from remat.plots import plot_comparison

            plot_comparison(rows, args.plot, title=title)
            print(f"remat compare: plot written to {args.plot}", file=sys.stderr)
        if args.trace:
            from remat.trace import write_chrome_trace

            write_chrome_trace(args.trace, rows, title=title)
            print(
                f"remat compare: trace written to {args.trace} (open it in "
                "https://ui.perfetto.dev or chrome://tracing)",
                file=sys.stderr,
            )
    except (OSError, ValueError) as error:
        print(f"remat compare: error: {error}", file=sys.stderr)
        return 1
    return 0


def register(sub, policy_type) -> None:
    """Add the `compare` subcommand to the `remat` parser's subparsers."""
    from remat import policies

    compare = sub.add_parser(
        "compare",
        help="run a model (or a saved graph) under several checkpoint policies "
        "and compare peak memory, recomputation and time",
        description="Run one workload under store_all (the baseline, always first) and "
        "each policy, on an in-process server unless --target. Prints a table (or "
        "--json), optionally draws the memory timelines and the memory-versus-compute "
        "Pareto front (--plot) and writes a Chrome/Perfetto trace of every executed "
        "step (--trace). A policy that cannot run (say, a budget nothing fits) shows "
        "as an error row; the others still run. Progress goes to stderr: a bar on a "
        "terminal, else a line per policy.",
        epilog="--json prints {workload, graph, loss, wrt, repeats, rows}: one object per "
        "policy with every ComparisonRow field except the per-step timeline and trace "
        "(see --plot and --trace for those). Exit status: 0 on success, 1 on a remat "
        "error, 2 on a usage error.",
    )
    add_workload_arguments(compare)
    compare.add_argument(
        "--policies",
        nargs="+",
        type=policy_type,
        metavar="POLICY",
        help=f"policies to compare, each one of: {', '.join(policies.FORMS)} "
        f"(default: {' '.join(DEFAULT_POLICIES)})",
    )
    compare.add_argument(
        "--sweep",
        action="store_true",
        help="add budget:F for F in "
        + " ".join(map(str, SWEEP))
        + " (after any --policies; instead of the default policies)",
    )
    compare.add_argument(
        "--repeats",
        type=positive,
        default=1,
        metavar="N",
        help="runs per policy; the fastest is reported (default 1)",
    )
    compare.add_argument(
        "--plot",
        metavar="FILE.png",
        help='draw the comparison (PNG, SVG or PDF; needs pip install "remat[plot]")',
    )
    compare.add_argument(
        "--trace",
        metavar="FILE.json",
        help="write a Chrome Trace Event file (open in ui.perfetto.dev)",
    )
    compare.add_argument(
        "--json", action="store_true", help="print the rows as JSON instead of the table"
    )
    compare.add_argument(
        "--target", metavar="ADDR", help="server address host:port (default: an in-process server)"
    )
    compare.set_defaults(run=run, parser=compare)
