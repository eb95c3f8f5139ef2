"""Data-parallel runs: split a batch into shards, run them concurrently, combine exactly.

`Client.run(..., shards=N, batch_axes={"x": 0, "y": 0}, reduction="mean")` splits
every input named in `batch_axes` into N near-equal parts along its axis, sends each
part (with the other inputs, the parameters, whole) as its own request, and combines
what comes back. With several addresses shard i goes to replica (i + offset) mod R
(`placement`), and a shard whose replica dies is retried on the next one; behind a
`dns:///` name, whose addresses only gRPC knows, the shards go round robin like any
call (see `remat.targets`).

Combining is exact because the loss is linear in the shards' losses. With shard i
holding n_i of the n examples, and w_i = n_i / n for `reduction="mean"` (1 for "sum"):

- the loss, and every other reduced output, is sum_i w_i * out_i (an output named in
  `output_axes` with "mean" or "sum" uses that reduction's weights instead);
- the gradient of a parameter (an input not in `batch_axes`) is sum_i w_i * grad_i;
- the gradient of a batched input is the shards' w_i * grad_i, concatenated;
- an output named in `output_axes` with an axis is concatenated along it.

For "mean" a batch-independent term of the loss (say an L2 penalty on the weights)
comes out right, since the weights add up to 1; for "sum" it would count once per
shard, so keep such terms out of a summed loss.

With `cotangents` instead of a loss, the cotangent of a concatenated output is split
like the batch and the cotangent of a reduced output is scaled by w_i, so the shards'
gradients simply add up (parameters) or concatenate (batched inputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .graph import Graph
from .results import Metrics, RunResult

REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class Shard:
    """One shard's request: its inputs and cotangents (None for a loss run)."""

    inputs: dict[str, Any]
    cotangents: dict[str, Any] | None
    weight: float  # w_i: n_i / n for "mean", 1 for "sum"
    size: int  # n_i, the examples in this shard


@dataclass(frozen=True)
class ShardPlan:
    """How a batch was split, and so how the shards' results combine."""

    shards: tuple[Shard, ...]
    batch_axes: dict[str, int]  # input -> its batch axis (normalized, >= 0)
    output_axes: dict[str, int | str]  # output -> its concatenation axis, or reduction
    loss: str | None
    reduction: str | None


def shard_runs(
    graph: Graph,
    inputs: Mapping[str, Any],
    options: Mapping[str, Any],
    *,
    shards: int,
    batch_axes,
    reduction,
    output_axes,
) -> tuple[ShardPlan, list[tuple[dict, dict]]]:
    """The plan of a sharded `run`, and each shard's (inputs, keyword arguments) for an
    unsharded one; `options` are the run's other keyword arguments."""
    for option in ("timeline", "trace"):
        if options.get(option):
            raise ValueError(
                f"{option}=True records one server's schedule; it is not "
                f"available for a sharded run (shards={shards})"
            )
    plan = split(
        graph,
        inputs,
        shards=shards,
        batch_axes=batch_axes,
        reduction=reduction,
        loss=options.get("loss"),
        cotangents=options.get("cotangents"),
        output_axes=output_axes,
    )
    return plan, [
        (shard.inputs, {**options, "cotangents": shard.cotangents}) for shard in plan.shards
    ]


def placement(shards: int, replicas: int, offset: int) -> list[int]:
    """The replica of each shard: shard i goes to replica (i + offset) mod `replicas`,
    so N shards land on min(N, R) replicas, each getting N // R of them or one more.

        >>> placement(4, 3, offset=2)
        [2, 0, 1, 2]
    """
    return [(i + offset) % replicas for i in range(shards)]


def split(
    graph: Graph,
    inputs: Mapping[str, Any],
    *,
    shards: int,
    batch_axes: Mapping[str, int] | None,
    reduction: str | None,
    loss: str | None,
    cotangents: Mapping[str, Any] | None,
    output_axes: Mapping[str, int | None] | None,
) -> ShardPlan:
    """Check the sharding arguments against the graph and inputs, and split the batch.

    Every mistake is a ValueError naming the argument, input or output, raised before
    anything is sent.

        >>> import numpy as np, remat
        >>> g = remat.Graph("mse")
        >>> x, w = g.input("x", (-1, 2), dtype="float64"), g.input("w", (2,), "float64")
        >>> _ = g.output("loss", remat.mean((x * w) ** 2))
        >>> plan = split(g, {"x": np.ones((5, 2)), "w": np.ones(2)}, shards=2,
        ...              batch_axes={"x": 0}, reduction="mean", loss="loss",
        ...              cotangents=None, output_axes=None)
        >>> [s.size for s in plan.shards], [s.weight for s in plan.shards]
        ([3, 2], [0.6, 0.4])
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive integer, got {shards!r}")
    if not batch_axes:
        raise ValueError(
            f"shards={shards}: name the batched inputs and their batch axis, "
            "e.g. batch_axes={'x': 0, 'y': 0}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"shards={shards}: declare how the loss combines across shards: "
            f"reduction='mean' (the loss averages over the batch) or 'sum' (it adds up), "
            f"got {reduction!r}"
        )
    axes = _batch_axes(graph, inputs, batch_axes)
    size = _batch_size(inputs, axes, shards)
    output_axes = _output_axes(graph, output_axes, loss, reduction)
    sizes = [len(part) for part in np.array_split(np.arange(size), shards)]
    bounds = np.cumsum([0, *sizes])
    planned = []
    for i, n in enumerate(sizes):
        part = slice(bounds[i], bounds[i + 1])
        shard_inputs = {name: _take(value, axes.get(name), part) for name, value in inputs.items()}
        shard_cotangents = (
            None
            if cotangents is None
            else {
                name: _shard_cotangent(name, value, output_axes, part, n / size)
                for name, value in cotangents.items()
            }
        )
        planned.append(Shard(shard_inputs, shard_cotangents, _weight(reduction, n / size), n))
    return ShardPlan(tuple(planned), axes, output_axes, loss, reduction)


def combine(plan: ShardPlan, results: Sequence[RunResult]) -> RunResult:
    """One RunResult from the shards' results, in shard order (see the module doc)."""
    # A loss run's gradients carry the shard's weight; a cotangent run already put the
    # weights into the cotangents.
    grad_weights = [shard.weight if shard.cotangents is None else 1.0 for shard in plan.shards]
    outputs = {
        name: _combine_output(plan, name, [r.outputs[name] for r in results])
        for name in results[0].outputs
    }
    grads = {}
    for name in results[0].grads:
        parts = [w * r.grads[name] for w, r in zip(grad_weights, results)]
        axis = plan.batch_axes.get(name)
        grads[name] = np.concatenate(parts, axis=axis) if axis is not None else _sum(parts)
    warnings = tuple(dict.fromkeys(w for r in results for w in r.warnings))
    return RunResult(
        outputs=outputs,
        grads=grads,
        metrics=combined_metrics(results),
        warnings=warnings,
        shards=tuple(r.metrics for r in results),
    )


def combined_metrics(results: Sequence[RunResult]) -> Metrics:
    """Shards run at once, each on its replica: peaks and seconds are the largest
    shard's, counts and FLOPs add up. Per-shard figures are in `RunResult.shards`."""
    every = [r.metrics for r in results]
    largest = {f: max(getattr(m, f) for m in every) for f in _LARGEST}
    added = {f: sum(getattr(m, f) for m in every) for f in _ADDED}
    return dataclasses.replace(every[0], **largest, **added)


_LARGEST = (
    "peak_bytes",
    "predicted_peak_bytes",
    "measured_peak_bytes",
    "forward_seconds",
    "backward_seconds",
    "recompute_seconds",
    "plan_seconds",
    "total_seconds",
    "queue_seconds",
)
_ADDED = ("nodes_computed", "recomputed_nodes", "flops", "recompute_flops")


# --- checks and splitting ---------------------------------------------------------------------
def _batch_axes(
    graph: Graph, inputs: Mapping[str, Any], batch_axes: Mapping[str, int]
) -> dict[str, int]:
    declared = {item.name: item.shape for item in graph.inputs}
    axes = {}
    for name, axis in batch_axes.items():
        if name not in declared:
            raise ValueError(
                f"batch_axes names {name!r}, which is not an input of graph "
                f"{graph.name!r} (inputs: {sorted(declared)})"
            )
        if name not in inputs:
            raise ValueError(f"batch_axes names {name!r}, but no value was given for it")
        shape = declared[name]
        if (
            isinstance(axis, bool)
            or not isinstance(axis, (int, np.integer))
            or not -len(shape) <= axis < len(shape)
        ):
            raise ValueError(
                f"batch_axes[{name!r}] = {axis!r} is not an axis of input "
                f"{name!r}, which has rank {len(shape)}"
            )
        axis = int(axis) % len(shape)
        if shape[axis] != -1:
            raise ValueError(
                f"input {name!r} declares dimension {axis} as {shape[axis]}; sharding "
                f"splits that dimension, so declare it as -1 (bound at run time)"
            )
        axes[name] = axis
    return axes


def _batch_size(inputs: Mapping[str, Any], axes: Mapping[str, int], shards: int) -> int:
    sizes = {
        name: np.shape(inputs[name])[axis] if axis < np.ndim(inputs[name]) else None
        for name, axis in axes.items()
    }
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"the batched inputs disagree on the batch size: {sizes}")
    size = next(iter(sizes.values()))
    if shards > size:
        raise ValueError(f"shards={shards} is more than the batch size {size}")
    return size


def _output_axes(
    graph: Graph, output_axes, loss: str | None, reduction: str
) -> dict[str, int | str]:
    """`output_axes` with None spelled out as the loss's reduction."""
    output_axes = dict(output_axes or {})
    unknown = sorted(set(output_axes) - set(graph.outputs))
    if unknown:
        raise ValueError(
            f"output_axes names {unknown}, which are not outputs of graph "
            f"{graph.name!r} (outputs: {sorted(graph.outputs)})"
        )
    for name, how in output_axes.items():
        if how is None:
            output_axes[name] = reduction
        elif how not in REDUCTIONS and (
            isinstance(how, bool) or not isinstance(how, (int, np.integer))
        ):
            raise ValueError(
                f"output_axes[{name!r}] = {how!r}: expected an axis to "
                f"concatenate along, 'mean', 'sum' or None (like the loss)"
            )
    if loss is not None and output_axes.get(loss, reduction) != reduction:
        raise ValueError(
            f"output_axes[{loss!r}]: the loss is reduced by "
            f"reduction={reduction!r}; do not set it here"
        )
    return output_axes


def _weight(reduction: str, fraction: float) -> float:
    """A shard's weight in a reduced output: its fraction of the batch for a mean."""
    return fraction if reduction == "mean" else 1.0


def _take(value, axis: int | None, part: slice):
    if axis is None:
        return value  # a parameter: every shard gets all of it
    index = [slice(None)] * np.ndim(value)
    index[axis] = part
    return np.asarray(value)[tuple(index)]


def _shard_cotangent(
    name: str, value, output_axes: Mapping[str, int | str], part: slice, fraction: float
):
    axis = output_axes.get(name)
    if axis is None or axis in REDUCTIONS:  # a reduced output: its share of the cotangent
        return _weight(axis or "mean", fraction) * np.asarray(value)
    if not -np.ndim(value) <= axis < np.ndim(value):
        raise ValueError(
            f"output_axes[{name!r}] = {axis} is not an axis of its cotangent, "
            f"which has shape {np.shape(value)}"
        )
    return _take(value, axis % np.ndim(value), part)


# --- combining --------------------------------------------------------------------------------
def _combine_output(plan: ShardPlan, name: str, parts: list[np.ndarray]) -> np.ndarray:
    how = plan.output_axes.get(name)
    if how is not None and how not in REDUCTIONS:
        return np.concatenate(parts, axis=how)
    if how is None and name != plan.loss and parts[0].ndim > 0:
        raise ValueError(
            f"output {name!r} has shape {parts[0].shape} in each shard: say how shards "
            f"combine it, output_axes={{{name!r}: 0}} to concatenate along its batch axis, "
            f"or 'mean', 'sum' or None (like the loss) to reduce it; or leave it out of "
            f"`fetch`"
        )
    total = sum(shard.size for shard in plan.shards)
    reduction = how or plan.reduction
    return _sum(
        [_weight(reduction, shard.size / total) * part for shard, part in zip(plan.shards, parts)]
    )


def _sum(parts: list[np.ndarray]) -> np.ndarray:
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total
