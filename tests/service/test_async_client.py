"""remat.AsyncClient against real servers on ephemeral ports: the same answers as the
synchronous Client, big tensors over RunStream, concurrency, errors, graph resending,
retries and cancellation. Each test drives its coroutine with asyncio.run."""
from __future__ import annotations

import asyncio
import doctest
import socket
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

import remat
import remat.aio
from remat import calls
from remat_proto.v1 import executor_pb2
from remat_server import ServerConfig, create_server

POLICIES = ["store_all", "sqrt", "recompute_all", remat.policies.EveryK(2)]
FAST_RETRY = calls.Retry(attempts=30, initial_backoff=0.02, max_backoff=0.1)


@pytest.fixture(scope="module")
def server():
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0))
    server.start()
    server.target = f"127.0.0.1:{port}"
    try:
        yield server
    finally:
        server.stop(grace=None).wait()


@pytest.fixture(scope="module")
def sync_client(server):
    with remat.Client(server.target) as client:
        yield client


def calls(server, method: str, code: str = "OK") -> int:
    """How many `method` RPCs the server has finished with `code`."""
    value = server.metrics.registry.get_sample_value(
        "remat_rpc_duration_seconds_count", {"method": method, "code": code})
    return int(value or 0)


def inflight(server) -> int:
    return int(server.metrics.registry.get_sample_value("remat_inflight_requests"))


def mlp():
    return remat.models.mlp(batch=8, widths=(16, 32, 32, 4))


def doubler(n: int, name: str = "double") -> remat.Graph:
    g = remat.Graph(name)
    x = g.input("x", (n,), "float32")
    g.output("y", x * 2.0)
    return g


# --- parity with the synchronous client ---------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_run_matches_the_sync_client_bit_for_bit(server, sync_client, policy):
    model = mlp()
    expected = sync_client.run(model.graph, model.inputs, wrt=model.wrt, loss=model.loss,
                               policy=policy, timeline=True)

    async def main():
        async with remat.AsyncClient(server.target) as client:
            return await client.run(model.graph, model.inputs, wrt=model.wrt,
                                    loss=model.loss, policy=policy, timeline=True)

    result = asyncio.run(main())
    assert result.outputs.keys() == expected.outputs.keys()
    assert result.grads.keys() == expected.grads.keys() == set(model.wrt)
    for name in expected.outputs:
        np.testing.assert_array_equal(result.outputs[name], expected.outputs[name])
    for name in expected.grads:
        np.testing.assert_array_equal(result.grads[name], expected.grads[name])
        assert result.grads[name].dtype == expected.grads[name].dtype
    assert result.metrics.policy == expected.metrics.policy
    assert result.metrics.peak_bytes == expected.metrics.peak_bytes
    assert result.timeline == expected.timeline


def test_plan_differentiate_register_and_list_ops_match(server, sync_client):
    model = mlp()
    want_plan = sync_client.plan(model.graph, wrt=model.wrt, loss=model.loss, policy="sqrt",
                                 include_schedule=True)
    want_joint = sync_client.differentiate(model.graph, wrt=model.wrt, loss=model.loss)
    want_id = sync_client.register(model.graph)
    want_ops = sync_client.list_ops()

    async def main():
        async with remat.AsyncClient(server.target) as client:
            return (await client.plan(model.graph, wrt=model.wrt, loss=model.loss,
                                      policy="sqrt", include_schedule=True),
                    await client.differentiate(model.graph, wrt=model.wrt, loss=model.loss),
                    await client.register(model.graph), await client.list_ops())

    plan, joint, graph_id, ops = asyncio.run(main())
    for field in ("peak_bytes", "flops", "recompute_flops", "node_evaluations", "timeline",
                  "schedule", "policy", "recomputed_nodes", "input_bytes"):
        assert getattr(plan, field) == getattr(want_plan, field), field
    assert plan.recompute_flops > 0
    assert joint.to_proto() == want_joint.to_proto()
    assert joint.grad_outputs == want_joint.grad_outputs == {
        name: f"grad/{name}" for name in model.wrt}
    assert graph_id == want_id and len(graph_id) == 64
    assert ops == want_ops and {"matmul", "tanh"} <= {op.name for op in ops}


ROW_FIGURES = ("policy", "predicted_peak_bytes", "peak_bytes", "peak_ratio",
               "recompute_flop_share", "max_grad_diff", "flops", "recompute_flops",
               "recomputed_nodes", "timeline", "error")


def figures(row):  # the deterministic part of a row (not its timings)
    return tuple(getattr(row, name) for name in ROW_FIGURES)


def test_compare_and_compare_stream_match_the_sync_client(server, sync_client):
    model = mlp()
    kwargs = dict(wrt=model.wrt, loss=model.loss, policies=["sqrt", "recompute_all"],
                  timeline=True)
    expected = [figures(row) for row in sync_client.compare(model.graph, model.inputs, **kwargs)]

    async def main():
        async with remat.AsyncClient(server.target) as client:
            rows = await client.compare(model.graph, model.inputs, **kwargs)
            streamed = []
            async for row in client.compare_stream(model.graph, model.inputs, **kwargs):
                streamed.append(row)
            return rows, streamed

    rows, streamed = asyncio.run(main())
    assert [row.policy for row in rows] == ["store_all", "sqrt", "recompute_all"]
    assert [figures(row) for row in rows] == expected
    assert [figures(row) for row in streamed] == expected
    assert all(isinstance(row, remat.ComparisonRow) for row in rows + streamed)


def test_compare_stream_yields_rows_as_they_arrive_and_can_stop_early(server):
    model = mlp()

    async def main():
        async with remat.AsyncClient(server.target) as client:
            stream = client.compare_stream(model.graph, model.inputs, wrt=model.wrt,
                                           loss=model.loss, policies=["sqrt", "recompute_all"])
            first = await anext(stream)
            await stream.aclose()  # cancels the rest of the call
            with pytest.raises(ValueError, match="repeats"):
                await client.compare(model.graph, model.inputs, wrt=model.wrt,
                                     loss=model.loss, repeats=0)
            return first

    assert asyncio.run(main()).policy == "store_all"


# --- big tensors over RunStream -------------------------------------------------------------
def test_an_8_mib_input_goes_over_run_stream(server):
    n = (8 << 20) // 4
    values = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    before = calls(server, "RunStream"), calls(server, "Run")

    async def main():
        async with remat.AsyncClient(server.target) as client:
            return await client.run(doubler(n), {"x": values})

    result = asyncio.run(main())
    assert result.outputs["y"].dtype == np.float32 and result.outputs["y"].shape == (n,)
    np.testing.assert_array_equal(result.outputs["y"], values * 2.0)
    assert (calls(server, "RunStream"), calls(server, "Run")) == (before[0] + 1, before[1])


def test_results_too_big_for_one_message_switch_to_run_stream():
    # A 2 MiB message ceiling (chunks are 1 MiB): 16 bytes in, 8 MiB out.
    n = (8 << 20) // 4
    g = remat.Graph("spread")
    x = g.input("x", (4,), "float32")
    g.output("y", remat.broadcast_to(x, (n // 4, 4)) * 3.0)

    async def main():
        async with remat.AsyncClient.in_process(ServerConfig(max_message_bytes=2 << 20)) as client:
            server = client._server
            result = await client.run(g, {"x": np.arange(4, dtype=np.float32)})
            return result, server

    result, server = asyncio.run(main())
    assert result.outputs["y"].shape == (n // 4, 4)
    np.testing.assert_array_equal(result.outputs["y"],
                                  np.broadcast_to(np.arange(4, dtype=np.float32) * 3, (n // 4, 4)))
    # Run was refused with the stream hint before anything ran, then RunStream served it.
    assert calls(server, "Run", "RESOURCE_EXHAUSTED") == 1
    assert calls(server, "RunStream") == 1 and calls(server, "Run") == 0


# --- concurrency and graph ids ------------------------------------------------------------
def test_sixteen_concurrent_runs_are_all_correct_and_register_once(server):
    g = remat.Graph("concurrent")
    x = g.input("x", (64,), "float64")
    w = g.input("w", (64,), "float64")
    g.output("loss", remat.sum(remat.tanh(x * w)))
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal(64), "w": rng.standard_normal(64)} for _ in range(16)]
    registered = calls(server, "RegisterGraph")

    async def main():
        async with remat.AsyncClient(server.target) as client:
            return await asyncio.gather(*(
                client.run(g, feed, wrt=["w"], loss="loss") for feed in feeds))

    results = asyncio.run(main())
    for feed, result in zip(feeds, results):
        t = np.tanh(feed["x"] * feed["w"])
        np.testing.assert_allclose(result.outputs["loss"], t.sum(), rtol=1e-12)
        np.testing.assert_allclose(result.grads["w"], (1 - t * t) * feed["x"], rtol=1e-12)
    assert calls(server, "RegisterGraph") == registered + 1


def test_an_evicted_graph_is_sent_again():
    first, second = doubler(3, "first"), doubler(3, "second")

    async def main():
        # A one-byte cache keeps only the latest graph.
        async with remat.AsyncClient.in_process(ServerConfig(graph_cache_bytes=1)) as client:
            server = client._server
            a = await client.run(first, {"x": [1, 2, 3]})
            await client.register(second)  # evicts `first`
            b = await client.run(first, {"x": [4, 5, 6]})
            return a, b, server

    a, b, server = asyncio.run(main())
    assert a.outputs["y"].tolist() == [2, 4, 6] and b.outputs["y"].tolist() == [8, 10, 12]
    assert calls(server, "Run", "NOT_FOUND") == 1
    assert calls(server, "RegisterGraph") == 2  # first, second; then first goes inline
    assert calls(server, "Run") == 2
    assert len(server.store) == 1  # the inline graph evicted `second` in turn


# --- errors, retries and cancellation -------------------------------------------------------
def test_errors_are_the_sync_clients_remat_exceptions(server, sync_client):
    g = doubler(3, "errors")
    with pytest.raises(remat.InvalidArgumentError) as sync_error:
        sync_client.run(g, {"nope": [1, 2, 3]})

    async def main():
        async with remat.AsyncClient(server.target) as client:
            with pytest.raises(remat.InvalidArgumentError) as error:
                await client.run(g, {"nope": [1, 2, 3]})
            with pytest.raises(remat.InvalidArgumentError):
                await client.plan(g, wrt=["nope"], loss="y")
            return error

    error = asyncio.run(main())
    assert str(error.value) == str(sync_error.value) and "nope" in str(error.value)
    assert error.value.code == "INVALID_ARGUMENT"


class _FlakyExecutor:
    """A stand-in server whose ListOps fails with `code` the first `failures` times."""

    def __init__(self, code: grpc.StatusCode, failures: int):
        self.code, self.failures, self.calls = code, failures, 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(
            self._list_ops, request_deserializer=executor_pb2.ListOpsRequest.FromString,
            response_serializer=executor_pb2.ListOpsResponse.SerializeToString)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "remat.v1.Executor", {"ListOps": handler}),))
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _list_ops(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(self.code, f"failure {self.calls}")
        return executor_pb2.ListOpsResponse()

    def stop(self):
        self.server.stop(grace=None).wait()


def test_unavailable_is_retried_and_invalid_argument_is_not():
    async def list_ops(flaky, **kwargs):
        async with remat.AsyncClient(flaky.target, retry=FAST_RETRY, **kwargs) as client:
            return await client.list_ops()

    flaky = _FlakyExecutor(grpc.StatusCode.UNAVAILABLE, failures=3)
    try:
        assert asyncio.run(list_ops(flaky)) == [] and flaky.calls == 4
    finally:
        flaky.stop()

    invalid = _FlakyExecutor(grpc.StatusCode.INVALID_ARGUMENT, failures=1)
    try:
        with pytest.raises(remat.InvalidArgumentError, match="failure 1"):
            asyncio.run(list_ops(invalid))
        assert invalid.calls == 1
    finally:
        invalid.stop()

    down = _FlakyExecutor(grpc.StatusCode.UNAVAILABLE, failures=10 ** 6)
    try:
        start = time.monotonic()
        with pytest.raises(remat.UnavailableError):  # retries stop at the deadline
            asyncio.run(list_ops(down, timeout=0.3))
        assert time.monotonic() - start < 1.0 and 1 < down.calls < FAST_RETRY.attempts
    finally:
        down.stop()


def test_a_server_that_starts_late_is_reached_by_retrying():
    with socket.socket() as probe:  # a free port, for the server to take in a moment
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    g = doubler(3, "late")

    async def main():
        fast_reconnect = [("grpc.initial_reconnect_backoff_ms", 50),
                          ("grpc.min_reconnect_backoff_ms", 50),
                          ("grpc.max_reconnect_backoff_ms", 100)]
        patient = calls.Retry(attempts=100, initial_backoff=0.02, max_backoff=0.1)
        async with remat.AsyncClient(f"127.0.0.1:{port}", retry=patient, timeout=10,
                                     options=fast_reconnect) as client:
            pending = asyncio.create_task(client.run(g, {"x": [1, 2, 3]}))
            await asyncio.sleep(0.3)
            assert not pending.done()
            server, _ = create_server(ServerConfig(host="127.0.0.1", port=port))
            server.start()
            try:
                return await pending
            finally:
                server.stop(grace=None).wait()

    start = time.monotonic()
    assert asyncio.run(main()).outputs["y"].tolist() == [2, 4, 6]
    assert time.monotonic() - start < 5.0


def heavy_graph(width: int, depth: int = 400) -> remat.Graph:
    """Seconds of work, in steps of a few milliseconds."""
    g = remat.Graph(f"heavy{width}")
    h = g.input("x", (width, width), "float64")
    w = g.input("w", (width, width), "float64")
    for _ in range(depth):
        h = remat.tanh(h @ w)
    g.output("loss", remat.sum(h))
    return g


@pytest.mark.parametrize("width, method", [(256, "Run"), (384, "RunStream")])
def test_cancelling_the_task_cancels_the_call_on_the_server(width, method):
    rng = np.random.default_rng(2)
    values = {"x": rng.standard_normal((width, width)),
              "w": rng.standard_normal((width, width)) / np.sqrt(width)}

    async def main():
        # One worker thread: the quick run below is served only once the slow one ends.
        config = ServerConfig(max_workers=1)
        async with remat.AsyncClient.in_process(config, timeout=30) as client:
            server = client._server
            slow = asyncio.create_task(
                client.run(heavy_graph(width), values, wrt=["w"], loss="loss"))
            # Cancel once the run itself is in flight (its graph registered) and executing.
            while not (calls(server, "RegisterGraph") == 1 and inflight(server) == 1):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            start = time.monotonic()
            quick = await client.run(doubler(2, "quick"), {"x": [1, 2]}, timeout=5)
            return server, quick, time.monotonic() - start

    server, quick, waited = asyncio.run(main())
    assert quick.outputs["y"].tolist() == [2, 4]
    assert waited < 2.0, "the server kept running the cancelled call"
    assert calls(server, method, "CANCELLED") == 1
    assert calls(server, "Run") == 1 and calls(server, "RunStream") == 0  # only the quick run


# --- lifecycle ---------------------------------------------------------------------------
def test_in_process_close_stops_the_server_and_the_loop_is_required():
    async def main():
        client = remat.AsyncClient.in_process()
        ops = await client.list_ops()
        target = client.target
        await client.close()
        async with remat.AsyncClient(target, retry=calls.NO_RETRY, timeout=2) as again:
            with pytest.raises(remat.UnavailableError):
                await again.list_ops()
        return ops

    assert asyncio.run(main())
    with pytest.raises(RuntimeError, match="inside a coroutine"):
        remat.AsyncClient("127.0.0.1:1")


def test_module_doctest():
    assert doctest.testmod(remat.aio).failed == 0



AUTH = ServerConfig(auth_tokens=("s3cret",))


def test_bearer_token_on_unary_calls():
    async def main():
        async with remat.AsyncClient.in_process(AUTH, token="s3cret") as client:
            result = await client.run(doubler(3, "auth"), {"x": [1, 2, 3]})
            async with remat.AsyncClient(client.target, token="") as anonymous:
                with pytest.raises(remat.UnauthenticatedError):
                    await anonymous.list_ops()
            return result

    assert asyncio.run(main()).outputs["y"].tolist() == [2, 4, 6]


def test_bearer_token_on_streaming_calls():
    n = (4 << 20) // 4
    values = np.arange(n, dtype=np.float32)
    model = mlp()

    async def main():
        async with remat.AsyncClient.in_process(AUTH, token="s3cret") as client:
            big = await client.run(doubler(n, "auth-big"), {"x": values})  # RunStream
            rows = await client.compare(model.graph, model.inputs, wrt=model.wrt,
                                        loss=model.loss, policies=["sqrt"])  # server stream
            return big, rows

    big, rows = asyncio.run(main())
    np.testing.assert_array_equal(big.outputs["y"], values * 2)
    assert [row.policy for row in rows] == ["store_all", "sqrt"]
