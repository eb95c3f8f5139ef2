"""Budget against the best proven lower bound on the zoo: issue 14's 1.10x goal.

    python bench/bounds.py [--models resnet,unet] [--fractions 0.7,0.5,0.3]
                           [--anchors 8] [--seconds 300] [--optimal 60] [--quick]
                           [--json PATH]

For each zoo model (bench/planners.py's, through `remat.from_torch`) and each budget
(a fraction of store_all's predicted peak): Budget's recomputation (the simulator's
FLOPs), the moment bound over every anchor where the budget binds, and the bound over a
chain of `--anchors` of those moments (`planners.moment_chain`) within `--seconds`.
Both bounds hold for every schedule within the budget, so Budget over the higher one
is an upper bound on how far Budget is from the optimum. A row is "proven" when that
ratio is at most 1.10 (or Budget recomputes nothing), "infeasible" when a bound proves
that nothing fits. With `--optimal SECONDS`, each row also plans Optimal with that
time limit (its moment search can find schedules Budget misses) and gives its
recomputation over the best bound too.

Prints Markdown; see bench/README.md ("bounds.py").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import planners as B  # bench/planners.py (bench/ is sys.path[0])

from remat_proto import policies as P
from remat_server.checkpoint.planners import plan
from remat_server.checkpoint.planners.bounds import recompute_cost, store_all_peak
from remat_server.checkpoint.planners.moment_chain import chain_lower_bound
from remat_server.errors import ResourceExhausted

GOAL = 1.10


def row(
    make, name: str, fraction: float, anchors: int, seconds: float, optimal: float = 0.0
) -> dict:
    """One model at one budget: Budget's recomputation, both bounds, their times, and
    with `optimal` seconds, Optimal's recomputation, status and time."""
    limit = int(fraction * store_all_peak(make()))
    start = time.perf_counter()
    try:
        budget = recompute_cost(make(), plan(make(), P.Budget(bytes=limit)))
    except ResourceExhausted:
        budget = None
    budget_seconds = time.perf_counter() - start
    scores: list[tuple[str, float]] = []
    bound = chain_lower_bound(make(), limit, anchors=anchors, seconds=seconds, scores=scores)
    best = bound.cost
    if budget is None:
        verdict = "infeasible" if math.isinf(best) else "open: nothing found, nothing proven"
    elif budget == 0 or (best > 0 and budget <= GOAL * best):
        verdict = "proven"
    else:
        verdict = "open"
    return dict(
        model=name,
        fraction=fraction,
        limit=limit,
        budget=budget,
        budget_seconds=budget_seconds,
        moment=max((cost for _, cost in scores), default=math.inf if math.isinf(best) else 0.0),
        chain=bound.cost,
        anchors=list(bound.chain) or ([bound.anchor] if bound.anchor else []),
        bound_seconds=bound.seconds,
        verdict=verdict,
        **(optimal_row(make, limit, optimal) if optimal > 0 else {}),
    )


def optimal_row(make, limit: int, seconds: float) -> dict:
    """Optimal's recomputation (None: nothing fits), status, chosen planner and time."""
    start = time.perf_counter()
    try:
        schedule = plan(make(), P.Optimal(bytes=limit, time_limit=seconds))
    except ResourceExhausted:
        return dict(optimal=None, optimal_status="none fits", optimal_seconds=0.0)
    return dict(
        optimal=recompute_cost(make(), schedule),
        optimal_status=f"{schedule.report.status}, {schedule.report.chosen}",
        optimal_seconds=time.perf_counter() - start,
    )


def mflop(value: float | None) -> str:
    if value is None:
        return "—"
    return "∞" if math.isinf(value) else f"{value / 1e6:.2f}"


def ratio(cost: float | None, best: float) -> str:
    """`cost` over the best bound, or "—" where that means nothing."""
    if cost is None or best <= 0 or math.isinf(best):
        return "—"
    return f"{cost / best:.3f}x"


def table(rows: list[dict]) -> str:
    optimal = any("optimal" in r for r in rows)
    more = " Optimal (MFLOP, status, time) | Optimal / best bound |" if optimal else ""
    lines = [
        "| model | budget | Budget (MFLOP) | moment bound | chain bound (anchors) "
        "| Budget / best bound | verdict | times (Budget, bounds) |" + more,
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if optimal else ""),
    ]
    for r in rows:
        best = r["chain"]
        line = (
            f"| {r['model']} | {r['fraction']:.0%} | {mflop(r['budget'])} | {mflop(r['moment'])} "
            f"| {mflop(r['chain'])} ({len(r['anchors'])}) | {ratio(r['budget'], best)} "
            f"| {r['verdict']} | {r['budget_seconds']:.1f} s, {r['bound_seconds']:.1f} s |"
        )
        if optimal:
            line += (
                f" {mflop(r['optimal'])} ({r['optimal_status']}, {r['optimal_seconds']:.0f} s)"
                f" | {ratio(r['optimal'], best)} |"
            )
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(B.ZOO), help="comma-separated zoo models")
    parser.add_argument("--fractions", default="0.7,0.5,0.3", help="of store_all's peak")
    parser.add_argument("--anchors", type=int, default=8, help="moments in the chain")
    parser.add_argument("--seconds", type=float, default=300.0, help="per row, both bounds")
    parser.add_argument(
        "--optimal", type=float, default=0.0, help="also plan Optimal with this time limit (s)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny batches: that it runs")
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        model = B.zoo_model(name, quick=args.quick)
        if model is None:
            sys.exit("bench/bounds.py needs torch (pip install -e '.[test]')")
        make = B.problem_factory(model)  # the server's default MILP limit
        for fraction in (float(f) for f in args.fractions.split(",")):
            rows.append(row(make, name, fraction, args.anchors, args.seconds, args.optimal))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
