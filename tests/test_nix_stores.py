"""NAR stores against real Nix (Nix 2.8): the repo's NAR manifests, the local Nix store, an HTTP binary cache.

Like test_nix_real.py: Nix runs without a daemon, every module gets its own HOME, extra stores are chroot stores
under tmp dirs, substituters are off, and the HTTP cache is a `nix copy --to file://` directory served by
Python's http.server on 127.0.0.1 — nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio

from p2pcache.content.narinfo import NarInfo
from p2pcache.content.nixhash import NixHash
from p2pcache.errors import CorruptData, NotFound
from p2pcache.store.httpcache import HttpBinaryCache
from p2pcache.store.interfaces import AsyncFromSync, AsyncNarReader, NarReader, NarWriter, copy_nar
from p2pcache.store.localnix import LocalNixStore
from p2pcache.store.narstore import RepoNarStore
from p2pcache.store.repo import Repo
from tests.test_nix_real import Nix, _make_tree


@pytest.fixture(scope="module")
def nix(tmp_path_factory) -> Nix:
    missing = [tool for tool in ("nix", "nix-store", "nix-build") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"real Nix is required but {', '.join(missing)} is not on PATH; "
                    "install it with `apt-get install -y nix-bin`", pytrace=False)
    return Nix(tmp_path_factory.mktemp("nix-home"))


@pytest.fixture(scope="module")
def paths(nix: Nix, tmp_path_factory) -> dict[str, str]:
    """Store paths with every kind of node: a tree (files, executables, symlinks, nested and empty dirs, a
    3 MiB file), a second version of it, and a built path that refers to the first."""
    base = tmp_path_factory.mktemp("trees")
    v1 = base / "pkg"
    v1.mkdir()
    _make_tree(v1)
    v2 = base / "v2" / "pkg"
    shutil.copytree(v1, v2, symlinks=True)
    (v2 / "seven").write_bytes(b"7654321")
    (v2 / "sub" / "new-file").write_bytes(b"new in v2\n" * 1000)
    with open(v2 / "big", "r+b") as f:  # a small edit inside the big file
        f.seek(1 << 20)
        f.write(b"patched")
    added = nix.out("nix-store", "--add", str(v1))
    added2 = nix.out("nix-store", "--add", str(v2))
    script = ("/bin/mkdir -p $out/bin && echo $dep > $out/ref && /bin/ln -s $dep/seven $out/link && "
              "printf '#!/bin/sh\\necho hi\\n' > $out/bin/hello && /bin/chmod +x $out/bin/hello")
    expr = ('derivation { name = "p2pcache-stores-withref"; system = builtins.currentSystem; builder = "/bin/sh"; '
            f'dep = builtins.storePath "{added}"; args = [ "-c" {json.dumps(script)} ]; }}')
    built = nix.out("nix-build", "--no-out-link", "-E", expr)
    return {"added": added, "added2": added2, "built": built}


def _hash(store_path: str) -> str:
    return Path(store_path).name[:32]


@pytest.fixture
def repo(tmp_path):
    r = Repo.init(tmp_path / "repo", durable=False)
    yield r
    r.close()


def _path_info(nix: Nix, store_path: str, store: str | None = None) -> dict:
    args = ["nix", "path-info", "--json", store_path] + (["--store", store] if store else [])
    return json.loads(nix.out(*args))[0]


def _assert_narinfo_matches(info: NarInfo, pi: dict) -> None:
    assert info.nar_hash == NixHash.parse(pi["narHash"])
    assert info.nar_size == pi["narSize"]
    assert sorted(str(p) for p in info.reference_paths) == sorted(pi["references"])
    assert (str(info.deriver_path) if info.deriver_path else None) == pi.get("deriver")
    assert info.ca == pi.get("ca")


# -- the repo's NAR manifests ------------------------------------------------------------------------------


def test_repo_nar_round_trips_real_store_paths(nix: Nix, paths, repo: Repo):
    for key in ("added", "built", "added2"):
        nar = nix.dump(paths[key])
        pieces = [nar[i : i + 100_003] for i in range(0, len(nar), 100_003)]
        result = repo.add_nar(pieces, store_path=paths[key])
        assert result.nar_size == len(nar)
        assert b"".join(repo.stream_nar(_hash(paths[key]))) == nar
        assert b"".join(repo.stream(result.root)) == nar  # `get <root>` works for NAR roots too
        assert repo.resolve(f"sha256:{result.nar_hash.hex()}") == result.root
        assert repo.index.resolve_alias(f"nix:{_hash(paths[key])}") == result.root
        assert repo.root_info(result.root).kind == "nar"
    assert repo.verify().consistent


def test_versions_of_a_real_package_share_chunks(nix: Nix, paths, repo: Repo):
    first = repo.add_nar([nix.dump(paths["added"])], store_path=paths["added"])
    second = repo.add_nar([nix.dump(paths["added2"])], store_path=paths["added2"])
    assert first.nar_size > 3 << 20 and second.new_blocks > 0
    # v2 changed one small file, added one, and patched 7 bytes of the 3 MiB file: only those chunks are new.
    assert second.new_bytes < 0.1 * second.nar_size


def test_add_nar_checks_the_narinfo_and_records_nothing_on_a_mismatch(nix: Nix, paths, repo: Repo):
    local = LocalNixStore()
    info = local.narinfo(_hash(paths["built"]))
    nar = nix.dump(paths["built"])
    bad = NarInfo.parse(info.render().replace(info.nar_hash.nix32(), NixHash.of(b"x").nix32()))
    with pytest.raises(CorruptData, match="does not match"):
        repo.add_nar([nar], narinfo=bad)
    short = NarInfo.parse(info.render().replace(f"NarSize: {info.nar_size}", f"NarSize: {info.nar_size - 8}"))
    with pytest.raises(CorruptData, match="longer"):
        repo.add_nar([nar], narinfo=short)
    assert repo.index.list_roots() == [] and not RepoNarStore(repo).has(_hash(paths["built"]))
    with pytest.raises(NotFound):
        repo.stream_nar(_hash(paths["built"]))


# -- the local Nix store -----------------------------------------------------------------------------------


def test_local_nix_store_serves_what_nix_would(nix: Nix, paths):
    local = LocalNixStore()
    assert local.db_error is None and isinstance(local, NarReader)
    for key in ("added", "built"):
        h = _hash(paths[key])
        assert local.has(h)
        info = local.narinfo(h)
        _assert_narinfo_matches(info, _path_info(nix, paths[key]))
        assert b"".join(local.stream_nar(h)) == nix.dump(paths[key])
    missing = "0" * 32
    assert not local.has(missing) and local.narinfo(missing) is None
    with pytest.raises(NotFound):
        local.stream_nar(missing)


def test_local_chroot_store_and_a_tampered_path(nix: Nix, paths, tmp_path: Path):
    chroot = tmp_path / "chroot"
    nix.run("nix", "copy", "--no-check-sigs", "--to", str(chroot), paths["built"])
    local = LocalNixStore.chroot(chroot)
    h = _hash(paths["built"])
    info = local.narinfo(h)
    _assert_narinfo_matches(info, _path_info(nix, paths["built"], store=str(chroot)))
    assert b"".join(local.stream_nar(h)) == nix.dump(paths["built"])
    # Without its database the store still streams NARs, but offers no narinfo.
    no_db = LocalNixStore("/nix/store", real_store_dir=chroot / "nix" / "store", db_path=tmp_path / "absent.sqlite")
    assert no_db.db_error and no_db.has(h) and no_db.narinfo(h) is None
    assert b"".join(no_db.stream_nar(h)) == nix.dump(paths["built"])
    # A store path changed on disk (same size) is never served whole: the last piece is withheld.
    real = chroot / paths["built"].lstrip("/")
    os.chmod(real / "bin", 0o755)
    os.chmod(real / "bin" / "hello", 0o755)
    (real / "bin" / "hello").write_bytes(b"#!/bin/sh\necho HI\n")
    got = []
    with pytest.raises(CorruptData, match="does not match"):
        for piece in local.stream_nar(h):
            got.append(piece)
    assert sum(map(len, got)) < info.nar_size


def test_copy_from_local_store_to_repo_and_nix_accepts_what_the_repo_serves(nix: Nix, paths, repo: Repo, tmp_path):
    local = LocalNixStore()
    store = RepoNarStore(repo)
    assert isinstance(store, NarReader) and isinstance(store, NarWriter)
    for key in ("added", "built"):
        copy_nar(local, store, _hash(paths[key]))
    for key in ("added", "built"):
        h = _hash(paths[key])
        ours, theirs = store.narinfo(h), local.narinfo(h)
        assert (ours.store_path, ours.nar_hash, ours.nar_size, ours.references, ours.deriver, ours.ca, ours.sigs) == \
               (theirs.store_path, theirs.nar_hash, theirs.nar_size, theirs.references, theirs.deriver, theirs.ca,
                theirs.sigs)
    # Lay out the repo's narinfos and NARs as a binary cache; real Nix copies from it into a fresh store.
    cache = tmp_path / "cache"
    (cache / "nar").mkdir(parents=True)
    (cache / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    for key in ("added", "built"):
        info = store.narinfo(_hash(paths[key]))
        (cache / f"{_hash(paths[key])}.narinfo").write_text(info.render())
        with open(cache / info.url, "wb") as f:
            for piece in store.stream_nar(_hash(paths[key])):
                f.write(piece)
    dest = tmp_path / "dest"
    nix.run("nix", "copy", "--no-check-sigs", "--from", f"file://{cache}", "--to", str(dest), paths["built"])
    copied = dest / paths["built"].lstrip("/")
    assert (copied / "ref").read_text().strip() == paths["added"]
    assert sorted(nix.out("nix", "path-info", "--store", str(dest), "-r", paths["built"]).split()) == \
           sorted([paths["added"], paths["built"]])


# -- an HTTP binary cache ----------------------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _Server:
    """A real HTTP server on 127.0.0.1 serving a directory from a thread; stops when the test ends."""

    def __init__(self, directory: Path):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(directory)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def serve():
    servers: list[_Server] = []

    def start(directory: Path) -> str:
        servers.append(_Server(directory))
        return servers[-1].url

    yield start
    for s in servers:
        s.close()


async def _collect(stream) -> tuple[bytes, int, BaseException | None]:
    got = []
    try:
        async for piece in stream:
            got.append(piece)
    except Exception as e:  # returned for the test to inspect
        return b"".join(got), sum(map(len, got)), e
    return b"".join(got), sum(map(len, got)), None


@pytest.mark.parametrize("compression", ["xz", "zstd", "bzip2", "none"])
def test_http_binary_cache_reads_what_nix_copy_wrote(nix: Nix, paths, repo: Repo, tmp_path, serve, compression):
    cache = tmp_path / "cache"
    nix.run("nix", "copy", "--to", f"file://{cache}?compression={compression}", paths["built"])
    url = serve(cache)
    built, added = _hash(paths["built"]), _hash(paths["added"])

    async def main():
        async with HttpBinaryCache(url) as upstream:
            assert isinstance(upstream, AsyncNarReader)
            info = await upstream.cache_info()
            assert info.store_dir == "/nix/store"
            assert await upstream.has(built) and not await upstream.has("1" * 32)
            assert await upstream.narinfo("1" * 32) is None
            results = {}
            for h in (built, added):
                narinfo = await upstream.narinfo(h)
                assert narinfo == NarInfo.parse((cache / f"{h}.narinfo").read_text())
                assert narinfo.effective_compression == compression
                data, _, error = await _collect(upstream.stream_nar(h))
                assert error is None
                results[h] = (narinfo, data)
            _, _, error = await _collect(upstream.stream_nar("1" * 32))
            assert isinstance(error, NotFound)
            return results

    results = trio.run(main)
    for key in ("built", "added"):
        narinfo, data = results[_hash(paths[key])]
        assert data == nix.dump(paths[key])
        _assert_narinfo_matches(narinfo, _path_info(nix, paths[key]))
        # Into the repo with the upstream narinfo (NarHash checked again while ingesting).
        repo.add_nar([data], narinfo=narinfo)
        assert b"".join(repo.stream_nar(_hash(paths[key]))) == data


def test_http_binary_cache_rejects_tampered_nars(nix: Nix, paths, tmp_path, serve):
    h = _hash(paths["added"])  # the 3 MiB tree: its NAR streams in many pieces
    caches = {}
    for compression in ("none", "xz"):
        caches[compression] = tmp_path / compression
        nix.run("nix", "copy", "--to", f"file://{caches[compression]}?compression={compression}", paths["added"])
    none_info = NarInfo.parse((caches["none"] / f"{h}.narinfo").read_text())
    nar_file = caches["none"] / none_info.url
    nar = bytearray(nar_file.read_bytes())

    def variant(name: str, nar_bytes: bytes, narinfo_text: str, source: Path) -> str:
        d = tmp_path / name
        shutil.copytree(source, d)
        info = NarInfo.parse(narinfo_text)
        (d / f"{h}.narinfo").write_text(narinfo_text)
        (d / info.url).write_bytes(nar_bytes)
        return serve(d)

    def without_file_hash(text: str) -> str:
        return "".join(line for line in text.splitlines(True) if not line.startswith(("FileHash:", "FileSize:")))

    flipped = bytearray(nar)
    flipped[len(nar) // 2] ^= 1
    xz_info = NarInfo.parse((caches["xz"] / f"{h}.narinfo").read_text())
    xz_bytes = (caches["xz"] / xz_info.url).read_bytes()
    urls = {
        # FileHash catches a changed byte of the file as served.
        "filehash": variant("filehash", bytes(flipped), none_info.render(), caches["none"]),
        # With no FileHash to check, NarHash catches it.
        "narhash": variant("narhash", bytes(flipped), without_file_hash(none_info.render()), caches["none"]),
        # A truncated compressed NAR.
        "truncated": variant("truncated", xz_bytes[:-100], without_file_hash(xz_info.render()), caches["xz"]),
        # A longer NAR than NarSize says fails as soon as it runs past it.
        "longer": variant("longer", bytes(nar) + b"\0" * 8, without_file_hash(none_info.render()), caches["none"]),
    }
    expected = {"filehash": "FileHash", "narhash": "does not match", "truncated": "truncated|NAR has",
                "longer": "longer"}

    async def main():
        out = {}
        for name, url in urls.items():
            async with HttpBinaryCache(url) as upstream:
                out[name] = await _collect(upstream.stream_nar(h))
        return out

    for name, (_, received, error) in trio.run(main).items():
        assert isinstance(error, CorruptData), (name, error)
        assert __import__("re").search(expected[name], str(error)), (name, str(error))
        assert received < none_info.nar_size, name  # never the whole NAR


def test_async_adapter_over_the_local_store(nix: Nix, paths):
    reader = AsyncFromSync(LocalNixStore())
    h = _hash(paths["built"])

    async def main():
        assert await reader.has(h)
        info = await reader.narinfo(h)
        data, _, error = await _collect(reader.stream_nar(h))
        return info, data, error

    info, data, error = trio.run(main)
    assert error is None and data == nix.dump(paths["built"]) and len(data) == info.nar_size
