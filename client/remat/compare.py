"""Checkpoint policies side by side: run one graph under each, compare cost and gradients.

>>> import remat
>>> model = remat.models.mlp(batch=8, widths=(16, 32, 32, 32, 4))
>>> with remat.Client.in_process() as client:
...     rows = client.compare(model.graph, model.inputs, wrt=model.wrt, loss=model.loss,
...                           policies=["sqrt", "recompute_all"])
>>> [row.policy for row in rows]
['store_all', 'sqrt', 'recompute_all']
>>> rows[2].peak_ratio < 1.0, [row.max_grad_diff for row in rows]
(True, [0.0, 0.0, 0.0])
>>> print(format_table(rows))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from remat_proto import policies as _policies
from remat_proto.units import format_bytes

from .results import Metrics, PlannerReport, TraceEvent

if TYPE_CHECKING:
    import rich.table

DEFAULT_POLICIES = ("store_all", "sqrt", "recompute_all")


@dataclass(frozen=True)
class ComparisonRow:
    """One policy's run, against store_all's (the baseline).

    `peak_bytes` is the executor's accounted peak, `predicted_peak_bytes` the
    simulator's (they are equal); `peak_ratio` is `peak_bytes` over store_all's.
    `recompute_share` is recompute_seconds over the compute seconds (forward +
    recompute + backward), `recompute_flop_share` recompute_flops over flops.
    `max_grad_diff` is the largest absolute difference of any gradient element from
    store_all's: 0.0, since every policy computes bit-identical gradients.
    `measured_peak_bytes` is 0 unless the comparison measured memory. `timeline`
    (bytes in use at each step) and `trace` (the executed steps, timed) are filled
    when the comparison asked for them. `error` is set, and the figures are zero,
    when this policy could not plan or run (say, a budget nothing fits): the other
    policies still run. `planner` is the budgeted planners' report.
    """

    policy: str
    predicted_peak_bytes: int
    peak_bytes: int
    peak_ratio: float
    recompute_share: float
    recompute_flop_share: float
    forward_seconds: float
    backward_seconds: float
    recompute_seconds: float
    total_seconds: float
    max_grad_diff: float
    flops: int = 0
    recompute_flops: int = 0
    recomputed_nodes: int = 0
    measured_peak_bytes: int = 0
    timeline: tuple[int, ...] = ()
    trace: tuple[TraceEvent, ...] = ()
    error: str = ""
    error_code: str = ""
    planner: PlannerReport | None = None
    plan_seconds: float = 0.0


def policy_list(policies: Iterable) -> list:
    """Resolved policies, store_all first (the baseline) whether listed or not."""
    if isinstance(policies, str) or type(policies) in _policies.KINDS:
        policies = [policies]
    chosen = [_policies.resolve(p) for p in policies]
    return [_policies.StoreAll()] + [p for p in chosen if not isinstance(p, _policies.StoreAll)]


def row_from_metrics(
    policy: str,
    m: Metrics,
    base: Metrics,
    max_grad_diff: float,
    *,
    timeline=(),
    trace=(),
    error: str = "",
    error_code: str = "",
) -> ComparisonRow:
    """One row from a run's metrics and the baseline's."""
    compute = m.forward_seconds + m.recompute_seconds + m.backward_seconds
    return ComparisonRow(
        policy=policy,
        predicted_peak_bytes=m.predicted_peak_bytes,
        peak_bytes=m.peak_bytes,
        peak_ratio=m.peak_bytes / base.peak_bytes if base.peak_bytes else 0.0,
        recompute_share=m.recompute_seconds / compute if compute else 0.0,
        recompute_flop_share=m.recompute_flops / m.flops if m.flops else 0.0,
        forward_seconds=m.forward_seconds,
        backward_seconds=m.backward_seconds,
        recompute_seconds=m.recompute_seconds,
        total_seconds=m.total_seconds,
        max_grad_diff=max_grad_diff,
        flops=m.flops,
        recompute_flops=m.recompute_flops,
        recomputed_nodes=m.recomputed_nodes,
        measured_peak_bytes=m.measured_peak_bytes,
        timeline=tuple(timeline),
        trace=tuple(trace),
        error=error,
        error_code=error_code,
        planner=m.planner,
        plan_seconds=m.plan_seconds,
    )


def comparison_table(rows: Iterable[ComparisonRow]) -> rich.table.Table:
    """The rows as a `rich` table (what `format_table` renders and `remat compare`
    prints): times in milliseconds, "recompute" shares as percentages of compute time
    and of FLOPs, a failed policy's status code where its peak would be."""
    from rich.table import Table

    rows = list(rows)
    measured = any(row.measured_peak_bytes for row in rows)
    headers = [
        "policy",
        "peak",
        "predicted",
        *(["measured"] if measured else []),
        "vs store_all",
        "recompute time",
        "recompute flops",
        "forward ms",
        "recompute ms",
        "backward ms",
        "total ms",
        "max grad diff",
    ]
    # Borderless, with no padding at the edges: a row starts with its policy, as in
    # `column -t` output, so the plain-text form greps and diffs cleanly.
    table = Table(box=None, pad_edge=False, header_style="bold")
    for i, header in enumerate(headers):
        # The policy reads left-aligned; figures right-aligned so digits line up.
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        if row.error:  # the reason is printed below the table by the CLI
            table.add_row(
                row.policy, row.error_code or "error", *["-"] * (len(headers) - 2), style="red"
            )
            continue
        table.add_row(
            row.policy,
            format_bytes(row.peak_bytes),
            format_bytes(row.predicted_peak_bytes),
            *([format_bytes(row.measured_peak_bytes)] if measured else []),
            f"{row.peak_ratio:.1%}",
            f"{row.recompute_share:.1%}",
            f"{row.recompute_flop_share:.1%}",
            f"{row.forward_seconds * 1e3:.2f}",
            f"{row.recompute_seconds * 1e3:.2f}",
            f"{row.backward_seconds * 1e3:.2f}",
            f"{row.total_seconds * 1e3:.2f}",
            f"{row.max_grad_diff:.3g}",
        )
    return table


def format_table(rows: Iterable[ComparisonRow]) -> str:
    """The rows as an aligned plain-text table, one line per policy under a header
    line: `comparison_table` rendered without colour, at its natural width.

        >>> row = ComparisonRow("sqrt", 3 << 20, 3 << 20, 0.25, 0.2, 0.3, 0.01, 0.02,
        ...                     0.005, 0.04, 0.0)
        >>> print(format_table([row]))  # doctest: +NORMALIZE_WHITESPACE
        policy      peak  predicted  vs store_all  recompute time  recompute flops
            forward ms  recompute ms  backward ms  total ms  max grad diff
        sqrt    3.00 MiB   3.00 MiB         25.0%           20.0%            30.0%
                 10.00          5.00        20.00     40.00              0
    """
    import io

    from rich.console import Console

    out = io.StringIO()
    # Never a terminal (not even under FORCE_COLOR), so never colour codes; wide
    # enough that rich never wraps or squeezes a column.
    console = Console(
        file=out,
        force_terminal=False,
        color_system=None,
        width=100_000,
        markup=False,
        highlight=False,
        emoji=False,
    )
    console.print(comparison_table(rows))
    return out.getvalue().rstrip("\n")
