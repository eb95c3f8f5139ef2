"""`remat compare`, and the workloads `remat compare` and `remat plan` run.

    remat compare                                   # sample MLP, default policies
    remat compare --model unet --plot out.png --trace out.json
    remat compare --sweep                           # budget at fractions 0.9 ... 0.1
    remat compare --graph model.pb --loss loss --policies sqrt dtr:0.4
    remat compare --onnx model.onnx --batch 16
    remat compare --torch examples/resnet_factory.py:make_model --json > rows.json

A workload is a sample model (`--model`) or the user's own: a saved graph (`--graph
FILE`) or an ONNX model (`--onnx FILE`), see `cli_models`, or the PyTorch module a
factory returns (`--torch MODULE:FACTORY`), see `cli_torch`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from remat_proto.arguments import positive

from . import cli_models, cli_torch
from .cli_models import GRAPH_BATCH, Workload, WorkloadError
from .cli_output import Progress, print_table

MODELS = ("mlp", "transformer", "cnn", "unet")
MLP_LAYERS, MLP_WIDTH, MLP_BATCH = 16, 64, 1024
DEFAULT_BATCH = {"mlp": MLP_BATCH, "transformer": 4, "cnn": 8, "unet": 8}
OWN = ("graph", "onnx", "torch")  # the sources --wrt and --loss apply to
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
    source.add_argument(
        "--onnx",
        metavar="FILE",
        help="an ONNX model (remat.from_onnx): its initializers keep their values, "
        "the other inputs are seeded random",
    )
    source.add_argument(
        "--torch",
        metavar="MODULE:FACTORY",
        type=cli_torch.factory_spec,
        help="a PyTorch model (remat.from_torch): FACTORY() from MODULE (on sys.path or "
        "in the current directory, or a file.py) returns (module, example_args) or "
        "(module, example_args, example_kwargs)",
    )
    parser.add_argument(
        "--batch",
        type=positive,
        metavar="N",
        help=f"batch size (default: mlp {MLP_BATCH}, transformer 4, cnn 8, unet 8; "
        f"a saved graph's leading -1 dimension or an ONNX model's dynamic batch "
        f"dimension: {GRAPH_BATCH}; not --torch, whose example inputs fix it)",
    )
    parser.add_argument(
        "--layers", type=positive, metavar="N", help=f"mlp linear layers (default {MLP_LAYERS})"
    )
    parser.add_argument(
        "--wrt",
        nargs="+",
        metavar="INPUT",
        help="--graph, --onnx, --torch: inputs to differentiate (default: every float "
        "input; --torch: the parameters that require grad, not buffers, and the float "
        "example inputs)",
    )
    parser.add_argument(
        "--loss",
        metavar="OUTPUT",
        help="--graph, --onnx, --torch: the scalar output to differentiate (default: "
        "--graph: the only output, or the one named 'loss'; --onnx, --torch: the scalar "
        "output named 'loss' or the only scalar one, else an added loss, the sum of "
        "mean(output**2) over the float outputs)",
    )


def mlp(batch: int, layers: int = MLP_LAYERS, width: int = MLP_WIDTH):
    """A deep, narrow tanh MLP: activations, not weights, dominate its memory, so the
    checkpoint policies differ visibly."""
    import remat

    return remat.models.mlp(batch=batch, widths=(width,) * layers + (10,))


def workload(args, parser: argparse.ArgumentParser) -> Workload:
    """The graph, inputs, wrt and loss the arguments name; usage errors exit 2 through
    `parser.error`, a bad file or factory raises WorkloadError."""
    own = next((flag for flag in OWN if getattr(args, flag) is not None), None)
    if own is None:
        for flag in ("wrt", "loss"):
            if getattr(args, flag):
                parser.error(f"--{flag} applies to --graph, --onnx and --torch only")
    if args.layers is not None and (own or (args.model or "mlp") != "mlp"):
        parser.error("--layers applies to --model mlp only")
    if own == "torch" and args.batch is not None:
        parser.error("--batch does not apply to --torch: the factory's example inputs fix it")
    if own == "graph":
        return cli_models.graph_workload(args.graph, batch=args.batch, wrt=args.wrt, loss=args.loss)
    if own == "onnx":
        return cli_models.onnx_workload(args.onnx, batch=args.batch, wrt=args.wrt, loss=args.loss)
    if own == "torch":
        return cli_torch.torch_workload(args.torch, wrt=args.wrt, loss=args.loss)
    return sample_workload(args.model or "mlp", args.batch, args.layers)


def sample_workload(name: str, batch: int | None, layers: int | None) -> Workload:
    import remat

    batch = batch or DEFAULT_BATCH[name]
    if name == "mlp":
        layers = layers or MLP_LAYERS
        model, what = mlp(batch, layers), f"mlp ({layers} layers)"
    elif name == "transformer":
        model, what = remat.models.transformer_block(batch=batch), "transformer block"
    elif name == "cnn":
        model, what = remat.models.cnn(batch=batch), "cnn"
    else:
        model, what = remat.models.unet(batch=batch, image=32), "unet (3 levels, 32x32)"
    return Workload(model.graph, model.inputs, model.wrt, model.loss, f"{what}, batch {batch}")


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
        help="run a model (a sample, a saved graph, an ONNX file or a PyTorch module) "
        "under several checkpoint policies "
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
