"""The `remat` command: serve, health, demo, compare, plan, ops.

remat serve --host 0.0.0.0 --port 50051 --workers 4 --metrics-port 9464
REMAT_MEMORY_BUDGET_BYTES=1073741824 remat serve   # any serve flag, from the environment
remat health --target 127.0.0.1:50051               # exit 0 if SERVING (Docker HEALTHCHECK)
remat demo
remat compare --plot policies.png --trace policies.json
remat compare --onnx model.onnx --batch 16          # your model, as an ONNX file
remat compare --torch examples/resnet_factory.py:make_model  # or a PyTorch factory
remat plan --policy sqrt
remat plan --torch my_models:make_model --policy budget:0.5
remat ops

compare and plan run a sample model (--model), a saved graph (--graph FILE), an ONNX
model (--onnx FILE) or the PyTorch module that FACTORY() returns with its example
inputs (--torch MODULE:FACTORY); see `remat compare --help`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

from remat_proto.arguments import positive

from . import cli_compare, cli_health, cli_models, cli_output

DEMO_LAYERS, DEMO_BATCH = cli_compare.MLP_LAYERS, cli_compare.MLP_BATCH
DEMO_POLICIES = ("store_all", "sqrt", "revolve:4", "recompute_all")


def _demo(args) -> int:
    import remat
    from remat.compare import comparison_table

    model = cli_compare.mlp(args.batch, args.layers)
    print(
        f"remat demo: {model.graph.name} with {len(model.graph.nodes)} nodes "
        f"({args.layers} layers), batch {args.batch}, in-process server"
    )
    with remat.Client.in_process() as client:
        result = client.run(model.graph, model.inputs, wrt=model.wrt, loss=model.loss)
        rows = client.compare(
            model.graph,
            model.inputs,
            wrt=model.wrt,
            loss=model.loss,
            policies=args.policies or [_policy(p) for p in DEMO_POLICIES],
        )
    print(f"loss = {float(result.outputs['loss']):.6f}")
    print()
    norms = cli_output.new_table(
        "input", "shape", "gradient norm", figures={"shape", "gradient norm"}
    )
    for name in model.wrt:
        grad = result.grads[name]
        norms.add_row(name, "x".join(map(str, grad.shape)), f"{float(np.linalg.norm(grad)):.6f}")
    cli_output.print_table(norms)
    print()
    m = result.metrics
    metrics = cli_output.new_table(
        "metric",
        "value",
        "unit",
        figures={"value"},
        title=f"metrics (policy {m.policy or 'store_all'})",
        show_header=False,
    )
    metrics.add_row("peak bytes", f"{m.peak_bytes:,}", f"predicted {m.predicted_peak_bytes:,}")
    metrics.add_row("forward", f"{m.forward_seconds * 1e3:.2f}", "ms")
    metrics.add_row("backward", f"{m.backward_seconds * 1e3:.2f}", "ms")
    metrics.add_row("total", f"{m.total_seconds * 1e3:.2f}", "ms")
    metrics.add_row("nodes computed", f"{m.nodes_computed:,}", "")
    metrics.add_row("flops", f"{m.flops:,}", "")
    cli_output.print_table(metrics)
    print()
    table = comparison_table(rows)
    table.title = (
        "checkpoint policies (same model and inputs; peak vs store_all, share of "
        "time and FLOPs spent recomputing, gradient difference from store_all)"
    )
    cli_output.print_table(table)
    return 0


def _natural(name: str) -> list:
    """Sort key: "act2" before "act10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _plan(args) -> int:
    import remat
    from remat_proto.units import format_bytes as _bytes

    try:
        load = cli_compare.workload(args, args.parser)
    except cli_models.WorkloadError as error:
        print(f"remat plan: error: {error}", file=sys.stderr)
        return 1
    policy_label = remat.policies.label(args.policy)
    print(f"remat plan: {load.description}, policy {policy_label} (dry run: no tensors sent)")
    # A saved graph's -1 (batch) dimensions are bound by the shapes of its inputs.
    shapes = {
        item.name: load.inputs[item.name].shape for item in load.graph.inputs if -1 in item.shape
    }
    try:
        with remat.Client(args.target) if args.target else remat.Client.in_process() as client:
            plan, base = (
                client.plan(
                    load.graph, wrt=load.wrt, loss=load.loss, policy=policy, input_shapes=shapes
                )
                for policy in (args.policy, "store_all")
            )
    except remat.RematError as error:
        print(f"remat plan: error: {error}", file=sys.stderr)
        return 1
    once = sum(1 for times in plan.node_evaluations.values() if times == 1)
    again = sorted(times for times in plan.node_evaluations.values() if times > 1)
    summary = f"{once} computed once"
    if again:
        spread = f"{again[0]}x" if again[0] == again[-1] else f"{again[0]}x to {again[-1]}x"
        summary += f", {len(again)} recomputed ({spread})"
    most = sorted(plan.node_evaluations.items(), key=lambda item: (-item[1], _natural(item[0])))
    most = [f"{name} ({times}x)" for name, times in most[:5] if times > 1]
    share = plan.recompute_flops / plan.flops if plan.flops else 0.0
    ratio = plan.peak_bytes / base.peak_bytes if base.peak_bytes else 0.0
    table = cli_output.new_table("figure", "value", "detail", figures={"value"}, show_header=False)
    table.add_row(
        "peak bytes",
        f"{plan.peak_bytes:,}",
        f"{_bytes(plan.peak_bytes)}; {ratio:.1%} of store_all's "
        f"{_bytes(base.peak_bytes)}; inputs {_bytes(plan.input_bytes)}",
    )
    table.add_row(
        "flops",
        f"{plan.flops:,}",
        f"{plan.flops / base.flops:.2f}x store_all's" if base.flops else "",
    )
    table.add_row("recompute flops", f"{plan.recompute_flops:,}", f"{share:.1%} of flops")
    table.add_row("recomputed nodes", f"{plan.recomputed_nodes:,}", "repeat evaluations")
    table.add_row(
        "schedule", f"{len(plan.timeline):,}", f"steps, planned in {plan.plan_seconds * 1e3:.1f} ms"
    )
    table.add_row("node evaluations", f"{len(plan.node_evaluations):,}", f"nodes: {summary}")
    if most:
        table.add_row("most recomputed", "", ", ".join(most))
    cli_output.print_table(table)
    return 0


def _ops(args) -> int:
    import remat

    with remat.Client(args.target) if args.target else remat.Client.in_process() as client:
        ops = client.list_ops()
    table = cli_output.new_table(
        "family", "op", "inputs", "gradient", "attributes", figures={"inputs"}
    )
    table.caption, table.caption_justify = "attr? marks an optional attribute", "left"
    families = sorted({op.family for op in ops})
    for family in families:
        group = [op for op in ops if op.family == family]
        for op in group:
            arity = f"{op.min_inputs}+" if op.max_inputs < 0 else str(op.max_inputs)
            attrs = ", ".join(a.name + ("" if a.required else "?") for a in op.attrs)
            grad = "differentiable" if any(op.differentiable) else "no gradient"
            table.add_row(
                family,
                op.name,
                arity,
                grad,
                attrs,
                end_section=op is group[-1] and family != families[-1],
            )
    cli_output.print_table(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `remat` parser (`remat serve`'s own flags are the server's: see `_serve`)."""
    from remat import policies

    parser = argparse.ArgumentParser(prog="remat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run a remat server (`remat serve --help` for its flags)", add_help=False
    )
    serve.add_argument("argv", nargs=argparse.REMAINDER)
    serve.set_defaults(run=_serve)
    cli_health.register(sub)

    demo = sub.add_parser(
        "demo",
        help="run a sample MLP on an in-process server and compare checkpoint policies on it",
    )
    demo.add_argument("--batch", type=positive, default=DEMO_BATCH)
    demo.add_argument("--layers", type=positive, default=DEMO_LAYERS, help="linear layers")
    demo.add_argument(
        "--policies",
        nargs="+",
        type=_policy,
        default=None,
        metavar="POLICY",
        help=f"policies to compare (default: {' '.join(DEMO_POLICIES)})",
    )
    demo.set_defaults(run=_demo)

    plan = sub.add_parser(
        "plan",
        help="dry-run a model (a sample, a saved graph, an ONNX file or a PyTorch "
        "module) under a policy: predicted peak memory, FLOPs and recomputation, no "
        "tensors sent",
    )
    plan.add_argument(
        "--policy",
        type=_policy,
        default="store_all",
        help=f"one of: {', '.join(policies.FORMS)} (default store_all)",
    )
    cli_compare.add_workload_arguments(plan)
    plan.add_argument("--target", help="server address (default: an in-process server)")
    plan.set_defaults(run=_plan, parser=plan)

    cli_compare.register(sub, _policy)

    ops = sub.add_parser("ops", help="list the server's ops")
    ops.add_argument("--target", help="server address (default: an in-process server)")
    ops.set_defaults(run=_ops)
    return parser


def _serve(args) -> int:
    """The server owns its flags (and their REMAT_* variables): hand it the rest."""
    from remat_server.service import flags

    return flags.main(args.argv)


def _policy(text: str):
    from remat import policies

    try:
        return policies.parse(text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # before parsing: every flag after it is the server's
        return _serve(argparse.Namespace(argv=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # `remat compare --json | head`: the reader left, not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
