"""Store path parsing and validation with Nix's rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcache.content import nixbase32
from p2pcache.content.storepath import InvalidStorePath, StorePath, check_name
from p2pcache.errors import InvalidInput

HASH = "3j8r511q8gg85ch41in6l4r4cfqrn0bv"


def test_parse_full_path():
    p = StorePath.parse(f"/nix/store/{HASH}-hello-2.12.1")
    assert (p.store_dir, p.hash_part, p.name) == ("/nix/store", HASH, "hello-2.12.1")
    assert p.base_name == f"{HASH}-hello-2.12.1"
    assert str(p) == f"/nix/store/{HASH}-hello-2.12.1"
    assert nixbase32.encode(p.digest) == HASH and len(p.digest) == 20
    assert not p.is_derivation
    assert StorePath.parse(f"/nix/store/{HASH}-x.drv").is_derivation


def test_custom_store_dir():
    p = StorePath.parse(f"/tmp/my store/{HASH}-a", "/tmp/my store")
    assert p.store_dir == "/tmp/my store"
    assert StorePath.parse(f"/opt/nix/store/{HASH}-a").store_dir == "/opt/nix/store"
    with pytest.raises(InvalidStorePath, match="not in the Nix store"):
        StorePath.parse(f"/opt/nix/store/{HASH}-a", "/nix/store")


def test_from_base_name():
    assert StorePath.from_base_name(f"{HASH}-a") == StorePath("/nix/store", HASH, "a")


def test_allowed_name_characters_and_length():
    check_name("aZ09+-._?=")
    check_name("x" * 211)
    check_name(".foo")  # current Nix allows a leading dot, except '.', '..', '.-', '..-'
    check_name("..foo")
    with pytest.raises(InvalidStorePath, match="longer than 211"):
        check_name("x" * 212)


@pytest.mark.parametrize(
    "path, match",
    [
        (f"/nix/store/{HASH}-", "not a store path base name"),
        (f"/nix/store/{HASH}", "not a store path base name"),
        (f"/nix/store/{HASH}_a", "not a store path base name"),
        (f"/nix/store/{HASH[:-1]}-a", "not a store path base name"),
        (f"/nix/store/{HASH[:-1]}-ab", "not a store path base name"),
        (f"/nix/store/{HASH[:-1]}e-a", "not 32 nix-base32"),
        (f"/nix/store/{HASH[:-1]}o-a", "not 32 nix-base32"),
        (f"/nix/store/{HASH.upper()}-a", "not 32 nix-base32"),
        (f"/nix/store/{HASH}-a b", "illegal character ' '"),
        (f"/nix/store/{HASH}-a/b", "not in the Nix store"),
        (f"/nix/store/{HASH}-é", "illegal character"),
        (f"/nix/store/{HASH}-.", "not valid"),
        (f"/nix/store/{HASH}-..", "not valid"),
        (f"/nix/store/{HASH}-.-x", "not valid"),
        (f"/nix/store/{HASH}-..-x", "not valid"),
        (f"nix/store/{HASH}-a", "not in the Nix store"),
        (f"{HASH}-a", "not a store path"),
        (f"/{HASH}-a", "not a store path"),
    ],
)
def test_rejects(path, match):
    with pytest.raises(InvalidStorePath, match=match) as info:
        StorePath.parse(path, "/nix/store" if path.startswith("/nix") or path.startswith("nix") else None)
    assert isinstance(info.value, InvalidInput) and "\n" not in str(info.value)


@pytest.mark.parametrize("store_dir", ["relative", "/", "/nix/store/", "/nix//store", "/nix/./store", "/nix/../store"])
def test_rejects_non_canonical_store_dirs(store_dir):
    with pytest.raises(InvalidStorePath, match="store directory"):
        StorePath(store_dir, HASH, "a")


name_chars = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=")


@given(st.binary(min_size=20, max_size=20), st.text(name_chars, min_size=1, max_size=211))
def test_round_trip(digest, name):
    if name in (".", "..") or name.startswith((".-", "..-")):
        with pytest.raises(InvalidStorePath):
            check_name(name)
        return
    text = f"/nix/store/{nixbase32.encode(digest)}-{name}"
    p = StorePath.parse(text)
    assert str(p) == text and p.digest == digest and p.name == name


@given(st.text(max_size=80))
def test_arbitrary_text_parses_or_raises_our_error(text):
    try:
        p = StorePath.parse(text)
    except InvalidStorePath:
        return
    assert str(p) == text
