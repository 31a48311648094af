"""What `nix copy --to http://…` sends, sent by hand to a real daemon: good uploads land, bad ones get a
400 with a reason and leave nothing recorded in the repo."""

import bz2
import hashlib
import lzma
import os

import httpx
import pytest
import zstandard

from p2pcache.content import nixbase32
from p2pcache.store.nixstore import dump_path

from .helpers.daemons import start_daemon


@pytest.fixture
def daemon(tmp_path):
    d = start_daemon(tmp_path / "node")
    yield d
    d.stop()


def _nar(tmp_path) -> bytes:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (tree / "bin" / "tool").chmod(0o755)
    (tree / "data").write_bytes(os.urandom(300_000))
    os.symlink("data", tree / "link")
    return b"".join(dump_path(tree))


def _narinfo(store_hash: str, url: str, compression: str, nar: bytes, file: bytes, nar_hash: bytes | None = None) -> str:
    nar_hash = nar_hash or hashlib.sha256(nar).digest()
    return (f"StorePath: /nix/store/{store_hash}-upload-test\nURL: {url}\nCompression: {compression}\n"
            f"FileHash: sha256:{nixbase32.encode(hashlib.sha256(file).digest())}\nFileSize: {len(file)}\n"
            f"NarHash: sha256:{nixbase32.encode(nar_hash)}\nNarSize: {len(nar)}\nReferences: \n")


def _roots(d) -> int:
    return d.status()["roots"]


@pytest.mark.parametrize("suffix,compress,compression", [
    (".nar.xz", lzma.compress, "xz"),
    (".nar.zst", lambda b: zstandard.ZstdCompressor().compress(b), "zstd"),
    (".nar.bz2", bz2.compress, "bzip2"),
    (".nar", lambda b: b, "none"),
])
def test_upload_then_narinfo_is_served_back_byte_exact(daemon, tmp_path, suffix, compress, compression):
    nar = _nar(tmp_path)
    file = compress(nar)
    store_hash = nixbase32.encode(os.urandom(20))
    url = f"nar/{nixbase32.encode(hashlib.sha256(file).digest())}{suffix}"
    assert httpx.put(headers=daemon.auth, url=f"{daemon.api}/{url}", content=file, timeout=30).status_code == 200
    r = httpx.put(headers=daemon.auth, url=f"{daemon.api}/{store_hash}.narinfo", timeout=30,
                  content=_narinfo(store_hash, url, compression, nar, file))
    assert r.status_code == 200, r.text
    info = httpx.get(f"{daemon.api}/{store_hash}.narinfo", timeout=30)
    assert info.status_code == 200 and "Compression: none" in info.text
    nar_url = next(line.split(": ", 1)[1] for line in info.text.splitlines() if line.startswith("URL: "))
    assert httpx.get(f"{daemon.api}/{nar_url}", timeout=30).content == nar


def test_bad_uploads_are_400_with_a_reason_and_leave_nothing(daemon, tmp_path):
    nar = _nar(tmp_path)
    file = lzma.compress(nar)
    store_hash = nixbase32.encode(os.urandom(20))
    url = "nar/upload.nar.xz"

    # a NarHash that does not match what was uploaded: rejected, and the uploaded NAR is dropped
    assert httpx.put(headers=daemon.auth, url=f"{daemon.api}/{url}", content=file, timeout=30).status_code == 200
    bad = _narinfo(store_hash, url, "xz", nar, file, nar_hash=b"\x01" * 32)
    r = httpx.put(headers=daemon.auth, url=f"{daemon.api}/{store_hash}.narinfo", content=bad, timeout=30)
    assert r.status_code == 400 and "NarHash/NarSize do not match" in r.json()["error"]
    assert _roots(daemon) == 0

    # a narinfo whose NAR never came
    r = httpx.put(headers=daemon.auth, url=f"{daemon.api}/{store_hash}.narinfo", content=_narinfo(store_hash, "nar/other.nar", "none", nar, nar),
                  timeout=30)
    assert r.status_code == 400 and "was not uploaded first" in r.json()["error"]

    # truncated compression, a body that is not a NAR, a NAR with trailing garbage, an unknown suffix
    cases = [
        ("nar/trunc.nar.xz", file[: len(file) // 2], "truncated"),
        ("nar/junk.nar", b"this is not a NAR at all, not even close....", "magic"),
        ("nar/tail.nar", nar + b"\0" * 8, "trailing"),
        ("nar/what.tar", nar, "expected a .nar"),
    ]
    for path, body, needle in cases:
        r = httpx.put(headers=daemon.auth, url=f"{daemon.api}/{path}", content=body, timeout=30)
        assert r.status_code == 400, (path, r.text)
        assert needle in r.json()["error"].lower(), (path, r.json())
    # a narinfo that is not one
    r = httpx.put(headers=daemon.auth, url=f"{daemon.api}/{store_hash}.narinfo", content=b"StorePath: nonsense\n", timeout=30)
    assert r.status_code == 400
    assert _roots(daemon) == 0
    assert httpx.get(f"{daemon.api}/{store_hash}.narinfo", timeout=30).status_code == 404
