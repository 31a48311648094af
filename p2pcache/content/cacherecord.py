"""Signed build-cache key records: "key K in namespace N names tree root R, saved at T by writer W".

A cache key is a name, not a hash, so the bytes it points at prove nothing about who chose that name: the
record that binds the name to a root is signed by its writer's libp2p ed25519 identity and checked against
who may write that key (the trust policy is the build cache service's, not this module's). Anyone may
relay a record; a relayed record is exactly as trustworthy as its signature.

Block (dag-cbor):

    {"type": "p2pcache/cache-key", "version": 1, "namespace": str, "key": str, "root": CID,
     "time": int (milliseconds since the Unix epoch), "writer": bytes (libp2p PublicKey protobuf, ed25519),
     "sig": bytes (64-byte ed25519 signature)}

The signature covers `SIGNING_DOMAIN` followed by the dag-cbor encoding of the same map without "sig", so
a signature cannot be replayed as one of another kind of message. The namespace is the key's first
"/"-separated segment ("" for a key without "/"), stated explicitly so a reader can match policies and
DHT keys without parsing; a record whose namespace does not match its key is malformed.

Pure: no I/O. Signing takes any object with `sign(bytes) -> bytes` (py-libp2p's private key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import InvalidInput, MalformedBlock
from . import dagcbor
from .cid import CID, DAG_CBOR

__all__ = ["CacheRecord", "MAX_KEY", "MAX_RECORD", "check_cache_key", "namespace_of", "peer_id_of"]

RECORD_TYPE = "p2pcache/cache-key"
SCHEMA_VERSION = 1
SIGNING_DOMAIN = b"p2pcache/cache-key/v1\0"
MAX_KEY = 512
MAX_RECORD = 2048
_ED25519_PREFIX = b"\x08\x01\x12\x20"  # libp2p PublicKey{Type: Ed25519, Data: <32 bytes>}


class Signer(Protocol):
    def sign(self, data: bytes) -> bytes: ...


def check_cache_key(key: str, what: str = "cache key") -> str:
    """`key` if it is a usable cache key (1..512 UTF-8 bytes, no control characters); else InvalidInput."""
    if not isinstance(key, str) or not key:
        raise InvalidInput(f"{what} is empty; give a key such as main/linux-build-<hash>")
    if len(key.encode("utf-8")) > MAX_KEY:
        raise InvalidInput(f"{what} {key[:40]!r}… is over {MAX_KEY} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise InvalidInput(f"{what} {key[:40]!r} holds control characters")
    return key


def namespace_of(key: str) -> str:
    """The namespace of a key or key prefix: its first "/"-separated segment, "" without a "/"."""
    return key.split("/", 1)[0] if "/" in key else ""


def peer_id_of(writer: bytes) -> str:
    """The base58 libp2p peer ID of an ed25519 public key in libp2p's protobuf encoding (identity multihash)."""
    return base58.b58encode(b"\x00" + bytes([len(writer)]) + writer).decode()


@dataclass(frozen=True, slots=True)
class CacheRecord:
    namespace: str
    key: str
    root: CID
    time_ms: int
    writer: bytes
    sig: bytes = b""

    @property
    def writer_id(self) -> str:
        return peer_id_of(self.writer)

    def _unsigned(self) -> dict[str, Any]:
        return {"type": RECORD_TYPE, "version": SCHEMA_VERSION, "namespace": self.namespace, "key": self.key,
                "root": self.root, "time": self.time_ms, "writer": self.writer}

    def signing_bytes(self) -> bytes:
        return SIGNING_DOMAIN + dagcbor.encode(self._unsigned())

    @classmethod
    def create(cls, key: str, root: CID, time_ms: int, writer: bytes, signer: Signer) -> "CacheRecord":
        check_cache_key(key)
        if not writer.startswith(_ED25519_PREFIX) or len(writer) != 36:
            raise InvalidInput("cache records are signed with ed25519 node identities only")
        unsigned = cls(namespace_of(key), key, root, time_ms, writer)
        return cls(unsigned.namespace, key, root, time_ms, writer, signer.sign(unsigned.signing_bytes()))

    def encode(self) -> bytes:
        return dagcbor.encode({**self._unsigned(), "sig": self.sig})

    @classmethod
    def decode(cls, data: bytes | memoryview) -> "CacheRecord":
        """A record from its bytes, checked for form and signature (not for trust); MalformedBlock if not."""
        if len(data) > MAX_RECORD:
            raise MalformedBlock(f"cache record of {len(data)} bytes is over {MAX_RECORD}")
        node = dagcbor.decode(data)
        fields = {"type", "version", "namespace", "key", "root", "time", "writer", "sig"}
        if not isinstance(node, dict) or node.get("type") != RECORD_TYPE:
            raise MalformedBlock("not a p2pcache cache-key record")
        if node.get("version") != SCHEMA_VERSION or set(node) != fields:
            raise MalformedBlock(f"cache record: unsupported version or fields {sorted(node)}")
        ns, key, root, t, writer, sig = (node[f] for f in ("namespace", "key", "root", "time", "writer", "sig"))
        if not (isinstance(ns, str) and isinstance(key, str) and isinstance(root, CID) and root.codec == DAG_CBOR
                and isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 53
                and isinstance(writer, bytes) and isinstance(sig, bytes)):
            raise MalformedBlock("cache record: a field has the wrong type")
        try:
            check_cache_key(key)
        except InvalidInput as e:
            raise MalformedBlock(f"cache record: {e}") from None
        if namespace_of(key) != ns:
            raise MalformedBlock(f"cache record: namespace {ns[:40]!r} does not match key {key[:40]!r}")
        record = cls(ns, key, root, t, writer, sig)
        if not writer.startswith(_ED25519_PREFIX) or len(writer) != 36 or len(sig) != 64:
            raise MalformedBlock("cache record: writer is not an ed25519 key or the signature is not 64 bytes")
        try:
            Ed25519PublicKey.from_public_bytes(writer[4:]).verify(sig, record.signing_bytes())
        except InvalidSignature:
            raise MalformedBlock(f"cache record for {key[:60]!r}: bad signature (writer {record.writer_id})") from None
        return record

    def order(self) -> tuple[Any, ...]:
        """Newest first sorts by this descending: time, then root bytes and writer to break ties the same
        way on every node."""
        return (self.time_ms, self.root.buffer, self.writer)

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "key": self.key, "root": str(self.root), "time": self.time_ms / 1000,
                "writer": self.writer_id}
