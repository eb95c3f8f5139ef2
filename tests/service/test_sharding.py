"""Data-parallel runs (`Client.run(..., shards=N)`): sharded results equal the
unsharded ones, for a mean and a summed loss, a vector-Jacobian product and
per-example outputs; bad sharding arguments are refused before anything is sent; and
a multi-address client spreads the shards over three replicas and survives one of
them dying mid-run.
"""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest
from served import Served

import remat
from remat import sharding, targets

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
    import asyncio

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
        def _with_graph(self, *args, **kwargs):
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


# --- three replicas -----------------------------------------------------------------------------
def connected_to_all(client: remat.Client, replicas: list[Served], timeout: float = 30) -> None:
    """Call until every replica has answered one: round robin only uses connections
    that are up, and a loaded machine may take a while to bring up the third."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client.list_ops()
        if all(answered(r, "ListOps") for r in replicas):
            return
    pytest.fail("the client did not reach every replica")


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


@pytest.fixture()
def replicas():
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        started = list(pool.map(lambda _: Served("--metrics-port", "0"), range(3)))
    try:
        yield started
    finally:
        for replica in started:
            replica.kill()


def slow_regression(batch: int, width: int, layers: int):
    """`layers` tanh layers of width `width` sharing one weight matrix: enough matmul
    work that a shard is still running when the test kills its replica."""
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


def test_shards_spread_over_three_replicas_and_equal_the_single_request(replicas):
    g, values = slow_regression(batch=96, width=32, layers=4)
    address = [replica.target for replica in replicas]
    # Every replica knows the graph, so each shard is one call (a replica that did not
    # would answer NOT_FOUND, and the resend could land on another one).
    for replica in replicas:
        with remat.Client(replica.target, timeout=60) as one:
            one.register(g)
    with remat.Client(address, timeout=60) as client:
        connected_to_all(client, replicas)
        whole = client.run(g, values, wrt=["x", "w"], loss="loss")
        before = [ok_runs(r) for r in replicas]
        for _ in range(2):
            sharded = client.run(
                g,
                values,
                wrt=["x", "w"],
                loss="loss",
                shards=3,
                batch_axes={"x": 0, "y": 0},
                reduction="mean",
            )
            assert_same(sharded, whole)
    served = [ok_runs(r) - b for r, b in zip(replicas, before)]
    assert sum(served) == 6
    assert all(count >= 1 for count in served), served  # round robin reached every replica


def test_a_shard_whose_replica_dies_mid_run_is_retried_on_another(replicas):
    # About a second per shard on one BLAS thread.
    g, values = slow_regression(batch=3 * 512, width=256, layers=120)
    with remat.Client.in_process() as local:
        whole = local.run(g, values, wrt=["w"], loss="loss")
    address = [replica.target for replica in replicas]
    with remat.Client(address, timeout=120) as client:
        connected_to_all(client, replicas)
        client.register(g)
        before = [ok_runs(r) for r in replicas]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                client.run,
                g,
                values,
                wrt=["w"],
                loss="loss",
                shards=3,
                batch_axes={"x": 0, "y": 0},
                reduction="mean",
            )
            victim = busy_replica(replicas, pending)
            victim.kill()
            sharded = pending.result(timeout=120)
    assert_same(sharded, whole)
    survivors = [(r, b) for r, b in zip(replicas, before) if r is not victim]
    # The victim's shard finished on a survivor: all three shards ran OK there.
    assert sum(ok_runs(r) - b for r, b in survivors) == 3


def busy_replica(replicas: list[Served], pending, timeout: float = 60) -> Served:
    """The first replica seen running a shard (an RPC in flight for 0.1 s: a run, not
    the quick NOT_FOUND of a replica that has yet to learn the graph)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pending.done():
        for replica in replicas:
            if replica.inflight() > 0:
                time.sleep(0.1)
                if replica.inflight() > 0:
                    return replica
        time.sleep(0.01)
    pytest.fail("no replica was seen running a shard")
