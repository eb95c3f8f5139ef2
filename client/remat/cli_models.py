"""The user's own models as workloads for `remat compare` and `remat plan`.

    remat compare --graph model.pb --loss loss       # a saved remat graph
    remat compare --onnx model.onnx --batch 16       # an ONNX file
    remat plan --torch examples/resnet_factory.py:make_model --policy sqrt

- `--graph FILE`: the `remat.v1.Graph` message, binary or JSON (told apart by content).
- `--onnx FILE`: imported with `remat.from_onnx`; initializers keep the file's values.
  A dynamic batch dimension (an input's leading one, and any dimension of the same
  name) is bound to `--batch`.
- `--torch MODULE:FACTORY`: a PyTorch module and its example inputs, from the user's
  factory (`cli_torch`).

Data inputs with no value are seeded random: floats standard normal, integers zeros
(valid labels and indices), bools False. An imported model's loss is its scalar float
output `loss`, else its only scalar float output, else one added to the graph: the sum
over its float outputs of mean(output**2). The default wrt: every float input (a saved
graph, an ONNX model), the parameters and float inputs (a torch module, not its buffers).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

GRAPH_BATCH = 8  # a saved graph's -1 or an ONNX model's dynamic batch dimension, unless --batch


class WorkloadError(Exception):
    """The workload cannot be built (unreadable file, bad factory, no loss...): exit 1."""


@dataclass
class Workload:
    graph: Any  # remat.Graph
    inputs: dict[str, np.ndarray]
    wrt: list[str]
    loss: str
    description: str


def random_inputs(
    graph, batch: int, seed: int = 0, given: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Seeded inputs of the declared shapes, except those `given`: floats standard
    normal, integers zeros, bools False; a leading -1 dimension is `batch`."""
    rng = np.random.default_rng(seed)
    inputs = dict(given or {})
    for item in graph.inputs:
        if item.name in inputs:
            continue
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


def _wrt(graph, wrt, trainable: Callable[[str], bool] = lambda name: True) -> list[str]:
    """`--wrt` checked against the graph's inputs, else its float inputs `trainable` keeps."""
    names = [item.name for item in graph.inputs]
    if wrt:
        unknown = [name for name in wrt if name not in names]
        if unknown:
            raise WorkloadError(
                f"--wrt {', '.join(unknown)}: not an input of the graph "
                f"(inputs: {', '.join(names) or 'none'})"
            )
        return list(wrt)
    wrt = [i.name for i in graph.inputs if i.dtype.startswith("float") and trainable(i.name)]
    if not wrt:
        raise WorkloadError(f"graph {graph.name!r} has no float input to differentiate")
    return wrt


def _check_loss(graph, loss: str) -> str:
    if loss not in graph.output_names:
        raise WorkloadError(
            f"--loss {loss}: not an output of the graph (outputs: {', '.join(graph.output_names)})"
        )
    return loss


# --- a saved graph -------------------------------------------------------------------------
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


def graph_workload(path: str, *, batch: int | None, wrt, loss) -> Workload:
    graph = load_graph(path)
    wrt = _wrt(graph, wrt)
    outputs = graph.output_names
    if loss is not None:
        loss = _check_loss(graph, loss)
    elif len(outputs) == 1:
        loss = outputs[0]
    elif "loss" in outputs:
        loss = "loss"
    else:
        raise WorkloadError(
            f"graph {graph.name!r} has outputs {', '.join(outputs)}: choose the loss with --loss"
        )
    batch = batch or GRAPH_BATCH
    batched = any(item.shape[:1] == (-1,) for item in graph.inputs)
    description = (
        f"graph {graph.name!r} from {path} ({len(graph.nodes)} nodes"
        + (f", batch {batch}" if batched else "")
        + f"), loss {loss!r}"
    )
    return Workload(graph, random_inputs(graph, batch), wrt, loss, description)


# --- an imported model: its loss -----------------------------------------------------------
def model_workload(
    graph, inputs, outputs, *, what: str, details=(), wrt, loss, trainable=lambda name: True
) -> Workload:
    """The workload of an imported graph, given its float outputs' shapes (`outputs`,
    None where unknown), what the description calls it, and which float inputs
    `trainable` keeps for the default wrt."""
    description = f"{what} ({', '.join([f'{len(graph.nodes)} nodes', *details])}), loss "
    wrt = _wrt(graph, wrt, trainable)
    if loss is not None:
        return Workload(graph, inputs, wrt, _check_loss(graph, loss), description + repr(loss))
    scalars = [name for name, shape in outputs.items() if shape == ()]
    if "loss" in scalars or len(scalars) == 1:
        loss = "loss" if "loss" in scalars else scalars[0]
        return Workload(graph, inputs, wrt, loss, description + repr(loss))
    loss, formula = _add_loss(graph, list(outputs))
    return Workload(graph, inputs, wrt, loss, f"{description}{loss!r} = {formula} (added)")


def _add_loss(graph, outputs: list[str]) -> tuple[str, str]:
    """Add a scalar loss, the sum over `outputs` of mean(output**2): its name and formula."""
    import remat

    if not outputs:
        raise WorkloadError(
            f"graph {graph.name!r} has no float output to build a loss from "
            f"(outputs: {', '.join(graph.output_names) or 'none'})"
        )
    name = next(n for n in ("loss", *(f"loss_{i}" for i in range(1, 100))) if n not in graph)
    terms = [remat.mean(remat.square(graph[output])) for output in outputs]
    graph.output(name, sum(terms[1:], start=terms[0]))
    formula = " + ".join(f"mean({output}**2)" for output in outputs)
    if len(outputs) > 3:
        formula = f"the sum of mean(output**2) over {len(outputs)} outputs"
    return name, formula


# --- an ONNX file --------------------------------------------------------------------------
def onnx_workload(path: str, *, batch: int | None, wrt, loss) -> Workload:
    import remat
    from remat_proto.onnx_import import OnnxImportError

    proto = _load_onnx(path)
    batch = batch or GRAPH_BATCH
    shapes = _onnx_input_shapes(proto, batch)
    try:
        graph, params = remat.from_onnx(
            proto, base_dir=os.path.dirname(os.path.abspath(path)), input_shapes=shapes
        )
    except (OnnxImportError, ValueError, OSError) as error:
        raise WorkloadError(f"{path}: {error}") from None
    return model_workload(
        graph,
        random_inputs(graph, batch, given=params),
        _onnx_outputs(proto, graph),
        what=f"ONNX model {path}",
        details=[f"batch {batch}"] if shapes else [],
        wrt=wrt,
        loss=loss,
    )


def _load_onnx(path: str):
    """The ModelProto in `path` (external tensor data stays on disk for from_onnx)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise WorkloadError(f"cannot read ONNX file {path}: {error.strerror}") from None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        proto.Clear()
    if not proto.HasField("graph"):
        raise WorkloadError(f"{path} is not an ONNX model (no graph in it)")
    return proto


def _onnx_input_shapes(proto, batch: int) -> dict[str, tuple[int, ...]]:
    """The shapes of the data inputs with dynamic dimensions: the batch dimension (the
    leading one, and any of the same name) bound to `batch`; any other is an error."""
    params = {tensor.name for tensor in proto.graph.initializer}
    data = [i for i in proto.graph.input if i.name not in params and i.type.HasField("tensor_type")]
    dims = {item.name: list(item.type.tensor_type.shape.dim) for item in data}
    named = {d[0].dim_param for d in dims.values() if d and not d[0].HasField("dim_value")}
    shapes = {}
    for name, item_dims in dims.items():
        if all(d.HasField("dim_value") for d in item_dims):
            continue
        shape = []
        for axis, d in enumerate(item_dims):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif axis == 0 or (d.dim_param and d.dim_param in named):
                shape.append(batch)
            else:
                raise WorkloadError(
                    f"ONNX input {name!r}: dimension {axis} ({d.dim_param or '?'}) is dynamic; "
                    "only the batch dimension is bound (to --batch): export the model "
                    "with the others fixed"
                )
        shapes[name] = tuple(shape)
    return shapes


def _onnx_outputs(proto, graph) -> dict[str, tuple[int, ...] | None]:
    """The model's float outputs and their declared shapes (None if not all static)."""
    from remat_proto.onnx_import.tensors import FLOAT_TYPES

    outputs = {}
    for item in proto.graph.output:
        kind = item.type.tensor_type
        if item.name not in graph.output_names or kind.elem_type not in FLOAT_TYPES:
            continue
        static = kind.HasField("shape") and all(d.HasField("dim_value") for d in kind.shape.dim)
        outputs[item.name] = tuple(d.dim_value for d in kind.shape.dim) if static else None
    return outputs
