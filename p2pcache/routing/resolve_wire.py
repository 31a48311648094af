"""The resolve protocol's messages, sans-IO: encode, decode, validate, frame. No awaits, no sockets.

`/p2pcache/resolve/1.0.0` asks a peer "which root do you hold under this alias?". One request and one
response per stream, each a protobuf message (`proto/p2pcache.proto`) prefixed by its length as an
unsigned varint. Limits: a request is at most `MAX_REQUEST` bytes with a key of at most `MAX_KEY`
bytes; a response at most `MAX_RESPONSE` bytes, `MAX_REFERENCES` references, `MAX_SIGS` signatures,
`MAX_FIELD` bytes per text field.

Anything a peer sends that breaks these rules raises `ResolveProtocolError` (one line saying what);
asking this module to encode something that breaks them raises `RoutingUsageError` (our bug).

An answer is a claim, not a fact: `ResolveAnswer.root` is what the exchange verifies every fetched block
against, so a lying peer costs one failed fetch and nothing else; `size` and `narinfo` are hints to check
against what arrives (NarHash/NarSize against the NAR, signatures against trusted keys).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from ..content import varint
from ..content.cid import CID
from ..errors import InvalidCID
from .errors import ResolveProtocolError, RoutingUsageError
from .pb import p2pcache_pb2 as pb

__all__ = [
    "KINDS", "MAX_FIELD", "MAX_KEY", "MAX_REFERENCES", "MAX_REQUEST", "MAX_RESPONSE", "MAX_ROOT_BLOCK", "MAX_SIGS",
    "PROTOCOL",
    "FrameReader", "NarInfoFields", "ResolveAnswer", "decode_request", "decode_response", "encode_request",
    "encode_response", "frame",
]

PROTOCOL = "/p2pcache/resolve/1.0.0"
KINDS = frozenset({"archive", "nar", "tree"})  # "tree": a build cache tree (p2pcache.content.treemanifest)
MAX_KEY = 512
MAX_REQUEST = 1024
MAX_RESPONSE = 512 * 1024
MAX_REFERENCES = 8192
MAX_SIGS = 32
MAX_FIELD = 1024
MAX_ROOT_BLOCK = 256 * 1024  # a root block bigger than this is not sent in the answer (the asker fetches it)
_MAX_VARINT_BYTES = 10


@dataclass(frozen=True, slots=True)
class NarInfoFields:
    """What a .narinfo says about a store path, in Nix's text forms (see `p2pcache.content.narinfo`)."""

    store_path: str
    nar_hash: str
    nar_size: int
    references: tuple[str, ...] = ()
    deriver: str = ""
    system: str = ""
    ca: str = ""
    sigs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ResolveAnswer:
    root: CID
    kind: str  # "archive", "nar" or "tree" (see KINDS)
    size: int
    narinfo: NarInfoFields | None = None
    # The root block's bytes (at most MAX_ROOT_BLOCK), unverified: the asker checks them against `root`
    # (`CID.verify`) before it reads them, and fetches the root itself when they are absent.
    root_block: bytes | None = None


# -- framing ---------------------------------------------------------------------------------------


_uvarint = varint.encode


def frame(payload: bytes) -> bytes:
    return _uvarint(len(payload)) + payload


class FrameReader:
    """Reassembles one length-prefixed message from chunks as they arrive.

    `feed(chunk)` returns the payload once complete (and None until then); bytes after the message, a
    length over `limit`, a non-minimal or overlong varint, or `eof()` in mid-message raise
    ResolveProtocolError. The declared length is checked before any payload is buffered."""

    def __init__(self, limit: int, what: str = "message"):
        self.limit = limit
        self.what = what
        self._buf = bytearray()
        self._length: int | None = None
        self._done = False

    def feed(self, chunk: bytes) -> bytes | None:
        if self._done:
            if chunk:
                raise ResolveProtocolError(f"resolve {self.what}: {len(chunk)} bytes after the message")
            return None
        self._buf += chunk
        if self._length is None:
            value = shift = 0
            for i, b in enumerate(self._buf[:_MAX_VARINT_BYTES]):
                value |= (b & 0x7F) << shift
                if not b & 0x80:
                    if b == 0 and i > 0:
                        raise ResolveProtocolError(f"resolve {self.what}: non-minimal length prefix")
                    if value > self.limit:
                        raise ResolveProtocolError(
                            f"resolve {self.what} of {value} bytes is over the {self.limit}-byte limit")
                    self._length = value
                    del self._buf[: i + 1]
                    break
                shift += 7
            else:
                if len(self._buf) >= _MAX_VARINT_BYTES:
                    raise ResolveProtocolError(f"resolve {self.what}: overlong length prefix")
                return None
        if len(self._buf) < self._length:
            return None
        if len(self._buf) > self._length:
            raise ResolveProtocolError(
                f"resolve {self.what}: {len(self._buf) - self._length} bytes after the message")
        self._done = True
        payload, self._buf = bytes(self._buf), bytearray()
        return payload

    def eof(self) -> None:
        """The stream ended; raise unless a whole message was read."""
        if not self._done:
            raise ResolveProtocolError(f"resolve {self.what}: stream ended before a whole message arrived")


# -- requests --------------------------------------------------------------------------------------


def _check_key(key: str, error: type[Exception]) -> None:
    if not key:
        raise error("resolve request has an empty key")
    if len(key.encode("utf-8")) > MAX_KEY:
        raise error(f"resolve key of {len(key.encode('utf-8'))} bytes is over the {MAX_KEY}-byte limit")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise error("resolve key holds control characters")


def encode_request(alias: str) -> bytes:
    """The framed request for `alias`."""
    _check_key(alias, RoutingUsageError)
    return frame(pb.ResolveRequest(key=alias).SerializeToString())


def decode_request(payload: bytes) -> str:
    """The alias a peer asks for. Any well-formed key is accepted: an alias we do not know is answered
    "not found", not treated as misbehaviour, so newer peers with new alias kinds still work."""
    if len(payload) > MAX_REQUEST:
        raise ResolveProtocolError(f"resolve request of {len(payload)} bytes is over the {MAX_REQUEST}-byte limit")
    msg = pb.ResolveRequest()
    try:
        msg.ParseFromString(payload)
    except DecodeError:
        raise ResolveProtocolError("resolve request is not a valid ResolveRequest protobuf") from None
    _check_key(msg.key, ResolveProtocolError)
    return msg.key


# -- responses -------------------------------------------------------------------------------------


def _check_text(name: str, value: str, error: type[Exception], required: bool = False) -> None:
    if required and not value:
        raise error(f"resolve answer: narinfo {name} is empty")
    if len(value.encode("utf-8")) > MAX_FIELD:
        raise error(f"resolve answer: narinfo {name} is over {MAX_FIELD} bytes")
    if "\n" in value or "\r" in value:
        raise error(f"resolve answer: narinfo {name} holds a line break")


def _check_narinfo(n: NarInfoFields, error: type[Exception]) -> None:
    _check_text("store_path", n.store_path, error, required=True)
    _check_text("nar_hash", n.nar_hash, error, required=True)
    for name in ("deriver", "system", "ca"):
        _check_text(name, getattr(n, name), error)
    if len(n.references) > MAX_REFERENCES:
        raise error(f"resolve answer: {len(n.references)} references, over the limit of {MAX_REFERENCES}")
    if len(n.sigs) > MAX_SIGS:
        raise error(f"resolve answer: {len(n.sigs)} signatures, over the limit of {MAX_SIGS}")
    for r in n.references:
        _check_text("reference", r, error, required=True)
    for s in n.sigs:
        _check_text("sig", s, error, required=True)
    if n.nar_size < 0 or n.nar_size >= 1 << 64:
        raise error(f"resolve answer: nar_size {n.nar_size} out of range")


def _check_answer(a: ResolveAnswer, error: type[Exception]) -> None:
    if a.kind not in KINDS:
        raise error(f"resolve answer: kind {a.kind[:40]!r} is not one of {sorted(KINDS)}")
    if a.size < 0 or a.size >= 1 << 64:
        raise error(f"resolve answer: size {a.size} out of range")
    if a.narinfo is not None:
        if a.kind != "nar":
            raise error(f"resolve answer: narinfo fields on a {a.kind!r}, only a 'nar' has them")
        _check_narinfo(a.narinfo, error)
    if a.root_block is not None and len(a.root_block) > MAX_ROOT_BLOCK:
        raise error(f"resolve answer: root block of {len(a.root_block)} bytes is over the {MAX_ROOT_BLOCK}-byte limit")


def encode_response(answer: ResolveAnswer | None) -> bytes:
    """The framed response: `None` means "not found here"."""
    if answer is None:
        return frame(pb.ResolveResponse(found=False).SerializeToString())
    _check_answer(answer, RoutingUsageError)
    msg = pb.ResolveResponse(found=True, root=answer.root.buffer, kind=answer.kind, size=answer.size)
    n = answer.narinfo
    if n is not None:
        msg.narinfo.CopyFrom(pb.NarInfo(
            store_path=n.store_path, nar_hash=n.nar_hash, nar_size=n.nar_size, references=list(n.references),
            deriver=n.deriver, system=n.system, ca=n.ca, sigs=list(n.sigs),
        ))
    if answer.root_block is not None:
        msg.root_block = answer.root_block
    data = msg.SerializeToString()
    if len(data) > MAX_RESPONSE and answer.root_block is not None:  # an optional hint: left out if it does not fit
        msg.ClearField("root_block")
        data = msg.SerializeToString()
    if len(data) > MAX_RESPONSE:
        raise RoutingUsageError(f"resolve answer of {len(data)} bytes is over the {MAX_RESPONSE}-byte limit")
    return frame(data)


def decode_response(payload: bytes) -> ResolveAnswer | None:
    """A peer's answer, validated for form (not for truth): None if it says "not found"."""
    if len(payload) > MAX_RESPONSE:
        raise ResolveProtocolError(
            f"resolve answer of {len(payload)} bytes is over the {MAX_RESPONSE}-byte limit")
    msg = pb.ResolveResponse()
    try:
        msg.ParseFromString(payload)
    except DecodeError:
        raise ResolveProtocolError("resolve answer is not a valid ResolveResponse protobuf") from None
    if not msg.found:
        if msg.root or msg.kind or msg.size or msg.HasField("narinfo") or msg.root_block:
            raise ResolveProtocolError("resolve answer says 'not found' but carries a root, kind, size, narinfo or root block")
        return None
    try:
        root = CID.decode(msg.root)
    except (InvalidCID, IndexError) as e:
        raise ResolveProtocolError(f"resolve answer: root is not a binary CID ({e})") from None
    narinfo = None
    if msg.HasField("narinfo"):
        n = msg.narinfo
        narinfo = NarInfoFields(n.store_path, n.nar_hash, n.nar_size, tuple(n.references), n.deriver, n.system,
                                n.ca, tuple(n.sigs))
    answer = ResolveAnswer(root, msg.kind, msg.size, narinfo, msg.root_block or None)
    _check_answer(answer, ResolveProtocolError)
    return answer
