"""The planners on the zoo, measured: issue 14's table.

    python bench/zoo_planners.py [--models resnet,gpt2] [--repeats 3] [--quick] [--json PATH]

For each zoo model (tests/zoo.py through `remat.from_torch`, at bench/models.py's batch,
float32, one thread), and each budget (70%, 50%, 30% of store_all's predicted peak,
and the least memory): Budget, Optimal (with its gap), DTR, sqrt and the best fitting
every_k, each with its predicted peak, its recompute overhead in FLOPs (the simulator's,
as a share of one forward+backward) and in measured time (its step's median over
store_all's, through an in-process server, all of a model's steps interleaved), and its
plan time. Then torch.utils.checkpoint around every block (bench/_zoo_case.py's
BLOCKS) against remat given the same memory: torch's step's measured peak RSS (in a
fresh process) plus the inputs remat's budget counts, as bench/models.py measures it.

Prints Markdown; see bench/README.md ("zoo_planners.py").
"""

from __future__ import annotations

import argparse
import os


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated zoo models (default all)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed repeats per step (default 5; --quick 1)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny batches: that it runs")
    parser.add_argument(
        "--optimal-time-limit", type=float, default=30.0, help="Optimal's limit (default 30 s)"
    )
    parser.add_argument("--json", default=None, help="also write every measurement here")
    return parser.parse_args(argv)


# BLAS reads its thread count when the library loads: set it before numpy or torch.
if __name__ == "__main__":
    ARGS = parse_args()
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _procmem import MiB  # noqa: E402  (bench/ is sys.path[0])
from _zoo_case import Case, RematCase, remat_step  # noqa: E402
from engine import interleaved  # noqa: E402
from models import BATCHES, QUICK_BATCHES, TorchSide, run_worker, step_mib  # noqa: E402

import remat  # noqa: E402
from remat import policies as P  # noqa: E402

FRACTIONS = (0.7, 0.5, 0.3)
EVERY_K = range(1, 9)


def planned(client: remat.Client, rc: RematCase, policy):
    """The dry run's figures under `policy` (remat.PlanResult), None if nothing fits."""
    try:
        return client.plan(rc.graph, wrt=rc.wrt, loss="loss", policy=policy)
    except remat.ResourceExhaustedError:
        return None


def contenders(budget: int | None, time_limit: float) -> dict:
    """label -> policy at `budget` bytes (None: the least memory)."""
    if budget is None:
        return {"min_memory": P.MinMemory(time_limit=time_limit)}
    return {
        "budget": P.Budget(bytes=budget),
        "optimal": P.Optimal(bytes=budget, time_limit=time_limit),
        "dtr": P.DTR(bytes=budget),
        "sqrt": P.Sqrt(),
        **{f"every_k({k})": P.EveryK(k) for k in EVERY_K},
    }


def measure_model(client: remat.Client, name: str, batch: int, args) -> dict:
    started = time.perf_counter()
    rc = RematCase.build(Case.build(name, batch))
    base = planned(client, rc, "store_all")
    rows: dict[str, dict] = {}
    objects: dict[str, object] = {"store_all": P.StoreAll()}  # label -> policy
    for fraction in (*FRACTIONS, None):
        budget = None if fraction is None else int(fraction * base.peak_bytes)
        key = "min" if fraction is None else f"{fraction:.0%}"
        row = rows[key] = {}
        for label, policy in contenders(budget, args.optimal_time_limit).items():
            start = time.perf_counter()
            plan = planned(client, rc, policy)
            seconds = time.perf_counter() - start
            if plan is None or (budget is not None and plan.peak_bytes > budget):
                continue  # a fixed heuristic over the budget, or nothing fits
            objects[remat.policies.label(policy)] = policy
            row[label] = dict(
                policy=remat.policies.label(policy),
                peak=plan.peak_bytes,
                recompute_flops=plan.recompute_flops,
                plan_seconds=seconds,
                chosen=plan.planner.chosen if plan.planner else "",
                status=plan.planner.status if plan.planner else "",
                gap=plan.planner.optimality_gap if plan.planner else 0.0,
            )
        every = {k: v for k, v in row.items() if k.startswith("every_k")}
        best = min(every, key=lambda k: every[k]["recompute_flops"], default=None)
        for k in every:
            if k != best:
                del row[k]
    # Each policy some row shows is timed, once.
    policies = {"store_all": objects["store_all"]}
    for row in rows.values():
        policies.update((e["policy"], objects[e["policy"]]) for e in row.values())
    # torch.utils.checkpoint per block: its measured peak RSS, then remat at that budget.
    config = dict(model=name, batch=batch, threads=1, hwm_reset=True)
    torch_ckpt = run_worker(dict(config, framework="torch", mode="checkpoint"))
    at_torch, torch_mib = None, step_mib(torch_ckpt)
    if torch_mib is not None:
        at_torch = int(max(torch_mib, 0) * MiB) + rc.input_bytes()
        plan = planned(client, rc, P.Budget(bytes=at_torch))
        if plan is not None:
            policies[remat.policies.label(P.Budget(bytes=at_torch))] = P.Budget(bytes=at_torch)
            rows["torch"] = dict(peak=plan.peak_bytes, recompute_flops=plan.recompute_flops)
    seconds = timed(client, rc, config, policies, args.repeats)
    return dict(
        model=name,
        batch=batch,
        nodes=len(rc.graph.nodes),
        store_all=dict(peak=base.peak_bytes, flops=base.flops),
        rows=rows,
        seconds=seconds,
        torch_checkpoint_mib=torch_mib,
        budget_at_torch=at_torch,
        wall_seconds=time.perf_counter() - started,
    )


def timed(client, rc: RematCase, config: dict, policies: dict, repeats: int) -> dict:
    """Median seconds of each remat step (label -> policy) and of torch's eager and
    checkpointed steps (in a helper process, bench/models.py's), all interleaved."""
    torch_side = TorchSide(config)
    try:
        steps = {label: torch_side.step(label) for label in ("torch eager", "torch checkpoint")}
        for label, policy in policies.items():
            run = remat_step(client, rc, policy)
            steps[label] = lambda run=run: float(run().outputs["loss"])
        samples, _ = interleaved(steps, repeats)
    finally:
        torch_side.close()
    return {label: statistics.median(s) for label, s in samples.items()}


# --- the table ----------------------------------------------------------------------------------
def cell(r: dict, row: dict | None, label: str, seconds: dict) -> str:
    """'peak %, recompute FLOPs %, time ×, plan s' of one contender, or '—'."""
    if row is None:
        return "—"
    base = r["store_all"]
    step = seconds.get(row["policy"]) if "policy" in row else None
    time_x = f"{step / seconds['store_all']:.2f}x" if step else "—"
    stopped = row["status"] in ("time_limit", "fallback")  # a fallback's: over the moment bound
    gap = f", gap {row['gap']:.0%}" if label == "optimal" and stopped else ""
    status = f" ({row['status']})" if label == "optimal" else ""
    return (
        f"{row['peak'] / base['peak']:.0%}, {row['recompute_flops'] / base['flops']:.1%}, "
        f"{time_x}, {row['plan_seconds']:.2f} s{status}{gap}"
    )


def table(results: list[dict]) -> str:
    head = (
        "| model (graph nodes) | budget | Budget | Optimal | DTR | sqrt | best every_k |\n"
        "|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in results:
        s = r["seconds"]
        for key, row in r["rows"].items():
            if key == "torch":
                continue
            if key == "min":
                lines.append(
                    f"| {r['model']} ({r['nodes']}) | least memory | "
                    f"min_memory: {cell(r, row.get('min_memory'), 'min_memory', s)} "
                    "| | | | |"
                )
                continue
            every = next((k for k in row if k.startswith("every_k")), None)
            cells = [cell(r, row.get(k), k, s) for k in ("budget", "optimal", "dtr", "sqrt")]
            cells.append(f"{every}: {cell(r, row[every], every, s)}" if every else "none fits")
            lines.append(f"| {r['model']} ({r['nodes']}) | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def torch_table(results: list[dict]) -> str:
    lines = [
        "| model | torch ckpt step / torch eager | torch ckpt peak RSS MiB | remat budget MiB "
        "(that + inputs) | remat predicted peak MiB | remat recompute / fwd+bwd FLOPs "
        "| remat step / store_all | remat step / torch ckpt step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s, t = r["seconds"], r["rows"].get("torch")
        label = remat.policies.label(P.Budget(bytes=r["budget_at_torch"] or 0))
        cells = [
            r["model"],
            f"{s['torch checkpoint'] / s['torch eager']:.2f}",
            f"{r['torch_checkpoint_mib']:.1f}" if r["torch_checkpoint_mib"] else "—",
        ]
        if t is None:
            cells += [f"{(r['budget_at_torch'] or 0) / MiB:.1f}", "nothing fits", "—", "—", "—"]
        else:
            cells += [
                f"{r['budget_at_torch'] / MiB:.1f}",
                f"{t['peak'] / MiB:.1f}",
                f"{t['recompute_flops'] / r['store_all']['flops']:.1%}",
                f"{s[label] / s['store_all']:.2f}",
                f"{s[label] / s['torch checkpoint']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict]:
    """Measure, print the tables, return one result per model."""
    torch.set_num_threads(1)
    batches = QUICK_BATCHES if args.quick else BATCHES
    names = args.models.split(",") if args.models else list(batches)
    repeats = 1 if args.quick else args.repeats
    args.repeats = repeats
    print(
        f"# the planners on the zoo, measured (float32, 1 thread, median of {repeats} "
        f"interleaved steps; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start)\n"
    )
    results = []
    with remat.Client.in_process() as client:
        for name in names:
            results.append(measure_model(client, name, batches[name], args))
            print(f"  {name}: {results[-1]['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    print(
        "Each cell: predicted peak / store_all's, recompute FLOPs / one forward+backward's, "
        "measured step time / store_all's, plan time (Optimal: its status and gap).\n"
    )
    print(table(results) + "\n")
    print("## torch.utils.checkpoint per block, and remat given the memory it measured\n")
    print(torch_table(results) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(ARGS)
