"""RunStream, the one RPC whose request is a stream: any sequence of messages gets a
clear answer, and an honest chunked upload right after still runs correctly.

* raw: one to four messages of arbitrary bytes, or of valid headers and chunks with
  bytes flipped, cut or inserted (the server's own chunk framing reads these first);
* structured: a header whose tensors are marked chunked (or not) with honest or
  hostile dtypes and shapes, then chunks with any role, name and length, in any
  order, with second headers and chunks before the header.
"""

from __future__ import annotations

import numpy as np
import pytest
from fuzz_support import (
    CALL_TIMEOUT,
    Checkpointed,
    Hostile,
    Tally,
    W,
    X,
    array_of,
    check_answer,
    fuzz_settings,
    hostile,
    mlp_graph,
    tensor,
)
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_bytes import mutated

from remat_proto import chunks
from remat_proto.v1 import executor_pb2, tensor_pb2

INPUT, COTANGENT = tensor_pb2.TensorChunk.INPUT, tensor_pb2.TensorChunk.COTANGENT
ROLES = [INPUT, COTANGENT, tensor_pb2.TensorChunk.OUTPUT, 0, 7, -1]


def _header(chunked: dict) -> executor_pb2.RunRequest:
    """The mlp Run with `chunked` inputs marked chunked and the others inline."""
    request = executor_pb2.RunRequest(
        graph=executor_pb2.GraphRef(graph=mlp_graph()), wrt=["x", "w"], loss="loss"
    )
    for name, array in (("x", X), ("w", W)):
        request.inputs[name].CopyFrom(tensor(array))
        if name in chunked:
            request.inputs[name].ClearField("data")
            request.inputs[name].chunked = True
    return request


def honest_stream(chunk_bytes: int = 16) -> list:
    """x and w both chunked, in small chunks, interleaved."""
    messages = [executor_pb2.RunStreamRequest(header=_header({"x", "w"})).SerializeToString()]
    xs, ws = X.tobytes(), W.tobytes()
    for start in range(0, max(len(xs), len(ws)), chunk_bytes):
        for name, data in (("x", xs), ("w", ws)):
            if start < len(data):
                messages.append(
                    chunks.encode_chunk(INPUT, name, memoryview(data[start : start + chunk_bytes]))
                )
    return messages


def assert_stream_still_works(call) -> None:
    responses = list(call(iter(honest_stream()), timeout=CALL_TIMEOUT))
    header = executor_pb2.RunStreamResponse.FromString(responses[0]).header
    h = X @ W
    np.testing.assert_allclose(array_of(header.outputs["h"]), h, rtol=1e-12)
    np.testing.assert_allclose(array_of(header.grads["x"]), 2 * h @ W.T, rtol=1e-12)


SEED_MESSAGES = honest_stream(chunk_bytes=24)


@st.composite
def raw_streams(draw) -> list[bytes]:
    count = draw(st.integers(0, 4))
    return [
        draw(st.one_of(st.binary(max_size=96), st.sampled_from(SEED_MESSAGES).flatmap(mutated)))
        for _ in range(count)
    ]


def structured_stream(h: Hostile) -> list[bytes]:
    """A header (usually first) and chunks that agree with it, or do not."""
    chunked = {name for name in ("x", "w") if h.chance(0.7)}
    header = _header(chunked)
    for name in chunked:  # sometimes the declared type is hostile
        if h.chance(h.level * 2):
            item = header.inputs[name]
            item.shape[:] = h.shape()
            item.dtype = h.dtype_enum()
        if h.chance(h.level):
            header.inputs[name].data = b"\0" * h.r.randint(1, 9)  # chunked and inline
    if h.chance(h.level):
        header.cotangents[h.pick(["h", "loss", h.name()])].CopyFrom(h.tensor())
        header.cotangents[h.pick(["h", "loss"])].chunked = True
    messages = [executor_pb2.RunStreamRequest(header=header).SerializeToString()]
    data = {"x": X.tobytes(), "w": W.tobytes()}
    for name in sorted(chunked):
        step = h.pick([1, 7, 8, 48, 96, 200])
        for start in range(0, len(data[name]), step):
            messages.append(
                chunks.encode_chunk(INPUT, name, memoryview(data[name][start : start + step]))
            )
    for _ in range(h.r.randint(0, 3) if h.chance(h.level * 3) else 0):  # stray chunks
        role = h.pick(ROLES)
        messages.insert(
            h.r.randint(0, len(messages)),
            executor_pb2.RunStreamRequest(
                chunk=tensor_pb2.TensorChunk(
                    role=role, name=h.pick(["x", "w", h.name()]), data=bytes(h.r.randint(0, 50))
                )
            ).SerializeToString(),
        )
    if h.chance(h.level):
        messages.append(messages[0])  # a second header
    if h.chance(h.level) and len(messages) > 1:
        del messages[h.r.randrange(len(messages))]  # a lost message
    if h.chance(h.level):
        h.r.shuffle(messages)
    return messages


@pytest.fixture(scope="module")
def run_stream(fuzz_channel):
    return fuzz_channel.stream_stream(
        "/remat.v1.Executor/RunStream", request_serializer=None, response_deserializer=None
    )


def test_honest_chunked_upload_runs(run_stream):
    assert_stream_still_works(run_stream)


def test_arbitrary_message_streams_get_a_clear_status(run_stream, fuzz_stub):
    tally, check = Tally(), Checkpointed(fuzz_stub)

    @fuzz_settings("raw_streams")
    @given(messages=raw_streams())
    def fuzz(messages):
        tally.add(
            check_answer(
                lambda m, timeout: run_stream(iter(m), timeout=timeout),
                messages,
                stream=True,
                what="RunStream",
            )
        )
        check.tick()

    fuzz()
    assert_stream_still_works(run_stream)
    print(tally.codes)


def test_hostile_chunked_uploads_get_a_clear_status(run_stream, fuzz_stub):
    tally, check = Tally(), Checkpointed(fuzz_stub)

    @fuzz_settings("hostile_streams")
    @given(h=hostile)
    def fuzz(h):
        messages = structured_stream(h)
        tally.add(
            check_answer(
                lambda m, timeout: run_stream(iter(m), timeout=timeout),
                messages,
                stream=True,
                what="RunStream",
            )
        )
        check.tick()

    fuzz()
    assert_stream_still_works(run_stream)
    print(tally.codes)
