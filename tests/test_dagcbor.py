"""Our dag-cbor against an independent decoder (the `dag-cbor` PyPI package) and against hand-made vectors."""

import dag_cbor as independent
import pytest
from hypothesis import given, strategies as st

from p2pcache.content import dagcbor
from p2pcache.content.cid import CID, RAW
from p2pcache.errors import MalformedBlock

LINK = CID.for_block(RAW, b"hello")

# Built by hand from RFC 8949 + the DAG-CBOR spec: map(2) {"a": 1, "bb": link}, keys length-first.
GOLDEN = bytes.fromhex(
    "a2" "6161" "01" "626262" "d82a" "5825" "00" "01551220"
    "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
)


def test_golden_vector_encodes_and_decodes():
    value = {"bb": LINK, "a": 1}
    assert dagcbor.encode(value) == GOLDEN
    assert dagcbor.decode(GOLDEN) == {"a": 1, "bb": LINK}


def test_independent_decoder_agrees_on_golden_vector():
    theirs = independent.decode(GOLDEN)
    assert theirs["a"] == 1
    assert bytes(theirs["bb"]) == LINK.buffer


values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.text(max_size=20) | st.binary(max_size=40) | st.just(LINK),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


def _normalise_theirs(v):
    if isinstance(v, dict):
        return {k: _normalise_theirs(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_normalise_theirs(x) for x in v]
    if type(v).__name__ == "CID":
        return CID.decode(bytes(v))
    return v


@given(values)
def test_independent_decoder_agrees_on_everything_we_encode(value):
    data = dagcbor.encode(value)
    assert dagcbor.decode(data) == value
    assert _normalise_theirs(independent.decode(data)) == value


@given(values)
def test_independent_encoder_output_is_accepted(value):
    theirs = independent.encode(_to_theirs(value))
    assert theirs == dagcbor.encode(value)


def _to_theirs(v):
    from multiformats import CID as MfCID
    if isinstance(v, CID):
        return MfCID.decode(v.buffer)
    if isinstance(v, dict):
        return {k: _to_theirs(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_to_theirs(x) for x in v]
    return v


@pytest.mark.parametrize("hexdata,why", [
    ("a2616201616101", "keys out of canonical order"),
    ("1817", "non-minimal integer"),
    ("f93c00", "float"),
    ("fb3ff0000000000000", "float64"),
    ("c074323031332d30332d32315432303a30343a30305a", "tag 0"),
    ("d82a4401551220", "tag 42 without identity prefix"),
    ("9f01ff", "indefinite array"),
    ("a2616101616102", "duplicate key"),
    ("a10101", "integer map key"),
    ("", "empty"),
    ("8301", "truncated"),
    ("0101", "trailing bytes"),
])
def test_non_canonical_or_foreign_encodings_rejected(hexdata, why):
    with pytest.raises(MalformedBlock):
        dagcbor.decode(bytes.fromhex(hexdata))


@pytest.mark.parametrize("value", [1.5, {1: 2}, object(), 2**64, -(2**64) - 1])
def test_unencodable_values_rejected(value):
    with pytest.raises(MalformedBlock):
        dagcbor.encode(value)


LINKS = [CID.for_block(RAW, bytes([i])) for i in range(4)]
linked_values = st.recursive(
    st.integers(min_value=0, max_value=300) | st.binary(max_size=40) | st.sampled_from(LINKS),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)


def _walk_theirs(v):
    """The links of the independent decoder's value in document order (its maps keep the encoded order)."""
    if isinstance(v, dict):
        return [link for x in v.values() for link in _walk_theirs(x)]
    if isinstance(v, list):
        return [link for x in v for link in _walk_theirs(x)]
    return [CID.decode(bytes(v))] if type(v).__name__ == "CID" else []


@given(linked_values)
def test_links_collected_while_decoding_are_the_blocks_links_in_document_order(value):
    data = dagcbor.encode(value)
    for recheck in (True, False):
        links: list[CID] = []
        assert dagcbor.decode(data, recheck=recheck, links=links) == value
        assert links == _walk_theirs(independent.decode(data))
