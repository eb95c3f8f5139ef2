"""Both SDK clients against real servers: each test runs once with remat.Client and
once with remat.AsyncClient (`kind`, `any_client`; both drive the same call flows).
Answers are checked against the server's own (its engine, or the raw RPC), so the
two clients agree with it and with each other: results bit for bit, plans, joint
graphs, comparisons, errors; big tensors over RunStream and the switch to it; bearer
tokens; deadlines; the in-process server's lifecycle. remat.AsyncClient's own
surface (asyncio.gather, task cancellation, async iterators) is in
test_async_client.py."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from unittest import mock

import grpc
import numpy as np
import pytest
from clients import KINDS, Recorder, connect, finished, in_process, serving, wait_until
from served import slow_tanh_graph

import remat
from remat import calls, wire
from remat.errors import from_rpc_error
from remat_proto import wire as proto_wire
from remat_proto.v1 import executor_pb2
from remat_server import Limits, ServerConfig
from remat_server.engine import Engine, RunRequest
from remat_server.runtime import executor

MiB = 1 << 20
POLICIES = ["store_all", "sqrt", "recompute_all", remat.policies.EveryK(2)]
ENGINE = Engine()


def mlp():
    return remat.models.mlp(batch=8, widths=(16, 32, 32, 4))


def doubler(n: int, name: str = "double") -> remat.Graph:
    g = remat.Graph(name)
    x = g.input("x", (n,), "float32")
    g.output("y", x * 2.0)
    return g


def inline(graph: remat.Graph) -> executor_pb2.GraphRef:
    return executor_pb2.GraphRef(graph=graph.to_proto())


# --- the same answers as the server's own ------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_run_returns_the_engines_results_bit_for_bit(any_client, policy):
    model = mlp()
    result = any_client.run(
        model.graph, model.inputs, wrt=model.wrt, loss=model.loss, policy=policy, timeline=True
    )
    expected = ENGINE.run(
        RunRequest(
            model.graph.spec(),
            model.inputs,
            wrt=tuple(model.wrt),
            loss=model.loss,
            policy=policy,
            timeline=True,
        )
    )
    assert result.outputs.keys() == expected.outputs.keys()
    assert result.grads.keys() == expected.grads.keys() == set(model.wrt)
    for name in expected.outputs:
        np.testing.assert_array_equal(result.outputs[name], expected.outputs[name])
        assert result.outputs[name].dtype == expected.outputs[name].dtype
    for name in expected.grads:
        np.testing.assert_array_equal(result.grads[name], expected.grads[name])
        assert result.grads[name].dtype == expected.grads[name].dtype
    for field in (
        "policy",
        "peak_bytes",
        "predicted_peak_bytes",
        "flops",
        "recompute_flops",
        "nodes_computed",
        "recomputed_nodes",
    ):
        assert getattr(result.metrics, field) == getattr(expected.metrics, field), field
    assert result.timeline == expected.timeline and len(result.timeline) > 0


def test_plan_differentiate_register_and_list_ops_match_the_raw_rpcs(any_client, stub):
    model = mlp()
    sqrt = proto_wire.policy_to_proto(remat.policies.Sqrt())
    want_plan = wire.plan_from_proto(
        stub.Plan(
            executor_pb2.PlanRequest(
                graph=inline(model.graph),
                wrt=model.wrt,
                loss=model.loss,
                policy=sqrt,
                include_schedule=True,
            )
        )
    )
    want_joint = stub.Differentiate(
        executor_pb2.DifferentiateRequest(graph=inline(model.graph), wrt=model.wrt, loss=model.loss)
    )
    want_ops = [
        wire.op_info_from_proto(op) for op in stub.ListOps(executor_pb2.ListOpsRequest()).ops
    ]

    plan = any_client.plan(
        model.graph, wrt=model.wrt, loss=model.loss, policy="sqrt", include_schedule=True
    )
    for field in (
        "peak_bytes",
        "flops",
        "recompute_flops",
        "node_evaluations",
        "timeline",
        "schedule",
        "policy",
        "recomputed_nodes",
        "input_bytes",
    ):
        assert getattr(plan, field) == getattr(want_plan, field), field
    assert plan.recompute_flops > 0 and plan.schedule
    joint = any_client.differentiate(model.graph, wrt=model.wrt, loss=model.loss)
    assert joint.to_proto() == want_joint.graph
    assert (
        joint.grad_outputs
        == dict(want_joint.grad_outputs)
        == {name: f"grad/{name}" for name in model.wrt}
    )
    graph_id = any_client.register(model.graph)
    assert (
        graph_id
        == model.graph.graph_id
        == hashlib.sha256(model.graph.to_proto().SerializeToString(deterministic=True)).hexdigest()
    )
    ops = any_client.list_ops()
    assert ops == want_ops and {"matmul", "tanh"} <= {op.name for op in ops}


ROW_FIGURES = (
    "policy",
    "predicted_peak_bytes",
    "peak_bytes",
    "peak_ratio",
    "recompute_flop_share",
    "max_grad_diff",
    "flops",
    "recompute_flops",
    "recomputed_nodes",
    "timeline",
    "error",
)


def figures(row):  # the deterministic part of a row (not its timings)
    return tuple(getattr(row, name) for name in ROW_FIGURES)


def test_compare_and_compare_stream_match_the_raw_rpc(any_client, stub):
    model = mlp()
    kwargs = dict(wrt=model.wrt, loss=model.loss, policies=["sqrt", "recompute_all"], timeline=True)
    rows = calls.rows_decoder()
    expected = [
        figures(rows.send(result))
        for result in stub.Compare(calls.compare_request(model.graph, model.inputs, **kwargs))
    ]
    compared = any_client.compare(model.graph, model.inputs, **kwargs)
    streamed = list(any_client.compare_stream(model.graph, model.inputs, **kwargs))
    assert [row.policy for row in compared] == ["store_all", "sqrt", "recompute_all"]
    assert [figures(row) for row in compared] == expected
    assert [figures(row) for row in streamed] == expected
    assert all(isinstance(row, remat.ComparisonRow) for row in compared + streamed)
    assert all(row.max_grad_diff == 0.0 for row in compared)


def test_closing_compare_stream_early_cancels_the_call(kind):
    """The server holds after the first row until the client goes: closing the stream
    must cancel the call (else the hold ends only after Recorder.HOLD_SECONDS, and the
    call ends OK)."""
    model = mlp()
    with (
        serving(Recorder(hold={"Compare": {1: 1}})) as (server, address),
        connect(kind, address) as client,
    ):
        stream = client.compare_stream(
            model.graph,
            model.inputs,
            wrt=model.wrt,
            loss=model.loss,
            policies=["sqrt", "recompute_all"],
        )
        assert next(stream).policy == "store_all"
        stream.close()
        wait_until(
            lambda: finished(server, "Compare", "CANCELLED") == 1,
            what="the Compare call's cancellation",
        )
        assert finished(server, "Compare") == 0
        with pytest.raises(ValueError, match="repeats"):  # checked before sending
            client.compare(model.graph, model.inputs, wrt=model.wrt, loss=model.loss, repeats=0)
        assert sum(finished(server, "Compare", code) for code in ("OK", "CANCELLED")) == 1


def test_errors_are_remat_exceptions_with_the_servers_message(any_client, stub):
    g = doubler(3, "errors")
    request = executor_pb2.RunRequest(graph=inline(g))
    proto_wire.fill_tensor(request.inputs["nope"], np.array([1.0, 2.0, 3.0], np.float32))
    with pytest.raises(grpc.RpcError) as raw:
        stub.Run(request, timeout=10)
    expected = from_rpc_error(raw.value)

    with pytest.raises(remat.InvalidArgumentError) as error:
        any_client.run(g, {"nope": np.array([1.0, 2.0, 3.0], np.float32)})
    assert type(error.value) is type(expected)
    assert str(error.value) == str(expected) and "'nope'" in str(error.value)
    assert error.value.code == "INVALID_ARGUMENT"
    assert isinstance(error.value, remat.RematError) and isinstance(error.value, ValueError)
    with pytest.raises(remat.InvalidArgumentError, match="'nope'"):
        any_client.plan(g, wrt=["nope"], loss="y")
    with pytest.raises(remat.InvalidArgumentError, match="'nope'"):
        any_client.differentiate(g, wrt=["nope"], loss="y")


def test_the_server_compiles_a_request_once_whether_its_graph_comes_inline_or_by_id(kind):
    """`plan_cached`: False the first time a graph/wrt/loss/fetch/policy combination
    runs, True when repeated, although the first call sent the graph inline and the
    next its id, and for another client (which sends it inline again)."""
    model = mlp()
    args = dict(wrt=model.wrt, loss=model.loss)
    with in_process(kind) as client:

        def cached(**options):
            return client.run(model.graph, model.inputs, **args, **options).metrics.plan_cached

        assert [cached(), cached()] == [False, True]
        assert [cached(policy="sqrt"), cached(policy="sqrt")] == [False, True]
        assert [cached(fetch=["loss"]), cached(fetch=["loss"])] == [False, True]
        assert client.plan(model.graph, **args).plan_cached  # run's plan: the same one
        planned = [
            client.plan(model.graph, policy="recompute_all", **args).plan_cached for _ in range(2)
        ]
        assert planned == [False, True]
        with connect(kind, client.target) as another:
            assert another.run(model.graph, model.inputs, **args).metrics.plan_cached


# What each run measures anew; every other field a plan fixes.
MEASURED = (
    "forward_seconds",
    "backward_seconds",
    "recompute_seconds",
    "plan_seconds",
    "total_seconds",
    "queue_seconds",
    "measured_peak_bytes",
)


@pytest.mark.parametrize("policy", [None, "sqrt", remat.policies.Budget(fraction=0.95)])
def test_a_repeated_run_reports_what_its_first_run_reported(kind, policy):
    """A repeated (cached) Run's response carries the figures the first, compiling, run
    reported (its plan's: peaks, counts, FLOPs, policy, planner report); timings and
    `plan_cached` aside."""
    model = mlp()
    args = dict(wrt=model.wrt, loss=model.loss, policy=policy)
    with in_process(kind) as client:
        first, *again = (client.run(model.graph, model.inputs, **args) for _ in range(3))
    fixed = {name: None for name in MEASURED} | {"plan_cached": None}
    assert not first.metrics.plan_cached and all(r.metrics.plan_cached for r in again)
    for result in again:
        assert replace(result.metrics, **fixed) == replace(first.metrics, **fixed)
        assert result.warnings == first.warnings
        for name, array in first.grads.items():
            np.testing.assert_array_equal(result.grads[name], array)
    assert first.metrics.peak_bytes == first.metrics.predicted_peak_bytes > 0


# --- big tensors -----------------------------------------------------------------------------
def test_an_8_mib_input_goes_over_run_stream(kind):
    n = (8 << 20) // 4
    values = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    with in_process(kind) as client:
        server = client._server
        result = client.run(doubler(n), {"x": values})
        assert (finished(server, "RunStream"), finished(server, "Run")) == (1, 0)
    assert result.outputs["y"].dtype == np.float32 and result.outputs["y"].shape == (n,)
    np.testing.assert_array_equal(result.outputs["y"], values * 2.0)


def test_results_too_big_for_one_message_switch_to_run_stream(kind):
    # A 2 MiB message ceiling (chunks are 1 MiB): 16 bytes in, 8 MiB out.
    n = (8 << 20) // 4
    g = remat.Graph("spread")
    x = g.input("x", (4,), "float32")
    g.output("y", remat.broadcast_to(x, (n // 4, 4)) * 3.0)
    with in_process(kind, ServerConfig(max_message_bytes=2 << 20)) as client:
        server = client._server
        for _ in range(2):  # the first run sends the graph inline, the second its id
            result = client.run(g, {"x": np.arange(4, dtype=np.float32)})
            assert result.outputs["y"].shape == (n // 4, 4)
            np.testing.assert_array_equal(
                result.outputs["y"],
                np.broadcast_to(np.arange(4, dtype=np.float32) * 3, (n // 4, 4)),
            )
        # Run was refused with the stream hint before anything ran, then RunStream
        # served it; each time.
        assert finished(server, "Run", "RESOURCE_EXHAUSTED") == 2
        assert finished(server, "RunStream") == 2 and finished(server, "Run") == 0


STREAM_REFUSALS = {  # refusal -> (server config, client options, the error)
    "unauthenticated": (
        ServerConfig(auth_tokens=("s3cret",)),
        {"token": ""},
        remat.UnauthenticatedError,
    ),
    "over max_request_bytes": (
        ServerConfig(limits=Limits(max_request_bytes=2 * MiB)),
        {},
        remat.ResourceExhaustedError,
    ),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("refusal", STREAM_REFUSALS)
def test_a_run_stream_refused_before_its_upload_reports_the_servers_status(
    kind, refusal, monkeypatch
):
    """The server refuses a 4 MiB upload at its start; the caller gets the server's
    status, every time (the async client races the refusal with its upload)."""
    for variable in ("REMAT_TOKEN", "REMAT_TOKEN_FILE"):
        monkeypatch.delenv(variable, raising=False)
    config, options, error = STREAM_REFUSALS[refusal]
    n = (4 << 20) // 4
    with in_process(kind, config, retry=remat.NO_RETRY, **options) as client:
        for _ in range(20):
            with pytest.raises(error):
                client.run(doubler(n), {"x": np.ones(n, np.float32)}, timeout=30)


# --- tokens ----------------------------------------------------------------------------------
AUTH = ServerConfig(auth_tokens=("s3cret",))


def test_bearer_token_on_unary_and_streaming_calls(kind, monkeypatch):
    for variable in ("REMAT_TOKEN", "REMAT_TOKEN_FILE"):
        monkeypatch.delenv(variable, raising=False)
    n = (4 << 20) // 4
    values = np.arange(n, dtype=np.float32)
    model = mlp()
    with in_process(kind, AUTH, token="s3cret") as client:
        small = client.run(doubler(3, "auth"), {"x": [1, 2, 3]})  # Run
        big = client.run(doubler(n, "auth-big"), {"x": values})  # RunStream
        rows = client.compare(
            model.graph, model.inputs, wrt=model.wrt, loss=model.loss, policies=["sqrt"]
        )  # a server stream
        with connect(kind, client.target, token="") as anonymous:
            with pytest.raises(remat.UnauthenticatedError):
                anonymous.list_ops()
    assert small.outputs["y"].tolist() == [2, 4, 6]
    np.testing.assert_array_equal(big.outputs["y"], values * 2)
    assert [row.policy for row in rows] == ["store_all", "sqrt"]


# --- deadlines -------------------------------------------------------------------------------
SIDE, STEPS = 2048, 4000  # tanh steps on 16 MiB: seconds of work, in steps of a millisecond


def slow_graph() -> remat.Graph:
    return slow_tanh_graph("slow", SIDE, STEPS)


def test_a_deadline_mid_run_ends_the_call_and_the_server_stops_the_run(kind):
    """One worker thread: the quick call after it is served only once the server has
    stopped the slow run (which would otherwise take seconds more than its deadline)."""
    steps = []
    real_run_node = executor._run_node

    def counted(*args):
        steps.append(1)
        return real_run_node(*args)

    slow, feeds = slow_graph(), {"x": np.full((1, SIDE), 0.5, np.float32)}
    with (
        mock.patch.object(executor, "_run_node", counted),
        in_process(kind, ServerConfig(max_workers=1)) as client,
    ):
        server = client._server
        client.plan(slow)  # compiled and cached: the deadline is all execution
        with pytest.raises(remat.DeadlineExceededError):
            client.run(slow, feeds, timeout=0.3)  # a fraction of the run
        wait_until(
            lambda: (
                finished(server, "Run", "DEADLINE_EXCEEDED") + finished(server, "Run", "CANCELLED")
                == 1
            ),
            what="the run's end",
        )
        stopped_after = len(steps)
        quick = client.run(doubler(2, "quick"), {"x": [1, 2]}, timeout=30)
    assert quick.outputs["y"].tolist() == [2, 4]
    assert 0 < stopped_after < STEPS // 2, stopped_after


# --- lifecycle -------------------------------------------------------------------------------
CLOSED_CHANNEL_ERROR = {"sync": ValueError, "async": grpc.aio.UsageError}  # gRPC's own


def test_in_process_client_runs_and_closing_it_stops_its_server(kind):
    g = remat.Graph("tiny")
    x = g.input("x", (3,), "float64")
    g.output("y", remat.exp(x))
    with in_process(kind) as client:
        target = client.target
        np.testing.assert_allclose(
            client.run(g, {"x": [0.0, 1.0, 2.0]}).outputs["y"], np.exp([0.0, 1.0, 2.0]), rtol=1e-15
        )
        assert client.list_ops()
        client.close()
        with pytest.raises(CLOSED_CHANNEL_ERROR[kind]):  # the channel is closed
            client.run(g, {"x": [0.0, 1.0, 2.0]})
    # ... and the in-process server is gone.
    with connect(kind, target, retry=remat.NO_RETRY, timeout=2) as other:
        with pytest.raises((remat.UnavailableError, remat.DeadlineExceededError)):
            other.run(g, {"x": [0.0, 1.0, 2.0]})
