"""What only remat.AsyncClient has: concurrent calls on one event loop
(asyncio.gather), cancelling the awaiting task, `compare_stream` as an async
iterator, and the rule that the client is made inside a coroutine. Each test drives
its coroutine with asyncio.run. The behaviour both clients share (results, graph
ids, retries, deadlines, streaming, errors, tokens, lifecycle) is tested for both in
test_clients.py and test_registry_retry.py."""

from __future__ import annotations

import asyncio
import doctest
from unittest import mock

import numpy as np
import pytest
from clients import Recorder, finished, serving, wait_until

import remat
import remat.aio
from remat_server import ServerConfig
from remat_server.runtime import executor

INLINE, BY_ID = "graph", "graph_id"


def mlp():
    return remat.models.mlp(batch=8, widths=(16, 32, 32, 4))


def doubler(n: int, name: str = "double") -> remat.Graph:
    g = remat.Graph(name)
    x = g.input("x", (n,), "float32")
    g.output("y", x * 2.0)
    return g


def test_sixteen_concurrent_first_runs_are_all_correct_and_send_the_graph_inline():
    """All sixteen start before any has an answer, so none knows the server has the
    graph: each carries it inline (and none needs RegisterGraph); the next run goes by id."""
    g = remat.Graph("concurrent")
    x = g.input("x", (64,), "float64")
    w = g.input("w", (64,), "float64")
    g.output("loss", remat.sum(remat.tanh(x * w)))
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal(64), "w": rng.standard_normal(64)} for _ in range(16)]
    seen = Recorder()

    async def main(address):
        async with remat.AsyncClient(address) as client:
            results = await asyncio.gather(
                *(client.run(g, feed, wrt=["w"], loss="loss") for feed in feeds)
            )
            return results, await client.run(g, feeds[0], wrt=["w"], loss="loss")

    with serving(seen) as (server, address):
        results, again = asyncio.run(main(address))
        assert len(server.store) == 1 and server.store.find(g.graph_id) is not None
    for feed, result in zip(feeds + feeds[:1], results + [again]):
        t = np.tanh(feed["x"] * feed["w"])
        np.testing.assert_allclose(result.outputs["loss"], t.sum(), rtol=1e-12)
        np.testing.assert_allclose(result.grads["w"], (1 - t * t) * feed["x"], rtol=1e-12)
    assert seen.refs("Run") == [INLINE] * 16 + [BY_ID]
    assert seen.counts["RegisterGraph"] == 0


SIDE, STEPS = 2048, 1500  # tanh steps on 16 MiB: seconds of work, in steps of milliseconds


def slow_graph(rows: int) -> remat.Graph:
    g = remat.Graph(f"slow{rows}")
    x = g.input("x", (rows, SIDE))
    h = remat.broadcast_to(remat.sum(x, axis=0, keepdims=True), (SIDE, SIDE))
    for _ in range(STEPS):
        h = remat.tanh(h)
    g.output("s", remat.sum(h))
    return g


# 8 KiB of input goes by Run; 2 MiB by RunStream.
@pytest.mark.parametrize("rows, method", [(1, "Run"), (256, "RunStream")])
def test_cancelling_the_task_cancels_the_call_on_the_server(rows, method):
    """Cancelled once the server has run a few steps: the server records the call as
    CANCELLED and stops the run at its next step, and (one worker thread) serves the
    next call."""
    steps = []
    real_run_node = executor._run_node

    def counted(*args):
        steps.append(1)
        return real_run_node(*args)

    feeds = {"x": np.full((rows, SIDE), 0.5 / rows, np.float32)}

    async def main():
        config = ServerConfig(max_workers=1)
        async with remat.AsyncClient.in_process(config, timeout=30) as client:
            server = client._server
            slow = asyncio.create_task(client.run(slow_graph(rows), feeds))
            deadline = asyncio.get_running_loop().time() + 30
            while len(steps) < 3:  # until it executes (polled; the run takes seconds)
                assert not slow.done() and asyncio.get_running_loop().time() < deadline, slow
                await asyncio.sleep(0.005)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            await asyncio.to_thread(
                wait_until,
                lambda: finished(server, method, "CANCELLED"),
                10,
                "the server's record of the cancellation",
            )
            stopped_after = len(steps)
            quick = await client.run(doubler(2, "quick"), {"x": [1, 2]})
            return server, quick, stopped_after

    with mock.patch.object(executor, "_run_node", counted):
        server, quick, stopped_after = asyncio.run(main())
    assert quick.outputs["y"].tolist() == [2, 4]
    assert stopped_after < STEPS // 2, "the server kept running the cancelled call"
    assert finished(server, method, "CANCELLED") == 1
    assert finished(server, "Run") == 1 and finished(server, "RunStream") == 0  # the quick one


def test_compare_stream_is_an_async_iterator_and_aclose_cancels_the_call():
    model = mlp()
    kwargs = dict(wrt=model.wrt, loss=model.loss, policies=["sqrt", "recompute_all"])

    async def main(address):
        async with remat.AsyncClient(address) as client:
            rows = [row async for row in client.compare_stream(model.graph, model.inputs, **kwargs)]
            stream = client.compare_stream(model.graph, model.inputs, **kwargs)
            first = await anext(stream)
            await stream.aclose()  # cancels the rest of the call
            return rows, first

    # The server holds the second call after its first row until the client goes.
    with serving(Recorder(hold={"Compare": {2: 1}})) as (server, address):
        rows, first = asyncio.run(main(address))
        assert [row.policy for row in rows] == ["store_all", "sqrt", "recompute_all"]
        assert first.policy == "store_all"
        wait_until(
            lambda: finished(server, "Compare", "CANCELLED") == 1,
            what="the second Compare call's cancellation",
        )


def test_the_client_must_be_made_inside_a_coroutine():
    with pytest.raises(RuntimeError, match="inside a coroutine"):
        remat.AsyncClient("127.0.0.1:1")
    with pytest.raises(RuntimeError, match="inside a coroutine"):
        remat.AsyncClient.in_process()


def test_module_doctest():
    assert doctest.testmod(remat.aio).failed == 0
