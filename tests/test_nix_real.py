"""Our Nix formats against real Nix (Debian's nix-bin, Nix 2.8): NAR bytes, narinfo text and signatures.

These tests need `nix`, `nix-store` and `nix-build` on PATH and fail (not skip) without them. Nix runs as root
without a daemon; every run gets its own HOME (so Nix's narinfo disk cache is fresh) and chroot stores under
pytest's tmp_path. The default /nix/store holds only a small test tree and one tiny derivation output built
with /bin/sh. Substituters are disabled, so nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from p2pcache.content.nar import Contents, NarReader, Symlink, read_nar, write_nar
from p2pcache.content.narinfo import NarInfo
from p2pcache.content.nixhash import NixHash
from p2pcache.content.nixsig import PublicKey, SecretKey, generate_key_pair
from p2pcache.store.nixstore import dump_path, restore_path

BASE_CONFIG = "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =\n"


class Nix:
    def __init__(self, home: Path):
        self.home = home

    def run(self, *args: str, config: str = "", check: bool = True, stdin: bytes | None = None):
        env = dict(os.environ)
        env.update(
            NIX_CONFIG=BASE_CONFIG + config,
            HOME=str(self.home),
            XDG_CACHE_HOME=str(self.home / "cache"),
            XDG_CONFIG_HOME=str(self.home / "config"),
        )
        proc = subprocess.run(args, env=env, input=stdin, capture_output=True, timeout=60)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
        return proc

    def out(self, *args: str, **kw) -> str:
        return self.run(*args, **kw).stdout.decode().strip()

    def dump(self, path: Path | str) -> bytes:
        return self.run("nix-store", "--dump", str(path)).stdout


@pytest.fixture(scope="module")
def nix(tmp_path_factory) -> Nix:
    missing = [tool for tool in ("nix", "nix-store", "nix-build") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"real Nix is required but {', '.join(missing)} is not on PATH; "
            "install it with `apt-get install -y nix-bin` (CI does this in .ci/run)",
            pytrace=False,
        )
    return Nix(tmp_path_factory.mktemp("nix-home"))


def _make_tree(root: Path) -> None:
    """Every kind of node NAR knows, and names whose byte order differs from naive orders."""
    (root / "sub" / "deeper" / "deepest").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "empty-file").write_bytes(b"")
    (root / "seven").write_bytes(b"1234567")  # padding of 1
    (root / "eight").write_bytes(b"12345678")  # no padding
    (root / "big").write_bytes(hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32 + 5))  # > 3 pieces
    exe = root / "sub" / "run.sh"
    exe.write_bytes(b"#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    owner_only = root / "owner-exec"
    owner_only.write_bytes(b"x")
    owner_only.chmod(0o700)
    group_only = root / "group-exec"  # Nix looks at the owner's execute bit only
    group_only.write_bytes(b"y")
    group_only.chmod(0o654)
    (root / "sub" / "deeper" / "deepest" / "leaf").write_bytes(b"leaf\n")
    for name in ("B", "a", "a-b", "a.b", "ab", "Z~", "\u00e9t\u00e9", "with space"):
        (root / "names" / name).parent.mkdir(exist_ok=True)
        (root / "names" / name).write_text(name)
    os.symlink("seven", root / "link-relative")
    os.symlink("/nonexistent/absolute/target", root / "link-dangling")
    os.symlink("sub/deeper", root / "link-to-dir")
    os.mkdir(os.fsencode(root / "names") + b"/\xff\x01bytes")  # not UTF-8: names are bytes


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "tree"
    root.mkdir()
    _make_tree(root)
    return root


@pytest.fixture(scope="module")
def store_paths(nix: Nix, tree: Path) -> dict[str, str]:
    """A content-addressed store path (`nix-store --add`) and an input-addressed derivation output that
    refers to it (so it has a reference and needs a signature to be copied)."""
    added = nix.out("nix-store", "--add", str(tree))
    script = (
        "/bin/mkdir -p $out/bin && echo $dep > $out/ref && /bin/ln -s $dep/seven $out/link && "
        "printf '#!/bin/sh\\necho hi\\n' > $out/bin/hello && /bin/chmod +x $out/bin/hello"
    )
    expr = (
        'derivation { name = "p2pcache-test-withref"; system = builtins.currentSystem; builder = "/bin/sh"; '
        f'dep = builtins.storePath "{added}"; args = [ "-c" {json.dumps(script)} ]; }}'
    )
    built = nix.out("nix-build", "--no-out-link", "-E", expr)
    refs = nix.out("nix-store", "--query", "--references", built).split()
    assert refs == [added], f"the derivation output should refer to exactly the added tree, got {refs}"
    return {"added": added, "built": built}


def _contents_merged(events):
    out = []
    for e in events:
        if isinstance(e, Contents) and out and isinstance(out[-1], Contents):
            out[-1] = Contents(out[-1].data + e.data)
        else:
            out.append(e)
    return out


# -- NAR --------------------------------------------------------------------------------------------------


def test_dump_path_equals_nix_store_dump(nix: Nix, tree: Path, store_paths):
    paths = [tree, tree / "empty-dir", tree / "empty-file", tree / "big", tree / "sub" / "run.sh",
             tree / "link-relative", tree / "link-dangling", tree / "names",
             store_paths["added"], store_paths["built"]]
    for path in paths:
        ours = list(dump_path(path, piece=1 << 20))
        assert b"".join(ours) == nix.dump(path), f"NAR of {path} differs from nix-store --dump"
    # Streaming: the 3 MiB file comes out in pieces, none much larger than the piece size.
    assert max(len(p) for p in dump_path(tree, piece=1 << 20)) <= (1 << 20) + 1024


def test_reader_and_writer_reproduce_nix_bytes(nix: Nix, tree: Path, store_paths):
    for path in (tree, store_paths["added"], store_paths["built"]):
        data = nix.dump(path)
        events = list(read_nar([data[i : i + 4093] for i in range(0, len(data), 4093)]))
        assert b"".join(write_nar(events)) == data
        # Fed in other piece sizes, the same archive gives the same events.
        reader = NarReader()
        again = []
        for i in range(0, len(data), 65536 + 3):
            again += reader.feed(data[i : i + 65536 + 3])
        reader.end()
        assert _contents_merged(again) == _contents_merged(events)


def test_restore_round_trips_with_nix(nix: Nix, tree: Path, tmp_path: Path):
    nar = nix.dump(tree)
    ours = tmp_path / "ours"
    restore_path([nar[i : i + 100_000] for i in range(0, len(nar), 100_000)], ours)
    assert nix.dump(ours) == nar
    assert os.readlink(ours / "link-dangling") == "/nonexistent/absolute/target"
    assert os.access(ours / "sub" / "run.sh", os.X_OK) and not os.access(ours / "seven", os.X_OK)
    # And Nix restores what we dump to the same tree.
    theirs = tmp_path / "theirs"
    nix.run("nix-store", "--restore", str(theirs), stdin=b"".join(dump_path(tree)))
    assert b"".join(dump_path(theirs)) == nar


def test_nix_rejects_what_we_reject(nix: Nix, tree: Path, tmp_path: Path):
    """Corrupt NARs that Nix 2.8 refuses are refused by us too, with the same reason. (We also refuse
    unsorted and duplicate entries; Nix 2.8 does not, because its `prevName` was reset for every entry, a bug
    later Nix fixed, so that cannot be checked against this Nix.)"""
    nar = nix.dump(tree / "names")
    name_ab = b"\x04\x00\x00\x00\x00\x00\x00\x00name\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00ab\x00\x00\x00\x00\x00\x00"
    assert nar.count(name_ab) == 1
    dotdot = nar.replace(name_ab, name_ab[:24] + b".." + name_ab[26:])
    padded = nar.replace(name_ab, name_ab[:26] + b"\x01" + name_ab[27:])
    for corrupt, theirs, ours in ((dotdot, b"invalid file name", "not allowed"), (padded, b"padding", "padding")):
        dest = tmp_path / ours.replace(" ", "-")
        proc = nix.run("nix-store", "--restore", str(dest), stdin=corrupt, check=False)
        assert proc.returncode != 0 and theirs in proc.stderr, proc.stderr.decode()
        with pytest.raises(ValueError, match=ours):
            list(read_nar([corrupt]))


# -- hashes ---------------------------------------------------------------------------------------------


def test_hash_forms_agree_with_nix(nix: Nix):
    """`nix hash to-*` converts our printed forms into each other exactly as we do (nix-base32 included)."""
    for algo, size in (("md5", 16), ("sha1", 20), ("sha256", 32), ("sha512", 64)):
        for digest in (bytes(size), b"\xff" * size, hashlib.sha512(algo.encode()).digest()[:size]):
            h = NixHash(algo, digest)
            got = nix.out("nix", "hash", "to-base32", h.sri()).split()
            assert got == [h.nix32(prefixed=False)], (algo, digest.hex())
            assert nix.out("nix", "hash", "to-sri", h.nix32()) == h.sri()
            assert nix.out("nix", "hash", "to-base16", h.base64()) == h.base16(prefixed=False)


# -- narinfo ----------------------------------------------------------------------------------------------


def _narinfo_for(cache: Path, store_path: str) -> Path:
    return cache / (Path(store_path).name.split("-", 1)[0] + ".narinfo")


def test_narinfos_nix_writes_parse_and_render_back(nix: Nix, store_paths, tmp_path: Path):
    cache = tmp_path / "cache"
    nix.run("nix", "copy", "--to", f"file://{cache}?compression=none", store_paths["built"])
    infos = sorted(cache.glob("*.narinfo"))
    assert len(infos) == 2
    path_info = {p["path"]: p for p in json.loads(nix.out("nix", "path-info", "--json", "-r", store_paths["built"]))}
    for file in infos:
        text = file.read_text()
        info = NarInfo.parse(text, store_dir="/nix/store", source=str(file))
        assert info.render() == text
        assert NarInfo.parse(info.render()) == info
        # The fields agree with Nix's own view of the path and with our NAR of it.
        pi = path_info[str(info.store_path)]
        assert info.nar_hash == NixHash.parse(pi["narHash"]) and info.nar_size == pi["narSize"]
        assert [str(p) for p in info.reference_paths] == sorted(pi["references"])
        nar = b"".join(dump_path(str(info.store_path)))
        assert (cache / info.url).read_bytes() == nar
        assert NixHash.of(nar) == info.nar_hash == info.file_hash and len(nar) == info.nar_size
    added = NarInfo.parse(_narinfo_for(cache, store_paths["added"]).read_text())
    assert added.ca is not None and added.ca.startswith("fixed:r:sha256:")
    built = NarInfo.parse(_narinfo_for(cache, store_paths["built"]).read_text())
    assert built.deriver is not None and built.deriver.endswith(".drv") and built.ca is None


def test_compressed_narinfo_round_trips(nix: Nix, store_paths, tmp_path: Path):
    cache = tmp_path / "xz"
    nix.run("nix", "copy", "--to", f"file://{cache}", store_paths["built"])
    for file in cache.glob("*.narinfo"):
        text = file.read_text()
        info = NarInfo.parse(text)
        assert info.compression == "xz" and info.url.endswith(".nar.xz") and info.render() == text
        assert NixHash.of((cache / info.url).read_bytes()) == info.file_hash


# -- signatures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nix_key(nix: Nix, tmp_path_factory) -> tuple[Path, SecretKey, PublicKey]:
    d = tmp_path_factory.mktemp("keys")
    nix.run("nix-store", "--generate-binary-cache-key", "p2pcache-test-1", str(d / "sec"), str(d / "pub"))
    secret = SecretKey.parse((d / "sec").read_text())
    public = PublicKey.parse((d / "pub").read_text())
    assert secret.public_key() == public
    return d / "sec", secret, public


def test_nix_signatures_equal_ours(nix: Nix, store_paths, nix_key, tmp_path: Path):
    sec_file, secret, public = nix_key
    cache = tmp_path / "signed-by-nix"
    nix.run("nix", "copy", "--to", f"file://{cache}?secret-key={sec_file}", store_paths["built"])
    for file in cache.glob("*.narinfo"):
        info = NarInfo.parse(file.read_text())
        assert len(info.sigs) == 1 and info.verify([public])
        unsigned = NarInfo.parse("".join(line for line in file.read_text().splitlines(True) if not line.startswith("Sig:")))
        assert unsigned.signed(secret).sigs == info.sigs  # ed25519 is deterministic: same bytes as Nix


def _copy_from(nix: Nix, cache: Path, store_path: str, public: PublicKey, dest: Path):
    config = f"require-sigs = true\ntrusted-public-keys = {public}\n"
    return nix.run("nix", "copy", "--from", f"file://{cache}", "--to", str(dest), store_path,
                   config=config, check=False)


def _cache_signed_with(nix: Nix, store_paths, cache: Path, sign) -> Path:
    nix.run("nix", "copy", "--to", f"file://{cache}?compression=none", store_paths["built"])
    file = _narinfo_for(cache, store_paths["built"])
    info = NarInfo.parse(file.read_text())
    assert info.sigs == ()
    file.write_text(sign(info).render())
    return file


def test_nix_accepts_a_narinfo_we_signed(nix: Nix, store_paths, nix_key, tmp_path: Path):
    _, secret, public = nix_key
    cache = tmp_path / "cache"
    _cache_signed_with(nix, store_paths, cache, lambda info: info.signed(secret))
    dest = tmp_path / "chroot"
    proc = _copy_from(nix, cache, store_paths["built"], public, dest)
    assert proc.returncode == 0, proc.stderr.decode()
    copied = dest / store_paths["built"].lstrip("/")
    assert (copied / "ref").read_text().strip() == store_paths["added"]


def test_nix_and_we_reject_unsigned_wrong_key_and_tampered(nix: Nix, store_paths, nix_key, tmp_path: Path):
    _, secret, public = nix_key
    impostor, _ = generate_key_pair(public.name)  # same name, other key
    other_hash = NixHash.of(b"not the nar")
    cases = {
        "unsigned": lambda info: info,
        "wrong-key": lambda info: info.signed(impostor),
        "tampered-narhash": lambda info: NarInfo.parse(
            info.signed(secret).render().replace(info.nar_hash.nix32(), other_hash.nix32())
        ),
        "tampered-narsize": lambda info: NarInfo.parse(
            info.signed(secret).render().replace(f"NarSize: {info.nar_size}\n", f"NarSize: {info.nar_size + 8}\n")
        ),
    }
    for name, sign in cases.items():
        cache = tmp_path / name
        file = _cache_signed_with(nix, store_paths, cache, sign)
        assert not NarInfo.parse(file.read_text()).verify([public]), name
        proc = _copy_from(nix, cache, store_paths["built"], public, tmp_path / f"chroot-{name}")
        assert proc.returncode != 0, f"Nix accepted the {name} narinfo"
        assert b"signature" in proc.stderr, (name, proc.stderr.decode())


# -- dump and restore edge cases that need no Nix ---------------------------------------------------------


def test_dump_refuses_unsupported_file_types(tmp_path: Path):
    from p2pcache.store.nixstore import DumpError

    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "fifo")
    with pytest.raises(DumpError, match="unsupported file type"):
        b"".join(dump_path(tmp_path / "d"))
    with pytest.raises(DumpError, match="No such file"):
        b"".join(dump_path(tmp_path / "missing"))


def test_restore_refuses_an_existing_destination_and_bad_input(tmp_path: Path):
    from p2pcache.content.nar import InvalidNar
    from p2pcache.store.nixstore import RestoreError

    nar = b"".join(write_nar([Symlink(b"/etc/passwd")]))
    (tmp_path / "exists").mkdir()
    with pytest.raises(RestoreError, match="exists"):
        restore_path([nar], tmp_path / "exists")
    restore_path([nar], tmp_path / "link")
    assert os.readlink(tmp_path / "link") == "/etc/passwd"
    with pytest.raises(InvalidNar, match="truncated"):
        restore_path([nar[:-8]], tmp_path / "short")
