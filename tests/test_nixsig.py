"""Nix signing keys, signatures and the fingerprint they sign."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcache.content.nixhash import NixHash
from p2pcache.content.nixsig import (
    InvalidSignature,
    PublicKey,
    SecretKey,
    Signature,
    fingerprint,
    generate_key_pair,
    verify_any,
)

# A public key from `nix-store --generate-binary-cache-key test1 sec.key pub.key` (Nix 2.8), and the Sig Nix
# wrote with its secret key for the path below on `nix copy --to 'file://...?secret-key=sec.key'`.
PUBLIC = "test1:xo1OliEsq3HpA0k5Om9MJpgYUEWUHcbJf618HB/KKJc="
PATH = "/nix/store/r910wcnq0snrp2gvskmpjqr7b7dwjxpj-withref"
NAR_HASH = "sha256:0mvi5yx7kv5m1nfy1hnxgwvg3m484qhn6z377m7wdv4d874fb5k9"
REF = "/nix/store/3j8r511q8gg85ch41in6l4r4cfqrn0bv-tree"
NIX_SIG = "test1:2b6aT1C4C02+l1jWRJ2MxLIJm7ORFufI0r3vbQQBo1nAgisMkeihjXSLlv4u4Z/lL9JGRqkI9Ov5y5eaJBpICQ=="


def test_fingerprint_format():
    fp = fingerprint(PATH, NAR_HASH, 168, [REF])
    assert fp == f"1;{PATH};{NAR_HASH};168;{REF}"
    # References are sorted and de-duplicated like Nix's path sets; the hash is normalised to nix32.
    a, b = "/nix/store/0" + "a" * 31 + "-x", "/nix/store/1" + "a" * 31 + "-x"
    h = NixHash.parse(NAR_HASH)
    assert fingerprint(PATH, h.sri(), 1, [b, a, b]) == f"1;{PATH};{NAR_HASH};1;{a},{b}"
    assert fingerprint(PATH, h, 1, []) == f"1;{PATH};{NAR_HASH};1;"
    with pytest.raises(ValueError, match="not positive"):
        fingerprint(PATH, h, 0, [])


def test_verify_a_signature_nix_made():
    key = PublicKey.parse(PUBLIC)
    fp = fingerprint(PATH, NAR_HASH, 168, [REF])
    assert key.verify(fp, NIX_SIG)
    assert not key.verify(fp.replace(";168;", ";169;"), NIX_SIG)
    assert not PublicKey("other", key.key).verify(fp, NIX_SIG)  # a name mismatch never verifies
    assert verify_any(fp, [NIX_SIG], [key])
    assert not verify_any(fp, [NIX_SIG], [PublicKey("other", key.key)])


def test_sign_verify_and_text_forms():
    sk, pk = generate_key_pair("cache.example.org-1")
    assert SecretKey.parse(str(sk)) == sk
    assert PublicKey.parse(str(pk) + "\n") == pk
    assert str(sk).startswith("cache.example.org-1:") and len(base64.b64decode(str(sk).split(":")[1])) == 64
    sig = sk.sign("message")
    assert Signature.parse(str(sig)) == sig and sig.key_name == "cache.example.org-1"
    assert pk.verify("message", sig) and pk.verify(b"message", str(sig))
    assert not pk.verify("massage", sig)
    tampered = Signature(sig.key_name, bytes([sig.sig[0] ^ 1]) + sig.sig[1:])
    assert not pk.verify("message", tampered)
    other_sk, other_pk = generate_key_pair("cache.example.org-1")
    assert not other_pk.verify("message", sig)
    assert sk.sign("message") == sig  # ed25519 is deterministic


def test_secret_key_whose_halves_disagree_is_rejected():
    sk1, _ = generate_key_pair("k")
    _, pk2 = generate_key_pair("k")
    raw = sk1.seed + pk2.key
    with pytest.raises(InvalidSignature, match="does not match") as info:
        SecretKey.parse("k:" + base64.b64encode(raw).decode())
    assert base64.b64encode(raw).decode() not in str(info.value)  # secrets never appear in messages


@pytest.mark.parametrize(
    "line, match",
    [
        ("nocolon", "no ':'"),
        (":" + "A" * 44, "key name"),
        ("a b:" + "A" * 44, "key name"),
        ("k:!!!", "not valid base64"),
        ("k:" + base64.b64encode(b"x" * 31).decode(), "holds 31 bytes"),
    ],
)
def test_public_key_rejects(line, match):
    with pytest.raises(InvalidSignature, match=match):
        PublicKey.parse(line)


@pytest.mark.parametrize("line", ["k:" + base64.b64encode(b"x" * 63).decode(), "k", "k:", "k:A"])
def test_signature_rejects(line):
    with pytest.raises(InvalidSignature):
        Signature.parse(line)


def test_secret_key_errors_do_not_echo_the_key():
    line = "k:" + base64.b64encode(b"s" * 63).decode()
    with pytest.raises(InvalidSignature) as info:
        SecretKey.parse(line)
    assert line not in str(info.value) and "63 bytes" in str(info.value)


@given(st.text(max_size=120))
def test_arbitrary_lines_parse_or_raise_our_error(text):
    for parse in (Signature.parse, PublicKey.parse, SecretKey.parse):
        try:
            value = parse(text)
        except InvalidSignature:
            continue
        assert parse(str(value)) == value
