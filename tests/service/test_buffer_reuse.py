"""Memory reused for big tensors, on both sides.

`Client.run(..., out=previous)`: results land in the previous result's arrays where
name, shape and dtype match (no fresh memory), by Run and by RunStream, sync and async;
anything that does not fit gets a new array. The server's RunStream uploads land in
pooled buffers, reused once a run no longer refers to them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import remat

MiB = 1 << 20


def scaled(n: int):
    g = remat.Graph(f"scaled_{n}")
    x = g.input("x", (n,), "float32")
    g.output("y", x * 3.0)
    g.output("loss", remat.sum(x * x))
    return g


@pytest.fixture(scope="module")
def client():
    with remat.Client.in_process() as client:
        yield client


@pytest.mark.parametrize("n", [16, 2 * MiB], ids=["unary", "stream"])
def test_results_are_written_into_the_previous_results_arrays(client, n):
    g = scaled(n)
    first = client.run(g, {"x": np.ones(n, np.float32)}, wrt=["x"], loss="loss")
    x = np.arange(n, dtype=np.float32)
    again = client.run(g, {"x": x}, wrt=["x"], loss="loss", out=first)
    assert again.outputs["y"] is first.outputs["y"]
    assert again.grads["x"] is first.grads["x"]
    np.testing.assert_array_equal(again.outputs["y"], 3 * x)
    np.testing.assert_array_equal(again.grads["x"], 2 * x)
    assert again.outputs["loss"] is first.outputs["loss"]  # 0-d arrays too
    np.testing.assert_allclose(
        again.outputs["loss"], float(np.sum(x.astype(np.float64) ** 2)), rtol=1e-5
    )


def unfit(array: np.ndarray) -> dict[str, np.ndarray]:
    read_only = array.copy()
    read_only.flags.writeable = False
    return {
        "other shape": np.zeros(array.size + 1, array.dtype),
        "other dtype": np.zeros(array.shape, np.float64),
        "read-only": read_only,
        "not contiguous": np.zeros(2 * array.size, array.dtype)[::2],
        "big-endian": np.zeros(array.shape, array.dtype.newbyteorder(">")),
        "not an array": list(array),
    }


@pytest.mark.parametrize("n", [16, 2 * MiB], ids=["unary", "stream"])
@pytest.mark.parametrize("case", list(unfit(np.zeros(1, np.float32))))
def test_arrays_that_do_not_fit_are_left_alone(client, n, case):
    g = scaled(n)
    x = np.arange(n, dtype=np.float32)
    candidate = unfit(np.zeros(n, np.float32))[case]
    before = np.array(candidate, copy=True)
    out = remat.RunResult(outputs={"y": candidate}, grads={}, metrics=remat.Metrics())
    result = client.run(g, {"x": x}, out=out)
    assert result.outputs["y"] is not candidate
    np.testing.assert_array_equal(result.outputs["y"], 3 * x)
    np.testing.assert_array_equal(np.asarray(candidate), before)  # untouched


def test_the_async_client_reuses_arrays_too():
    g = scaled(2 * MiB)
    x = np.arange(2 * MiB, dtype=np.float32)

    async def main():
        async with remat.AsyncClient.in_process() as client:
            first = await client.run(g, {"x": x})
            return first, await client.run(g, {"x": -x}, out=first)

    first, again = asyncio.run(main())
    assert again.outputs["y"] is first.outputs["y"]
    np.testing.assert_array_equal(again.outputs["y"], -3 * x)


def test_a_sharded_run_refuses_out(client):
    with pytest.raises(ValueError, match="out= is not available for a sharded run"):
        client.run(
            scaled(4),
            {"x": np.ones(4, np.float32)},
            shards=2,
            batch_axes={"x": 0},
            reduction="sum",
            out=remat.RunResult({}, {}, remat.Metrics()),
        )


# --- the server's upload buffers ---------------------------------------------------------------
def test_the_server_reuses_upload_buffers_and_results_stay_right():
    """Identity and scaled outputs alias or derive from the upload buffer; each run's
    answer must be its own even though the next upload lands in the same memory."""
    n = 2 * MiB
    g = remat.Graph("alias")
    x = g.input("x", (n,), "float32")
    g.output("same", x)
    g.output("y", x * 2.0)
    with remat.Client.in_process() as client:
        buffers = client._server.buffers
        results = []
        for step in range(4):
            value = np.full(n, step + 1, np.float32)
            results.append(client.run(g, {"x": value}))
        assert buffers.reused >= 3
        for step, result in enumerate(results):
            assert np.all(result.outputs["same"] == step + 1)
            assert np.all(result.outputs["y"] == 2 * (step + 1))
        assert buffers.idle_bytes() >= n * 4  # nothing on the server holds the last one


def test_a_pool_of_zero_bytes_allocates_every_time():
    from remat_server import ServerConfig

    n = 2 * MiB
    with remat.Client.in_process(ServerConfig(buffer_pool_bytes=0)) as client:
        for _ in range(2):
            client.run(scaled(n), {"x": np.ones(n, np.float32)})
        assert client._server.buffers.reused == 0
