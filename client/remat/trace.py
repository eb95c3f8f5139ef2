"""Executed schedules as Chrome Trace Event Format JSON, for Perfetto or chrome://tracing.

Each policy becomes one process (named after it, in comparison order); its steps are
complete ("X") events on three threads, forward, recompute and backward, and its live
memory a counter ("C") track. Every policy's run starts at 0 µs, so in
https://ui.perfetto.dev the policies line up one above the other and their lengths
compare directly. Free steps take no time: they show only as drops of the counter.

    >>> import json, remat
    >>> from remat.trace import chrome_trace
    >>> model = remat.models.mlp(batch=8, widths=(16, 32, 32, 4))
    >>> with remat.Client.in_process() as client:
    ...     rows = client.compare(model.graph, model.inputs, wrt=model.wrt, loss=model.loss,
    ...                           policies=["sqrt"], trace=True)
    >>> doc = chrome_trace(rows)
    >>> sorted({e["ph"] for e in doc["traceEvents"]})
    ['C', 'M', 'X']
    >>> [e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"]
    ['store_all', 'sqrt']
    >>> write_chrome_trace("/tmp/remat-trace.json", rows)  # doctest: +SKIP

Open the file with https://ui.perfetto.dev ("Open trace file") or chrome://tracing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .results import TraceEvent

__all__ = ["chrome_trace", "write_chrome_trace", "PHASES"]

# Thread ids per phase, in the order the tracks appear under each policy.
PHASES = {"forward": 1, "recompute": 2, "backward": 3}
COUNTER = "live memory"
_MIB = float(1 << 20)


def _us(seconds: float) -> float:
    """Seconds to microseconds (the format's unit), to the nanosecond."""
    return round(seconds * 1e6, 3)


def _processes(source) -> tuple[list[tuple[str, Sequence[TraceEvent]]], list[dict]]:
    """(label, events) per process to draw, and the skipped rows (errors, no trace)."""
    if isinstance(source, Mapping):
        return [(str(label), tuple(events)) for label, events in source.items()], []
    items = list(source)
    if not items or all(isinstance(item, TraceEvent) for item in items):
        return [("remat", items)], []
    processes, skipped = [], []
    for row in items:
        if not hasattr(row, "trace") or not hasattr(row, "policy"):
            raise TypeError(
                "chrome_trace takes comparison rows, a sequence of "
                f"remat.results.TraceEvent or a mapping of them, got "
                f"{type(row).__name__}"
            )
        if row.error or not row.trace:
            skipped.append(
                {"policy": row.policy, "reason": row.error or "no trace (compare with trace=True)"}
            )
        else:
            processes.append((row.policy, row.trace))
    return processes, skipped


def chrome_trace(
    rows_or_events: Iterable[Any] | Mapping[str, Iterable[TraceEvent]],
    *,
    title: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> dict:
    """A Chrome Trace Event Format document (a dict ready for `json.dump`).

    `rows_or_events` is a list of `remat.ComparisonRow` (from `client.compare(...,
    trace=True)`; one process per row, rows without a trace, such as errors, are
    listed under `otherData.skipped`), a sequence of `remat.results.TraceEvent` (one
    run, e.g. `client.run(..., trace=True).trace`), or a mapping label -> events.
    Times are microseconds from the start of each run; the counter is in MiB.
    `title` and `metadata` go to `otherData`.
    """
    processes, skipped = _processes(rows_or_events)
    if not any(events for _, events in processes):
        raise ValueError(
            "nothing to trace: no trace events (run the comparison with "
            "trace=True)" + "".join(f"; {s['policy']}: {s['reason']}" for s in skipped)
        )
    out: list[dict] = []
    for pid, (label, events) in enumerate(processes, start=1):
        out.append(
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": label}}
        )
        out.append(
            {
                "name": "process_sort_index",
                "ph": "M",
                "pid": pid,
                "tid": 0,
                "args": {"sort_index": pid},
            }
        )
        for phase, tid in PHASES.items():
            out.append(
                {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": phase}}
            )
            out.append(
                {
                    "name": "thread_sort_index",
                    "ph": "M",
                    "pid": pid,
                    "tid": tid,
                    "args": {"sort_index": tid},
                }
            )
        ordered = sorted(events, key=lambda e: e.start_seconds)  # stable: ties keep step order
        counter_ts = 0.0
        for step, event in enumerate(ordered):
            start, duration = _us(event.start_seconds), _us(max(event.seconds, 0.0))
            if event.phase in PHASES:
                out.append(
                    {
                        "name": event.node,
                        "cat": event.phase,
                        "ph": "X",
                        "ts": start,
                        "dur": duration,
                        "pid": pid,
                        "tid": PHASES[event.phase],
                        "args": {
                            "op": event.op,
                            "step": step,
                            "live_bytes_after": event.live_bytes,
                        },
                    }
                )
            elif event.phase != "free":
                raise ValueError(
                    f"trace event {event.node!r} has unknown phase "
                    f"{event.phase!r}; expected one of {[*PHASES, 'free']}"
                )
            # Live bytes *after* the step: stamped at its end (never before the last stamp,
            # so the counter track stays ordered even if timings overlap by rounding).
            counter_ts = max(counter_ts, round(start + duration, 3))
            out.append(
                {
                    "name": COUNTER,
                    "ph": "C",
                    "ts": counter_ts,
                    "pid": pid,
                    "tid": 0,
                    "args": {"MiB": round(event.live_bytes / _MIB, 6)},
                }
            )
    other = {
        "tool": "remat",
        "title": title,
        "time_unit": "microseconds",
        "counter_unit": "MiB",
        "policies": [label for label, _ in processes],
        "skipped": skipped,
    }
    other.update(metadata or {})
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": other}


def write_chrome_trace(path: str | os.PathLike, rows_or_events, **kwargs) -> str:
    """Write `chrome_trace(rows_or_events, **kwargs)` to `path` as JSON; returns the path."""
    document = chrome_trace(rows_or_events, **kwargs)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, separators=(",", ":"))
    return os.fspath(path)
