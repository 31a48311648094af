"""The bitswap 1.2.0 message as immutable values, its protobuf encoding, and stream framing.

Owns: turning bytes from a peer into a `Message` whose every block has already been checked against
its hash (`decode`), the reverse (`encode`), exact encoded sizes for batching (`block_wire_size`,
`presence_wire_size`, `want_wire_size`), and uvarint length-prefix framing of a stream (`frame`,
`FrameDecoder`). Pure: no I/O, no clocks, no peers.

Limits (from the bitswap spec): a message is at most 4 MiB and a block at most 2 MiB. Anything a peer
sends that breaks them, does not parse, names a malformed CID, or carries a block whose hash function
we cannot verify raises `ProtocolViolation` with a one-line reason. Building an oversized message
ourselves raises `ExchangeUsageError`.

A received block's CID is rebuilt from the prefix the peer sent and the SHA-256 of the data, so a
decoded `Block` is self-consistent by construction; whether it is a block anyone asked for is the
client engine's question.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import cast

from google.protobuf.message import DecodeError

from ..content import varint
from ..content.cid import CID, DAG_PB, SHA2_256
from ..errors import InvalidCID
from .errors import ExchangeUsageError, ProtocolViolation
from .frozen import fast_init
from .pb import bitswap_pb2 as _pb

MAX_MESSAGE_SIZE = 4 * 1024 * 1024
MAX_BLOCK_SIZE = 2 * 1024 * 1024

PROTOCOL_1_2_0 = "/ipfs/bitswap/1.2.0"
PROTOCOL_1_1_0 = "/ipfs/bitswap/1.1.0"
PROTOCOL_1_0_0 = "/ipfs/bitswap/1.0.0"
PROTOCOLS = (PROTOCOL_1_2_0, PROTOCOL_1_1_0, PROTOCOL_1_0_0)

_Entry = _pb.Message.Wantlist.Entry


class WantType(enum.IntEnum):
    BLOCK = 0
    HAVE = 1


@fast_init
@dataclass(frozen=True, slots=True)
class WantEntry:
    """One wantlist entry. `cancel=True` revokes an earlier want for `cid` (other fields unused)."""

    cid: CID
    want_type: WantType = WantType.BLOCK
    priority: int = 1
    cancel: bool = False
    send_dont_have: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class Presence:
    """A 1.2.0 block presence: the sender has (`have=True`) or does not have `cid`."""

    cid: CID
    have: bool


@fast_init
@dataclass(frozen=True, slots=True)
class Block:
    cid: CID
    data: bytes = field(repr=False)


@fast_init
@dataclass(frozen=True, slots=True)
class Message:
    wants: tuple[WantEntry, ...] = ()
    full: bool = False  # `wants` replaces the receiver's copy of our wantlist
    blocks: tuple[Block, ...] = ()
    presences: tuple[Presence, ...] = ()
    pending_bytes: int = 0

    def is_empty(self) -> bool:
        return not (self.wants or self.full or self.blocks or self.presences)


# -- sizes ---------------------------------------------------------------------------------------


def uvarint(n: int) -> bytes:
    try:
        return varint.encode(n)
    except ValueError as e:
        raise ExchangeUsageError(str(e)) from None


def uvarint_size(n: int) -> int:
    """`len(uvarint(n))`, without building the bytes."""
    if n < 0:
        uvarint(n)  # raises the usage error
    return max(1, (n.bit_length() + 6) // 7)


_varint_len = uvarint_size


def _len_field(n: int) -> int:
    """Bytes a length-delimited field of `n` payload bytes takes (tag < 16, so one tag byte)."""
    return 1 + _varint_len(n) + n


def block_wire_size(cid: CID, data_len: int) -> int:
    """Exact bytes one payload entry adds to an encoded message."""
    key = (len(cid.prefix()), data_len)
    size = _BLOCK_SIZES.get(key)
    if size is None:
        inner = _len_field(key[0]) + (_len_field(data_len) if data_len else 0)
        size = _len_field(inner)
        if len(_BLOCK_SIZES) < 65536:  # bounded: block sizes vary, CID prefixes hardly
            _BLOCK_SIZES[key] = size
    return size


def presence_wire_size(cid: CID, have: bool) -> int:
    key = (len(cid.buffer), have)
    size = _PRESENCE_SIZES.get(key)
    if size is None:
        size = _PRESENCE_SIZES[key] = _len_field(_len_field(key[0]) + (0 if have else 2))
    return size


def want_wire_size(entry: WantEntry) -> int:
    """Bytes one wantlist entry adds, not counting the wantlist field's own header (a few bytes)."""
    priority = entry.priority & 0xFFFFFFFFFFFFFFFF
    # the priority counts only by its varint length (0 = field absent)
    key = (len(entry.cid.buffer), priority.bit_length(), entry.cancel, entry.want_type, entry.send_dont_have)
    size = _WANT_SIZES.get(key)
    if size is None:
        inner = _len_field(key[0])
        if priority:
            inner += 1 + _varint_len(priority)
        inner += 2 * bool(entry.cancel) + 2 * bool(entry.want_type) + 2 * bool(entry.send_dont_have)
        size = _WANT_SIZES[key] = _len_field(inner)
    return size


def wants_wire_size(entries: tuple[WantEntry, ...] | list[WantEntry]) -> int:
    """`sum(want_wire_size(e) for e in entries)`, in one call: a client's message carries a wantlist of
    hundreds of entries, whose sizes come from a table of a few shapes."""
    sizes = _WANT_SIZES
    n = 0
    for e in entries:
        size = sizes.get((len(e.cid.buffer), (e.priority & 0xFFFFFFFFFFFFFFFF).bit_length(), e.cancel, e.want_type,
                          e.send_dont_have))
        n += want_wire_size(e) if size is None else size
    return n


# Wire sizes depend on a few small numbers only; they are asked for once per entry on hot paths.
_BLOCK_SIZES: dict[tuple[int, int], int] = {}
_PRESENCE_SIZES: dict[tuple[int, bool], int] = {}
_WANT_SIZES: dict[tuple[int, int, bool, WantType, bool], int] = {}  # small: CID lengths x 65 priority lengths x flags


# -- encoding ------------------------------------------------------------------------------------


def to_protobuf(msg: Message) -> _pb.Message:
    pb = _pb.Message()
    if msg.wants or msg.full:
        wl = pb.wantlist
        wl.full = msg.full
        for w in msg.wants:
            e = wl.entries.add()
            e.block = w.cid.buffer
            e.priority = w.priority
            e.cancel = w.cancel
            e.wantType = cast("_pb.Message.Wantlist.WantType", int(w.want_type))  # the stub's int subclass
            e.sendDontHave = w.send_dont_have
    for b in msg.blocks:
        if len(b.data) > MAX_BLOCK_SIZE:
            raise ExchangeUsageError(f"block {b.cid} is {len(b.data)} bytes, over the {MAX_BLOCK_SIZE} byte limit")
        p = pb.payload.add()
        p.prefix = b.cid.prefix()
        p.data = b.data
    for pr in msg.presences:
        bp = pb.blockPresences.add()
        bp.cid = pr.cid.buffer
        bp.type = _pb.Message.Have if pr.have else _pb.Message.DontHave
    pb.pendingBytes = max(0, min(msg.pending_bytes, 2**31 - 1))
    return pb


def encode(msg: Message) -> bytes:
    """The protobuf bytes of `msg` (no length prefix). Raises ExchangeUsageError over 4 MiB."""
    out = to_protobuf(msg).SerializeToString()
    if len(out) > MAX_MESSAGE_SIZE:
        raise ExchangeUsageError(f"bitswap message is {len(out)} bytes, over the {MAX_MESSAGE_SIZE} byte limit")
    return out


# -- decoding ------------------------------------------------------------------------------------


def _read_uvarint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    try:
        return varint.decode(buf, pos)
    except ValueError as e:
        raise ProtocolViolation(f"bitswap {what} has a {e}") from None


def _cid(raw: bytes, where: str) -> CID:
    try:
        return CID.decode(raw)
    except InvalidCID as e:
        raise ProtocolViolation(f"bitswap {where} carries a malformed CID: {e}") from None


def block_from_prefix(prefix: bytes, data: bytes) -> Block:
    """Rebuild a block's CID from a bitswap prefix and the SHA-256 of `data`."""
    if len(data) > MAX_BLOCK_SIZE:
        raise ProtocolViolation(f"bitswap block is {len(data)} bytes, over the {MAX_BLOCK_SIZE} byte limit")
    version, pos = _read_uvarint(prefix, 0, "block prefix")
    codec, pos = _read_uvarint(prefix, pos, "block prefix")
    mh_code, pos = _read_uvarint(prefix, pos, "block prefix")
    mh_len, pos = _read_uvarint(prefix, pos, "block prefix")
    if pos != len(prefix):
        raise ProtocolViolation(f"bitswap block prefix has {len(prefix) - pos} trailing bytes")
    if mh_code != SHA2_256 or mh_len != 32:
        raise ProtocolViolation(
            f"bitswap block uses multihash 0x{mh_code:x} length {mh_len}; only sha2-256 (0x12, 32) is accepted"
        )
    digest = hashlib.sha256(data).digest()
    if version == 0:
        if codec != DAG_PB:
            raise ProtocolViolation(f"bitswap block prefix says CIDv0 with codec 0x{codec:x}, not dag-pb")
        return Block(CID(b"\x12\x20" + digest), bytes(data))
    if version != 1:
        raise ProtocolViolation(f"bitswap block prefix has CID version {version}")
    return Block(CID.from_digest(codec, digest), bytes(data))


def decode(buf: bytes | bytearray | memoryview) -> Message:
    """Parse one message (without its length prefix); every block is hashed before it is returned."""
    if len(buf) > MAX_MESSAGE_SIZE:
        raise ProtocolViolation(f"bitswap message is {len(buf)} bytes, over the {MAX_MESSAGE_SIZE} byte limit")
    pb = _pb.Message()
    try:
        pb.ParseFromString(bytes(buf))
    except (DecodeError, ValueError) as e:  # ValueError: e.g. invalid UTF-8 never applies, but be safe
        raise ProtocolViolation(f"bitswap message does not parse as protobuf: {e}") from None
    wants = []
    for entry in pb.wantlist.entries:
        if entry.wantType not in (0, 1):
            raise ProtocolViolation(f"bitswap wantlist entry has unknown want type {entry.wantType}")
        wants.append(
            WantEntry(
                cid=_cid(entry.block, "wantlist entry"),
                want_type=WantType(entry.wantType),
                priority=entry.priority,
                cancel=entry.cancel,
                send_dont_have=entry.sendDontHave,
            )
        )
    blocks = []
    for raw in pb.blocks:  # 1.0.0: the CID is implicitly v0 (dag-pb, sha2-256)
        blocks.append(block_from_prefix(b"\x00\x70\x12\x20", raw))
    for p in pb.payload:
        blocks.append(block_from_prefix(p.prefix, p.data))
    presences = []
    for bp in pb.blockPresences:
        if bp.type not in (0, 1):
            raise ProtocolViolation(f"bitswap block presence has unknown type {bp.type}")
        presences.append(Presence(_cid(bp.cid, "block presence"), have=bp.type == _pb.Message.Have))
    if pb.pendingBytes < 0:
        raise ProtocolViolation(f"bitswap message has negative pendingBytes {pb.pendingBytes}")
    return Message(
        wants=tuple(wants),
        full=pb.wantlist.full,
        blocks=tuple(blocks),
        presences=tuple(presences),
        pending_bytes=pb.pendingBytes,
    )


# -- framing -------------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    """Prefix one encoded message with its length (unsigned varint), as bitswap streams carry it."""
    if len(payload) > MAX_MESSAGE_SIZE:
        raise ExchangeUsageError(f"bitswap message is {len(payload)} bytes, over the {MAX_MESSAGE_SIZE} byte limit")
    return uvarint(len(payload)) + payload


def encode_framed(msg: Message) -> bytes:
    return frame(encode(msg))


class FrameDecoder:
    """Splits a byte stream into length-prefixed messages. Feed it whatever the stream yields.

    Rejects a length over `max_size` as soon as its prefix is read, so a peer cannot make us buffer
    more than one maximum-size message. `push` + `next_frame` hand out one message at a time (a reader
    can stop at any message, e.g. once a peer is over its budget); `feed` is both at once. Consumed
    bytes are dropped once per `push`, not per message, so a megabyte of empty frames costs linear time.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE, what: str = "bitswap stream") -> None:
        self._max = max_size
        self._what = what
        self._buf = bytearray()
        self._pos = 0  # start of the first unconsumed byte in _buf

    def push(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> bytes | None:
        """The next whole message's payload, or None until more bytes are pushed."""
        buf, start = self._buf, self._pos
        n = shift = 0
        end = min(len(buf), start + 10)
        i = start
        while i < end:
            b = buf[i]
            n |= (b & 0x7F) << shift
            shift += 7
            i += 1
            if not b & 0x80:
                break
        else:
            if end - start >= 10:
                raise ProtocolViolation(f"{self._what} has an overlong length prefix")
            return None
        if n > self._max:
            raise ProtocolViolation(f"{self._what} announces a {n} byte message, over the {self._max} byte limit")
        if len(buf) - i < n:
            return None
        self._pos = i + n
        return bytes(buf[i : i + n])

    def feed(self, data: bytes) -> list[bytes]:
        self.push(data)
        out: list[bytes] = []
        while (payload := self.next_frame()) is not None:
            out.append(payload)
        return out

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete message; non-zero at end of stream means it was cut short."""
        return len(self._buf) - self._pos
