"""Content identifiers: CIDv1 over sha2-256 multihashes.

We make CIDv1 with codec raw (0x55) for chunks and dag-cbor (0x71) for manifest nodes, printed in
base32 (multibase prefix ``b``). On input we also accept CIDv0 (``Qm...``, base58btc, implicitly dag-pb)
and any multibase py-cid understands. Parsing of text forms and multihash framing is delegated to
py-cid / py-multihash; the hot path (making a CID for a freshly hashed chunk) builds the few prefix
bytes directly, since it runs once per chunk.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import cid as _pycid
import multihash as _multihash

from ..errors import InvalidCID as InvalidCID  # re-exported: callers import it from here
from . import varint

RAW = 0x55
DAG_CBOR = 0x71
DAG_PB = 0x70
SHA2_256 = 0x12

CODEC_NAMES = {RAW: "raw", DAG_CBOR: "dag-cbor", DAG_PB: "dag-pb"}
_CODEC_BY_NAME = {v: k for k, v in CODEC_NAMES.items()}


_uvarint = varint.encode


def _read_uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    try:
        return varint.decode(buf, pos)
    except ValueError as e:
        raise InvalidCID(f"CID has a {e}") from None


@dataclass(frozen=True, slots=True)
class CID:
    """A CID held as its binary form. Compares, hashes and sorts by bytes."""

    buffer: bytes

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_digest(cls, codec: int, sha256_digest: bytes) -> "CID":
        if len(sha256_digest) != 32:
            raise InvalidCID(f"sha2-256 digest must be 32 bytes, got {len(sha256_digest)}")
        return cls(b"\x01" + _uvarint(codec) + b"\x12\x20" + sha256_digest)

    @classmethod
    def for_block(cls, codec: int, data: bytes | memoryview) -> "CID":
        return cls.from_digest(codec, hashlib.sha256(data).digest())

    @classmethod
    def decode(cls, buf: bytes) -> "CID":
        """Parse a binary CID (v1, or a bare v0 multihash) and reject anything malformed."""
        buf = bytes(buf)
        if len(buf) == 36 and buf[0] == 1 and buf[1] < 0x80 and buf[2] == 0x12 and buf[3] == 0x20:
            return cls(buf)  # CIDv1, a one-byte codec, sha2-256 (every block here): what the checks below accept
        if len(buf) == 34 and buf[:2] == b"\x12\x20":
            return cls(buf)  # CIDv0: a bare sha2-256 multihash
        if not buf or buf[0] != 1:
            raise InvalidCID("CID is not version 1 (first byte must be 0x01)")
        _, pos = _read_uvarint(buf, 1)
        mh_code, pos = _read_uvarint(buf, pos)
        mh_len, pos = _read_uvarint(buf, pos)
        if len(buf) - pos != mh_len:
            raise InvalidCID(f"CID multihash length says {mh_len} bytes, {len(buf) - pos} follow")
        try:
            _multihash.decode(buf[_mh_start(buf):])
        except Exception as e:  # py-multihash raises several types
            raise InvalidCID(f"CID carries an invalid multihash: {e}") from None
        return cls(buf)

    @classmethod
    def parse(cls, text: str) -> "CID":
        """Parse a CID's text form: base32 CIDv1 (``b...``), base58btc CIDv0 (``Qm...``) or other multibases."""
        text = text.strip()
        if not text:
            raise InvalidCID("empty CID")
        try:
            parsed = _pycid.from_string(text)
        except Exception as e:
            raise InvalidCID(f"not a CID: {text!r} ({e})") from None
        return cls.decode(parsed.buffer)

    # Written out because the generated ones compare 1-tuples: CIDs are dict keys on every hot path.
    def __hash__(self) -> int:
        return hash(self.buffer)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is CID:
            return self.buffer == other.buffer
        return NotImplemented

    # -- properties ---------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return 0 if self.buffer[0] == 0x12 else 1

    @property
    def codec(self) -> int:
        buf = self.buffer
        if buf[0] == 1 and buf[1] < 0x80:
            return buf[1]  # a one-byte codec (every CID made here): read on every block of every fetch
        if buf[0] == 0x12:
            return DAG_PB
        return _read_uvarint(buf, 1)[0]

    @property
    def multihash(self) -> bytes:
        return self.buffer[_mh_start(self.buffer):]

    @property
    def hash_code(self) -> int:
        return _read_uvarint(self.multihash, 0)[0]

    @property
    def digest(self) -> bytes:
        mh = self.multihash
        _, pos = _read_uvarint(mh, 0)
        _, pos = _read_uvarint(mh, pos)
        return mh[pos:]

    @property
    def codec_name(self) -> str:
        return CODEC_NAMES.get(self.codec, hex(self.codec))

    def prefix(self) -> bytes:
        """The CID prefix as bitswap sends it: version, codec, hash code, digest length (varints)."""
        buf = self.buffer
        if buf[0] == 0x12:
            return b"\x00\x70" + buf[:2]  # CIDv0: version 0, dag-pb, then its multihash header
        if buf[1] < 0x80 and buf[2] < 0x80 and buf[3] < 0x80:
            return buf[:4]  # one-byte codec, hash code and length: the v1 bytes up to the digest
        return _uvarint(self.version) + _uvarint(self.codec) + _uvarint(self.hash_code) + _uvarint(len(self.digest))

    def verify(self, data: bytes | memoryview) -> bool:
        """True if `data` hashes to this CID's digest. Only sha2-256 is supported."""
        if self.hash_code != SHA2_256:
            return False
        return hashlib.sha256(data).digest() == self.digest

    def encode(self) -> str:
        if self.version == 0:
            text: str = _pycid.CIDv0(self.buffer).encode().decode()
            return text
        return "b" + base64.b32encode(self.buffer).decode().lower().rstrip("=")

    def __str__(self) -> str:
        return self.encode()

    def __repr__(self) -> str:
        return f"CID({self.encode()})"


def _mh_start(buf: bytes) -> int:
    if buf[:1] == b"\x12":
        return 0
    return _read_uvarint(buf, 1)[1]  # skip version byte and codec varint
