"""RunStream: tensors bigger than one message, in ~1 MiB chunks.

Upload: the first message is a header (a RunRequest whose big tensors carry dtype and
shape, `chunked` set and no data); then TensorChunks fill them, each tensor's chunks in
order. Every size is checked against the limits, and the request's total against
`max_request_bytes`, before a byte is allocated; a tensor's buffer is allocated once
and chunks are copied straight into it.

Download: a header (a RunResponse whose big tensors are `chunked`), then their chunks,
cut from the result arrays without a whole-tensor copy. Chunks are framed by
`remat.chunks` (one copy per byte each way instead of three).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

from remat_proto import chunks, dtypes
from remat_proto.v1 import executor_pb2, tensor_pb2

from ..errors import InvalidArgument, ResourceExhausted
from ..graph.limits import Limits
from . import codec
from .interceptors import Malformed, tolerant_deserializer

INPUT, COTANGENT = tensor_pb2.TensorChunk.INPUT, tensor_pb2.TensorChunk.COTANGENT
OUTPUT, GRAD = tensor_pb2.TensorChunk.OUTPUT, tensor_pb2.TensorChunk.GRAD
_ROLE_NAMES = {INPUT: "input", COTANGENT: "cotangent", OUTPUT: "output", GRAD: "gradient"}


class _Buffer:
    """One chunked tensor being received: its array and how many bytes have arrived."""

    def __init__(self, array: np.ndarray, nbytes: int, what: str):
        self.array = array
        self.view = memoryview(self.array.reshape(-1).view(np.uint8))
        self.nbytes, self.received, self.what = nbytes, 0, what

    def write(self, data: bytes) -> None:
        end = self.received + len(data)
        if end > self.nbytes:
            raise InvalidArgument(f"{self.what}: chunks carry more than its {self.nbytes} bytes")
        self.view[self.received : end] = data
        self.received = end


class Upload:
    """Assembles one RunStream request: `Upload(header, limits)`, `add(chunk)` for each
    chunk, then `finish()` for the inputs and cotangents as arrays. Buffers come from
    `pool` when given (a `remat_server.buffers.BufferPool`)."""

    def __init__(self, header: executor_pb2.RunRequest, limits: Limits, pool=None):
        self.header = header
        self.arrays: dict[int, dict[str, np.ndarray]] = {INPUT: {}, COTANGENT: {}}
        self._pending: dict[tuple[int, str], _Buffer] = {}
        chunked_total, chunked = 0, []
        for role, tensors in ((INPUT, header.inputs), (COTANGENT, header.cotangents)):
            for name, tensor in tensors.items():
                what = f"{_ROLE_NAMES[role]} '{name}'"
                if not tensor.chunked:
                    self.arrays[role][name] = codec.tensor_to_array(tensor, limits, what)
                    continue
                if tensor.data:
                    raise InvalidArgument(f"{what}: marked chunked but carries inline data")
                dtype, shape, nbytes = codec.tensor_type(tensor, limits, what)
                chunked_total += nbytes
                chunked.append((role, name, dtype, shape, nbytes, what))
        if chunked_total > limits.max_request_bytes:
            raise ResourceExhausted(
                f"the request's chunked tensors total {chunked_total:,} bytes, over the "
                f"per-request limit of {limits.max_request_bytes:,} (server flag "
                "--max-request-bytes)"
            )
        for role, name, dtype, shape, nbytes, what in chunked:  # allocate only when all fit
            numpy_dtype = dtypes.NUMPY[dtype]
            array = pool.array(shape, numpy_dtype) if pool else np.empty(shape, numpy_dtype)
            self._pending[role, name] = _Buffer(array, nbytes, what)

    def add(self, chunk: tensor_pb2.TensorChunk) -> None:
        buffer = self._pending.get((chunk.role, chunk.name))
        if buffer is None:
            role = _ROLE_NAMES.get(chunk.role, f"role {chunk.role}")
            raise InvalidArgument(
                f"chunk for {role} '{chunk.name}': the header marks no such tensor as chunked"
            )
        buffer.write(chunk.data)

    def finish(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        for (role, name), buffer in self._pending.items():
            if buffer.received != buffer.nbytes:
                raise InvalidArgument(
                    f"{buffer.what}: the stream ended after {buffer.received:,}"
                    f" of its {buffer.nbytes:,} bytes"
                )
            self.arrays[role][name] = buffer.array
        return self.arrays[INPUT], self.arrays[COTANGENT]


def receive(
    messages: Iterable,
    limits: Limits,
    on_header: Callable[[executor_pb2.RunRequest], None] | None = None,
    pool=None,
    on_accepted: Callable[[], None] | None = None,
) -> Upload:
    """Read a whole upload: the header first, then chunks until the client half-closes.
    Messages are RunStreamRequests or, on the fast path, `chunks.Chunk`s. `on_header`
    checks the header before any tensor is allocated or received (e.g. that its graph
    id is known, so an evicted graph costs no upload); `on_accepted` runs once the
    header has passed every check, before the first chunk is read."""
    upload = None
    for index, message in enumerate(messages):
        if isinstance(message, Malformed):
            raise InvalidArgument(
                f"RunStream: message {index} is not a RunStreamRequest ({message.reason})"
            )
        part = "chunk" if isinstance(message, chunks.Chunk) else message.WhichOneof("part")
        if upload is None:
            if part != "header":
                raise InvalidArgument(
                    "RunStream: the first message must be the header (a RunRequest), not a chunk"
                )
            if on_header is not None:
                on_header(message.header)
            upload = Upload(message.header, limits, pool)
            if on_accepted is not None:
                on_accepted()
        elif part == "chunk":
            upload.add(message if isinstance(message, chunks.Chunk) else message.chunk)
        else:
            raise InvalidArgument("RunStream: only the first message may be a header")
    if upload is None:
        raise InvalidArgument("RunStream: the stream ended before the header")
    return upload


def send(
    response: executor_pb2.RunResponse,
    outputs: Mapping[str, np.ndarray],
    grads: Mapping[str, np.ndarray],
    chunk_bytes: int,
) -> Iterator[executor_pb2.RunStreamResponse]:
    """The header (small tensors inline, up to `chunk_bytes` in all; the others
    `chunked`), then the chunks of each chunked tensor. The inline total is bounded so
    that many medium results cannot make the header too big for one message."""
    big, inline = [], 0
    for role, arrays, field in ((OUTPUT, outputs, response.outputs), (GRAD, grads, response.grads)):
        for name, array in arrays.items():
            chunked = inline + array.nbytes > chunk_bytes
            codec.fill_tensor(field[name], array, chunked=chunked)
            if not chunked:
                inline += array.nbytes
            else:
                contiguous = np.ascontiguousarray(array, dtype=dtypes.NUMPY[dtypes.of_array(array)])
                big.append((role, name, contiguous))
    yield executor_pb2.RunStreamResponse(header=response)
    for role, name, array in big:
        data = memoryview(array.reshape(-1).view(np.uint8))
        for start in range(0, len(data), chunk_bytes):
            yield chunks.encode_chunk(role, name, data[start : start + chunk_bytes])


def _decode(raw: bytes):
    return chunks.decode(raw, executor_pb2.RunStreamRequest)


# RunStream's request deserializer: chunks without a copy, garbage as `Malformed`.
decode_request = tolerant_deserializer(_decode)


encode_response = chunks.encode  # RunStream's response serializer
