"""Checkpoint policies through the SDK and a real server: remat.policies objects on the
wire, bit-identical gradients under each, client.plan against Run metrics, timelines,
measured memory, bad policies, client.compare and policies.parse."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

import remat
from remat import policies as P
from remat_proto import wire
from remat_proto.v1 import executor_pb2

MLP_CHECKPOINTS = ("act0", "act2")
TRANSFORMER_CHECKPOINTS = ("ln1", "attn", "resid1")


def mlp(dtype: str = "float32") -> remat.models.Model:
    return remat.models.mlp(batch=8, widths=(12, 16, 16, 16, 16, 5), dtype=dtype, seed=3)


def transformer(dtype: str = "float32") -> remat.models.Model:
    return remat.models.transformer_block(
        batch=2, seq=4, d_model=8, heads=2, d_ff=16, dtype=dtype, seed=3
    )


def every_policy(checkpoints=MLP_CHECKPOINTS) -> list:
    return [
        P.StoreAll(),
        P.RecomputeAll(),
        P.EveryK(1),
        P.EveryK(2),
        P.EveryK(3),
        P.Sqrt(),
        P.Checkpoints(checkpoints),
        P.SaveOps(("matmul",)),
        P.SaveOps(("tanh", "add")),
        P.Revolve(1),
        P.Revolve(2),
        P.Revolve(4),
    ]


def run(client, model, policy, **options) -> remat.RunResult:
    return client.run(
        model.graph, model.inputs, wrt=model.wrt, loss=model.loss, policy=policy, **options
    )


def plan(client, model, policy, **options) -> remat.PlanResult:
    return client.plan(model.graph, wrt=model.wrt, loss=model.loss, policy=policy, **options)


# --- objects and the wire ----------------------------------------------------------------
@pytest.mark.parametrize(
    "policy, kind, fields",
    [
        (P.StoreAll(), "store_all", {}),
        (P.RecomputeAll(), "recompute_all", {}),
        (P.Sqrt(), "sqrt", {}),
        (P.EveryK(4), "every_k", {"k": 4}),
        (P.Revolve(3), "revolve", {"slots": 3}),
        (P.Checkpoints(("act0", "act2")), "checkpoints", {"names": ["act0", "act2"]}),
        (P.SaveOps(("matmul", "conv2d")), "save_ops", {"ops": ["matmul", "conv2d"]}),
        (P.MinMemory(time_limit=5), "min_memory", {"time_limit_seconds": 5}),
    ],
)
def test_each_policy_is_its_oneof_on_the_wire(policy, kind, fields):
    message = wire.policy_to_proto(policy)
    assert message.WhichOneof("kind") == kind
    for name, value in fields.items():
        sent = getattr(getattr(message, kind), name)
        assert (list(sent) if isinstance(value, list) else sent) == value
    # Frozen, hashable values: usable as dict keys and in sets.
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.name = "other"  # type: ignore[misc]
    assert {policy: 1}[policy] == 1


def test_every_policy_runs_and_the_server_reports_it(client):
    model = mlp()
    for policy in every_policy():
        metrics = run(client, model, policy).metrics
        assert metrics.policy.split("(")[0] == policy.name
        if not isinstance(policy, P.Checkpoints):  # the server does not list the names
            assert metrics.policy == P.label(policy)
        assert metrics.peak_bytes == metrics.predicted_peak_bytes > 0


def test_names_resolve_to_the_same_plans_as_objects(client):
    model = mlp()
    for name, obj in (
        ("store_all", P.StoreAll()),
        ("recompute_all", P.RecomputeAll()),
        ("sqrt", P.Sqrt()),
    ):
        assert P.resolve(name) == obj
        by_name, by_object = plan(client, model, name), plan(client, model, obj)
        assert (by_name.peak_bytes, by_name.flops, by_name.policy) == (
            by_object.peak_bytes,
            by_object.flops,
            by_object.policy,
        ) and by_name.policy == name
    # The default is auto, which plans store_all whenever it fits the server's limit.
    assert P.resolve(None) == P.Auto()
    assert plan(client, model, None).policy == "store_all"
    assert P.resolve(P.Revolve(2)) == P.Revolve(2)


def test_min_memory_by_name_plans_under_recompute_all_and_says_how_it_knows(client):
    model = mlp()
    floor = plan(client, model, "min_memory")
    assert floor.policy == "min_memory" == P.label(P.MinMemory())
    assert floor.peak_bytes <= plan(client, model, "recompute_all").peak_bytes
    report = floor.planner
    assert report.budget_bytes == floor.peak_bytes
    assert report.status in ("optimal", "feasible")
    assert ("proven minimum" in report.detail) == (report.status == "optimal")
    assert "proven bound" in report.detail or report.status == "optimal"
    result = run(client, model, P.MinMemory(time_limit=5))
    assert result.metrics.peak_bytes == result.metrics.predicted_peak_bytes <= floor.peak_bytes
    expected = run(client, model, "store_all")
    for key, value in expected.grads.items():
        assert np.array_equal(result.grads[key], value), key


def test_public_namespace():
    for name in (
        "StoreAll",
        "RecomputeAll",
        "EveryK",
        "Sqrt",
        "Checkpoints",
        "SaveOps",
        "Revolve",
        "MinMemory",
        "resolve",
        "parse",
        "label",
    ):
        assert name in P.__all__ and hasattr(remat.policies, name)
    for name in ("PlanResult", "ComparisonRow", "format_table"):
        assert name in remat.__all__ and hasattr(remat, name)
    # One name means one node, not its characters; lists become tuples.
    assert P.Checkpoints("act3").names == ("act3",)
    assert P.SaveOps(["matmul", "conv2d"]).ops == ("matmul", "conv2d")


# --- gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "build, checkpoints", [(mlp, MLP_CHECKPOINTS), (transformer, TRANSFORMER_CHECKPOINTS)]
)
def test_gradients_are_bit_identical_under_every_policy(client, build, checkpoints, dtype):
    model = build(dtype)
    reference = run(client, model, "store_all")
    for policy in every_policy(checkpoints):
        result = run(client, model, policy)
        assert np.array_equal(result.outputs["loss"], reference.outputs["loss"]), policy
        assert result.grads.keys() == reference.grads.keys()
        for name, grad in result.grads.items():
            assert grad.dtype == np.dtype(dtype)
            assert np.array_equal(grad, reference.grads[name]), (policy, name)


# --- plan ------------------------------------------------------------------------------------
def test_plan_figures_equal_the_run_metrics(client):
    for build, checkpoints in ((mlp, MLP_CHECKPOINTS), (transformer, TRANSFORMER_CHECKPOINTS)):
        model = build()
        for policy in every_policy(checkpoints):
            planned, metrics = plan(client, model, policy), run(client, model, policy).metrics
            assert isinstance(planned, remat.PlanResult)
            assert planned.peak_bytes == metrics.predicted_peak_bytes == metrics.peak_bytes
            assert planned.flops == metrics.flops
            assert planned.recompute_flops == metrics.recompute_flops
            assert planned.recomputed_nodes == metrics.recomputed_nodes
            assert planned.policy == metrics.policy
            assert planned.input_bytes == sum(a.nbytes for a in model.inputs.values())
            assert planned.plan_seconds > 0
            assert planned.schedule == ()  # not requested


def test_node_evaluations_store_all_once_recompute_all_more(client):
    model = mlp()
    store = plan(client, model, P.StoreAll())
    assert store.node_evaluations and set(store.node_evaluations.values()) == {1}
    assert store.recompute_flops == 0 and store.recomputed_nodes == 0
    low = plan(client, model, P.RecomputeAll())
    assert low.node_evaluations.keys() == store.node_evaluations.keys()
    assert low.node_evaluations["act0"] > 1 and low.node_evaluations["linear0"] > 1
    assert low.recomputed_nodes == sum(n - 1 for n in low.node_evaluations.values()) > 0
    assert low.peak_bytes < store.peak_bytes and low.flops > store.flops
    assert low.recompute_flops == low.flops - store.flops


def test_schedule_steps_agree_with_node_evaluations(client):
    model = transformer()
    for policy in (P.StoreAll(), P.Sqrt(), P.RecomputeAll(), P.Revolve(2)):
        planned = plan(client, model, policy, include_schedule=True)
        assert planned.schedule and len(planned.schedule) == len(planned.timeline)
        assert {kind for kind, _ in planned.schedule} == {"compute", "free"}
        computed = Counter(node for kind, node in planned.schedule if kind == "compute")
        assert computed == Counter(planned.node_evaluations)
        live: set[str] = set()  # a value is computed only when dead and freed only when live
        for kind, node in planned.schedule:
            if kind == "compute":
                assert node not in live
                live.add(node)
            else:
                live.remove(node)


def test_plan_binds_batch_dimensions_and_cotangent_outputs(client):
    g = remat.Graph("batched")
    x, w = g.input("x", (-1, 3), "float64"), g.input("w", (3, 2), "float64")
    h = remat.tanh(x @ w, name="h")
    g.output("h", h)
    g.output("loss", remat.sum(h * h))
    with pytest.raises(remat.InvalidArgumentError, match="batch dimension"):
        client.plan(g, wrt=["w"], loss="loss")
    with pytest.raises(remat.InvalidArgumentError, match="'y' is not an input"):
        client.plan(g, wrt=["w"], loss="loss", input_shapes={"y": (5, 3)})
    small = client.plan(g, wrt=["w"], loss="loss", input_shapes={"x": (5, 3)})
    big = client.plan(g, wrt=["w"], loss="loss", input_shapes={"x": (50, 3)})
    assert big.peak_bytes > small.peak_bytes and big.flops > small.flops
    xv, wv = np.ones((5, 3)), np.ones((3, 2))
    assert client.run(g, {"x": xv, "w": wv}, wrt=["w"], loss="loss").metrics.flops == small.flops
    # A vector-Jacobian product: plan with the cotangent's output, run with its value.
    vjp = client.plan(
        g, wrt=["w"], cotangent_outputs=["h"], fetch=["h"], input_shapes={"x": (5, 3)}
    )
    metrics = client.run(
        g, {"x": xv, "w": wv}, wrt=["w"], cotangents={"h": np.ones((5, 2))}, fetch=["h"]
    ).metrics
    assert (vjp.peak_bytes, vjp.flops) == (metrics.predicted_peak_bytes, metrics.flops)


# --- run options -----------------------------------------------------------------------------
def test_timeline_on_request(client):
    model = mlp()
    assert run(client, model, "sqrt").timeline == ()
    for policy in (P.StoreAll(), P.Sqrt(), P.RecomputeAll()):
        result = run(client, model, policy, timeline=True)
        assert isinstance(result.timeline, tuple) and len(result.timeline) > 0
        assert all(isinstance(v, int) for v in result.timeline)
        assert max(result.timeline) == result.metrics.predicted_peak_bytes
        assert result.timeline == plan(client, model, policy).timeline


def test_measure_memory_on_request(client):
    model = mlp()
    assert run(client, model, "store_all").metrics.measured_peak_bytes == 0
    measured = run(client, model, "store_all", measure_memory=True).metrics
    assert measured.measured_peak_bytes > 0
    # It includes the inputs, which are live for the whole run.
    assert measured.measured_peak_bytes >= sum(a.nbytes for a in model.inputs.values())


# --- bad policies ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: P.EveryK(0), ValueError, "k must be >= 1"),
        (lambda: P.EveryK(-2), ValueError, "k must be >= 1"),
        (lambda: P.Revolve(0), ValueError, "slots must be >= 1"),
        (lambda: P.Revolve(2**31), ValueError, "below 2\\*\\*31"),
        (lambda: P.EveryK(2.5), TypeError, "k must be an int"),
        (lambda: P.EveryK(True), TypeError, "k must be an int"),
        (lambda: P.Revolve("3"), TypeError, "slots must be an int"),
        (lambda: P.Checkpoints(("act0", "")), ValueError, "non-empty string"),
        (lambda: P.SaveOps((3,)), ValueError, "non-empty string"),
        (lambda: P.resolve("telepathy"), ValueError, "unknown policy 'telepathy'.*store_all"),
        (lambda: P.resolve("every_k"), ValueError, "takes a parameter"),
        (lambda: P.resolve(42), TypeError, "remat.policies object or name"),
    ],
)
def test_obvious_misuse_fails_before_sending(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_bad_policies_the_server_finds_are_invalid_argument(client):
    model = mlp()
    for policy, message in (
        (P.Checkpoints(("nope",)), "checkpoints: 'nope' is not a node"),
        (P.SaveOps(("nope",)), "save_ops: unknown op 'nope'"),
    ):
        for call in (run, plan):
            with pytest.raises(remat.InvalidArgumentError, match=message):
                call(client, model, policy)
    with pytest.raises(ValueError, match="unknown policy"):  # checked locally, never sent
        run(client, model, "telepathy")


@pytest.mark.parametrize(
    "policy, message",
    [
        (executor_pb2.Policy(every_k=executor_pb2.EveryK(k=0)), "k must be >= 1"),
        (executor_pb2.Policy(revolve=executor_pb2.Revolve(slots=0)), "slots must be >= 1"),
        (executor_pb2.Policy(name="telepathy"), "unknown policy 'telepathy'"),  # the SDK's words
    ],
)
def test_the_server_also_rejects_what_the_sdk_checks(stub, policy, message):
    # Other clients skip the SDK's checks; the server must not rely on them.
    import grpc

    request = executor_pb2.PlanRequest(
        graph=executor_pb2.GraphRef(graph=mlp().graph.to_proto()),
        wrt=mlp().wrt,
        loss="loss",
        policy=policy,
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.Plan(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


# --- compare ---------------------------------------------------------------------------------
def test_compare_puts_store_all_first_with_identical_gradients(client):
    model = mlp()
    chosen = [P.Sqrt(), P.Revolve(2), "recompute_all", P.EveryK(2)]
    rows = client.compare(
        model.graph, model.inputs, wrt=model.wrt, loss=model.loss, policies=chosen
    )
    assert [row.policy for row in rows] == [
        "store_all",
        "sqrt",
        "revolve(2)",
        "recompute_all",
        "every_k(2)",
    ]
    assert all(isinstance(row, remat.ComparisonRow) for row in rows)
    base = rows[0]
    assert base.peak_ratio == 1.0 and base.recompute_share == 0.0
    assert base.recompute_flop_share == 0.0
    for row in rows:
        assert row.max_grad_diff == 0.0
        assert row.peak_bytes == row.predicted_peak_bytes > 0
        assert row.peak_ratio == row.peak_bytes / base.peak_bytes
        assert 0.0 <= row.recompute_share <= 1.0 and 0.0 <= row.recompute_flop_share < 1.0
        assert row.total_seconds >= row.forward_seconds + row.backward_seconds
    low = rows[3]
    assert low.peak_ratio < 1.0 and low.recompute_flop_share > 0 and low.recompute_seconds > 0
    assert low.recompute_flop_share == low.recompute_flops / low.flops
    assert plan(client, model, "recompute_all").peak_bytes == low.predicted_peak_bytes

    table = remat.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 1 + len(rows)
    assert lines[0].split()[:3] == ["policy", "peak", "predicted"]
    for line, row in zip(lines[1:], rows):
        assert line.startswith(row.policy + " ")
    # Right-aligned figures: every row's last column ends where the header's does.
    assert len({len(line) for line in lines}) == 1


def test_compare_listing_store_all_does_not_run_it_twice(client):
    model = transformer()
    rows = client.compare(
        model.graph,
        model.inputs,
        wrt=model.wrt,
        loss=model.loss,
        policies=["sqrt", "store_all", P.StoreAll()],
        repeats=2,
        measure_memory=True,
    )
    assert [row.policy for row in rows] == ["store_all", "sqrt"]
    assert all(row.max_grad_diff == 0.0 and row.measured_peak_bytes > 0 for row in rows)
    assert "measured" in remat.format_table(rows).splitlines()[0]
    with pytest.raises(ValueError, match="repeats"):
        client.compare(model.graph, model.inputs, wrt=model.wrt, loss=model.loss, repeats=0)
    # A policy the server rejects becomes a row with the error; the others still run.
    rows = client.compare(
        model.graph,
        model.inputs,
        wrt=model.wrt,
        loss=model.loss,
        policies=[P.Checkpoints(("nope",)), "sqrt"],
    )
    assert [(row.policy, row.error_code) for row in rows] == [
        ("store_all", ""),
        ("checkpoints(nope)", "INVALID_ARGUMENT"),
        ("sqrt", ""),
    ]
    assert "nope" in rows[1].error and rows[1].peak_bytes == 0 and rows[2].peak_bytes > 0
    assert "INVALID_ARGUMENT" in remat.format_table(rows).splitlines()[2]


def test_max_abs_diff_sees_every_difference():
    from remat_server.engine import max_abs_diff  # the server computes it for Compare

    a = {"w": np.array([1.0, 2.0, np.nan], np.float32)}
    assert max_abs_diff(a, {"w": a["w"].copy()}) == 0.0
    assert max_abs_diff({"w": np.array([1.0, 2.5, np.nan])}, a) == 0.5
    assert max_abs_diff({"w": np.array([1.0, 2.0, 0.0])}, a) == float("inf")
    assert max_abs_diff({}, a) == float("inf")
    infinities = {"w": np.array([np.inf, -np.inf])}
    assert max_abs_diff(infinities, {"w": infinities["w"].copy()}) == 0.0  # equal infinities
    assert max_abs_diff({"w": np.array([np.inf, np.inf])}, infinities) == float("inf")


# --- parse -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("store_all", P.StoreAll()),
        ("recompute_all", P.RecomputeAll()),
        ("sqrt", P.Sqrt()),
        ("  Sqrt ", P.Sqrt()),
        ("recompute-all", P.RecomputeAll()),
        ("every_k:4", P.EveryK(4)),
        ("every_k: 1", P.EveryK(1)),
        ("revolve:3", P.Revolve(3)),
        ("save_ops:matmul", P.SaveOps(("matmul",))),
        ("save_ops:matmul,conv2d", P.SaveOps(("matmul", "conv2d"))),
        ("checkpoints:act3,act7", P.Checkpoints(("act3", "act7"))),
        ("checkpoints: act3 , Act7", P.Checkpoints(("act3", "Act7"))),  # names keep their case
    ],
)
def test_parse(text, expected):
    assert P.parse(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "unknown policy ''"),
        ("telepathy", "unknown policy 'telepathy'; expected one of: store_all"),
        ("every_k", "'every_k' needs a parameter: every_k:K"),
        ("every_k:", "'every_k' needs a parameter"),
        ("every_k:four", "'four' is not an integer"),
        ("every_k:0", "k must be >= 1"),
        ("revolve:2.5", "'2.5' is not an integer"),
        ("revolve:-1", "slots must be >= 1"),
        ("sqrt:3", "'sqrt' takes no parameter"),
        ("save_ops:", "'save_ops' needs a parameter"),
        ("save_ops:matmul,,conv2d", "empty name"),
        ("checkpoints:act3,", "empty name"),
    ],
)
def test_parse_rejects_bad_strings_clearly(text, message):
    with pytest.raises(ValueError, match=message):
        P.parse(text)


def test_labels():
    assert [
        P.label(p)
        for p in (
            P.StoreAll(),
            "sqrt",
            None,
            P.EveryK(4),
            P.Revolve(3),
            P.SaveOps(("matmul", "conv2d")),
            P.Checkpoints(("a", "b")),
        )
    ] == [
        "store_all",
        "sqrt",
        "auto",
        "every_k(4)",
        "revolve(3)",
        "save_ops(matmul,conv2d)",
        "checkpoints(a,b)",
    ]
