import base64
import hashlib

import pytest
from hypothesis import given, strategies as st

from p2pcache.content import nixbase32
from p2pcache.content.cid import CID, DAG_CBOR
from p2pcache.content.keys import HashKey, RootKey, parse_key
from p2pcache.errors import InvalidKey


def forms(algo: str, digest: bytes) -> list[str]:
    b64 = base64.b64encode(digest).decode()
    out = [f"{algo}:{digest.hex()}", f"{algo}:{digest.hex().upper()}", f"{algo}-{b64}",
           f"{algo}:{nixbase32.encode(digest)}", f"{algo}:{b64}", f"  {algo}-{b64}\n"]
    if algo == "sha256":
        out += [digest.hex(), nixbase32.encode(digest)]
    return out


@given(st.binary(min_size=1, max_size=100), st.sampled_from(["sha256", "sha512"]))
def test_every_form_resolves_to_the_same_alias(data, algo):
    digest = hashlib.new(algo, data).digest()
    parsed = {parse_key(f) for f in forms(algo, digest)}
    assert parsed == {HashKey(algo, digest)}
    key = HashKey(algo, digest)
    assert parse_key(key.sri) == parse_key(key.nix32) == parse_key(key.alias) == key


def test_known_nix_base32_of_empty_sha256():
    # `nix hash to-base32 sha256:e3b0c442...` prints this (Nix's own test vector).
    digest = hashlib.sha256(b"").digest()
    assert nixbase32.encode(digest) == "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
    assert parse_key("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73") == HashKey("sha256", digest)


def test_root_cid_key():
    c = CID.for_block(DAG_CBOR, b"\xa0")
    assert parse_key(str(c)) == RootKey(c)


@pytest.mark.parametrize("text", ["", "nope", "sha256:", "sha256:abc", "sha256-!!!", "sha512-" + "A" * 10,
                                  "sha256-" + base64.b64encode(b"x" * 31).decode(), "md5:" + "0" * 32,
                                  "e" * 52])
def test_bad_keys_are_one_line_errors(text):
    with pytest.raises(InvalidKey) as e:
        parse_key(text)
    assert "\n" not in str(e.value)
