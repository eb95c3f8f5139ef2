"""Data-parallel runs (`Client.run(..., shards=N)`): sharded results equal the
unsharded ones, for a mean and a summed loss, a vector-Jacobian product and
per-example outputs; bad sharding arguments are refused before anything is sent; and
a multi-address client places shard i on replica (i + offset) mod R, one shard per
replica, and moves a shard whose replica dies mid-run on to the next one. Nothing
here depends on timing or on the order of round robin.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import time

import grpc
import numpy as np
import pytest
from served import Served

import remat
from remat import calls, retries, sharding, targets

RTOL = 1e-10


def regression(l2: float = 0.01, summed: bool = False):
    """Two-layer tanh regression with a batch dimension of -1: outputs the loss, a
    per-example prediction and a scalar metric."""
    g = remat.Graph("regression")
    x = g.input("x", (-1, 6), "float64")
    y = g.input("y", (-1,), "float64")
    w0, b0 = g.input("w0", (6, 5), "float64"), g.input("b0", (5,), "float64")
    w1 = g.input("w1", (5,), "float64")
    pred = remat.matmul(remat.tanh(remat.matmul(x, w0) + b0), w1)
    error = (pred - y) ** 2
    data = remat.sum(error) if summed else remat.mean(error)
    g.output("loss", data + l2 * remat.sum(w0 * w0))
    g.output("pred", pred)
    g.output("mae", remat.mean(remat.abs(pred - y)))
    return g


def feed(batch: int = 11, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, 6)),
        "y": rng.standard_normal(batch),
        "w0": rng.standard_normal((6, 5)),
        "b0": rng.standard_normal(5),
        "w1": rng.standard_normal(5),
    }


WRT = ["x", "w0", "b0", "w1"]
BATCH_AXES = {"x": 0, "y": 0}


def assert_same(sharded: remat.RunResult, whole: remat.RunResult) -> None:
    assert sharded.outputs.keys() == whole.outputs.keys()
    assert sharded.grads.keys() == whole.grads.keys()
    for kind in ("outputs", "grads"):
        for name, expected in getattr(whole, kind).items():
            np.testing.assert_allclose(
                getattr(sharded, kind)[name],
                expected,
                rtol=RTOL,
                atol=1e-12,
                err_msg=f"{kind}[{name!r}]",
            )


@pytest.fixture(scope="module")
def client():
    with remat.Client.in_process() as client:
        yield client


# --- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shards", [2, 3, 11])
def test_sharded_gradients_equal_the_single_request(client, reduction, shards):
    # A summed loss with an L2 term would count the term once per shard (see the
    # module doc of remat.sharding), so the summed case has none.
    g = regression(l2=0.01 if reduction == "mean" else 0.0, summed=reduction == "sum")
    whole = client.run(g, feed(), wrt=WRT, loss="loss")
    sharded = client.run(
        g,
        feed(),
        wrt=WRT,
        loss="loss",
        shards=shards,
        batch_axes=BATCH_AXES,
        reduction=reduction,
        output_axes={"pred": 0, "mae": "mean"},
    )
    assert_same(sharded, whole)
    assert len(sharded.shards) == shards
    assert sharded.metrics.flops == sum(m.flops for m in sharded.shards)
    assert sharded.metrics.peak_bytes == max(m.peak_bytes for m in sharded.shards)


def test_a_vector_jacobian_product_shards_its_cotangents(client):
    g = regression()
    rng = np.random.default_rng(1)
    cotangents = {"pred": rng.standard_normal(11), "loss": np.array(0.7)}
    whole = client.run(g, feed(), wrt=WRT, cotangents=cotangents, fetch=["pred", "loss"])
    sharded = client.run(
        g,
        feed(),
        wrt=WRT,
        cotangents=cotangents,
        fetch=["pred", "loss"],
        shards=3,
        batch_axes=BATCH_AXES,
        reduction="mean",
        output_axes={"pred": 0},
    )
    assert_same(sharded, whole)


def test_a_negative_batch_axis_counts_from_the_end(client):
    g = remat.Graph("vector")
    x = g.input("x", (-1,), "float64")
    w = g.input("w", (), "float64")
    g.output("loss", remat.mean(remat.tanh(x * w)))
    values = {"x": np.random.default_rng(2).standard_normal(7), "w": np.array(0.5)}
    whole = client.run(g, values, wrt=["x", "w"], loss="loss")
    sharded = client.run(
        g, values, wrt=["x", "w"], loss="loss", shards=2, batch_axes={"x": -1}, reduction="mean"
    )
    assert_same(sharded, whole)


def test_the_async_client_shards_too():
    g = regression()

    async def main():
        async with remat.AsyncClient.in_process() as client:
            whole = await client.run(g, feed(), wrt=WRT, loss="loss", fetch=["loss"])
            sharded = await client.run(
                g,
                feed(),
                wrt=WRT,
                loss="loss",
                fetch=["loss"],
                shards=4,
                batch_axes=BATCH_AXES,
                reduction="mean",
            )
            return whole, sharded

    whole, sharded = asyncio.run(main())
    assert_same(sharded, whole)


# --- refusals, before anything is sent ---------------------------------------------------------
@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(shards=0, batch_axes=BATCH_AXES, reduction="mean"), "positive integer"),
        (dict(shards=2, batch_axes=None, reduction="mean"), "batch_axes"),
        (dict(shards=2, batch_axes=BATCH_AXES, reduction=None), "reduction='mean'"),
        (dict(shards=2, batch_axes=BATCH_AXES, reduction="max"), "reduction='mean'"),
        (dict(shards=2, batch_axes={"z": 0}, reduction="mean"), "'z', which is not an input"),
        (dict(shards=2, batch_axes={"x": 2}, reduction="mean"), "not an axis of input 'x'"),
        (
            dict(shards=2, batch_axes={"x": 0, "w0": 0}, reduction="mean"),
            "input 'w0' declares dimension 0 as 6",
        ),
        (dict(shards=12, batch_axes=BATCH_AXES, reduction="mean"), "more than the batch size 11"),
        (
            dict(shards=2, batch_axes=BATCH_AXES, reduction="mean", output_axes={"nope": 0}),
            "'nope'",
        ),
        (
            dict(shards=2, batch_axes=BATCH_AXES, reduction="mean", output_axes={"loss": 0}),
            "the loss is reduced",
        ),
        (
            dict(shards=2, batch_axes=BATCH_AXES, reduction="mean", output_axes={"mae": "max"}),
            "expected an axis to concatenate along",
        ),
        (dict(shards=2, batch_axes=BATCH_AXES, reduction="mean", timeline=True), "timeline=True"),
    ],
)
def test_bad_sharding_arguments_are_refused_before_sending(arguments, message):
    class Unreachable(remat.Client):
        def _drive(self, *args, **kwargs):
            raise AssertionError("a refused sharded run sent something")

    with Unreachable("127.0.0.1:1") as client, pytest.raises(ValueError, match=message):
        client.run(regression(), feed(), wrt=WRT, loss="loss", **arguments)


def test_batched_inputs_must_agree_on_the_batch_size():
    values = {**feed(), "y": np.zeros(10)}
    with pytest.raises(ValueError, match="disagree on the batch size"):
        sharding.split(
            regression(),
            values,
            shards=2,
            batch_axes=BATCH_AXES,
            reduction="mean",
            loss="loss",
            cotangents=None,
            output_axes=None,
        )


def test_a_per_example_output_must_say_how_it_combines(client):
    with pytest.raises(ValueError, match=r"output 'pred' has shape \(6,\).*output_axes"):
        client.run(
            regression(),
            feed(),
            wrt=WRT,
            loss="loss",
            shards=2,
            batch_axes=BATCH_AXES,
            reduction="mean",
        )


@pytest.mark.parametrize(
    "batch, shards, sizes", [(11, 2, [6, 5]), (11, 3, [4, 4, 3]), (4, 4, [1, 1, 1, 1]), (9, 1, [9])]
)
def test_the_batch_splits_into_near_equal_shards_whose_weights_add_to_one(batch, shards, sizes):
    plan = sharding.split(
        regression(),
        feed(batch),
        shards=shards,
        batch_axes=BATCH_AXES,
        reduction="mean",
        loss="loss",
        cotangents=None,
        output_axes=None,
    )
    assert [s.size for s in plan.shards] == sizes
    assert sum(s.weight for s in plan.shards) == pytest.approx(1.0)
    assert np.array_equal(np.concatenate([s.inputs["x"] for s in plan.shards]), feed(batch)["x"])
    assert all(s.inputs["w0"] is plan.shards[0].inputs["w0"] for s in plan.shards)


# --- targets ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target, expected",
    [
        ("localhost:50051", "localhost:50051"),
        ("dns:///remat-headless:50051", "dns:///remat-headless:50051"),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1"),
        (["10.0.0.1:50051", "10.0.0.2:50051"], "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
        ("10.0.0.1:1, 10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        (["[::1]:1", "[::1]:2"], "ipv6:[::1]:1,[::1]:2"),
        (["localhost:7", "127.0.0.1:7"], "ipv4:127.0.0.1:7"),
    ],
)
def test_channel_targets(target, expected):
    assert targets.channel_target(target) == expected


@pytest.mark.parametrize("target", [[], ["nohost"], ["host:port"], [":50051"]])
def test_bad_targets_are_refused(target):
    with pytest.raises(ValueError):
        targets.channel_target(target)


def test_channels_balance_round_robin_unless_told_otherwise():
    assert targets.balancing_options([]) == [("grpc.service_config", targets.ROUND_ROBIN)]
    assert targets.balancing_options([("grpc.lb_policy_name", "pick_first")]) == []


# --- placement ----------------------------------------------------------------------------------
ADDRESSES = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]


@pytest.mark.parametrize(
    "target, expected",
    [
        (ADDRESSES, ("ipv4:127.0.0.1:1", "ipv4:127.0.0.1:2", "ipv4:127.0.0.1:3")),
        ("127.0.0.1:1,127.0.0.1:2", ("ipv4:127.0.0.1:1", "ipv4:127.0.0.1:2")),
        ("ipv6:[::1]:1,[::1]:2", ("ipv6:[::1]:1", "ipv6:[::1]:2")),
        ("127.0.0.1:1", ()),
        ("127.0.0.1:1,127.0.0.1:1", ()),
        ("dns:///remat-headless:50051", ()),
    ],
)
def test_the_sdk_knows_the_replicas_of_a_list_of_addresses_only(target, expected):
    assert targets.replica_targets(targets.channel_target(target)) == expected


def test_shard_i_goes_to_replica_i_plus_offset_and_the_offset_moves_on():
    with remat.Client(ADDRESSES) as client:
        runs = [[p.replica for p in client._shard_placements(n)] for n in (3, 2, 2, 4)]
    assert runs == [[0, 1, 2], [0, 1], [2, 0], [1, 2, 0, 1]]


def test_without_known_addresses_shards_go_round_robin():
    with remat.Client("dns:///remat-headless:50051") as client:
        assert client._shard_placements(3) == [None, None, None]
        assert client._endpoint(None) is client._main


def test_a_placed_call_moves_on_to_the_next_replica_after_unavailable():
    placement = retries.Placement(replica=2, count=3)
    attempts = retries.Attempts(remat.Retry(attempts=3), None, placement)
    unavailable = grpc.RpcError()
    unavailable.code = lambda: grpc.StatusCode.UNAVAILABLE
    attempts.delay_after(unavailable)
    assert placement.replica == 0
    attempts.delay_after(unavailable)
    assert placement.replica == 1
    with pytest.raises(remat.RematError):  # the attempts are spent: it stays
        attempts.delay_after(unavailable)
    assert placement.replica == 1


def test_replica_channels_open_on_first_use_and_close_with_the_client():
    client = remat.Client(ADDRESSES)
    assert client._replica_endpoints == {}
    placements = client._shard_placements(4)
    endpoints = [client._endpoint(p) for p in placements]
    assert endpoints[0] is endpoints[3] and len({id(e) for e in endpoints}) == 3
    assert client._main not in endpoints and client._endpoint(None) is client._main
    client.close()
    assert client._replica_endpoints == {}
    assert client._endpoint(placements[1]) is client._main  # closed: no new channels


# --- three replicas -----------------------------------------------------------------------------
def answered(replica: Served, *methods: str) -> float:
    """Calls of `methods` the replica answered OK."""
    samples = replica.metrics()
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "remat_rpc_duration_seconds_count"
        and dict(labels).get("code") == "OK"
        and dict(labels).get("method") in methods
    )


def ok_runs(replica: Served) -> float:
    return answered(replica, "Run", "RunStream")


def runs_since(replicas: list[Served], before: list[float], total: int, timeout: float = 60):
    """The runs each replica answered OK since `before`, read once they add up to
    `total`. A replica records a call when its handler has ended, which can be after
    the client got the response: one read could miss the last call."""
    deadline = time.monotonic() + timeout
    while True:
        served = [ok_runs(r) - b for r, b in zip(replicas, before)]
        if sum(served) >= total or time.monotonic() > deadline:
            return served
        time.sleep(0.05)


@pytest.fixture()
def replicas():
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        started = list(pool.map(lambda _: Served("--metrics-port", "0"), range(3)))
    try:
        yield started
    finally:
        for replica in started:
            replica.kill()


def deep_regression(batch: int = 96, width: int = 32, layers: int = 4):
    """`layers` tanh layers of width `width` sharing one weight matrix."""
    g = remat.Graph("deep")
    h = g.input("x", (-1, width), "float64")
    y = g.input("y", (-1, width), "float64")
    w = g.input("w", (width, width), "float64")
    for _ in range(layers):
        h = remat.tanh(remat.matmul(h, w))
    g.output("loss", remat.mean((h - y) ** 2))
    rng = np.random.default_rng(3)
    values = {
        "x": rng.standard_normal((batch, width)),
        "y": rng.standard_normal((batch, width)),
        "w": rng.standard_normal((width, width)) / np.sqrt(width),
    }
    return g, values


SHARDED = dict(wrt=["x", "w"], loss="loss", shards=3, batch_axes={"x": 0, "y": 0}, reduction="mean")


def single_request(g, values) -> remat.RunResult:
    with remat.Client.in_process() as local:
        return local.run(g, values, wrt=SHARDED["wrt"], loss=SHARDED["loss"])


def sharded_runs(client_class, target, g, values, times: int) -> list[remat.RunResult]:
    """`times` sharded runs, one after the other, on a new `client_class` client."""
    if client_class is remat.Client:
        with remat.Client(target, timeout=60) as client:
            return [client.run(g, values, **SHARDED) for _ in range(times)]

    async def main():
        async with remat.AsyncClient(target, timeout=60) as client:
            return [await client.run(g, values, **SHARDED) for _ in range(times)]

    return asyncio.run(main())


@pytest.mark.parametrize("client_class", [remat.Client, remat.AsyncClient])
def test_shards_spread_over_three_replicas_and_equal_the_single_request(replicas, client_class):
    g, values = deep_regression()
    whole = single_request(g, values)
    address = [replica.target for replica in replicas]
    before = [ok_runs(r) for r in replicas]
    # Shard i runs on replica i (the offset starts at 0, and moves on by 3 of 3), the
    # graph going inline to each replica on its first run, by id on the second.
    for sharded in sharded_runs(client_class, address, g, values, times=2):
        assert_same(sharded, whole)
    assert runs_since(replicas, before, total=6) == [2, 2, 2]


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_a_shard_whose_replica_dies_mid_run_is_retried_on_another(replicas):
    g, values = deep_regression()
    whole = single_request(g, values)
    address = [replica.target for replica in replicas]
    victim, survivors = replicas[1], [replicas[0], replicas[2]]
    before = [ok_runs(r) for r in survivors]
    with remat.Client(address, timeout=120) as client:
        # Connected to every replica, each of which knows the graph; the offset is
        # back at 0, so shard 1 goes to the victim.
        client.run(g, values, **SHARDED)
        assert runs_since(survivors, before, total=2) == [1, 1]
        # A stopped replica holds its shard's call unanswered, however long the
        # other shards take: it dies mid-run, without a race against the run. The
        # stop is complete once waitpid reports it: until then, on a loaded machine,
        # its threads may still run (and answer) for a while.
        os.kill(victim.process.pid, signal.SIGSTOP)
        _, status = os.waitpid(victim.process.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.run, g, values, **SHARDED)
            assert runs_since(survivors, before, total=4) == [2, 2]
            assert not pending.done()  # shard 1 is still waiting for the victim
            victim.kill()
            sharded = pending.result(timeout=120)
    assert_same(sharded, whole)
    # Shard 1 failed over to the next replica, replica 2.
    assert runs_since(survivors, before, total=5) == [2, 3]


@pytest.mark.parametrize("client_class", [remat.Client, remat.AsyncClient])
def test_replica_channels_carry_the_clients_token(monkeypatch, client_class):
    from remat_server import ServerConfig

    servers, address = [], []
    for _ in range(2):
        server, target, _ = calls.start_in_process_server(ServerConfig(auth_tokens=("s3cret",)))
        servers.append(server)
        address.append(target)
    g, values = deep_regression(batch=8, width=4, layers=2)
    monkeypatch.setenv("REMAT_TOKEN", "s3cret")
    try:
        # The token is read once, with the client: replica channels opened later, one
        # per shard, carry it too (without it each shard would be UNAUTHENTICATED).
        if client_class is remat.Client:
            with remat.Client(address, timeout=60) as client:
                monkeypatch.delenv("REMAT_TOKEN")
                sharded = client.run(g, values, **{**SHARDED, "shards": 2})
        else:

            async def main():
                async with remat.AsyncClient(address, timeout=60) as client:
                    monkeypatch.delenv("REMAT_TOKEN")
                    return await client.run(g, values, **{**SHARDED, "shards": 2})

            sharded = asyncio.run(main())
    finally:
        for server in servers:
            server.stop(grace=None).wait()
    assert_same(sharded, single_request(g, values))
