"""remat_proto.chunks: the hand-rolled TensorChunk framing must be byte-compatible with
protobuf both ways, and anything it does not fully understand must go to protobuf
(which parses it or raises DecodeError), never crash or disagree with it."""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError

from remat_proto import chunks
from remat_proto.v1 import executor_pb2, tensor_pb2

Request, Response = executor_pb2.RunStreamRequest, executor_pb2.RunStreamResponse
INPUT, COTANGENT = tensor_pb2.TensorChunk.INPUT, tensor_pb2.TensorChunk.COTANGENT
OUTPUT, GRAD = tensor_pb2.TensorChunk.OUTPUT, tensor_pb2.TensorChunk.GRAD

# Names and sizes around the varint boundaries of the lengths chunks.py writes itself.
NAMES = [
    "x",
    "",
    "poids/couche_1",
    "градиент",
    "张量",
    "emoji 🧮",
    "n" * 127,
    "n" * 128,
    "x" * 16384,
]
SIZES = [0, 1, 127, 128, 129, 16383, 16384, 16385, 1 << 20]
ROLES = [INPUT, COTANGENT, OUTPUT, GRAD, tensor_pb2.TensorChunk.ROLE_UNSPECIFIED]


def _name_id(name: str) -> str:
    return f"{name[:8]}({len(name)})"


def _data(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + bytes(range(size % 256))


def _as_tuple(message) -> tuple:
    """(role, name, data) of a Chunk or of a RunStream message holding a chunk."""
    if isinstance(message, chunks.Chunk):
        return message.role, message.name, bytes(message.data)
    assert message.WhichOneof("part") == "chunk", message
    return message.chunk.role, message.chunk.name, bytes(message.chunk.data)


def _protobuf_view(raw: bytes, cls=Request):
    """What generated code makes of `raw`: "DecodeError", a chunk tuple or the message."""
    try:
        message = cls.FromString(raw)
    except DecodeError:
        return "DecodeError"
    if message.WhichOneof("part") == "chunk":
        return _as_tuple(message)
    return message.SerializeToString(deterministic=True)


def _fast_view(raw: bytes, cls=Request):
    """The same, through chunks.decode."""
    try:
        message = chunks.decode(raw, cls)
    except DecodeError:
        return "DecodeError"
    if isinstance(message, chunks.Chunk) or message.WhichOneof("part") == "chunk":
        return _as_tuple(message)
    return message.SerializeToString(deterministic=True)


# --- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES, ids=_name_id)
@pytest.mark.parametrize("role", ROLES)
def test_round_trip_names_and_roles(role, name):
    data = b"\x00\x01payload\xff"
    raw = chunks.encode_chunk(role, name, memoryview(data))
    decoded = chunks.decode(raw, Request)
    assert isinstance(decoded, chunks.Chunk)  # the fast path took it
    assert _as_tuple(decoded) == (role, name, data)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cls", [Request, Response])
def test_round_trip_sizes_across_varint_boundaries(size, cls):
    data = _data(size)
    raw = chunks.encode_chunk(GRAD, "g", memoryview(data))
    decoded = chunks.decode(raw, cls)
    assert isinstance(decoded, chunks.Chunk)
    assert _as_tuple(decoded) == (GRAD, "g", data)
    # The data is a view into the received bytes, not a copy.
    assert isinstance(decoded.data, memoryview) and decoded.data.obj is raw


@pytest.mark.parametrize("data", [b"", b"a", memoryview(b"abc")[1:], bytearray(b"xyz")])
def test_encode_accepts_any_buffer_slice(data):
    raw = chunks.encode_chunk(INPUT, "x", memoryview(data))
    assert _as_tuple(chunks.decode(raw, Request)) == (INPUT, "x", bytes(data))


# --- interoperability with generated code -------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["x", "градиент", "n" * 128], ids=_name_id)
@pytest.mark.parametrize("cls", [Request, Response])
def test_generated_code_parses_encode_chunk_output(cls, name, size):
    data = _data(size)
    raw = chunks.encode_chunk(OUTPUT, name, memoryview(data))
    assert _as_tuple(cls.FromString(raw)) == (OUTPUT, name, data)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["x", "", "张量", "n" * 16384], ids=_name_id)
@pytest.mark.parametrize("role", [INPUT, GRAD, tensor_pb2.TensorChunk.ROLE_UNSPECIFIED])
def test_decode_reads_what_protobuf_serialized(role, name, size):
    """Protobuf omits default fields (role 0, empty name or data): still a Chunk."""
    data = _data(size)
    raw = Request(chunk=tensor_pb2.TensorChunk(role=role, name=name, data=data)).SerializeToString()
    decoded = chunks.decode(raw, Request)
    assert isinstance(decoded, chunks.Chunk)
    assert _as_tuple(decoded) == (role, name, data)


def test_protobuf_field_order_and_repeats_decode_like_protobuf():
    """Fields in another order, a field repeated (last wins), unknown fields skipped."""
    body = (
        b"\x1a\x02ab"  # data = "ab"
        b"\x12\x01y"  # name = "y"
        b"\x08\x04"  # role = GRAD
        b"\x12\x01z"  # name again: the last one wins
        b"\x28\x07"  # unknown varint field 5
        b"\x32\x03qqq"
    )  # unknown bytes field 6
    raw = b"\x12" + bytes([len(body)]) + body
    assert _fast_view(raw) == _protobuf_view(raw) == (GRAD, "z", b"ab")


HEADERS = [
    Request(header=executor_pb2.RunRequest(loss="loss", wrt=["x"])),
    Request(header=executor_pb2.RunRequest()),
    Request(),
]


@pytest.mark.parametrize("message", HEADERS, ids=["header", "empty-header", "nothing"])
def test_other_messages_fall_back_to_protobuf(message):
    raw = message.SerializeToString()
    decoded = chunks.decode(raw, Request)
    assert isinstance(decoded, Request)
    assert decoded == message


def test_response_header_falls_back_to_protobuf():
    message = Response(header=executor_pb2.RunResponse(warnings=["w"]))
    decoded = chunks.decode(message.SerializeToString(), Response)
    assert isinstance(decoded, Response) and decoded == message


def test_two_chunk_fields_in_one_message_merge_like_protobuf():
    """Protobuf merges a message field that appears twice (scalars: the last wins);
    the fast path must not decode only the first one."""
    first = chunks.encode_chunk(INPUT, "a", memoryview(b"12"))
    second = chunks.encode_chunk(INPUT, "b", memoryview(b"34"))
    raw = first + second
    assert _fast_view(raw) == _protobuf_view(raw) == (INPUT, "b", b"34")


def test_encode_passes_bytes_through_and_serializes_messages():
    raw = chunks.encode_chunk(INPUT, "x", memoryview(b"abc"))
    assert chunks.encode(raw) is raw
    message = HEADERS[0]
    assert chunks.encode(message) == message.SerializeToString()


# --- malformed input ----------------------------------------------------------------------
_GOOD = chunks.encode_chunk(INPUT, "xé", memoryview(b"abcdef"))

MALFORMED = {
    "empty": b"",
    "lone tag": b"\x12",
    "truncated outer length": b"\x12\x80",
    "overlong outer varint": b"\x12" + b"\xff" * 11 + b"\x01",
    "outer length past the end": b"\x12\x10\x08\x01",
    "outer length short of the end": b"\x12\x01\x08\x01",
    "truncated role varint": b"\x12\x02\x08\x80",
    "truncated tag varint": b"\x12\x01\x80",
    "name length past the end": b"\x12\x03\x12\x09a",
    "data length past the end": b"\x12\x05\x1a\x09ab\x00",
    "invalid utf-8 name": b"\x12\x04\x12\x02\xff\xfe",
    "field number 0 (varint)": b"\x12\x02\x00\x00",
    "field number 0 (bytes)": b"\x12\x02\x02\x00",
    "start group": b"\x12\x02\x0b\x0c",
    "end group": b"\x12\x01\x0c",
    "wire type 6": b"\x12\x02\x0e\x00",
    "wire type 7": b"\x12\x02\x0f\x00",
    "fixed64 truncated": b"\x12\x03\x09\x00\x00",
    "fixed32 truncated": b"\x12\x03\x0d\x00\x00",
    "garbage": b"\xff\xfe\xfd\xfc",
    "header tag truncated": b"\x0a\x05\x00",
    "good chunk, one byte short": _GOOD[:-1],
    "good chunk, one byte extra": _GOOD + b"\x00",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("cls", [Request, Response])
def test_malformed_input_decodes_exactly_as_protobuf_does(cls, raw):
    """Either the same chunk or message as protobuf, or protobuf's own DecodeError;
    never another exception."""
    assert _fast_view(raw, cls) == _protobuf_view(raw, cls)


@pytest.mark.parametrize(
    "case",
    [
        "lone tag",
        "truncated outer length",
        "truncated role varint",
        "name length past the end",
        "data length past the end",
        "invalid utf-8 name",
        "field number 0 (varint)",
        "field number 0 (bytes)",
        "wire type 7",
        "garbage",
    ],
)
def test_malformed_chunks_raise_decode_error(case):
    with pytest.raises(DecodeError):
        chunks.decode(MALFORMED[case], Request)


def test_unknown_wire_types_defer_to_protobuf():
    """fixed64/fixed32 fields are legal (unknown fields): protobuf keeps them, and so
    the fast path hands the message over rather than guessing."""
    body = b"\x08\x01\x12\x01x\x1a\x01d" + b"\x39" + b"\x00" * 8 + b"\x45" + b"\x00" * 4
    raw = b"\x12" + bytes([len(body)]) + body
    assert _fast_view(raw) == _protobuf_view(raw) == (INPUT, "x", b"d")
    assert not isinstance(chunks.decode(raw, Request), chunks.Chunk)


def test_mutated_chunks_decode_exactly_as_protobuf_does():
    """A deterministic fuzz: byte flips, insertions, deletions and truncations of valid
    chunks must never make the fast path disagree with protobuf."""
    rng = random.Random(20240521)
    bases = [
        _GOOD,
        chunks.encode_chunk(GRAD, "", memoryview(b"")),
        chunks.encode_chunk(COTANGENT, "n" * 130, memoryview(b"q" * 200)),
    ]
    for _ in range(6000):
        raw = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(4)
            if kind == 0 and raw:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            elif kind == 1:
                raw.insert(rng.randrange(len(raw) + 1), rng.randrange(256))
            elif kind == 2 and raw:
                del raw[rng.randrange(len(raw))]
            else:
                raw = raw[: rng.randrange(len(raw) + 1)]
        raw = bytes(raw)
        assert _fast_view(raw) == _protobuf_view(raw), raw.hex()


def test_varint_helpers_at_boundaries():
    for value in [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**63 - 1]:
        encoded = chunks._varint(value)
        assert chunks._read_varint(encoded, 0) == (value, len(encoded))
    assert [len(chunks._varint(v)) for v in (127, 128, 16383, 16384)] == [1, 2, 2, 3]
    with pytest.raises(ValueError):
        chunks._read_varint(b"\x80\x80", 0)
    with pytest.raises(ValueError):
        chunks._read_varint(b"\xff" * 11, 0)
