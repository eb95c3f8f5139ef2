"""The SDK's side of RunStream: tensors bigger than one message, in ~1 MiB chunks.

Upload: a header (the RunRequest, big tensors marked `chunked` with no data), then each
big tensor's bytes as TensorChunks, sliced from the caller's array without a
whole-tensor copy. Download: the server's header, then chunks written straight into
arrays allocated once per tensor. Chunks are framed by `remat_proto.chunks`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from remat_proto import chunks, wire
from remat_proto.v1 import executor_pb2, tensor_pb2

CHUNK_BYTES = 1 << 20
INPUT, COTANGENT = tensor_pb2.TensorChunk.INPUT, tensor_pb2.TensorChunk.COTANGENT
OUTPUT, GRAD = tensor_pb2.TensorChunk.OUTPUT, tensor_pb2.TensorChunk.GRAD


def byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without copying."""
    return memoryview(array.reshape(-1).view(np.uint8))


def upload(
    header: executor_pb2.RunRequest,
    chunked: Mapping[tuple[int, str], np.ndarray],
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[executor_pb2.RunStreamRequest]:
    """The messages of one RunStream call; `chunked` maps (role, name) to wire arrays."""
    yield executor_pb2.RunStreamRequest(header=header)
    for (role, name), array in chunked.items():
        data = byte_view(array)
        for start in range(0, len(data), chunk_bytes):
            yield chunks.encode_chunk(role, name, data[start : start + chunk_bytes])


RUN_STREAM = "/" + executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name + "/RunStream"


def run_stream_call(channel):
    """The RunStream multi-callable on `channel` (sync or aio), with the fast chunk
    framing instead of the generated stub's protobuf (de)serializers."""
    return channel.stream_stream(
        RUN_STREAM, request_serializer=chunks.encode, response_deserializer=decode_response
    )


def decode_response(raw: bytes):
    """RunStream's response deserializer (chunks without a copy)."""
    return chunks.decode(raw, executor_pb2.RunStreamResponse)


def _empty_array(tensor: tensor_pb2.Tensor, reuse: np.ndarray | None = None) -> np.ndarray:
    """A writable little-endian array for a chunked tensor's data: `reuse` when it fits
    (see `remat_proto.wire.reusable`), else a new one."""
    dtype = np.dtype(wire.dtype_name(tensor.dtype, "tensor")).newbyteorder("<")
    if wire.reusable(reuse, tuple(tensor.shape), dtype):
        return reuse
    return np.empty(tuple(tensor.shape), dtype=dtype)


def previous(out, role: int, name: str) -> np.ndarray | None:
    """`out`'s array for an output (role OUTPUT) or gradient, if it has one."""
    if out is None:
        return None
    return (out.outputs if role == OUTPUT else out.grads).get(name)


class Download:
    """Assembles RunStream responses: `add` each message, then `finish()` gives the
    RunResponse header and (outputs, grads) as arrays. `out`: a previous RunResult whose
    arrays take the new values where name, shape and dtype match."""

    def __init__(self, out=None):
        self.out = out
        self.header: executor_pb2.RunResponse | None = None
        self.arrays: dict[int, dict[str, np.ndarray]] = {OUTPUT: {}, GRAD: {}}
        self._pending: dict[tuple[int, str], list] = {}  # -> [array, bytes view, received]

    def add(self, message) -> None:
        """`message`: a RunStreamResponse, or a `chunks.Chunk` from the fast path."""
        if isinstance(message, chunks.Chunk):
            chunk = message
        elif message.WhichOneof("part") == "header":
            self._start(message.header)
            return
        else:
            chunk = message.chunk
        entry = self._pending.get((chunk.role, chunk.name))
        if entry is None:
            raise ValueError(f"RunStream: unexpected chunk for '{chunk.name}'")
        array, view, received = entry
        end = received + len(chunk.data)
        if end > len(view):
            raise ValueError(f"RunStream: '{chunk.name}' got more than its {len(view)} bytes")
        view[received:end] = chunk.data
        entry[2] = end

    def _start(self, header: executor_pb2.RunResponse) -> None:
        self.header = header
        for role, tensors in ((OUTPUT, header.outputs), (GRAD, header.grads)):
            for name, tensor in tensors.items():
                reuse = previous(self.out, role, name)
                if tensor.chunked:
                    array = _empty_array(tensor, reuse)
                    self._pending[role, name] = [array, byte_view(array), 0]
                else:
                    self.arrays[role][name] = wire.tensor_to_array(tensor, reuse)

    def finish(self) -> tuple[executor_pb2.RunResponse, dict, dict]:
        if self.header is None:
            raise ValueError("RunStream: the server sent no header")
        for (role, name), (array, view, received) in self._pending.items():
            if received != len(view):
                raise ValueError(f"RunStream: '{name}' ended after {received} of {len(view)} bytes")
            self.arrays[role][name] = array.astype(array.dtype.newbyteorder("="), copy=False)
        return self.header, self.arrays[OUTPUT], self.arrays[GRAD]
