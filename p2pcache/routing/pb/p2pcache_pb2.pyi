from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResolveRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class NarInfo(_message.Message):
    __slots__ = ("store_path", "nar_hash", "nar_size", "references", "deriver", "system", "ca", "sigs")
    STORE_PATH_FIELD_NUMBER: _ClassVar[int]
    NAR_HASH_FIELD_NUMBER: _ClassVar[int]
    NAR_SIZE_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    DERIVER_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    CA_FIELD_NUMBER: _ClassVar[int]
    SIGS_FIELD_NUMBER: _ClassVar[int]
    store_path: str
    nar_hash: str
    nar_size: int
    references: _containers.RepeatedScalarFieldContainer[str]
    deriver: str
    system: str
    ca: str
    sigs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, store_path: _Optional[str] = ..., nar_hash: _Optional[str] = ..., nar_size: _Optional[int] = ..., references: _Optional[_Iterable[str]] = ..., deriver: _Optional[str] = ..., system: _Optional[str] = ..., ca: _Optional[str] = ..., sigs: _Optional[_Iterable[str]] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("found", "root", "kind", "size", "narinfo", "root_block")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NARINFO_FIELD_NUMBER: _ClassVar[int]
    ROOT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    found: bool
    root: bytes
    kind: str
    size: int
    narinfo: NarInfo
    root_block: bytes
    def __init__(self, found: _Optional[bool] = ..., root: _Optional[bytes] = ..., kind: _Optional[str] = ..., size: _Optional[int] = ..., narinfo: _Optional[_Union[NarInfo, _Mapping]] = ..., root_block: _Optional[bytes] = ...) -> None: ...

class DagRequest(_message.Message):
    __slots__ = ("roots", "have", "scope")
    class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ALL: _ClassVar[DagRequest.Scope]
        NODES: _ClassVar[DagRequest.Scope]
    ALL: DagRequest.Scope
    NODES: DagRequest.Scope
    ROOTS_FIELD_NUMBER: _ClassVar[int]
    HAVE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    roots: _containers.RepeatedScalarFieldContainer[bytes]
    have: _containers.RepeatedScalarFieldContainer[bytes]
    scope: DagRequest.Scope
    def __init__(self, roots: _Optional[_Iterable[bytes]] = ..., have: _Optional[_Iterable[bytes]] = ..., scope: _Optional[_Union[DagRequest.Scope, str]] = ...) -> None: ...

class DagBlock(_message.Message):
    __slots__ = ("cid", "data")
    CID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    cid: bytes
    data: bytes
    def __init__(self, cid: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class DagEnd(_message.Message):
    __slots__ = ("status", "missing", "message")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[DagEnd.Status]
        NOT_FOUND: _ClassVar[DagEnd.Status]
        REFUSED: _ClassVar[DagEnd.Status]
    OK: DagEnd.Status
    NOT_FOUND: DagEnd.Status
    REFUSED: DagEnd.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: DagEnd.Status
    missing: bytes
    message: str
    def __init__(self, status: _Optional[_Union[DagEnd.Status, str]] = ..., missing: _Optional[bytes] = ..., message: _Optional[str] = ...) -> None: ...

class DagFrame(_message.Message):
    __slots__ = ("block", "end")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    block: DagBlock
    end: DagEnd
    def __init__(self, block: _Optional[_Union[DagBlock, _Mapping]] = ..., end: _Optional[_Union[DagEnd, _Mapping]] = ...) -> None: ...

class CacheRecordsRequest(_message.Message):
    __slots__ = ("key", "prefix", "limit")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    key: str
    prefix: bool
    limit: int
    def __init__(self, key: _Optional[str] = ..., prefix: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class CacheRecordsResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, records: _Optional[_Iterable[bytes]] = ...) -> None: ...
