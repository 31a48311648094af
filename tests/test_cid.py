import hashlib

import cid as pycid
import pytest
from hypothesis import given, strategies as st

from p2pcache.content.cid import CID, DAG_CBOR, RAW
from p2pcache.errors import InvalidCID


def test_raw_cid_of_known_bytes_matches_ipfs():
    # `ipfs add --raw-leaves --cid-version=1` of "hello" gives this CID.
    c = CID.for_block(RAW, b"hello")
    assert str(c) == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
    assert c.codec == RAW and c.version == 1 and c.digest == hashlib.sha256(b"hello").digest()
    assert c.prefix() == bytes([0x01, 0x55, 0x12, 0x20])


def test_text_forms_parse_to_the_same_cid():
    c = CID.for_block(DAG_CBOR, b"\xa0")
    assert CID.parse(str(c)) == c
    b58 = pycid.from_bytes(c.buffer).encode("base58btc").decode()
    assert b58.startswith("z") and CID.parse(b58) == c


def test_cidv0_accepted_on_input():
    v0 = CID.parse("QmPZ9gcCEpqKTo6aq61g2nXGUhM4iCL3ewB6LDXZCtioEB")
    assert v0.version == 0 and v0.codec_name == "dag-pb" and len(v0.digest) == 32
    assert str(v0) == "QmPZ9gcCEpqKTo6aq61g2nXGUhM4iCL3ewB6LDXZCtioEB"


@pytest.mark.parametrize("text", ["", "hello", "bafkrei", "Qm123", "b!!!!"])
def test_garbage_text_is_rejected(text):
    with pytest.raises(InvalidCID):
        CID.parse(text)


@pytest.mark.parametrize("buf", [b"", b"\x02\x55\x12\x20" + b"\0" * 32, b"\x01\x55\x12\x20" + b"\0" * 31,
                                 b"\x01\x55\x12\x20" + b"\0" * 33, b"\x01\xff", b"\x01\x55\x12\x80\x00"])
def test_malformed_binary_rejected(buf):
    with pytest.raises(InvalidCID):
        CID.decode(buf)


@given(st.binary(max_size=2048), st.sampled_from([RAW, DAG_CBOR]))
def test_roundtrip_and_verify(data, codec):
    c = CID.for_block(codec, data)
    assert CID.decode(c.buffer) == c
    assert CID.parse(c.encode()) == c
    assert c.verify(data)
    assert not c.verify(data + b"x")


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_varint_roundtrip(n):
    from p2pcache.content import varint

    enc = varint.encode(n)
    assert varint.decode(enc + b"\xff", 0) == (n, len(enc))


@pytest.mark.parametrize("buf", [b"", b"\x80", b"\x80\x00", b"\xff" * 10])
def test_varint_rejects_truncated_overlong_and_non_minimal(buf):
    from p2pcache.content import varint

    with pytest.raises(ValueError):
        varint.decode(buf)
