"""Strict DAG-CBOR encoding and decoding (the IPLD codec 0x71) on top of cbor2.

Encoding: canonical map-key order (length first, then bytewise — what cbor2's `canonical=True` does and
what DAG-CBOR requires), minimal integer encodings, definite lengths, links as tag 42 over the binary CID
with a leading 0x00 (the identity multibase). We refuse floats, tags other than 42, integers outside the
64-bit range and non-string map keys: our manifests never need them and refusing them keeps every value
with exactly one encoding.

Decoding is strict: a block decodes only if re-encoding the decoded value gives back the same bytes, so a
non-canonical or otherwise odd encoding of "the same" data is rejected instead of being given a second CID.
"""

from __future__ import annotations

from typing import Any

import cbor2

from ..errors import MalformedBlock
from .cid import CID, InvalidCID

_INT_MIN = -(2**64)
_INT_MAX = 2**64 - 1


_LEAVES = frozenset({type(None), bool, str, bytes, CID})  # exact types that need no look inside


def _check(value: Any, depth: int = 0) -> None:
    """Refuse what has no dag-cbor encoding. Exact built-in types are taken the quick way (a manifest page
    is thousands of small lists of ints, bytes and CIDs); anything else, subclasses included, goes through
    `_check_any`, which decides with isinstance. Same answers, same errors, as checking each value alone."""
    t = type(value)
    if depth > 64 or not (t is list or t is tuple or t is dict):
        _check_any(value, depth)
        return
    deeper = depth + 1
    if t is dict:
        for k, v in value.items():
            if type(k) is not str and not isinstance(k, str):
                raise MalformedBlock(f"dag-cbor map keys must be strings, got {type(k).__name__}")
            _check_item(v, deeper)
        return
    for v in value:
        _check_item(v, deeper)


def _check_item(v: Any, depth: int) -> None:
    t = type(v)
    if depth > 64:
        raise MalformedBlock("dag-cbor value nests deeper than 64 levels")
    if t in _LEAVES:
        return
    if t is int:
        if not _INT_MIN <= v <= _INT_MAX:
            raise MalformedBlock(f"integer {v} is outside the dag-cbor 64-bit range")
        return
    _check(v, depth)


def _check_any(value: Any, depth: int) -> None:
    if depth > 64:
        raise MalformedBlock("dag-cbor value nests deeper than 64 levels")
    if value is None or isinstance(value, (bool, str, bytes, CID)):
        return
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise MalformedBlock(f"integer {value} is outside the dag-cbor 64-bit range")
        return
    if isinstance(value, float):
        raise MalformedBlock("floats are not used in p2pcache dag-cbor data")
    if isinstance(value, (list, tuple)):
        for v in value:
            _check(v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise MalformedBlock(f"dag-cbor map keys must be strings, got {type(k).__name__}")
            _check(v, depth + 1)
        return
    raise MalformedBlock(f"type {type(value).__name__} has no dag-cbor encoding")


def _default(encoder: Any, value: Any) -> None:
    if isinstance(value, CID):
        encoder.encode(cbor2.CBORTag(42, b"\x00" + value.buffer))
        return
    raise MalformedBlock(f"type {type(value).__name__} has no dag-cbor encoding")


def encode(value: Any) -> bytes:
    """Encode a value of the dag-cbor data model (dict/list/str/bytes/int/bool/None/CID)."""
    _check(value)
    return cbor2.dumps(value, canonical=True, default=_default)


def encode_built(value: Any) -> bytes:
    """`encode` without the walk that refuses what has no dag-cbor encoding, for a value this process built
    itself from parts of known types only: a NAR manifest builder's directory pages (names and targets bytes,
    sizes u64s from the NAR, links CIDs), the file socket's answers. The same bytes; a value of a foreign
    type still fails, in cbor2's `default`. The walk was about half the cost of encoding a page of a
    many-file NAR; a value of any other origin goes through `encode`."""
    return cbor2.dumps(value, canonical=True, default=_default)


def _decode_link(value: Any, immutable: bool = False) -> CID:
    if not isinstance(value, bytes) or not value.startswith(b"\x00"):
        raise MalformedBlock("tag 42 must wrap a byte string starting with 0x00")
    try:
        return CID.decode(value[1:])
    except InvalidCID as e:
        raise MalformedBlock(f"tag 42 holds an invalid CID: {e}") from None


def _reject_tag(tag: Any, immutable: bool = False) -> Any:
    raise MalformedBlock(f"unexpected CBOR tag {tag.tag} (dag-cbor allows only tag 42)")


def decode(data: bytes | memoryview, *, recheck: bool = True, links: list[CID] | None = None) -> Any:
    """Decode a dag-cbor block, rejecting anything that is not in canonical dag-cbor form.

    `recheck=False` skips the canonical re-encode (the larger half of the cost) for a block this repo
    has decoded strictly before, e.g. a page of a tree it registered; the CBOR itself is still parsed
    strictly (no indefinite lengths, duplicate keys or foreign tags). `links`: a list the block's links
    are appended to in document order as they are decoded (what a walk of the value would find, without
    the walk: a many-file NAR manifest's page has thousands of values)."""
    data = bytes(data)
    link_decoder = _decode_link
    if links is not None:
        found = links.append

        def link_decoder(value: Any, immutable: bool = False) -> CID:
            cid = _decode_link(value)
            found(cid)
            return cid
    try:
        value = cbor2.loads(
            data,
            tag_hook=_reject_tag,
            semantic_decoders={42: link_decoder},
            allow_indefinite=False,
            allow_duplicate_keys=False,
            max_depth=80,
        )
    except MalformedBlock:
        raise
    except Exception as e:  # cbor2 raises CBORDecodeError and a few builtins on garbage
        cause = e.__cause__ if isinstance(e.__cause__, MalformedBlock) else None
        if cause is not None:
            raise cause from None
        raise MalformedBlock(f"not valid CBOR: {e}") from None
    if not recheck:
        return value
    try:
        again = encode(value)
    except MalformedBlock:
        raise
    if again != data:
        raise MalformedBlock("block is not canonical dag-cbor (re-encoding differs)")
    return value
