from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
INT32: DType
INT64: DType
BOOL: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "chunked")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    chunked: bool
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., chunked: _Optional[bool] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("role", "name", "data")
    class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ROLE_UNSPECIFIED: _ClassVar[TensorChunk.Role]
        INPUT: _ClassVar[TensorChunk.Role]
        COTANGENT: _ClassVar[TensorChunk.Role]
        OUTPUT: _ClassVar[TensorChunk.Role]
        GRAD: _ClassVar[TensorChunk.Role]
    ROLE_UNSPECIFIED: TensorChunk.Role
    INPUT: TensorChunk.Role
    COTANGENT: TensorChunk.Role
    OUTPUT: TensorChunk.Role
    GRAD: TensorChunk.Role
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    role: TensorChunk.Role
    name: str
    data: bytes
    def __init__(self, role: _Optional[_Union[TensorChunk.Role, str]] = ..., name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...
