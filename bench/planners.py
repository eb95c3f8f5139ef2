"""Budgeted planners (budget, dtr, optimal) against the fixed heuristics, side by side.

    python bench/planners.py [--quick] [--fractions 0.7,0.5,0.3] [--models a,b] [--zoo]
                             [--json FILE]

No tensor is computed: everything here is the server's planning and its simulator, at
the engine level (no gRPC). For each sample model the joint graph (forward + backward)
is built once with `Engine().plan(..., policy="store_all")`; then every policy is
planned on a fresh `checkpoint.problem.Problem` of that graph (fresh, so memoised
figures such as store_all's peak are not reused between policies) and its schedule is
run through `planners.budgeting.simulated`, the server's exact byte and FLOP accounting
(inputs, parameters and gradients included, views charged once). Measured per policy:

* peak: the simulated peak bytes, in MiB and as a percentage of store_all's peak;
* recompute FLOPs: FLOPs of every evaluation of a node after its first, as a
  percentage of one forward+backward's FLOPs (store_all's, which recomputes nothing);
* plan ms: wall time of `planners.plan(problem, policy)` alone (simulation not timed).

Budgets are fractions of store_all's peak (default 70%, 50%, 30%). The budgeted policies
(`Budget(fraction)`, `DTR(fraction)`, `Optimal(fraction, time_limit)`) are
planned per budget; they either return a schedule that fits or raise ResourceExhausted
("nothing fits"). The heuristics (sqrt, every_k(1..8), save_ops(matmul), save_ops(conv2d),
revolve(1..8), recompute_all) and `MinMemory(time_limit)` (the lowest peak, with its
proven bound in the last column) ignore the budget: each is planned once per model and
the "fits?" column says whether its peak is within the budget. Optimal solves Checkmate's MILP
only on joint graphs of at most `--optimal-max-nodes` nodes; above that it falls back to
Budget (status "fallback"). After each table, a summary compares Budget's recompute
FLOPs with the best heuristic that fits (ratio <= 1 expected) and with Optimal when the
MILP proved optimality (ratio <= 1.10 expected), and says plainly when it does not hold.

Last, the plan-time benchmark: Budget on a deep tanh MLP whose joint graph has about
10,000 nodes, at each budget, median of 3 (issue 14's target: under 2 s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy
from _rss_worker import transformer_stack  # bench/ is on sys.path when run as a script

import remat
from remat import models
from remat_proto import policies as P
from remat_server.checkpoint.planners import plan
from remat_server.checkpoint.planners.bounds import simulated
from remat_server.checkpoint.problem import Problem
from remat_server.engine import Engine
from remat_server.errors import InvalidArgument, ResourceExhausted
from remat_server.graph.limits import Limits
from remat_server.service.codec import graph_from_proto

MiB = 1 << 20
FRACTIONS = {"full": (0.7, 0.5, 0.3), "quick": (0.5, 0.3)}  # issue 14: 70, 50, 30%
OPTIMAL_TIME_LIMIT = {"full": 60.0, "quick": 10.0}
OPTIMAL_MAX_NODES = 300
PLAN_TIME_TARGET = 2.0  # seconds, for the ~10,000-node graph (issue 14)


# --- models ---------------------------------------------------------------------------------
def tanh_chain(length: int, width: int) -> models.Model:
    """tests/support.py's tanh chain, rebuilt with the SDK: x -> tanh -> ... (`length`
    times) -> sum; the gradient is taken with respect to x."""
    g = remat.Graph(f"tanh_chain{length}")
    y = g.input("x", (width,), "float32")
    for i in range(1, length + 1):
        y = remat.tanh(y, name=f"t{i}")
    g.output("loss", remat.sum(y, name="loss"))
    value = np.random.default_rng(0).standard_normal(width).astype("float32")
    return models.Model(g, {"x": value}, ["x"])


def deep_mlp(layers: int, batch: int, width: int = 64) -> models.Model:
    """remat.models.mlp with `layers` tanh layers of `width` and a 10-way linear head."""
    return models.mlp(batch=batch, widths=(width,) * (layers + 1) + (10,), dtype="float32")


def unet(**kwargs) -> models.Model | None:
    builder = getattr(models, "unet", None)  # being added by another change: optional
    return builder(**kwargs) if builder is not None else None


@dataclass
class ModelSpec:
    name: str
    describe: str
    build: Callable[[], models.Model | None]


ZOO = ("resnet", "unet", "gpt2", "bert", "llama")  # tests/zoo.py, through remat.from_torch


def zoo_model(name: str, quick: bool) -> models.Model | None:
    """A tests/zoo.py model imported with `remat.from_torch` at bench/models.py's batch
    (the same graph and loss as there: sum(output * R)); None without torch. Only
    shapes matter here: no tensor of the model is computed by the planners."""
    try:
        import _zoo_case  # noqa: PLC0415  (imports torch: only for --zoo)
        from models import BATCHES, QUICK_BATCHES  # noqa: PLC0415  (bench/models.py)
    except ImportError:
        return None
    batch = (QUICK_BATCHES if quick else BATCHES)[name]
    case = _zoo_case.RematCase.build(_zoo_case.Case.build(name, batch))
    return models.Model(case.graph, case.feeds, case.wrt, "loss")


def zoo_specs(quick: bool) -> list[ModelSpec]:
    return [
        ModelSpec(
            f"zoo_{name}",
            f"tests/zoo.py's {name} through remat.from_torch, at bench/models.py's batch "
            "(its README table describes the model)",
            lambda name=name: zoo_model(name, quick),
        )
        for name in ZOO
    ]


def model_specs(quick: bool) -> list[ModelSpec]:
    """Sizes where activations, not parameters, dominate store_all's peak (otherwise no
    schedule can get far below it). The last two are small enough for the MILP."""
    # Planning cost grows with the node count, not the batch: --quick keeps the batch
    # (the memory proportions) and cuts depth.
    block = dict(batch=8, seq=64, d_model=128, heads=4, d_ff=512)
    cnn = dict(batch=32, channels=(3, 16, 32, 64), image=32)
    net = dict(batch=4, channels=(8, 16, 32), image=32)
    if quick:
        mlp, stack = dict(layers=24, batch=2048), dict(blocks=2, **block)
        small, chain = dict(layers=6, batch=1024, width=16), (8, 1024)
    else:
        mlp, stack = dict(layers=32, batch=2048), dict(blocks=4, **block)
        small, chain = dict(layers=8, batch=1024, width=16), (16, 1024)
    return [
        ModelSpec(
            "mlp",
            f"remat.models.mlp: {mlp['layers']} tanh layers of width 64 + a "
            f"10-way head, batch {mlp['batch']} (deep and narrow)",
            lambda: deep_mlp(**mlp),
        ),
        ModelSpec(
            "transformer_block",
            "remat.models.transformer_block: one pre-LN block, "
            + ", ".join(f"{k} {v}" for k, v in block.items()),
            lambda: models.transformer_block(**block, dtype="float32"),
        ),
        ModelSpec(
            "transformer_stack",
            f"{stack['blocks']} of those blocks stacked "
            "(bench/_rss_worker.py's transformer_stack): a chain of blocks",
            lambda: transformer_stack(stack),
        ),
        ModelSpec(
            "cnn",
            f"remat.models.cnn: batch {cnn['batch']}, channels "
            f"{cnn['channels']}, image {cnn['image']}",
            lambda: models.cnn(**cnn, dtype="float32"),
        ),
        ModelSpec(
            "unet",
            f"remat.models.unet: batch {net['batch']}, channels "
            f"{net['channels']}, image {net['image']}",
            lambda: unet(**net, dtype="float32"),
        ),
        ModelSpec(
            "mlp_small",
            f"remat.models.mlp: {small['layers']} tanh layers of width "
            f"{small['width']} + a 10-way head, batch {small['batch']} (for the MILP)",
            lambda: deep_mlp(**small),
        ),
        ModelSpec(
            "tanh_chain",
            f"x -> tanh x{chain[0]} -> sum, x of {chain[1]} float32 "
            "(tests/support.py's chain; for the MILP)",
            lambda: tanh_chain(*chain),
        ),
    ]


def problem_factory(model: models.Model, milp_max_nodes: int = 300) -> Callable[[], Problem]:
    """Differentiate once; each call returns a fresh Problem over the same joint graph,
    whose exact solver takes joint graphs of up to `milp_max_nodes` nodes (the server's
    --optimal-max-nodes)."""
    spec = graph_from_proto(model.graph.to_proto(), Limits())
    planned = Engine().plan(spec, wrt=tuple(model.wrt), loss=model.loss, policy="store_all")
    graph, results = planned.joint.graph, planned.schedule.results
    forward = planned.joint.forward_nodes
    return lambda: Problem(graph, results, forward, milp_max_nodes=milp_max_nodes)


# --- planning one policy ---------------------------------------------------------------------
@dataclass
class Outcome:
    policy: str
    budgeted: bool
    plan_seconds: float = 0.0
    peak_bytes: int | None = None
    recompute_flops: int | None = None
    flops: int | None = None  # every evaluation, recomputations included
    status: str = ""  # budgeted: the report's status; "nothing fits", "n/a", "ERROR"
    chosen: str = ""
    gap: float = 0.0
    detail: str = ""  # the report's detail or the error message
    budget_bytes: int = 0

    @property
    def planned(self) -> bool:
        return self.peak_bytes is not None

    def fits(self, budget: int) -> bool:
        return self.planned and self.peak_bytes <= budget


def run_policy(make: Callable[[], Problem], policy: P.Policy) -> Outcome:
    out = Outcome(P.label(policy), isinstance(policy, P.BUDGETED))
    problem = make()
    start = time.perf_counter()
    try:
        schedule = plan(problem, policy)
    except ResourceExhausted as error:
        out.plan_seconds, out.status = time.perf_counter() - start, "nothing fits"
        out.detail = str(error)
        return out
    except InvalidArgument as error:  # e.g. revolve on a graph with no chain
        out.plan_seconds, out.status, out.detail = time.perf_counter() - start, "n/a", str(error)
        return out
    except Exception as error:  # noqa: BLE001 - a planner bug: report it, keep going
        out.plan_seconds, out.status = time.perf_counter() - start, "ERROR"
        out.detail = f"{type(error).__name__}: {error}"
        return out
    out.plan_seconds = time.perf_counter() - start
    try:
        sim = simulated(problem, schedule)
    except Exception as error:  # noqa: BLE001 - an invalid schedule: a planner bug
        out.status, out.detail = "ERROR", f"simulating: {type(error).__name__}: {error}"
        return out
    out.peak_bytes, out.recompute_flops, out.flops = sim.peak_bytes, sim.recompute_flops, sim.flops
    report = schedule.report
    if report is not None:
        out.status, out.chosen, out.gap = report.status, report.chosen, report.optimality_gap
        out.detail, out.budget_bytes = report.detail, report.budget_bytes
    return out


def heuristics(time_limit: float) -> list[P.Policy]:
    """The policies planned once per model: the fixed heuristics and the least memory."""
    return [
        P.MinMemory(time_limit=time_limit),
        P.Sqrt(),
        *(P.EveryK(k) for k in range(1, 9)),
        P.SaveOps(("matmul",)),
        P.SaveOps(("conv2d",)),
        *(P.Revolve(c) for c in range(1, 9)),
        P.RecomputeAll(),
    ]


def heuristic_note(problem: Problem, policy: P.Policy) -> str:
    """Why a heuristic degenerates on this graph (it still runs)."""
    match policy:
        case P.EveryK(k) if k > len(problem.candidates):
            return f"k > {len(problem.candidates)} candidates: keeps none"
        case P.SaveOps(ops) if not any(problem.graph[n].op in ops for n in problem.forward_order):
            return f"no {','.join(ops)} in the graph: keeps none"
    return ""


# --- tables --------------------------------------------------------------------------------------
def pct(value: float, base: float) -> str:
    return f"{100 * value / base:.1f}%" if base else "—"


def ratio(a: float, b: float) -> float:
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def status_cell(o: Outcome, note: str = "") -> str:
    if o.status in ("nothing fits", "n/a", "ERROR"):
        text = o.detail.replace("|", "/")
        if o.status == "nothing fits":  # keep the informative part of the long message
            text = text.split(": ", 1)[-1].split("; raise the budget")[0]
        return f"{o.status}: {text[:160]}"
    if not o.budgeted:
        return note
    if o.policy.startswith("optimal"):
        cell = o.status
        if o.status == "time_limit":
            cell += f", gap {o.gap:.3f}"
        elif o.status == "fallback":  # its gap: over the moment bound
            cell += f" → {o.chosen}, gap {o.gap:.3f} ({o.detail.split(';')[0][:90]})"
        return cell
    return f"{o.status}: {o.chosen}" if o.chosen else o.status


def table(rows: list[tuple[Outcome, str]], budget: int, base_peak: int, base_flops: int) -> str:
    head = [
        "policy",
        "fits?",
        "peak MiB",
        "% store_all",
        "recompute MFLOP",
        "% of fwd+bwd",
        "plan ms",
        "status / chosen",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * 5 + "---|"]
    for o, note in rows:
        if o.planned:
            fits = "yes" if o.fits(budget) else ("**NO: over its budget**" if o.budgeted else "no")
            cells = [
                fits,
                f"{o.peak_bytes / MiB:.2f}",
                pct(o.peak_bytes, base_peak),
                f"{o.recompute_flops / 1e6:.2f}",
                pct(o.recompute_flops, base_flops),
            ]
        else:
            cells = ["—" if o.status == "n/a" else "no", "—", "—", "—", "—"]
        lines.append(
            "| "
            + " | ".join([o.policy, *cells, f"{o.plan_seconds * 1e3:.1f}", status_cell(o, note)])
            + " |"
        )
    return "\n".join(lines)


def summary(
    budgeted: dict[str, Outcome], heur: list[Outcome], budget: int
) -> tuple[str, list[str]]:
    """One line comparing Budget with the best fitting heuristic and with Optimal; and
    the findings that contradict expectations."""
    b, dtr, opt = budgeted["budget"], budgeted["dtr"], budgeted["optimal"]
    fitting = [h for h in heur if h.fits(budget)]
    best = min(fitting, key=lambda h: (h.recompute_flops, h.peak_bytes), default=None)
    parts, flags = [], []
    if b.status == "ERROR":
        flags.append(f"budget raised {b.detail[:200]}")
        parts.append("budget: ERROR")
    elif not b.planned:
        parts.append("budget: nothing fits")
        if best is not None:
            flags.append(
                f"budget found nothing while {best.policy} fits "
                f"(peak {best.peak_bytes:,} <= {budget:,})"
            )
    elif not b.fits(budget):
        flags.append(f"budget's schedule peaks at {b.peak_bytes:,}, over its budget {budget:,}")
    if b.planned:
        parts.append(f"budget recomputes {b.recompute_flops / 1e6:.2f} MFLOP ({b.chosen})")
    if best is None:
        parts.append("no heuristic fits")
    elif b.planned:
        r = ratio(b.recompute_flops, best.recompute_flops)
        ok = r <= 1.0 + 1e-9
        parts.append(
            f"vs best fitting heuristic {best.policy} "
            f"({best.recompute_flops / 1e6:.2f} MFLOP): {r:.3f} "
            f"{'(<= 1: ok)' if ok else '(> 1: LOSES)'}"
        )
        if not ok:
            flags.append(
                f"budget recomputes {b.recompute_flops:,} FLOPs, {best.policy} "
                f"{best.recompute_flops:,} ({r:.3f}x)"
            )
    else:
        parts.append(
            f"best fitting heuristic {best.policy} ({best.recompute_flops / 1e6:.2f} MFLOP)"
        )
    if dtr.planned and b.planned:
        parts.append(f"vs dtr: {ratio(b.recompute_flops, dtr.recompute_flops):.3f}")
    if opt.status == "optimal" and b.planned:
        r = ratio(b.recompute_flops, opt.recompute_flops)
        ok = r <= 1.10 + 1e-9
        parts.append(
            f"vs proven optimal ({opt.recompute_flops / 1e6:.2f} MFLOP): {r:.3f} "
            f"{'(<= 1.10: ok)' if ok else '(> 1.10: TOO FAR)'}"
        )
        if not ok:
            flags.append(
                f"budget recomputes {b.recompute_flops:,} FLOPs, the proven optimum "
                f"{opt.recompute_flops:,} ({r:.3f}x)"
            )
    elif opt.status == "optimal":
        parts.append("the MILP found an optimal schedule")
        flags.append(f"optimal fits (peak {opt.peak_bytes:,}) where budget does not")
    elif opt.status == "time_limit" and b.planned:
        # The incumbent is a schedule that fits, so the optimum is at most its cost: a
        # ratio above 1.10 here means budget is provably more than 10% above the optimum.
        r = ratio(b.recompute_flops, opt.recompute_flops)
        parts.append(
            f"vs optimal's incumbent at its time limit ({opt.recompute_flops / 1e6:.2f} "
            f"MFLOP, gap {opt.gap:.3f}; the optimum is at most that): {r:.3f}"
            + (
                " (> 1.10: budget is provably over 10% above the optimum)"
                if r > 1.10 + 1e-9
                else ""
            )
        )
        if r > 1.10 + 1e-9:
            flags.append(
                f"budget recomputes {b.recompute_flops:,} FLOPs; optimal's incumbent "
                f"(not proven optimal, gap {opt.gap:.3f}) {opt.recompute_flops:,}: "
                f"{r:.3f}x"
            )
    elif opt.status == "time_limit":
        flags.append(
            f"optimal's MILP found a schedule (peak {opt.peak_bytes:,}) where budget found none"
        )
    elif opt.status == "fallback":
        why = (
            "its graph is over the MILP's node limit"
            if "over the MILP limit" in opt.detail
            else "the MILP found no schedule within its time limit"
            if "no feasible schedule within" in opt.detail
            else opt.detail.split(";")[0]
        )
        parts.append(f"optimal fell back to budget ({why})")
    elif opt.status == "nothing fits" and b.planned:
        flags.append(
            f"optimal reports nothing fits ({opt.detail[:160]}) but budget's schedule "
            f"peaks at {b.peak_bytes:,} <= {budget:,}"
        )
        parts.append("optimal: nothing fits, though budget fits")
    elif opt.status == "ERROR":
        flags.append(f"optimal raised {opt.detail[:200]}")
    for o in (opt, dtr):
        if o.planned and o.budgeted and not o.fits(budget):
            flags.append(f"{o.policy}'s schedule peaks at {o.peak_bytes:,}, over {budget:,}")
        if o is dtr and o.status == "ERROR":
            flags.append(f"dtr raised {o.detail[:200]}")
    return "; ".join(parts), flags


# --- the plan-time benchmark -----------------------------------------------------------------
def plan_time(layers: int, batch: int, fractions, repeats: int) -> tuple[str, list[dict]]:
    make = problem_factory(deep_mlp(layers, batch))
    nodes = len(make().graph.nodes)
    lines = [
        f"Deep tanh MLP, {layers} layers of width 64 + a 10-way head, batch {batch}: "
        f"joint graph of **{nodes} nodes**; Budget planned on a fresh Problem each time, "
        f"median of {repeats} (target < {PLAN_TIME_TARGET:g} s).\n",
        "| budget | plan s (median) | runs s | chosen | fits? | under target |",
        "|---|---:|---|---|---|---|",
    ]
    raw = []
    for f in fractions:
        outs = [run_policy(make, P.Budget(fraction=f)) for _ in range(repeats)]
        seconds = [o.plan_seconds for o in outs]
        med, o = statistics.median(seconds), outs[-1]
        fits = "yes" if o.planned and o.peak_bytes <= o.budget_bytes else o.status
        lines.append(
            f"| {f:.0%} | {med:.2f} | {', '.join(f'{s:.2f}' for s in seconds)} | "
            f"{o.chosen or '—'} | {fits} | "
            f"{'yes' if med < PLAN_TIME_TARGET else '**NO**'} |"
        )
        raw.append(dict(fraction=f, nodes=nodes, seconds=seconds, median=med, outcome=asdict(o)))
        print(f"  plan time {f:.0%}: {med:.2f} s", file=sys.stderr)
    return "\n".join(lines), raw


# --- main ------------------------------------------------------------------------------------
def source_version() -> str:
    """The commit, and the server or SDK files changed since it (they are what is measured)."""

    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], capture_output=True, text=True, cwd=Path(__file__).parent
            ).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "?"
    changed = [
        line.split(maxsplit=1)[-1]
        for line in git("status", "--porcelain", "--", "../server", "../client").splitlines()
    ]
    return f"commit {commit}" + (
        f" + uncommitted changes to {', '.join(changed)}" if changed else ""
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller models, budgets 50%% and 30%%, MILP limit 10 s (smoke test, under 2 minutes)",
    )
    parser.add_argument(
        "--fractions",
        default=None,
        help="comma-separated budgets as fractions of store_all's peak "
        "(default 0.7,0.5,0.3; --quick 0.5,0.3)",
    )
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated subset of: mlp, transformer_block, "
        "transformer_stack, cnn, unet, mlp_small, tanh_chain (default all)",
    )
    parser.add_argument(
        "--optimal-time-limit",
        type=float,
        default=None,
        help="Optimal's MILP time limit in seconds (default 60; --quick 10)",
    )
    parser.add_argument(
        "--optimal-max-nodes",
        type=int,
        default=OPTIMAL_MAX_NODES,
        help="Optimal solves the MILP up to this many joint-graph nodes and "
        f"falls back to Budget above (default {OPTIMAL_MAX_NODES})",
    )
    parser.add_argument(
        "--plan-time-layers",
        type=int,
        default=455,
        help="depth of the plan-time MLP (default 455: about 10,000 joint nodes)",
    )
    parser.add_argument("--no-plan-time", action="store_true", help="skip the plan-time benchmark")
    parser.add_argument(
        "--zoo",
        action="store_true",
        help="also the zoo (tests/zoo.py: " + ", ".join(f"zoo_{n}" for n in ZOO) + "; needs "
        "the test extra); --models zoo_gpt2,... picks some",
    )
    parser.add_argument("--json", type=Path, help="also write every outcome here")
    args = parser.parse_args()
    size = "quick" if args.quick else "full"
    fractions = (
        tuple(float(f) for f in args.fractions.split(",")) if args.fractions else FRACTIONS[size]
    )
    time_limit = args.optimal_time_limit or OPTIMAL_TIME_LIMIT[size]
    specs = model_specs(args.quick) + (zoo_specs(args.quick) if args.zoo else [])
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - {s.name for s in specs})
        if unknown:
            parser.error(f"unknown model(s): {', '.join(unknown)}")
        specs = [s for s in specs if s.name in wanted]

    print(
        "# budgeted planners vs fixed heuristics (simulated, engine level"
        f"{', quick' if args.quick else ''})\n"
    )
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, scipy "
        f"{scipy.__version__}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} "
        f"at start), {source_version()}; budgets "
        f"{', '.join(f'{f:.0%}' for f in fractions)} of store_all's peak; Optimal: "
        f"time_limit {time_limit:g} s, MILP up to {args.optimal_max_nodes} nodes\n"
    )
    started, raw, findings, lines = time.perf_counter(), {}, [], []
    for spec in specs:
        model = spec.build()
        if model is None:
            print(f"## {spec.name}: skipped (remat.models has no `{spec.name}`, or no torch)\n")
            continue
        make = problem_factory(model, args.optimal_max_nodes)
        problem = make()
        base = run_policy(make, P.StoreAll())
        base_peak, base_flops = base.peak_bytes, base.flops
        heur = [
            (o, o.detail if o.policy == "min_memory" else heuristic_note(problem, h))
            for h in heuristics(time_limit)
            for o in (run_policy(make, h),)
        ]
        planned = [o for o, _ in heur if o.planned]
        lowest = min(planned, key=lambda o: o.peak_bytes, default=None)
        print(f"## {spec.name}: {spec.describe}\n")
        print(
            f"Joint graph {len(problem.graph.nodes)} nodes ({len(problem.forward_order)} "
            f"forward values, {len(problem.candidates)} checkpoint candidates); store_all "
            f"peaks at {base_peak / MiB:.2f} MiB (inputs and parameters "
            f"{pct(problem.input_bytes, base_peak)} of it) and computes "
            f"{base_flops / 1e6:.1f} MFLOP; the lowest heuristic peak is "
            + (f"{pct(lowest.peak_bytes, base_peak)} ({lowest.policy})." if lowest else "—.")
            + "\n"
        )
        raw[spec.name] = dict(
            describe=spec.describe,
            nodes=len(problem.graph.nodes),
            store_all=asdict(base),
            flops=base_flops,
            heuristics=[asdict(o) for o, _ in heur],
            budgets={},
        )
        for f in fractions:
            budget = int(f * base_peak)
            budgeted = {
                "budget": run_policy(make, P.Budget(fraction=f)),
                "dtr": run_policy(make, P.DTR(fraction=f)),
                "optimal": run_policy(
                    make,
                    P.Optimal(fraction=f, time_limit=time_limit),
                ),
            }
            print(
                f"  {spec.name} {f:.0%}: "
                + ", ".join(f"{k} {o.status}" for k, o in budgeted.items()),
                file=sys.stderr,
            )
            rows = [(base, "reference")] + [(o, "") for o in budgeted.values()] + heur
            print(
                f"### {spec.name}, budget {f:.0%} of store_all = {budget / MiB:.2f} MiB "
                f"({budget:,} bytes)\n"
            )
            print(table(rows, budget, base_peak, base_flops) + "\n")
            line, flags = summary(budgeted, [o for o, _ in heur], budget)
            print(f"**Summary {spec.name} @ {f:.0%}:** {line}.\n")
            lines.append(f"- {spec.name} @ {f:.0%}: {line}")
            findings += [f"{spec.name} @ {f:.0%}: {flag}" for flag in flags]
            raw[spec.name]["budgets"][str(f)] = dict(
                budget_bytes=budget, **{k: asdict(o) for k, o in budgeted.items()}
            )
        errors = sorted({f"{o.policy}: {o.detail[:160]}" for o, _ in heur if o.status == "ERROR"})
        findings += [f"{spec.name}: heuristic {e}" for e in errors]

    print("## Summary\n")
    print("\n".join(lines) + "\n")
    print(
        "Findings against expectations (budget never above a fitting heuristic, within "
        "1.10 of a proven optimum, every planner valid and within its budget):\n"
    )
    print("\n".join(f"- {f}" for f in findings) if findings else "- none")
    print()
    if not args.no_plan_time:
        print("## Plan time of Budget on a ~10,000-node graph\n")
        text, raw["plan_time"] = plan_time(
            args.plan_time_layers, 1024, fractions, 1 if args.quick else 3
        )
        print(text + "\n")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
