"""narinfo parsing, rendering, validation, signing and verification."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcache.content import nixbase32
from p2pcache.content.narinfo import InvalidNarInfo, NarInfo
from p2pcache.content.nixhash import ALGORITHMS, NixHash
from p2pcache.content.nixsig import PublicKey, generate_key_pair
from p2pcache.content.storepath import StorePath
from p2pcache.errors import InvalidInput

# Written by Nix 2.8: `nix copy --to 'file://DIR?secret-key=sec.key'` of a built derivation output and of a
# path added with `nix-store --add` (content-addressed, so it carries CA).
NIX_WRITTEN = """\
StorePath: /nix/store/r910wcnq0snrp2gvskmpjqr7b7dwjxpj-withref
URL: nar/09zr7g9xaqhdx5zh49s2a95l46i3bby823nqkigql92r7d5sxa21.nar.xz
Compression: xz
FileHash: sha256:09zr7g9xaqhdx5zh49s2a95l46i3bby823nqkigql92r7d5sxa21
FileSize: 176
NarHash: sha256:0mvi5yx7kv5m1nfy1hnxgwvg3m484qhn6z377m7wdv4d874fb5k9
NarSize: 168
References: 3j8r511q8gg85ch41in6l4r4cfqrn0bv-tree
Deriver: d2c2njksdd7c2dr45ryc09zy0jlnj2xv-withref.drv
Sig: test1:2b6aT1C4C02+l1jWRJ2MxLIJm7ORFufI0r3vbQQBo1nAgisMkeihjXSLlv4u4Z/lL9JGRqkI9Ov5y5eaJBpICQ==
"""
NIX_WRITTEN_CA = """\
StorePath: /nix/store/3j8r511q8gg85ch41in6l4r4cfqrn0bv-tree
URL: nar/0mr5637i3wmsw87chz06fp2h6rx9sdcg9ba04d845cl8l0n95qji.nar.xz
Compression: xz
FileHash: sha256:0mr5637i3wmsw87chz06fp2h6rx9sdcg9ba04d845cl8l0n95qji
FileSize: 252
NarHash: sha256:10m2lb6s6ajcr2m9db6wr3z3dyn9gldcxqw02n3dsy2dsqg76b8j
NarSize: 1232
References: 
Sig: test1:RDJqNjVZgtRgllkl8zmimNiosJto7/8GG0dr3z25YBVPgQRUwjYbg+ntNpPumyuC6xYxT7lgpsUyHT3LWZyrDw==
CA: fixed:r:sha256:10m2lb6s6ajcr2m9db6wr3z3dyn9gldcxqw02n3dsy2dsqg76b8j
"""
PUBLIC = PublicKey.parse("test1:xo1OliEsq3HpA0k5Om9MJpgYUEWUHcbJf618HB/KKJc=")


def test_parse_nix_written():
    info = NarInfo.parse(NIX_WRITTEN)
    assert str(info.store_path) == "/nix/store/r910wcnq0snrp2gvskmpjqr7b7dwjxpj-withref"
    assert info.url.startswith("nar/09zr") and info.compression == "xz" and info.file_size == 176
    assert info.file_hash == NixHash.parse("sha256:09zr7g9xaqhdx5zh49s2a95l46i3bby823nqkigql92r7d5sxa21")
    assert info.nar_size == 168 and info.nar_hash.algo == "sha256"
    assert info.references == ("3j8r511q8gg85ch41in6l4r4cfqrn0bv-tree",)
    assert info.reference_paths == (StorePath.parse("/nix/store/3j8r511q8gg85ch41in6l4r4cfqrn0bv-tree"),)
    assert info.deriver_path == StorePath.parse("/nix/store/d2c2njksdd7c2dr45ryc09zy0jlnj2xv-withref.drv")
    assert info.ca is None and info.extra == () and len(info.sigs) == 1
    assert info.render() == NIX_WRITTEN
    ca = NarInfo.parse(NIX_WRITTEN_CA)
    assert ca.references == () and ca.ca.startswith("fixed:r:sha256:")
    assert ca.render() == NIX_WRITTEN_CA


def test_nix_signatures_verify():
    assert NarInfo.parse(NIX_WRITTEN).verify([PUBLIC])
    assert NarInfo.parse(NIX_WRITTEN_CA).verify([PUBLIC])
    tampered = NIX_WRITTEN.replace("NarSize: 168", "NarSize: 169")
    assert not NarInfo.parse(tampered).verify([PUBLIC])
    no_refs = NIX_WRITTEN.replace("References: 3j8r511q8gg85ch41in6l4r4cfqrn0bv-tree", "References: ")
    assert not NarInfo.parse(no_refs).verify([PUBLIC])


def test_unknown_fields_are_kept_in_order():
    text = NIX_WRITTEN.replace("Compression: xz\n", "Compression: xz\nZeta: 1\n") + "Alpha: two words\nZeta: 3\n"
    info = NarInfo.parse(text)
    assert info.extra == (("Zeta", "1"), ("Alpha", "two words"), ("Zeta", "3"))
    assert info.render() == NIX_WRITTEN + "Zeta: 1\nAlpha: two words\nZeta: 3\n"
    assert NarInfo.parse(info.render()) == info


def test_old_style_fields_and_other_hash_spellings():
    text = (
        "StorePath: /nix/store/r910wcnq0snrp2gvskmpjqr7b7dwjxpj-withref\n"
        "URL: nar/x.nar.bz2\n"
        "NarHash: sha256-" + NixHash.parse("sha256:0mvi5yx7kv5m1nfy1hnxgwvg3m484qhn6z377m7wdv4d874fb5k9").base64(False) + "\n"
        "NarSize: 168\n"
        "References: 3j8r511q8gg85ch41in6l4r4cfqrn0bv-tree r910wcnq0snrp2gvskmpjqr7b7dwjxpj-withref\n"
        "Deriver: unknown-deriver\n"
        "System: x86_64-linux\n"
    )
    info = NarInfo.parse(text)
    assert info.compression is None and info.effective_compression == "bzip2"
    assert info.deriver == "unknown-deriver" and info.deriver_path is None and info.system == "x86_64-linux"
    assert info.file_hash is None and info.file_size is None
    rendered = info.render()
    assert "NarHash: sha256:0mvi5yx7kv5m1nfy1hnxgwvg3m484qhn6z377m7wdv4d874fb5k9\n" in rendered
    assert "System: x86_64-linux\n" in rendered and "Compression" not in rendered
    assert NarInfo.parse(rendered) == info


def test_custom_store_dir():
    text = NIX_WRITTEN.replace("/nix/store/", "/tmp/st/")
    info = NarInfo.parse(text)
    assert info.store_path.store_dir == "/tmp/st"
    assert info.fingerprint().endswith(";/tmp/st/3j8r511q8gg85ch41in6l4r4cfqrn0bv-tree")
    with pytest.raises(InvalidNarInfo, match="not in the Nix store"):
        NarInfo.parse(text, store_dir="/nix/store")


def test_sign_and_verify():
    sk, pk = generate_key_pair("p2pcache-test-1")
    base = NarInfo.parse(NIX_WRITTEN)
    signed = base.signed(sk)
    assert len(signed.sigs) == 2 and signed.verify([pk]) and signed.verify([PUBLIC])
    assert signed.signed(sk).sigs == signed.sigs  # re-signing replaces the same key's signature
    assert NarInfo.parse(signed.render()).verify([pk])
    assert not replace(signed, nar_hash=NixHash.of(b"other")).verify([pk])
    assert not replace(signed, references=()).verify([pk])
    assert not signed.verify([generate_key_pair("p2pcache-test-1")[1]])


def _drop(field: str) -> str:
    return "".join(line for line in NIX_WRITTEN.splitlines(True) if not line.startswith(field + ":"))


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        (NIX_WRITTEN[:-1], "newline"),
        (NIX_WRITTEN.replace("\n", "\r\n"), "carriage return"),
        (_drop("StorePath"), "no StorePath"),
        (_drop("URL"), "no URL"),
        (_drop("NarHash"), "no NarHash"),
        (_drop("NarSize"), "no NarSize"),
        (NIX_WRITTEN.replace("NarSize: 168", "NarSize: 0"), "NarSize is zero"),
        (NIX_WRITTEN.replace("NarSize: 168", "NarSize: -1"), "not a decimal"),
        (NIX_WRITTEN.replace("NarSize: 168", "NarSize: 18446744073709551616"), "not a decimal"),
        (NIX_WRITTEN.replace("FileSize: 176", "FileSize: 1e3"), "not a decimal"),
        (NIX_WRITTEN.replace("NarHash: sha256:0mvi", "NarHash: sha256:zmvi"), "bad NarHash"),
        (NIX_WRITTEN.replace("FileHash: sha256:", "FileHash: "), "bad FileHash"),
        (NIX_WRITTEN + "URL: again\n", "line 11: field URL appears twice"),
        (NIX_WRITTEN + "References: \n", "appears twice"),
        (NIX_WRITTEN.replace("URL: ", "URL:"), "line 2: expected 'Key: value'"),
        (NIX_WRITTEN.replace("References: ", "References:"), "line 8"),
        (NIX_WRITTEN.replace("References: 3j8r511q8gg85ch41in6l4r4cfqrn0bv-tree", "References: a b"), "not a store path"),
        (NIX_WRITTEN.replace("References: 3j8r", "References:  3j8r"), "not a store path"),
        (NIX_WRITTEN.replace("Deriver: d2c2", "Deriver: /nix/store/d2c2"), "not a store path"),
        (NIX_WRITTEN.replace("StorePath: /nix/store/r910", "StorePath: /nix/store/r91e"), "bad StorePath"),
        (NIX_WRITTEN.replace("Sig: test1:", "Sig: test1"), "signature"),
        (NIX_WRITTEN.replace("Sig: test1:2b6a", "Sig: test1:2b6"), "signature"),
        (NIX_WRITTEN + "CA: fixed:r:md6:abc\n", "CA"),
        (NIX_WRITTEN + "CA: nonsense\n", "CA"),
        (NIX_WRITTEN + "CA: text:sha1:" + "0" * 40 + "\n", "text content addresses use sha256"),
        (NIX_WRITTEN.replace("Compression: xz", "Compression: "), "Compression"),
        (NIX_WRITTEN + "\n", "line 11: expected 'Key: value'"),
        (NIX_WRITTEN + "Bad Key: x\n", "malformed field name"),
        (NIX_WRITTEN.encode() + b"Extra: \xff\n", "not UTF-8"),
        ("x" * (1 << 21), "larger than"),
    ],
)
def test_rejects(text, match):
    with pytest.raises(InvalidNarInfo, match=match) as info:
        NarInfo.parse(text)
    assert isinstance(info.value, InvalidInput) and "\n" not in str(info.value)


def test_constructor_validates():
    info = NarInfo.parse(NIX_WRITTEN)
    with pytest.raises(InvalidNarInfo, match="line break"):
        replace(info, extra=(("X", "a\nb"),))
    with pytest.raises(InvalidNarInfo, match="known field"):
        replace(info, extra=(("NarSize", "1"),))
    with pytest.raises(InvalidNarInfo, match="empty URL"):
        replace(info, url="")


# -- render -> parse round trip ------------------------------------------------------------------------

hash_parts = st.binary(min_size=20, max_size=20).map(nixbase32.encode)
names = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-_?=", min_size=1, max_size=40)
base_names = st.builds(lambda h, n: f"{h}-{n}", hash_parts, names)
hashes = st.sampled_from(sorted(ALGORITHMS)).flatmap(
    lambda a: st.binary(min_size=ALGORITHMS[a], max_size=ALGORITHMS[a]).map(lambda d: NixHash(a, d))
)
values = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=30).map(str.strip)
sig_lines = st.builds(
    lambda n, b: f"{n}:{base64.b64encode(b).decode()}",
    st.text("abcdefghijklmnopqrstuvwxyz.-0123456789", min_size=1, max_size=20),
    st.binary(min_size=64, max_size=64),
)
cas = st.builds(lambda p, h: p + h.nix32(), st.sampled_from(["fixed:", "fixed:r:", "fixed:git:"]), hashes)
extras = st.lists(
    st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9_.\-]{0,10}", fullmatch=True).filter(
        lambda k: k not in {"StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize",
                            "References", "Deriver", "System", "CA", "Sig"}), values),
    max_size=4,
)

narinfos = st.builds(
    NarInfo,
    store_path=st.builds(lambda b: StorePath.from_base_name(b), base_names),
    url=values.filter(bool),
    nar_hash=hashes,
    nar_size=st.integers(1, 2**64 - 1),
    compression=st.none() | st.sampled_from(["xz", "zstd", "none", "bzip2", "br"]),
    file_hash=st.none() | hashes,
    file_size=st.none() | st.integers(0, 2**64 - 1),
    references=st.lists(base_names, max_size=5).map(tuple),
    deriver=st.none() | st.just("unknown-deriver") | base_names,
    system=st.none() | st.sampled_from(["x86_64-linux", "aarch64-darwin"]),
    sigs=st.lists(sig_lines, max_size=3).map(tuple),
    ca=st.none() | cas,
    extra=extras.map(tuple),
)


@given(narinfos)
def test_render_parse_round_trip(info):
    text = info.render()
    again = NarInfo.parse(text)
    assert again == info
    assert again.render() == text


@given(st.text(max_size=300))
def test_arbitrary_text_parses_or_raises_our_error(text):
    try:
        info = NarInfo.parse(text)
    except InvalidNarInfo:
        return
    assert NarInfo.parse(info.render()) == info
