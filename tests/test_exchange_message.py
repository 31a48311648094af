"""Bitswap 1.2.0 message encoding, decoding, limits and framing (p2pcache.exchange.message)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcache.content.cid import CID, DAG_CBOR, RAW
from p2pcache.exchange import message as m
from p2pcache.exchange.errors import ExchangeUsageError, ProtocolViolation
from p2pcache.exchange.pb import bitswap_pb2 as pb

HELLO = b"hello"
HELLO_CID = CID.for_block(RAW, HELLO)


def test_golden_vector_from_the_spec():
    # Encoded by hand from the 1.2.0 wire format in ipfs/specs (bitswap-protocol.md) and protobuf's
    # encoding rules: tag = field << 3 | wire type; proto3 leaves out fields at their defaults.
    cid = bytes([0x01, 0x55, 0x12, 0x20]) + hashlib.sha256(HELLO).digest()  # CIDv1 raw sha2-256
    assert len(cid) == 0x24
    entry = (
        b"\x0a\x24" + cid  # block = 1, length-delimited
        + b"\x10\x01"  # priority = 2, varint 1
        + b"\x20\x01"  # wantType = 4, Have
        + b"\x28\x01"  # sendDontHave = 5, true
    )
    wantlist = b"\x0a" + bytes([len(entry)]) + entry  # entries = 1
    block = b"\x0a\x04\x01\x55\x12\x20" + b"\x12\x05" + HELLO  # prefix = 1, data = 2
    presence = b"\x0a\x24" + cid + b"\x10\x01"  # cid = 1, type = 2 DontHave
    golden = (
        b"\x0a" + bytes([len(wantlist)]) + wantlist  # wantlist = 1
        + b"\x1a" + bytes([len(block)]) + block  # payload = 3
        + b"\x22" + bytes([len(presence)]) + presence  # blockPresences = 4
        + b"\x28\x05"  # pendingBytes = 5
    )
    msg = m.Message(
        wants=(m.WantEntry(HELLO_CID, m.WantType.HAVE, priority=1, send_dont_have=True),),
        blocks=(m.Block(HELLO_CID, HELLO),),
        presences=(m.Presence(HELLO_CID, have=False),),
        pending_bytes=5,
    )
    assert m.encode(msg) == golden
    assert m.decode(golden) == msg


def test_bitswap_1_0_blocks_field_decodes_as_cidv0():
    msg = m.decode(b"\x12\x05" + HELLO)  # blocks = 2
    assert msg.blocks == (m.Block(CID(b"\x12\x20" + hashlib.sha256(HELLO).digest()), HELLO),)
    assert msg.blocks[0].cid.version == 0


def test_cancel_and_full_round_trip():
    msg = m.Message(wants=(m.WantEntry(HELLO_CID, cancel=True),), full=True)
    assert m.decode(m.encode(msg)) == msg
    assert m.decode(m.encode(m.Message(full=True))) == m.Message(full=True)
    assert m.encode(m.Message()) == b""
    assert m.decode(b"") == m.Message()


cids = st.builds(CID.for_block, st.sampled_from([RAW, DAG_CBOR]), st.binary(max_size=8))
datas = st.binary(max_size=300)
wants = st.builds(
    m.WantEntry,
    cids,
    st.sampled_from(list(m.WantType)),
    st.integers(-(2**31), 2**31 - 1),
    st.booleans(),
    st.booleans(),
)
blocks = st.builds(lambda codec, data: m.Block(CID.for_block(codec, data), data), st.sampled_from([RAW, DAG_CBOR]), datas)
presences = st.builds(m.Presence, cids, st.booleans())
messages = st.builds(
    m.Message,
    st.lists(wants, max_size=5).map(tuple),
    st.booleans(),
    st.lists(blocks, max_size=4).map(tuple),
    st.lists(presences, max_size=4).map(tuple),
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=100, deadline=None)
@given(messages)
def test_round_trip(msg):
    assert m.decode(m.encode(msg)) == msg


@settings(max_examples=100, deadline=None)
@given(st.lists(blocks, max_size=4), st.lists(presences, max_size=4), st.integers(0, 2**31 - 1))
def test_wire_size_helpers_are_exact(bs, ps, pending):
    msg = m.Message(blocks=tuple(bs), presences=tuple(ps), pending_bytes=pending)
    expected = sum(m.block_wire_size(b.cid, len(b.data)) for b in bs)
    expected += sum(m.presence_wire_size(p.cid, p.have) for p in ps)
    expected += (1 + len(m.uvarint(pending))) if pending else 0
    assert len(m.encode(msg)) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(wants, min_size=1, max_size=5))
def test_want_wire_size_is_exact(ws):
    body = sum(m.want_wire_size(w) for w in ws)
    wire = len(m.encode(m.Message(wants=tuple(ws))))
    assert wire == 1 + len(m.uvarint(body)) + body


# -- rejected input ------------------------------------------------------------------------------


def _pb_message(**payload) -> bytes:
    msg = pb.Message()
    for prefix, data in payload.get("payload", []):
        b = msg.payload.add()
        b.prefix, b.data = prefix, data
    for raw, want_type in payload.get("entries", []):
        e = msg.wantlist.entries.add()
        e.block, e.wantType = raw, want_type
    for raw, kind in payload.get("presences", []):
        p = msg.blockPresences.add()
        p.cid, p.type = raw, kind
    if "pending" in payload:
        msg.pendingBytes = payload["pending"]
    return msg.SerializeToString()


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\xff\xff\xff", "does not parse"),
        (b"\x0a\x05\x0a", "does not parse"),  # truncated wantlist
        (_pb_message(payload=[(b"\x01\x55\x1b\x20", HELLO)]), "only sha2-256"),  # keccak-256
        (_pb_message(payload=[(b"\x01\x55\x12\x14", HELLO)]), "only sha2-256"),  # truncated digest
        (_pb_message(payload=[(b"\x01\x55\x12\x20\x00", HELLO)]), "trailing"),
        (_pb_message(payload=[(b"\x02\x55\x12\x20", HELLO)]), "CID version 2"),
        (_pb_message(payload=[(b"\x00\x55\x12\x20", HELLO)]), "CIDv0 with codec"),
        (_pb_message(payload=[(b"\x01\x55\x12", HELLO)]), "varint"),
        (_pb_message(payload=[(b"", HELLO)]), "varint"),
        (_pb_message(entries=[(b"\x07\x01", 0)]), "malformed CID"),
        (_pb_message(entries=[(HELLO_CID.buffer, 7)]), "unknown want type"),
        (_pb_message(presences=[(b"\x01\x55\x12\x20abc", 0)]), "malformed CID"),
        (_pb_message(presences=[(HELLO_CID.buffer, 5)]), "unknown type"),
        (_pb_message(pending=-1), "negative pendingBytes"),
    ],
)
def test_malformed_messages_are_protocol_violations(raw, reason):
    with pytest.raises(ProtocolViolation, match=reason) as info:
        m.decode(raw)
    assert "\n" not in str(info.value)


def test_oversized_message_rejected_before_parsing():
    with pytest.raises(ProtocolViolation, match="over the 4194304 byte limit"):
        m.decode(b"\x00" * (m.MAX_MESSAGE_SIZE + 1))


def test_oversized_block_rejected():
    data = b"\x00" * (m.MAX_BLOCK_SIZE + 1)
    raw = _pb_message(payload=[(HELLO_CID.prefix(), data)])
    with pytest.raises(ProtocolViolation, match="over the 2097152 byte limit"):
        m.decode(raw)
    ok = b"\x00" * m.MAX_BLOCK_SIZE
    assert m.decode(_pb_message(payload=[(HELLO_CID.prefix(), ok)])).blocks[0].cid == CID.for_block(RAW, ok)


def test_a_wrong_block_cannot_pass_as_the_cid_it_claims():
    # The peer sends the prefix of HELLO_CID with other data: decoding names the block by what the
    # data hashes to, so it can never be mistaken for HELLO_CID.
    msg = m.decode(_pb_message(payload=[(HELLO_CID.prefix(), b"jello")]))
    assert msg.blocks[0].cid != HELLO_CID
    assert msg.blocks[0].cid == CID.for_block(RAW, b"jello")
    assert msg.blocks[0].cid.verify(b"jello")


def test_encoding_over_the_limits_is_our_misuse():
    big = b"\x00" * (m.MAX_BLOCK_SIZE + 1)
    with pytest.raises(ExchangeUsageError):
        m.encode(m.Message(blocks=(m.Block(CID.for_block(RAW, big), big),)))
    two = b"\x01" * m.MAX_BLOCK_SIZE
    three = [m.Block(CID.for_block(RAW, two[:-i]), two[:-i]) for i in (1, 2)]
    with pytest.raises(ExchangeUsageError, match="over the 4194304 byte limit"):
        m.encode(m.Message(blocks=tuple(three)))
    with pytest.raises(ExchangeUsageError):
        m.frame(b"\x00" * (m.MAX_MESSAGE_SIZE + 1))


# -- framing -------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(messages, max_size=3), st.lists(st.integers(1, 64), max_size=20))
def test_framing_survives_any_split(msgs, cuts):
    stream = b"".join(m.encode_framed(x) for x in msgs)
    dec = m.FrameDecoder()
    got, pos = [], 0
    for c in cuts:
        got += dec.feed(stream[pos : pos + c])
        pos += c
    got += dec.feed(stream[pos:])
    assert [m.decode(g) for g in got] == msgs
    assert dec.buffered == 0


def test_frame_length_prefix():
    assert m.frame(b"abc") == b"\x03abc"
    assert m.frame(b"x" * 300)[:2] == b"\xac\x02"
    assert m.FrameDecoder().feed(b"\x00") == [b""]


def test_frame_decoder_rejects_oversized_announcement_early():
    dec = m.FrameDecoder()
    with pytest.raises(ProtocolViolation, match="over the 4194304 byte limit"):
        dec.feed(m.uvarint(m.MAX_MESSAGE_SIZE + 1))
    with pytest.raises(ProtocolViolation, match="overlong"):
        m.FrameDecoder().feed(b"\xff" * 10)
    partial = m.FrameDecoder()
    assert partial.feed(b"\x05ab") == []
    assert partial.buffered == 3


def test_wire_compatible_with_an_independent_schema():
    # py-libp2p ships its own generated bitswap schema; bytes must mean the same to both.
    theirs = pytest.importorskip("libp2p.bitswap.pb.bitswap_pb2")
    msg = m.Message(
        wants=(m.WantEntry(HELLO_CID, m.WantType.HAVE, 7, send_dont_have=True),),
        blocks=(m.Block(HELLO_CID, HELLO),),
        presences=(m.Presence(HELLO_CID, have=False),),
        pending_bytes=5,
    )
    parsed = theirs.Message.FromString(m.encode(msg))
    entry = parsed.wantlist.entries[0]
    assert (entry.block, entry.priority, entry.wantType, entry.sendDontHave) == (HELLO_CID.buffer, 7, 1, True)
    assert (parsed.payload[0].prefix, parsed.payload[0].data) == (HELLO_CID.prefix(), HELLO)
    assert (parsed.blockPresences[0].cid, parsed.blockPresences[0].type, parsed.pendingBytes) == (HELLO_CID.buffer, 1, 5)
    assert m.decode(parsed.SerializeToString()) == msg
