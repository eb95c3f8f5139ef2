"""Test helpers: build one-op graphs and check gradients against centered differences.

The loss is sum(out * R) with a fixed random R, so every output element carries a
distinct weight and a wrong gradient cannot hide behind symmetry.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np

from remat_server.engine import Engine, RunRequest
from remat_server.graph.ir import GraphSpec, InputSpec, NodeSpec

ENGINE = Engine()
# A call to a test server that has not answered in this long is taken as hung. It is
# generous on purpose: CI machines are shared, and a 10 s deadline once expired on a
# request that answers in 8 ms (tests/property, 17,000 calls on a loaded machine).
HANG_SECONDS = 60.0


@contextlib.contextmanager
def evaluated_nodes() -> Iterator[list[str]]:
    """The names of the nodes the executor evaluates in this process while the block
    runs (any run: a server's in this process, a profiling pass): a request that a
    server here refuses "before anything runs" leaves the list empty."""
    from unittest import mock

    from remat_server.runtime import executor

    names: list[str] = []
    real = executor._run_node

    def counted(node, *args):
        names.append(node.name)
        return real(node, *args)

    with mock.patch.object(executor, "_run_node", counted):
        yield names


def op_graph(
    op: str, inputs: dict[str, np.ndarray], attrs: dict | None = None, weight_seed: int = 7
) -> tuple[GraphSpec, dict[str, np.ndarray]]:
    """Graph: out = op(*inputs, **attrs); loss = sum(out * R). Returns (spec, feeds)."""
    specs = tuple(InputSpec(name, a.shape, a.dtype.name) for name, a in inputs.items())
    out = ENGINE.run(
        RunRequest(
            GraphSpec(
                "probe",
                specs,
                (NodeSpec("out", op, tuple(inputs), attrs or {}),),
                (("out", "out"),),
            ),
            inputs,
        )
    ).outputs["out"]
    feeds = dict(inputs)
    nodes = [NodeSpec("out", op, tuple(inputs), attrs or {})]
    if np.issubdtype(out.dtype, np.floating):
        rng = np.random.default_rng(weight_seed)
        # Magnitudes in [0.5, 1.5] with random signs: no weight is tiny enough to hide
        # an error, and no symmetry makes a wrong gradient look right.
        weight = (rng.uniform(0.5, 1.5, out.shape) * rng.choice([-1.0, 1.0], out.shape)).astype(
            out.dtype
        )
        specs = specs + (InputSpec("__weight", weight.shape, weight.dtype.name),)
        feeds["__weight"] = weight
        nodes += [
            NodeSpec("__weighted", "mul", ("out", "__weight")),
            NodeSpec("__loss", "sum", ("__weighted",)),
        ]
    outputs = (("out", "out"),) + ((("loss", "__loss"),) if len(nodes) > 1 else ())
    return GraphSpec("probe", specs, tuple(nodes), outputs), feeds


def loss_value(spec: GraphSpec, feeds: dict[str, np.ndarray], loss: str = "loss") -> float:
    return float(ENGINE.run(RunRequest(spec, feeds, fetch=(loss,))).outputs[loss])


def numeric_grad(spec, feeds, name, loss="loss", h=1e-6) -> np.ndarray:
    """Centered differences (f(x+h) - f(x-h)) / 2h, one element at a time, in float64."""
    base = feeds[name]
    grad = np.zeros(base.shape, dtype=np.float64)
    for index in np.ndindex(base.shape):
        values = []
        for sign in (1.0, -1.0):
            bumped = base.copy()
            bumped[index] += sign * h
            values.append(loss_value(spec, {**feeds, name: bumped}, loss))
        grad[index] = (values[0] - values[1]) / (2 * h)
    return grad


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """Norm-wise: max |a - n| / max |n| (absolute when the gradient is ~0)."""
    scale = max(float(np.max(np.abs(numeric), initial=0.0)), 1e-3)
    return float(np.max(np.abs(analytic - numeric), initial=0.0)) / scale


def check_grads(spec, feeds, wrt, loss="loss", tol=1e-6) -> dict[str, float]:
    """Assert autodiff matches centered differences for every `wrt` input; return errors."""
    result = ENGINE.run(RunRequest(spec, feeds, wrt=tuple(wrt), loss=loss))
    errors = {}
    for name in wrt:
        assert result.grads[name].shape == feeds[name].shape, name
        assert result.grads[name].dtype == feeds[name].dtype, name
        errors[name] = relative_error(result.grads[name], numeric_grad(spec, feeds, name, loss))
        assert errors[name] <= tol, f"gradient of {name}: relative error {errors[name]:.3g}"
    return errors


def tanh_chain(
    length: int, width: int = 3, dtype: str = "float64", loss: bool = False
) -> GraphSpec:
    """x -> t1 = tanh(x) -> ... -> t<length>; output "out" is the last value, or with
    `loss`, output "loss" = sum of it."""
    nodes, prev = [], "x"
    for i in range(1, length + 1):
        nodes.append(NodeSpec(f"t{i}", "tanh", (prev,)))
        prev = f"t{i}"
    outputs = (("out", prev),)
    if loss:
        nodes.append(NodeSpec("loss", "sum", (prev,)))
        outputs = (("loss", "loss"),)
    return GraphSpec("chain", (InputSpec("x", (width,), dtype),), tuple(nodes), outputs)


def skip_chain(length: int, width: int = 4) -> GraphSpec:
    """x -> t1 = tanh(x) -> ... -> t<length>, and loss = sum(t<length> * t1): t1 is read
    by its successor and, through the skip connection, again at the end."""
    nodes = [NodeSpec("t1", "tanh", ("x",))]
    for i in range(2, length + 1):
        nodes.append(NodeSpec(f"t{i}", "tanh", (f"t{i - 1}",)))
    nodes.append(NodeSpec("skip", "mul", (f"t{length}", "t1")))
    nodes.append(NodeSpec("loss", "sum", ("skip",)))
    x = InputSpec("x", (width, width), "float64")
    return GraphSpec("skip", (x,), tuple(nodes), (("loss", "loss"),))


def run_op(op, inputs, attrs=None, name="out"):
    """The output of one `op` node on `inputs` (no gradient)."""
    specs = tuple(InputSpec(k, a.shape, a.dtype.name) for k, a in inputs.items())
    spec = GraphSpec(
        "t", specs, (NodeSpec(name, op, tuple(inputs), attrs or {}),), (("out", name),)
    )
    return ENGINE.run(RunRequest(spec, inputs)).outputs["out"]


def rel(a, b) -> float:
    """max |a - b| / max |b|: a relative error for comparing against a reference."""
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-12))


def joint_hvp_spec(spec, wrt):
    """loss2 = sum_i <d loss / d wrt_i, v_i>, built on the joint graph; its gradient is H v."""
    joint = ENGINE.differentiate(spec, wrt=tuple(wrt), loss="loss")
    graph = joint.graph
    inputs = tuple(InputSpec(n.name, n.shape, n.dtype) for n in graph.inputs)
    nodes = [NodeSpec(n.name, n.op, n.inputs, dict(n.attrs)) for n in graph if not n.is_input]
    terms = []
    for name in wrt:
        grad = graph.outputs[joint.grad_outputs[name]]
        inputs += (InputSpec(f"v/{name}", graph[name].shape, graph[name].dtype),)
        nodes += [
            NodeSpec(f"gv/{name}", "mul", (grad, f"v/{name}")),
            NodeSpec(f"s/{name}", "sum", (f"gv/{name}",)),
        ]
        terms.append(f"s/{name}")
    nodes += [
        NodeSpec(f"acc/{k}", "add", (f"acc/{k - 1}" if k > 1 else terms[0], terms[k]))
        for k in range(1, len(terms))
    ]
    total = f"acc/{len(terms) - 1}" if len(terms) > 1 else terms[0]
    return GraphSpec("hvp", inputs, tuple(nodes), (("loss2", total),))


def nonlinear_probe(op, inputs, attrs):
    """loss = sum(tanh(op(...)) * R): curvature even where the op is linear."""
    specs = tuple(InputSpec(k, a.shape, a.dtype.name) for k, a in inputs.items())
    out = run_op(op, inputs, attrs)
    # Away from 0, even for a scalar output.
    weight = 0.5 + np.random.default_rng(7).random(out.shape)
    spec = GraphSpec(
        "probe",
        specs + (InputSpec("R", weight.shape, "float64"),),
        (
            NodeSpec("out", op, tuple(inputs), attrs),
            NodeSpec("t", "tanh", ("out",)),
            NodeSpec("tw", "mul", ("t", "R")),
            NodeSpec("l", "sum", ("tw",)),
        ),
        (("loss", "l"),),
    )
    return spec, {**inputs, "R": weight}


def check_hvp(op, inputs, attrs, wrt, seed: int = 11) -> None:
    """Second order: Hessian-vector products of `op` (inside a nonlinear probe, so that
    linear ops have curvature too) against centered differences of the first-order
    joint graph, in random directions drawn from `seed`; and a nonzero one, so that the
    check tests curvature rather than zeros."""
    spec, feeds = nonlinear_probe(op, inputs, attrs)
    spec2 = joint_hvp_spec(spec, wrt)
    rng = np.random.default_rng(seed)
    directions = {f"v/{name}": rng.standard_normal(inputs[name].shape) for name in wrt}
    feeds2 = {**feeds, **directions}
    check_grads(spec2, feeds2, wrt, loss="loss2", tol=1e-6)
    hvp = ENGINE.run(RunRequest(spec2, feeds2, wrt=tuple(wrt), loss="loss2")).grads
    assert max(np.max(np.abs(hvp[name])) for name in wrt) > 1e-2  # a real curvature test


def run_float32(op, inputs, attrs, wrt):
    """Run `op` on float32 copies of its float64 `inputs`; check that the output and every
    gradient stay float32. Returns (the float32 result, the float64 output) for the
    caller's tolerance."""
    inputs32 = {k: a.astype(np.float32) if a.dtype == np.float64 else a for k, a in inputs.items()}
    spec, feeds = op_graph(op, inputs32, attrs)
    result = ENGINE.run(RunRequest(spec, feeds, wrt=tuple(wrt), loss="loss"))
    assert result.outputs["out"].dtype == np.float32
    for name in wrt:
        assert result.grads[name].dtype == np.float32, name
    return result, run_op(op, inputs, attrs)


def measured_scratch(op, inputs, attrs=None) -> tuple[int, int]:
    """(the temporaries `op`'s forward really holds at its peak, in bytes, as tracemalloc
    sees them on these arrays; what its registration's `scratch` declares). The result
    itself is not a temporary: its bytes are taken off the traced peak unless the op
    returns a view."""
    import tracemalloc

    from remat_server.graph.ir import TensorType
    from remat_server.ops import REGISTRY

    definition = REGISTRY[op]
    arrays = list(inputs.values())
    types = [TensorType(tuple(a.shape), a.dtype.name) for a in arrays]
    full = {name: a.default for name, a in definition.attrs.items() if not a.required}
    full.update(attrs or {})
    if definition.normalize is not None:
        full.update(definition.normalize(*types, **full))
    out_type = definition.infer(*types, **full)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = definition.forward(*arrays, **full)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    owned = result.nbytes if result.base is None or result.base.nbytes == result.nbytes else 0
    declared = definition.scratch(out_type, *types, **full) if definition.scratch else 0
    return max(peak - owned, 0), declared


def assert_runs_as_store_all(problem, schedule, feeds) -> None:
    """Executed, `schedule` computes every value store_all's schedule computes, bit for
    bit (`problem`: a checkpoint.problem.Problem over the joint graph)."""
    from remat_proto.policies import StoreAll
    from remat_server.checkpoint.planners import plan
    from remat_server.runtime.executor import execute

    run = execute(problem.graph, schedule, feeds, problem.forward_nodes)
    reference = execute(problem.graph, plan(problem, StoreAll()), feeds, problem.forward_nodes)
    assert run.values.keys() == reference.values.keys()
    for name, value in reference.values.items():
        assert np.array_equal(run.values[name], value), name


def residual_blocks(
    blocks: int = 3, width: int = 4, batch: int = 4, image: int = 8, dtype="float32"
):
    """ResNet basic blocks without normalisation (conv3x3, relu, conv3x3, + skip, relu),
    loss sum(out * R): a remat.models.Model whose weights w{b}_{k} are differentiated."""
    import remat
    from remat import models, ops

    rng = np.random.default_rng(0)
    g = remat.Graph("residual")
    inputs = {"x": rng.standard_normal((batch, width, image, image)).astype(dtype)}
    h = g.input("x", inputs["x"].shape, dtype)
    for b in range(blocks):
        skip = h
        for k in range(2):
            inputs[f"w{b}_{k}"] = (rng.standard_normal((width, width, 3, 3)) / 6).astype(dtype)
            h = ops.conv2d(h, g.input(f"w{b}_{k}", (width, width, 3, 3), dtype), padding=1)
            h = ops.relu(h, name=f"relu{b}") if k == 0 else h
        h = ops.relu(ops.add(h, skip), name=f"out{b}")
    inputs["r"] = rng.standard_normal(inputs["x"].shape).astype(dtype)
    g.output("loss", ops.sum(h * g.input("r", inputs["r"].shape, dtype)))
    return models.Model(g, inputs, [n for n in inputs if n.startswith("w")], "loss")


def stored_bytes(message) -> int:
    """What the server's graph store counts for a `remat.v1.Graph` message: its decoded
    spec's estimate (`graph_store.Registered.nbytes`), not the message's size."""
    from remat_server.graph.limits import Limits
    from remat_server.service.codec import graph_from_proto
    from remat_server.service.graph_store import Registered

    return Registered("", graph_from_proto(message, Limits())).nbytes


def without_moment_bound(monkeypatch, scale: float = 0.0) -> None:
    """Optimal with its lower bound (one moment's or a chain's) scaled by `scale` (0: none
    above 0), and no moment search. Otherwise they prove Budget's schedule, or the
    search's, optimal on small graphs before the MILP runs, and a test of the MILP's
    own path would test nothing."""
    from remat_server.checkpoint.planners import optimal  # noqa: PLC0415

    real = optimal.chain_lower_bound

    def scaled(problem, limit, **kwargs):
        bound = real(problem, limit, **kwargs)
        return dataclasses.replace(bound, cost=bound.cost * scale)

    monkeypatch.setattr(optimal, "chain_lower_bound", scaled)
    # The moment search from the bound's anchors would answer before the MILP too.
    monkeypatch.setattr(optimal, "moment_schedule", lambda *args, **kwargs: None)
