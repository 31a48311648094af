"""Hash strings in every form Nix prints and accepts."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcache.content.nixhash import ALGORITHMS, InvalidNixHash, NixHash, parse

# sha256("hello\n") as Nix 2.8 prints it (`nix hash file --base32|--base16|--base64|--sri`).
HELLO = hashlib.sha256(b"hello\n").digest()
HELLO_FORMS = [
    "sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
    "sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
    "sha256:WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=",
    "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=",
    "sha256:5891B5B522D5DF086D0FF0B110FBD9D21BB4FC7163AF34D08286A2E846F6BE03",
]


@pytest.mark.parametrize("text", HELLO_FORMS)
def test_parse_each_form(text):
    h = parse(text)
    assert h == NixHash("sha256", HELLO)


def test_print_each_form():
    h = NixHash.of(b"hello\n")
    assert h.nix32() == HELLO_FORMS[0]
    assert h.base16() == HELLO_FORMS[1]
    assert h.base64() == HELLO_FORMS[2]
    assert h.sri() == HELLO_FORMS[3]
    assert str(h) == HELLO_FORMS[0]
    assert h.nix32(prefixed=False) == HELLO_FORMS[0][7:]


def test_bare_body_needs_the_algorithm():
    assert parse(HELLO_FORMS[0][7:], "sha256").digest == HELLO
    with pytest.raises(InvalidNixHash, match="no algorithm prefix"):
        parse(HELLO_FORMS[0][7:])
    with pytest.raises(InvalidNixHash, match="expected sha512"):
        parse(HELLO_FORMS[0], "sha512")


def test_sha512_and_others():
    for algo in ALGORITHMS:
        h = NixHash.of(b"abc", algo)
        for text in (h.nix32(), h.base16(), h.base64(), h.sri()):
            assert parse(text) == h
    sha512 = NixHash.of(b"abc", "sha512")
    assert len(sha512.nix32(prefixed=False)) == 103 and len(sha512.base16(prefixed=False)) == 128


@pytest.mark.parametrize(
    "text, match",
    [
        ("sha256:", "length 0"),
        ("sha256:abc", "length 3"),
        ("sha3:" + "0" * 64, "unknown algorithm"),
        ("blake3-" + "A" * 44, "unknown algorithm"),
        ("sha256:" + "g" * 64, "not valid base16"),
        ("sha256:" + "e" * 52, "not valid nix-base32"),
        ("sha256:" + "z" * 52, "non-zero padding"),  # 260 bits for a 256-bit digest
        ("sha256-" + "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03", "not base64"),
        ("sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgN=", "not canonical"),
        ("sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM", "length 43"),
        ("sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2v!M=", "not valid base64"),
        ("", "no algorithm prefix"),
    ],
)
def test_rejects(text, match):
    with pytest.raises(InvalidNixHash, match=match) as info:
        parse(text)
    assert "\n" not in str(info.value)


def test_digest_size_is_checked():
    with pytest.raises(InvalidNixHash, match="32 bytes"):
        NixHash("sha256", b"\0" * 31)


@given(st.sampled_from(sorted(ALGORITHMS)), st.data())
def test_round_trip_every_form(algo, data):
    h = NixHash(algo, data.draw(st.binary(min_size=ALGORITHMS[algo], max_size=ALGORITHMS[algo])))
    for text in (h.nix32(), h.base16(), h.base64(), h.sri()):
        assert parse(text) == h
    for text in (h.nix32(False), h.base16(False), h.base64(False)):
        assert parse(text, algo) == h


@given(st.text(max_size=140))
def test_arbitrary_text_parses_or_raises_our_error(text):
    try:
        h = parse(text)
    except InvalidNixHash:
        return
    assert parse(h.nix32()) == h
