"""Fast protobuf framing for TensorChunks, shared by the SDK and the server.

A RunStream carries mostly 1 MiB chunks. Going through protobuf objects costs three
copies of every byte on each side (into the message, out of it, into the array); this
module writes and reads the same wire format directly, so a chunk's bytes are copied
once when sent and once when received. Other messages (the headers) go through
protobuf as usual, and anything this reader does not recognise falls back to it, so
a peer using plain generated code interoperates.

    >>> from remat_proto.v1 import executor_pb2, tensor_pb2
    >>> raw = encode_chunk(tensor_pb2.TensorChunk.INPUT, "x", memoryview(b"abc"))
    >>> executor_pb2.RunStreamRequest.FromString(raw).chunk.name
    'x'
    >>> chunk = decode(raw, executor_pb2.RunStreamRequest)
    >>> chunk.name, bytes(chunk.data)
    ('x', b'abc')
"""

from __future__ import annotations

from typing import NamedTuple

# RunStreamRequest.chunk and RunStreamResponse.chunk are both field 2; TensorChunk's
# fields are role = 1 (varint), name = 2 and data = 3 (length-delimited).
_CHUNK_TAG = bytes([2 << 3 | 2])
_ROLE_TAG, _NAME_TAG, _DATA_TAG = bytes([1 << 3]), bytes([2 << 3 | 2]), bytes([3 << 3 | 2])


class Chunk(NamedTuple):
    """A decoded TensorChunk whose `data` is a view into the received message."""

    role: int
    name: str
    data: memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(buffer, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buffer) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buffer[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def encode_chunk(role: int, name: str, data: memoryview) -> bytes:
    """A serialized RunStreamRequest/RunStreamResponse holding one chunk."""
    name_bytes = name.encode()
    head = (
        _ROLE_TAG
        + _varint(role)
        + _NAME_TAG
        + _varint(len(name_bytes))
        + name_bytes
        + _DATA_TAG
        + _varint(len(data))
    )
    return b"".join((_CHUNK_TAG, _varint(len(head) + len(data)), head, data))


def encode(message) -> bytes:
    """Serializer for RunStream: pre-encoded chunks pass through, messages serialize."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def decode(raw: bytes, message_class):
    """Deserializer for RunStream: a lone chunk becomes a `Chunk` (no copy of its data);
    anything else is parsed by protobuf into `message_class`."""
    chunk = _lone_chunk(memoryview(raw))
    return chunk if chunk is not None else message_class.FromString(raw)


def _lone_chunk(view: memoryview) -> Chunk | None:
    if len(view) < 2 or view[0] != _CHUNK_TAG[0]:
        return None
    try:
        length, start = _read_varint(view, 1)
        if start + length != len(view):
            return None  # more than one field: let protobuf handle it
        return _tensor_chunk(view[start:])
    except ValueError:
        return None


def _tensor_chunk(view: memoryview) -> Chunk | None:
    role, name, data, pos = 0, "", view[:0], 0
    while pos < len(view):
        tag, pos = _read_varint(view, pos)
        field, wire_type = tag >> 3, tag & 7
        if field == 0:
            return None  # invalid in protobuf: let it raise DecodeError
        if wire_type == 0:
            value, pos = _read_varint(view, pos)
            if field == 1:
                role = value
        elif wire_type == 2:
            length, pos = _read_varint(view, pos)
            if pos + length > len(view):
                raise ValueError("truncated field")
            if field == 2:
                name = bytes(view[pos : pos + length]).decode()
            elif field == 3:
                data = view[pos : pos + length]
            pos += length
        else:
            return None  # a field type TensorChunk does not have: protobuf decides
    return Chunk(role, name, data)
