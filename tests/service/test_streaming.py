"""RunStream: tensors bigger than one message travel in chunks, both ways.

Through the SDK (which picks the stream by itself) the results must equal NumPy's
exactly; through a raw multi-callable, every malformed stream must be refused with
the right status and a message naming what is wrong, before anything is allocated,
and the server must keep serving.
"""

from __future__ import annotations

import math
import time

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import HANG_SECONDS

import remat
from remat import calls, streaming
from remat_proto import chunks, metadata
from remat_proto.v1 import executor_pb2, executor_pb2_grpc, tensor_pb2
from remat_server import Limits, ServerConfig, create_server
from remat_server.service import streaming as server_streaming

MiB = 1 << 20
MESSAGE_BYTES = 8 * MiB  # small, so that results of 16 MiB cannot go in one Run response
LIMITS = Limits(max_dim=1 << 40, max_elements=1 << 40, max_request_bytes=256 * MiB)
INPUT, COTANGENT = tensor_pb2.TensorChunk.INPUT, tensor_pb2.TensorChunk.COTANGENT
OUTPUT, GRAD = tensor_pb2.TensorChunk.OUTPUT, tensor_pb2.TensorChunk.GRAD
RUN_STREAM = "/remat.v1.Executor/RunStream"


def _start(**config):
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0, **config))
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served():
    """(server, address) with small messages and limits that let huge shapes through
    the per-tensor checks (so the per-request byte limit is what refuses them)."""
    server, address = _start(max_message_bytes=MESSAGE_BYTES, limits=LIMITS)
    yield server, address
    server.stop(None).wait()


@pytest.fixture(scope="module")
def client(served):
    with remat.Client(served[1], max_message_bytes=MESSAGE_BYTES) as c:
        yield c


@pytest.fixture(scope="module")
def channel(served):
    ch = grpc.insecure_channel(
        served[1],
        options=[
            ("grpc.max_receive_message_length", MESSAGE_BYTES),
            ("grpc.max_send_message_length", MESSAGE_BYTES),
        ],
    )
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def run_stream(channel):
    """RunStream as a raw multi-callable: any message or raw bytes may be sent."""
    return channel.stream_stream(
        RUN_STREAM,
        request_serializer=chunks.encode,
        response_deserializer=streaming.decode_response,
    )


def _rpc_count(server, method: str, code: str) -> float:
    text = server.metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "remat_rpc_duration_seconds_count" and sample.labels == {
                "method": method,
                "code": code,
            }:
                return sample.value
    return 0.0


def _ints(rng, shape, dtype):
    """Small integers, so every sum and product is exact in any order, in any dtype."""
    return rng.integers(-4, 5, size=shape).astype(dtype)


def _check_serving(client):
    g = remat.Graph("alive")
    x = g.input("x", (3,), dtype="float64")
    g.output("loss", remat.sum(x * x))
    result = client.run(g, {"x": np.array([1.0, 2.0, 3.0])}, wrt=["x"], loss="loss")
    assert result.grads["x"].tolist() == [2.0, 4.0, 6.0]


# --- through the SDK ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "bool"])
def test_round_trip_each_dtype(client, served, dtype):
    server, _ = served
    before = _rpc_count(server, "RunStream", "OK")
    rng = np.random.default_rng(1)
    # About 5 MiB in every dtype (over the streaming threshold), an odd number of elements.
    shape = (7, 5 * MiB // np.dtype(dtype).itemsize // 7 + 1)
    if dtype == "bool":
        x = rng.random(shape) < 0.5
    else:
        x = (
            rng.standard_normal(shape).astype(dtype)
            if "float" in dtype
            else rng.integers(-1000, 1000, size=shape).astype(dtype)
        )
    g = remat.Graph(f"round_trip_{dtype}")
    node = g.input("x", shape, dtype=dtype)
    g.output("same", node)
    g.output("f", remat.eq(node, False) if dtype == "bool" else node * 3 + 1)
    result = client.run(g, {"x": x})
    expected = ~x if dtype == "bool" else x * np.array(3, dtype) + np.array(1, dtype)
    for name, want in (("same", x), ("f", expected)):
        got = result.outputs[name]
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want), name
        assert got.flags.writeable and got.dtype.isnative
    assert _rpc_count(server, "RunStream", "OK") == before + 1  # it did go by the stream


def test_big_inputs_mixed_with_scalars_and_empty_tensors_and_chunked_gradients(client):
    rng = np.random.default_rng(2)
    a, b = _ints(rng, (1024, 1024), "float32"), _ints(rng, (1024, 1024), "float32")
    s = np.array(3.0, dtype=np.float32)  # 0-d
    e = np.zeros((0, 7), dtype=np.float32)  # empty
    g = remat.Graph("mixed")
    A, B = g.input("a", a.shape), g.input("b", b.shape)
    S, E = g.input("s", ()), g.input("e", e.shape)
    y = g.output("y", A * B * S)
    g.output("e2", E * 2)
    g.output("s2", S * S)
    g.output("loss", remat.sum(y) + remat.sum(E))
    result = client.run(g, {"a": a, "b": b, "s": s, "e": e}, wrt=["a", "b", "s", "e"], loss="loss")
    assert np.array_equal(result.outputs["y"], a * b * s)
    assert result.outputs["e2"].shape == (0, 7)
    assert result.outputs["s2"].shape == () and result.outputs["s2"] == 9.0
    assert result.outputs["loss"] == np.sum(a * b * s)
    grads = result.grads
    assert np.array_equal(grads["a"], b * s) and np.array_equal(grads["b"], a * s)
    assert grads["s"].shape == () and grads["s"] == np.sum(a * b)
    assert grads["e"].shape == (0, 7) and grads["e"].dtype == np.float32


def test_vector_jacobian_run_with_big_cotangents(client):
    rng = np.random.default_rng(3)
    a, b = _ints(rng, (768, 1024), "float64"), _ints(rng, (768, 1024), "float64")
    dy, dz = _ints(rng, a.shape, "float64"), _ints(rng, a.shape, "float64")
    c = np.array(2.0)
    g = remat.Graph("vjp")
    A, B, C = (
        g.input("a", a.shape, "float64"),
        g.input("b", b.shape, "float64"),
        g.input("c", (), "float64"),
    )
    g.output("y", A * B)
    g.output("z", A + B * C)
    result = client.run(
        g, {"a": a, "b": b, "c": c}, wrt=["a", "b", "c"], cotangents={"y": dy, "z": dz}
    )
    assert np.array_equal(result.outputs["y"], a * b)
    assert np.array_equal(result.outputs["z"], a + b * c)
    assert np.array_equal(result.grads["a"], dy * b + dz)
    assert np.array_equal(result.grads["b"], dy * a + dz * c)
    assert result.grads["c"] == np.sum(dz * b)


def test_only_the_output_is_big_run_is_refused_and_the_sdk_streams(client, served):
    """A tiny input broadcast to a 16 MiB output: Run is refused before running, with
    the stream hint, and the SDK resends on RunStream."""
    server, _ = served
    refused = _rpc_count(server, "Run", "RESOURCE_EXHAUSTED")
    streamed = _rpc_count(server, "RunStream", "OK")
    x = np.arange(1024, dtype=np.float32)
    g = remat.Graph("broadcast")
    X = g.input("x", (1, 1024))
    big = g.output("big", remat.broadcast_to(X, (4096, 1024)) * 2)
    g.output("loss", remat.sum(big))
    result = client.run(g, {"x": x[None]}, wrt=["x"], loss="loss")
    assert np.array_equal(result.outputs["big"], np.broadcast_to(x * 2, (4096, 1024)))
    assert np.array_equal(result.grads["x"], np.full((1, 1024), 2 * 4096, np.float32))
    assert _rpc_count(server, "Run", "RESOURCE_EXHAUSTED") == refused + 1
    assert _rpc_count(server, "RunStream", "OK") == streamed + 1

    # The refusal itself, as a raw client sees it: the status, the flag and the hint.
    stub = executor_pb2_grpc.ExecutorStub(grpc.insecure_channel(served[1]))
    request, _ = calls.run_request(
        executor_pb2.GraphRef(graph=g.to_proto()), g, {"x": x[None]}, stream=False
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.Run(request, timeout=HANG_SECONDS)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "RunStream" in caught.value.details()
    assert (metadata.USE_STREAM, "1") in tuple(caught.value.trailing_metadata())


def test_many_medium_tensors_keep_every_message_small(client):
    """Twelve inputs and twelve outputs of exactly 1 MiB each: none is bigger than a
    chunk, but together (12 MiB) they are over the 8 MiB message limit; the headers
    must not carry them all inline (regression: both sides did)."""
    count, n = 12, MiB // 4
    g = remat.Graph("medium")
    inputs = {}
    for i in range(count):
        node = g.input(f"x{i}", (n,))
        g.output(f"y{i}", node * 2)
        inputs[f"x{i}"] = np.full(n, i, dtype=np.float32)
    tiny = g.input("t", (1,))
    for i in range(count):  # outputs only: broadcast from one number
        g.output(f"b{i}", remat.broadcast_to(tiny, (n,)) * (i + 1))
    inputs["t"] = np.ones(1, dtype=np.float32)
    result = client.run(g, inputs)
    for i in range(count):
        assert np.array_equal(result.outputs[f"y{i}"], inputs[f"x{i}"] * 2)
        assert np.array_equal(result.outputs[f"b{i}"], np.full(n, i + 1, np.float32))
    # The headers themselves: inline tensors total at most one chunk.
    request, chunked = calls.run_request(
        executor_pb2.GraphRef(graph_id="id"), g, inputs, stream=True
    )
    assert request.ByteSize() < MiB + 4096 and len(chunked) >= count - 1
    header, *_ = server_streaming.send(executor_pb2.RunResponse(), result.outputs, {}, MiB)
    assert header.ByteSize() < MiB + 4096


def test_server_chunk_size_is_honoured_even_when_it_does_not_divide_the_tensor():
    """stream_chunk_bytes = 100,003 (odd: chunks end mid-element): the server's chunks
    are all that size but the last; uploads in odd chunks (65,537) assemble too."""
    chunk = 100_003
    server, address = _start(stream_chunk_bytes=chunk, limits=LIMITS)
    try:
        rng = np.random.default_rng(4)
        x = rng.standard_normal((700, 1001))  # 5,605,600 bytes: not a multiple of `chunk`
        g = remat.Graph("odd")
        X = g.input("x", x.shape, "float64")
        g.output("y", X * 2)
        g.output("small", remat.sum(X * X))
        g.output("loss", remat.sum(X * 3))
        request, big = calls.run_request(
            executor_pb2.GraphRef(graph=g.to_proto()),
            g,
            {"x": x},
            wrt=["x"],
            loss="loss",
            stream=True,
            chunk_bytes=65_537,
        )
        assert list(big) == [(INPUT, "x")]
        with grpc.insecure_channel(address) as channel:
            call = channel.stream_stream(
                RUN_STREAM,
                request_serializer=chunks.encode,
                response_deserializer=streaming.decode_response,
            )
            messages = list(
                call(streaming.upload(request, big, chunk_bytes=65_537), timeout=HANG_SECONDS)
            )
        header, *rest = messages
        assert header.WhichOneof("part") == "header"
        assert header.header.outputs["y"].chunked and header.header.grads["x"].chunked
        assert not header.header.outputs["small"].chunked  # 8 bytes: inline
        sizes = {}
        for message in rest:
            assert isinstance(message, chunks.Chunk)  # the fast path read every chunk
            sizes.setdefault((message.role, message.name), []).append(len(message.data))
        for key in [(OUTPUT, "y"), (GRAD, "x")]:
            full, last = divmod(x.nbytes, chunk)
            assert sizes[key] == [chunk] * full + [last], key
        assert set(sizes) == {(OUTPUT, "y"), (GRAD, "x")}
        download = streaming.Download()
        for message in messages:
            download.add(message)
        _, outputs, grads = download.finish()
        assert np.array_equal(outputs["y"], x * 2)
        assert np.array_equal(grads["x"], np.full_like(x, 3.0))
        # And the SDK against that server.
        with remat.Client(address) as sdk:
            result = sdk.run(g, {"x": x}, wrt=["x"], loss="loss")
        assert np.array_equal(result.outputs["y"], x * 2)
        assert np.array_equal(result.grads["x"], np.full_like(x, 3.0))
    finally:
        server.stop(None).wait()


# --- hostile streams ------------------------------------------------------------------------
def _graph():
    g = remat.Graph("target")
    x = g.input("x", (1024,))
    c = g.input("c", (4,))
    g.output("y", x * 2)
    g.output("z", c + 1)
    return g


def _header(*, chunked=("x",), inline_data=b"", shape=None, **tensors):
    """A RunStream header for `_graph()`: the inputs in `chunked` (x by default) and
    the extra `tensors` declared chunked; the others inline."""
    g = _graph()
    request = executor_pb2.RunRequest(graph=executor_pb2.GraphRef(graph=g.to_proto()))
    x = request.inputs["x"]
    x.dtype, x.shape[:] = tensor_pb2.FLOAT32, shape or (1024,)
    x.chunked = "x" in chunked
    if inline_data or not x.chunked:
        x.data = inline_data or bytes(4096)
    c = request.inputs["c"]
    c.dtype, c.shape[:] = tensor_pb2.FLOAT32, (4,)
    if "c" in chunked:
        c.chunked = True
    else:
        c.data = bytes(16)
    for name, (dtype, shape) in tensors.items():
        extra = request.inputs[name]
        extra.dtype, extra.shape[:], extra.chunked = dtype, shape, True
    return executor_pb2.RunStreamRequest(header=request)


def _chunk(name="x", nbytes=4096, role=INPUT):
    return chunks.encode_chunk(role, name, memoryview(bytes(nbytes)))


HOSTILE = {
    "chunk before the header": (
        [_chunk(), _header()],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["first message", "header"],
    ),
    "two headers": ([_header(), _header(), _chunk()], grpc.StatusCode.INVALID_ARGUMENT, ["header"]),
    "no header at all": ([], grpc.StatusCode.INVALID_ARGUMENT, ["header"]),
    "chunk for an unknown name": (
        [_header(), _chunk("nope")],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'nope'", "chunked"],
    ),
    "chunk with the wrong role": (
        [_header(), _chunk(role=COTANGENT)],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["cotangent 'x'"],
    ),
    "chunk for a tensor not marked chunked": (
        [_header(chunked=()), _chunk()],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'x'", "chunked"],
    ),
    "chunk for an inline tensor": (
        [_header(), _chunk(), _chunk("c", 16)],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'c'", "chunked"],
    ),
    "more bytes than declared": (
        [_header(), _chunk(nbytes=4000), _chunk(nbytes=97)],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'x'", "4096 bytes"],
    ),
    "fewer bytes (the stream ends early)": (
        [_header(), _chunk(nbytes=4000)],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'x'", "4,000 of its 4,096 bytes"],
    ),
    "no chunk at all": (
        [_header()],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'x'", "0 of its 4,096"],
    ),
    "chunked tensor with inline data": (
        [_header(inline_data=bytes(4096)), _chunk()],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'x'", "inline data"],
    ),
    "chunked tensor over max_elements": (
        [_header(shape=(1 << 20, 1 << 20, 2))],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'x'", "--max-elements"],
    ),
    "chunked tensor with a negative dimension": (
        [_header(shape=(-1,))],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'x'", "negative"],
    ),
    "chunked tensor with an unknown dtype": (
        [_header(w=(99, (4,)))],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'w'", "dtype"],
    ),
    "garbage bytes as the first message": (
        [b"\xff\xfe\xfd"],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["message 0", "RunStreamRequest"],
    ),
    "garbage bytes after the header": (
        [_header(), b"\x12\x05\x1a\x09ab"],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["message 1", "RunStreamRequest"],
    ),
    "chunk for a tensor of a graph input it does not declare": (
        [_header(w=(tensor_pb2.FLOAT32, (4,))), _chunk(), _chunk("w", 16)],
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'w'"],
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_stream_is_refused_and_the_server_keeps_serving(run_stream, client, case):
    messages, code, fragments = HOSTILE[case]
    with pytest.raises(grpc.RpcError) as caught:
        list(run_stream(iter(messages), timeout=HANG_SECONDS))
    assert caught.value.code() == code, caught.value.details()
    for fragment in fragments:
        assert fragment in caught.value.details()
    _check_serving(client)


def test_a_valid_hand_built_stream_is_accepted(run_stream):
    """The control for the hostile cases: the same kind of messages, well formed;
    chunks of two tensors interleaved, uneven and empty chunks, protobuf-serialized
    chunks mixed with fast-framed ones."""
    x, c = np.arange(1024, dtype=np.float32), np.array([1, 2, 3, 4], dtype=np.float32)
    xd, cd = memoryview(x.view(np.uint8)), memoryview(c.view(np.uint8))
    messages = [
        _header(chunked=("x", "c")),
        chunks.encode_chunk(INPUT, "x", xd[:1000]),
        chunks.encode_chunk(INPUT, "c", cd[:5]),
        chunks.encode_chunk(INPUT, "x", xd[1000:1000]),  # empty chunks are fine
        executor_pb2.RunStreamRequest(
            chunk=tensor_pb2.TensorChunk(role=INPUT, name="x", data=bytes(xd[1000:3001]))
        ),
        chunks.encode_chunk(INPUT, "c", cd[5:]),
        chunks.encode_chunk(INPUT, "x", xd[3001:]),
    ]
    download = streaming.Download()
    for message in run_stream(iter(messages), timeout=HANG_SECONDS):
        download.add(message)
    _, outputs, _ = download.finish()
    assert np.array_equal(outputs["y"], x * 2)
    assert np.array_equal(outputs["z"], c + 1)


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize(
    "shapes",
    [
        {"x": (1 << 38,)},  # one tensor of 1 TiB
        {"x": (1024,), "w": (40 * MiB,), "v": (30 * MiB,)},  # each fits; together 280 MiB do not
    ],
    ids=["one-tebibyte-tensor", "sum-over-the-limit"],
)
def test_declared_total_over_max_request_bytes_is_refused_before_allocating(
    run_stream, client, monkeypatch, shapes
):
    allocated = []

    class CountingBuffer(server_streaming._Buffer):
        def __init__(self, *args):
            allocated.append(args)
            super().__init__(*args)

    monkeypatch.setattr(server_streaming, "_Buffer", CountingBuffer)
    extra = {name: (tensor_pb2.FLOAT32, shape) for name, shape in shapes.items() if name != "x"}
    header = _header(shape=shapes["x"], **extra)
    total = sum(4 * math.prod(shape) for shape in shapes.values())
    rss = _rss_bytes()
    # Chunks follow the header, as a real client would send them, but are never read.
    with pytest.raises(grpc.RpcError) as caught:
        list(run_stream(iter([header, _chunk()]), timeout=HANG_SECONDS))
    # Refused from the declared sizes, before any buffer was made: `allocated` shows it
    # (not a wall-clock bound, which on a loaded machine is scheduling luck).
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = caught.value.details()
    assert "--max-request-bytes" in details and f"{total:,}" in details
    assert allocated == []
    assert _rss_bytes() - rss < 64 * MiB
    _check_serving(client)


def test_chunked_flag_in_unary_run_is_invalid(channel, client):
    stub = executor_pb2_grpc.ExecutorStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Run(_header().header, timeout=HANG_SECONDS)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x'" in caught.value.details()
    assert "RunStream" in caught.value.details()
    _check_serving(client)


def test_client_rejects_a_hostile_download():
    """The SDK's Download checks what the server sends, too."""
    header = executor_pb2.RunStreamResponse(header=executor_pb2.RunResponse())
    y = header.header.outputs["y"]
    y.dtype, y.shape[:], y.chunked = tensor_pb2.FLOAT32, (4,), True
    cases = {
        "unexpected chunk for 'z'": [
            header,
            chunks.decode(
                chunks.encode_chunk(OUTPUT, "z", memoryview(bytes(4))),
                executor_pb2.RunStreamResponse,
            ),
        ],
        "'y' got more than its 16 bytes": [
            header,
            chunks.decode(
                chunks.encode_chunk(OUTPUT, "y", memoryview(bytes(20))),
                executor_pb2.RunStreamResponse,
            ),
        ],
        "'y' ended after 8 of 16 bytes": [
            header,
            executor_pb2.RunStreamResponse(
                chunk=tensor_pb2.TensorChunk(role=OUTPUT, name="y", data=bytes(8))
            ),
        ],
        "no header": [],
    }
    for message, sequence in cases.items():
        download = streaming.Download()
        with pytest.raises(ValueError, match=message):
            for item in sequence:
                download.add(item)
            download.finish()


# --- one gibibyte ---------------------------------------------------------------------------
@pytest.mark.slow
def test_one_gibibyte_round_trip():
    """2**28 float32 (1 GiB) up, y = x * 2 (1 GiB) down, checked element for element."""
    n, block = 1 << 28, 1 << 24
    server, address = _start(limits=Limits(max_elements=1 << 28, max_request_bytes=4 << 30))
    try:
        rng = np.random.default_rng(5)
        x = np.empty(n, dtype=np.float32)
        for start in range(0, n, block):
            x[start : start + block] = rng.random(block, dtype=np.float32)
        g = remat.Graph("gibibyte")
        g.output("y", g.input("x", (n,)) * 2)
        began = time.perf_counter()
        with remat.Client(address) as client:
            y = client.run(g, {"x": x}).outputs["y"]
        seconds = time.perf_counter() - began
        assert y.shape == (n,) and y.dtype == np.float32
        for start in range(0, n, block):
            assert np.array_equal(y[start : start + block], x[start : start + block] * 2), start
        print(f"1 GiB round trip: {seconds:.1f} s")
    finally:
        server.stop(None).wait()
