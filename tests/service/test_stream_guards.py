"""Guards around RunStream and Run that protect the server's threads and bandwidth:
the graph is resolved from the header before any tensor is read, an upload that
stalls is cancelled after --max-upload-seconds, a deadline that passes mid-run is
reported as DEADLINE_EXCEEDED, and request bytes that do not parse are
INVALID_ARGUMENT for every RPC."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from clients import wait_until
from prometheus_client.parser import text_string_to_metric_families
from support import HANG_SECONDS

import remat
from remat import streaming
from remat_proto import chunks
from remat_proto.v1 import executor_pb2, tensor_pb2
from remat_server import ServerConfig, create_server

MiB = 1 << 20
RUN_STREAM = "/remat.v1.Executor/RunStream"
MAX_UPLOAD_SECONDS = 0.5


@pytest.fixture(scope="module")
def served():
    server, port = create_server(
        ServerConfig(host="127.0.0.1", port=0, max_upload_seconds=MAX_UPLOAD_SECONDS)
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, f"127.0.0.1:{port}", channel
    channel.close()
    server.stop(None).wait()


def _run_stream(channel):
    return channel.stream_stream(
        RUN_STREAM,
        request_serializer=chunks.encode,
        response_deserializer=streaming.decode_response,
    )


def _header(ref: executor_pb2.GraphRef, n: int) -> executor_pb2.RunStreamRequest:
    request = executor_pb2.RunRequest(graph=ref)
    x = request.inputs["x"]
    x.dtype, x.shape[:], x.chunked = tensor_pb2.FLOAT32, (n,), True
    return executor_pb2.RunStreamRequest(header=request)


def _double(n: int) -> remat.Graph:
    g = remat.Graph("double")
    g.output("y", g.input("x", (n,)) * 2.0)
    return g


def _runs(server, code: str | None) -> float:
    """Run and RunStream calls that ended with `code` (None: with any code; 16 MiB of
    input streams)."""
    for family in text_string_to_metric_families(server.metrics.exposition().decode()):
        if family.name == "remat_rpc_duration_seconds":
            return sum(
                s.value
                for s in family.samples
                if s.name.endswith("_count")
                and s.labels["method"] in ("Run", "RunStream")
                and code in (None, s.labels["code"])
            )
    return 0.0


def test_an_unknown_graph_id_is_refused_before_the_upload_is_read(served):
    _, _, channel = served
    n_chunks = 256
    pulled = []

    def messages():
        yield _header(executor_pb2.GraphRef(graph_id="f" * 64), n_chunks * MiB // 4)
        for index in range(n_chunks):
            pulled.append(index)
            yield chunks.encode_chunk(tensor_pb2.TensorChunk.INPUT, "x", memoryview(bytes(MiB)))

    with pytest.raises(grpc.RpcError) as caught:
        list(_run_stream(channel)(messages(), timeout=HANG_SECONDS))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert "f" * 64 in caught.value.details()
    assert len(pulled) < n_chunks // 2, "the server read the upload of an unknown graph"


def test_a_stalled_upload_is_cancelled_after_max_upload_seconds(served, caplog):
    server, address, channel = served
    with remat.Client(address) as client:
        graph_id = client.register(_double(MiB // 4))

    over = threading.Event()  # the call is over: the client may stop stalling

    def stalled():
        yield _header(executor_pb2.GraphRef(graph_id=graph_id), MiB // 4)
        over.wait(HANG_SECONDS)  # never sends the data while the call lasts

    ended, cancelled = _runs(server, None), _runs(server, "CANCELLED")
    start = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(_run_stream(channel)(stalled(), timeout=HANG_SECONDS))
        took = time.monotonic() - start
    finally:
        over.set()
    # The server cancelled the upload while the client still stalled, so it did not
    # wait for the upload to end (then it would have answered INVALID_ARGUMENT, short
    # of data), nor for the client's deadline (DEADLINE_EXCEEDED); and not before its
    # --max-upload-seconds (a timer does not fire early). No upper bound on the time:
    # on a loaded machine that would be scheduling luck.
    assert caught.value.code() is grpc.StatusCode.CANCELLED
    assert took >= MAX_UPLOAD_SECONDS
    # The handler notices after the client does: wait until the server has ended it.
    wait_until(lambda: _runs(server, None) > ended, HANG_SECONDS, "the end of the handler")
    # Its metrics say what the client got (not a refusal of the request).
    assert _runs(server, "CANCELLED") == cancelled + 1
    errors = [r for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("remat")]
    assert not errors, "a cancelled upload is the client's doing, not a server error"
    with remat.Client(address) as client:  # and the server still serves
        x = np.arange(MiB, dtype=np.float32)
        np.testing.assert_array_equal(client.run(_double(MiB), {"x": x}).outputs["y"], x * 2)


def test_a_deadline_passing_mid_run_is_deadline_exceeded(served):
    server, address, _ = served
    g = remat.Graph("slow")
    h = g.input("x", (2048, 2048))
    for _ in range(1500):  # several seconds of tanh: never runs to the end here
        h = remat.tanh(h)
    g.output("y", h)
    x = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    with remat.Client(address, retry=remat.retries.NO_RETRY) as client:
        client.register(g)
        before, cancelled = _runs(server, "DEADLINE_EXCEEDED"), _runs(server, "CANCELLED")
        with pytest.raises(remat.DeadlineExceededError):
            client.run(g, {"x": x}, timeout=0.3)
    deadline = time.monotonic() + HANG_SECONDS
    while _runs(server, "DEADLINE_EXCEEDED") == before and time.monotonic() < deadline:
        time.sleep(0.05)  # the server notices between two steps
    assert _runs(server, "DEADLINE_EXCEEDED") == before + 1
    assert _runs(server, "CANCELLED") == cancelled


@pytest.mark.parametrize(
    "method", ["Run", "Plan", "Differentiate", "RegisterGraph", "Compare", "ListOps"]
)
def test_request_bytes_that_do_not_parse_are_invalid_argument(served, method):
    _, _, channel = served
    path = f"/remat.v1.Executor/{method}"
    call = (channel.unary_stream if method == "Compare" else channel.unary_unary)(path)
    with pytest.raises(grpc.RpcError) as caught:
        reply = call(b"\xff\xff\xff", timeout=HANG_SECONDS)
        if method == "Compare":
            list(reply)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid" in caught.value.details() and "Request" in caught.value.details()
