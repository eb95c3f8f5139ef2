"""Checkpoint policies compared in one picture (needs matplotlib: `pip install "remat[plot]"`).

Left: each policy's live memory over its run, against the schedule's progress (step
over steps, so every run spans [0, 1] and the shapes compare directly) or, with
`x="time"`, against execution time from the trace. Right: each
policy as a point, peak memory against compute (FLOPs relative to store_all's, or
measured time), with the Pareto front, the policies no other beats on both, joined.

    >>> import remat
    >>> from remat.plots import plot_comparison
    >>> model = remat.models.mlp(batch=64, widths=(32,) * 8 + (4,))
    >>> with remat.Client.in_process() as client:
    ...     rows = client.compare(model.graph, model.inputs, wrt=model.wrt, loss=model.loss,
    ...                           policies=["sqrt", "recompute_all"], timeline=True)
    >>> plot_comparison(rows, "/tmp/remat-policies.png")  # doctest: +SKIP
    '/tmp/remat-policies.png'
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np

__all__ = ["plot_comparison", "pareto_front", "require_matplotlib"]

_MIB = float(1 << 20)
ENVELOPE_BINS = 250  # longer timelines are drawn as their maximum per bin
INSTALL_HINT = 'plotting needs matplotlib: pip install "remat[plot]"'


def require_matplotlib():
    """matplotlib's Figure and Agg canvas classes, or RuntimeError saying how to install
    it. No pyplot: no display is needed and the caller's pyplot state stays untouched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise RuntimeError(f"{INSTALL_HINT} ({error})") from error
    return Figure, FigureCanvasAgg


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (lower is better
    in each), ordered by the first coordinate.

        >>> pareto_front([(1.0, 10.0), (2.0, 5.0), (2.5, 6.0), (3.0, 1.0)])
        [0, 1, 3]
    """
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            ox <= x and oy <= y and (ox < x or oy < y)
            for j, (ox, oy) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def _memory_curve(row, use_time: bool) -> tuple[list[float], list[float]]:
    """(x, live MiB) for one row: x in ms when `use_time`, else step / steps in [0, 1]
    (from the timeline, or the trace's live bytes when only that was recorded)."""
    if use_time:
        events = sorted(row.trace, key=lambda e: e.start_seconds)
        return (
            [(e.start_seconds + e.seconds) * 1e3 for e in events],
            [e.live_bytes / _MIB for e in events],
        )
    live = row.timeline or tuple(e.live_bytes for e in row.trace)
    if len(live) > 2 * ENVELOPE_BINS:
        # Thousands of steps alternate between allocating and freeing; drawn raw they
        # fill the panel with solid blocks. The upper envelope keeps every peak.
        edges = np.linspace(0, len(live), ENVELOPE_BINS + 1).astype(int)
        peaks = np.maximum.reduceat(np.asarray(live, dtype=np.float64), edges[:-1])
        return list(edges / len(live)), [*(peaks / _MIB), live[-1] / _MIB]
    return ([i / max(len(live) - 1, 1) for i in range(len(live))], [b / _MIB for b in live])


def _cost(row, base, cost: str) -> float:
    if cost == "time":
        return row.total_seconds * 1e3
    return row.flops / base.flops if base.flops else 1.0


def _label_points(ax, points, labels, colors) -> None:
    """One text per distinct point; policies landing on the same point share it."""
    groups: dict[tuple[float, float], list[int]] = {}
    for i, point in enumerate(points):
        key = (round(point[0], 6), round(point[1], 6))
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        x, y = points[members[0]]
        ax.annotate(
            ", ".join(labels[i] for i in members),
            (x, y),
            xytext=(7, 5),
            textcoords="offset points",
            fontsize=8,
            color=colors[members[0]] if len({colors[i] for i in members}) == 1 else "0.15",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
        )


def plot_comparison(
    rows,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    x: str = "progress",
    cost: str = "flops",
    dpi: int = 130,
) -> str:
    """Draw a comparison (rows from `client.compare(..., timeline=True)`) to `path`
    (PNG, SVG or PDF, by extension); returns the path.

    `x` is the left panel's x axis: "progress" (schedule step / steps) or "time"
    (execution ms; needs rows from `client.compare(..., trace=True)`). `cost` is the
    right panel's x axis: "flops" (total FLOPs relative to store_all's, 1.0 meaning
    no recomputation; deterministic) or "time" (measured total ms, noisy on small
    models). Rows with an error are left out and named in the right panel's legend. Raises
    RuntimeError if matplotlib is missing, ValueError if no row has a timeline (or,
    with x="time", a trace).
    """
    if x not in ("progress", "time"):
        raise ValueError(f"x must be 'progress' or 'time', got {x!r}")
    if cost not in ("flops", "time"):
        raise ValueError(f"cost must be 'flops' or 'time', got {cost!r}")
    Figure, FigureCanvas = require_matplotlib()
    rows = list(rows)
    ok = [row for row in rows if not row.error]
    failed = [row for row in rows if row.error]
    use_time = x == "time"
    if use_time and not all(row.trace for row in ok):
        raise ValueError("x='time' needs every row's trace (run the comparison with trace=True)")
    if not any(row.timeline or row.trace for row in ok):
        raise ValueError(
            "nothing to plot: no row has a memory timeline (run the comparison with timeline=True)"
        )
    base = next((row for row in ok if row.policy == "store_all"), ok[0])

    figure = Figure(figsize=(13, 5.6), dpi=dpi, layout="constrained")
    FigureCanvas(figure)
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.35, 1]})
    # Left: memory over the run. Policies that planned the very same schedule share one
    # curve (a second one would hide exactly under it). Draw the highest peaks first so
    # lower curves stay visible; the legend follows the comparison order.
    same: dict[tuple, list] = {}
    for row in ok:
        curve = _memory_curve(row, use_time)
        same.setdefault((tuple(curve[0]), tuple(curve[1])), []).append(row)
    palette = _palette(len(same))  # one color per distinct schedule, in both panels
    colors = {row.policy: palette[i] for i, group in enumerate(same.values()) for row in group}
    lines = []
    for (xs, ys), group in sorted(same.items(), key=lambda item: -item[1][0].peak_bytes):
        if not xs:
            continue
        names = " = ".join(row.policy for row in group)
        (line,) = left.step(
            xs,
            ys,
            where="post",
            color=colors[group[0].policy],
            linewidth=1.2,
            alpha=0.9,
            label=f"{names}  (peak {group[0].peak_bytes / _MIB:.2f} MiB)",
        )
        lines.append((ok.index(group[0]), line))
    left.set_xlabel(
        "execution time (ms)"
        if use_time
        else "schedule progress (step / number of steps: forward, then backward)"
    )
    left.set_ylabel("live memory (MiB)")
    left.set_title("Live memory during forward + backward", fontsize=11)
    left.set_ylim(bottom=0)
    left.set_xlim(left=0)
    left.grid(alpha=0.3)
    shown = [line for _, line in sorted(lines, key=lambda item: item[0])]
    # matplotlib fills legend columns first; reorder so the entries read across rows.
    nrows = -(-len(shown) // 4)
    ncol = -(-len(shown) // nrows)
    shown = [
        shown[r * ncol + c] for c in range(ncol) for r in range(nrows) if r * ncol + c < len(shown)
    ]
    figure.legend(
        shown,
        [line.get_label() for line in shown],
        loc="outside lower center",
        ncol=ncol,
        fontsize=9,
        frameon=False,
    )

    # Right: peak memory against compute, Pareto front joined.
    points = [(_cost(row, base, cost), row.peak_bytes / _MIB) for row in ok]
    front = pareto_front(points)
    dominated = [i for i in range(len(ok)) if i not in front]
    right.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        "-",
        color="0.35",
        linewidth=1.2,
        zorder=1,
        label="Pareto front",
    )
    right.scatter(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        s=60,
        c=[colors[ok[i].policy] for i in front],
        edgecolors="black",
        zorder=3,
        label="Pareto-optimal",
    )
    if dominated:
        right.scatter(
            [points[i][0] for i in dominated],
            [points[i][1] for i in dominated],
            s=45,
            c=[colors[ok[i].policy] for i in dominated],
            alpha=0.6,
            marker="s",
            edgecolors="none",
            zorder=2,
            label="dominated (another is better on both)",
        )
    _label_points(right, points, [row.policy for row in ok], [colors[row.policy] for row in ok])
    if cost == "time":
        right.set_xlabel("total time (ms, measured)")
    else:
        right.set_xlabel("compute (total FLOPs / store_all's; 1.0 = no recomputation)")
    right.set_ylabel("peak memory (MiB)")
    right.set_title("Peak memory vs compute: lower left is better", fontsize=11)
    right.set_ylim(bottom=0, top=max(p[1] for p in points) * 1.12)
    spread = max(p[0] for p in points) - min(p[0] for p in points)
    pad = max(spread * 0.08, 0.02 * max(p[0] for p in points), 1e-9)
    # Labels sit right of their point: leave room for them.
    right.set_xlim(min(p[0] for p in points) - pad, max(p[0] for p in points) + 3 * pad)
    right.grid(alpha=0.3)
    if failed:  # named in the legend, so they are not silently missing
        names = ", ".join(row.policy for row in failed)
        right.plot(
            [],
            [],
            "x",
            color="firebrick",
            label="\n".join(textwrap.wrap(f"not shown, error: {names}", 48)),
        )
    right.legend(fontsize=8, loc="upper right", framealpha=0.85)

    figure.suptitle(title or "Checkpoint policies: memory against compute", fontsize=13)
    figure.savefig(path, dpi=dpi)
    return os.fspath(path)


def _palette(n: int) -> list:
    """Distinct colors: tab10 up to 10 policies, tab20 beyond."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
