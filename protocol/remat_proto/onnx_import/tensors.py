"""ONNX tensors as NumPy arrays: element types, sizes checked before reading, and
external data read only from inside an explicit base directory.

    >>> import numpy as np, onnx
    >>> tensor = onnx.numpy_helper.from_array(np.arange(3, dtype=np.int64), "t")
    >>> TensorReader(max_elements=10).read(tensor, "t").tolist()
    [0, 1, 2]
"""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx

from .errors import OnnxImportError

T = onnx.TensorProto
# ONNX element type -> NumPy type of its storage (bfloat16 is widened on read).
NUMPY = {
    T.FLOAT: np.dtype("<f4"),
    T.DOUBLE: np.dtype("<f8"),
    T.FLOAT16: np.dtype("<f2"),
    T.BFLOAT16: np.dtype("<u2"),
    T.INT8: np.dtype("i1"),
    T.INT16: np.dtype("<i2"),
    T.INT32: np.dtype("<i4"),
    T.INT64: np.dtype("<i8"),
    T.UINT8: np.dtype("u1"),
    T.UINT16: np.dtype("<u2"),
    T.UINT32: np.dtype("<u4"),
    T.UINT64: np.dtype("<u8"),
    T.BOOL: np.dtype("bool"),
}
FLOAT_TYPES = frozenset({T.FLOAT, T.DOUBLE, T.FLOAT16, T.BFLOAT16})
# Element types remat computes with, by their remat names.
REMAT = {
    T.FLOAT: "float32",
    T.DOUBLE: "float64",
    T.INT32: "int32",
    T.INT64: "int64",
    T.BOOL: "bool",
}


def type_name(elem_type: int) -> str:
    try:
        return T.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type {elem_type}"


def nbytes_of(tensor: onnx.TensorProto, what: str) -> int:
    """The bytes a tensor holds, from its dims and type alone (nothing is read)."""
    dtype = NUMPY.get(tensor.data_type)
    if dtype is None:
        raise OnnxImportError(
            f"{what}: element type {type_name(tensor.data_type)} is not supported"
        )
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            raise OnnxImportError(f"{what}: negative dimension in {list(tensor.dims)}")
        count *= dim
    return count * dtype.itemsize


class ExternalData:
    """Reads external tensor data from files strictly inside `base_dir`."""

    KEYS = frozenset({"location", "offset", "length", "checksum"})

    def __init__(self, base_dir: str | os.PathLike | None, allowed: bool = True):
        self.base_dir = None if base_dir is None else os.fspath(base_dir)
        self.allowed = allowed

    def read(self, tensor: onnx.TensorProto, nbytes: int, what: str) -> bytes:
        if not self.allowed:
            raise OnnxImportError(f"{what}: external data is not allowed here")
        if self.base_dir is None:
            raise OnnxImportError(
                f"{what}: the tensor's data is external; give the base directory it is read "
                "from (base_dir=...)"
            )
        entries = {entry.key: entry.value for entry in tensor.external_data}
        unknown = sorted(set(entries) - self.KEYS)
        if unknown:
            raise OnnxImportError(f"{what}: unknown external data key '{unknown[0]}'")
        path = self._resolve(entries.get("location", ""), what)
        offset = _natural(entries.get("offset", "0"), "offset", what)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise OnnxImportError(
                f"{what}: cannot open its external data ({exc.strerror})"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OnnxImportError(f"{what}: its external data location is not a regular file")
            size = info.st_size
            length = _natural(entries.get("length", str(max(size - offset, 0))), "length", what)
            if offset > size or length > size - offset:
                raise OnnxImportError(
                    f"{what}: external data offset {offset} + length {length} is past the end "
                    f"of its file ({size} bytes)"
                )
            if length != nbytes:
                raise OnnxImportError(
                    f"{what}: external data length {length} does not match the {nbytes} bytes "
                    "its shape and type need"
                )
            os.lseek(fd, offset, os.SEEK_SET)
            chunks, left = [], length
            while left:
                chunk = os.read(fd, min(left, 1 << 24))
                if not chunk:
                    raise OnnxImportError(f"{what}: its external data file is shorter than stated")
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _resolve(self, location: str, what: str) -> str:
        if not location or "\x00" in location:
            raise OnnxImportError(f"{what}: external data without a valid location")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location[:2]:
            raise OnnxImportError(
                f"{what}: external data location '{location}' is absolute; it must be relative "
                "to the model's directory"
            )
        base = os.path.realpath(self.base_dir)
        if not os.path.isdir(base):
            raise OnnxImportError(f"{what}: base directory '{self.base_dir}' is not a directory")
        path = os.path.realpath(os.path.join(base, location))  # resolves '..' and symlinks
        if path == base or os.path.commonpath([base, path]) != base:
            raise OnnxImportError(
                f"{what}: external data location '{location}' escapes the base directory"
            )
        return path


def _natural(text: str, key: str, what: str) -> int:
    if not text.isdigit():
        raise OnnxImportError(f"{what}: external data {key} '{text}' is not a natural number")
    return int(text)


class TensorReader:
    """TensorProto -> NumPy array (native byte order, writable, its own memory)."""

    def __init__(self, max_elements: int, external: ExternalData | None = None):
        self.max_elements = max_elements
        self.external = external or ExternalData(None, allowed=False)

    def read(self, tensor: onnx.TensorProto, what: str, max_elements: int | None = None):
        limit = self.max_elements if max_elements is None else max_elements
        dtype = NUMPY.get(tensor.data_type)
        if dtype is None:
            raise OnnxImportError(
                f"{what}: element type {type_name(tensor.data_type)} is not supported"
            )
        if tensor.HasField("segment"):
            raise OnnxImportError(f"{what}: segmented tensors are not supported")
        shape = tuple(tensor.dims)
        count = 1
        for dim in shape:
            if dim < 0:
                raise OnnxImportError(f"{what}: negative dimension in {list(shape)}")
            count *= dim
            if count > limit:
                raise OnnxImportError(f"{what}: shape {list(shape)} has more than {limit} elements")
        nbytes = count * dtype.itemsize
        if tensor.data_location == T.EXTERNAL:
            array = np.frombuffer(self.external.read(tensor, nbytes, what), dtype=dtype)
        elif tensor.HasField("raw_data"):
            if len(tensor.raw_data) != nbytes:
                raise OnnxImportError(
                    f"{what}: {len(tensor.raw_data)} bytes of data, {nbytes} expected for "
                    f"{type_name(tensor.data_type)} {list(shape)}"
                )
            array = np.frombuffer(tensor.raw_data, dtype=dtype)
        else:
            array = self._typed(tensor, dtype, count, what)
        array = array.reshape(shape)
        if tensor.data_type == T.BFLOAT16:
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(dtype.newbyteorder("="), copy=True)

    @staticmethod
    def _typed(tensor: onnx.TensorProto, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        kind = tensor.data_type
        if kind == T.FLOAT:
            field, storage = tensor.float_data, np.float32
        elif kind == T.DOUBLE:
            field, storage = tensor.double_data, np.float64
        elif kind == T.INT64:
            field, storage = tensor.int64_data, np.int64
        elif kind in (T.UINT32, T.UINT64):
            field, storage = tensor.uint64_data, np.uint64
        else:  # INT32 and the types stored in int32_data (16-bit floats as their bits)
            field, storage = tensor.int32_data, np.int64
        if len(field) != count:
            raise OnnxImportError(
                f"{what}: {len(field)} values stored, {count} expected for shape "
                f"{list(tensor.dims)}"
            )
        values = np.array(field, dtype=storage)
        if kind in (T.FLOAT16, T.BFLOAT16):
            return values.astype(np.uint16).view(dtype)
        if kind == T.BOOL:
            return values != 0
        return values.astype(dtype)
