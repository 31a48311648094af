"""The repo's NAR store without Nix: ingest from files and iterables, narinfo kept and merged, NAR roots claimed
from blocks fetched elsewhere, garbage collection forgetting narinfo with its root."""

from __future__ import annotations

import hashlib
import random

import pytest

from p2pcache.content.cid import CID, DAG_CBOR
from p2pcache.content.nar import Contents, DirectoryEnd, DirectoryStart, Entry, RegularFile, Symlink, write_nar
from p2pcache.content.narinfo import NarInfo
from p2pcache.content.narmanifest import NarManifest, iter_blocks
from p2pcache.content.nixhash import NixHash
from p2pcache.content.nixsig import generate_key_pair
from p2pcache.errors import CorruptData, InvalidInput, NotFound, RepoError
from p2pcache.store.narstore import RepoNarStore
from p2pcache.store.repo import Repo

STORE_HASH = "0" * 31 + "1"
STORE_PATH = f"/nix/store/{STORE_HASH}-demo-1.0"
DEP = "1" * 32 + "-dep-2.0"


def _nar(seed: int = 1) -> bytes:
    rng = random.Random(seed)
    events = [DirectoryStart(), Entry(b"bin"), DirectoryStart(), Entry(b"demo"), RegularFile(300_000, True),
              Contents(rng.randbytes(300_000)), DirectoryEnd(), Entry(b"lib"), Symlink(b"bin"),
              Entry(b"small"), RegularFile(5), Contents(b"hello"), DirectoryEnd()]
    return b"".join(write_nar(events))


def _narinfo(nar: bytes, **changes) -> NarInfo:
    fields = dict(store_path=STORE_PATH, url="nar/x.nar.xz", nar_hash=NixHash.of(nar), nar_size=len(nar),
                  compression="xz", references=(DEP,), deriver="2" * 32 + "-demo-1.0.drv", system="x86_64-linux")
    fields.update(changes)
    from p2pcache.content.storepath import StorePath

    fields["store_path"] = StorePath.parse(fields["store_path"])
    return NarInfo(**fields)


@pytest.fixture
def repo(tmp_path):
    r = Repo.init(tmp_path / "repo", durable=False)
    yield r
    r.close()


def test_add_from_a_file_keeps_the_narinfo_fields(repo: Repo, tmp_path):
    nar = _nar()
    (tmp_path / "x.nar").write_bytes(nar)
    secret, public = generate_key_pair("test-1")
    info = _narinfo(nar).signed(secret)
    store = RepoNarStore(repo)
    with open(tmp_path / "x.nar", "rb") as f:
        result = store.add_nar(info, f)
    assert result.store_path == STORE_PATH and result.files == 2 and not result.already_present
    served = store.narinfo(STORE_HASH)
    assert served.references == (DEP,) and served.deriver == info.deriver and served.system == "x86_64-linux"
    assert served.sigs == info.sigs and served.verify([public])  # signatures survive re-serving uncompressed
    assert served.compression == "none" and served.file_hash == served.nar_hash == info.nar_hash
    assert served.url == f"nar/{info.nar_hash.nix32(prefixed=False)}.nar"
    assert NarInfo.parse(served.render()) == served
    assert b"".join(store.stream_nar(STORE_HASH)) == nar
    # Added again with another signature: nothing new is stored, both signatures are kept.
    other, _ = generate_key_pair("test-2")
    again = store.add_nar(_narinfo(nar).signed(other), [nar])
    assert again.already_present and again.new_blocks == 0
    assert len(store.narinfo(STORE_HASH).sigs) == 2


def test_gc_forgets_the_narinfo_with_its_root(repo: Repo):
    nar = _nar()
    store = RepoNarStore(repo)
    store.add_nar(_narinfo(nar), [nar])
    assert store.has(STORE_HASH)
    report = repo.gc(max_size=0)
    assert len(report.roots_removed) == 1 and report.bytes_after == 0
    assert not store.has(STORE_HASH) and store.narinfo(STORE_HASH) is None
    with pytest.raises(NotFound):
        store.stream_nar(STORE_HASH)


def test_a_nar_root_from_elsewhere_is_claimed_after_checks(repo: Repo, tmp_path):
    nar = _nar()
    with Repo.init(tmp_path / "peer", durable=False) as peer:
        root = RepoNarStore(peer).add_nar(_narinfo(nar), [nar]).root
        manifest = NarManifest.decode(peer.load_block(root))
        blocks = [(root, peer.load_block(root))] + [(c, peer.load_block(c))
                                                     for c, _ in iter_blocks(manifest, peer.load_block)]
    store = RepoNarStore(repo)
    repo.put_blocks(blocks[:-1])
    with pytest.raises(NotFound, match="missing block"):
        store.register_nar(root, _narinfo(nar))
    repo.put_blocks(blocks[-1:])
    with pytest.raises(CorruptData, match="does not match"):
        store.register_nar(root, _narinfo(nar, nar_hash=NixHash.of(b"other")))
    store.register_nar(root, _narinfo(nar))
    assert b"".join(store.stream_nar(STORE_HASH)) == nar
    assert repo.verify().consistent and repo.index.check_refcounts() == []


def test_a_lying_manifest_is_refused_when_claimed_and_when_streamed(repo: Repo, tmp_path):
    nar = _nar()
    with Repo.init(tmp_path / "peer", durable=False) as peer:
        root = RepoNarStore(peer).add_nar(None, [nar]).root
        manifest = NarManifest.decode(peer.load_block(root))
        blocks = [(c, peer.load_block(c)) for c, _ in iter_blocks(manifest, peer.load_block)]
    # A peer's manifest claiming another NAR's hash, over genuine blocks.
    other = _nar(2)
    lie = NarManifest(hashlib.sha256(other).digest(), manifest.nar_size, manifest.chunker, manifest.inline,
                      manifest.root).encode()
    lie_cid = CID.for_block(DAG_CBOR, lie)
    repo.put_blocks(blocks + [(lie_cid, lie)])
    store = RepoNarStore(repo)
    with pytest.raises(CorruptData, match="does not match"):
        store.register_nar(lie_cid)
    assert repo.index.get_root(lie_cid) is None
    # Claimed without the check, streaming still never completes it.
    store.register_nar(lie_cid, verify=False)
    got = []
    with pytest.raises(CorruptData):
        for piece in repo.stream(lie_cid):
            got.append(piece)
    assert sum(map(len, got)) < len(nar)


def test_bad_input_records_nothing(repo: Repo):
    nar = _nar()
    store = RepoNarStore(repo)
    with pytest.raises(InvalidInput, match="truncated"):
        store.add_nar(None, [nar[:-8]], store_path=STORE_PATH)
    with pytest.raises(InvalidInput, match="trailing"):
        store.add_nar(None, [nar + b"\0" * 8], store_path=STORE_PATH)
    assert repo.index.list_roots() == [] and not store.has(STORE_HASH)
    # Archive roots and NAR roots do not mix: an archive is not streamed as a NAR.
    import io

    archive = repo.add_stream(io.BytesIO(b"not a nar"))
    from p2pcache.store.narstore import stream_nar_root

    with pytest.raises(InvalidInput, match="not a NAR"):
        b"".join(stream_nar_root(repo, archive.root))


def test_an_upload_is_claimed_by_its_narinfo_against_what_its_ingest_recorded(repo: Repo):
    """The way `nix copy --to` uploads: the NAR alone (no store path), then its narinfo. The narinfo's
    NarHash and NarSize are checked against the root the ingest recorded; a mismatch records nothing."""
    nar = _nar()
    store = RepoNarStore(repo)
    result = store.add_nar(None, [nar])
    refs = repo.index.check_refcounts()
    for bad in (_narinfo(nar, nar_hash=NixHash.of(b"other")), _narinfo(nar, nar_size=len(nar) + 8)):
        with pytest.raises(CorruptData, match="does not match|its narinfo says"):
            store.register_nar(result.root, bad, verify=False)
        assert store.narinfo(STORE_HASH) is None
    store.register_nar(result.root, _narinfo(nar), verify=False)
    info = store.narinfo(STORE_HASH)
    assert info is not None and info.nar_hash == NixHash.of(nar) and info.references == (DEP,)
    assert repo.root_info(result.root).name == "0" * 31 + "1-demo-1.0"
    assert b"".join(store.stream_nar(STORE_HASH)) == nar
    assert repo.index.check_refcounts() == refs == [] and repo.verify().consistent


def test_only_an_upload_waiting_for_its_narinfo_commits_without_its_own_fsync(tmp_path):
    """An upload's NAR (no store path yet) is dropped at a daemon's start if no narinfo names it, so its commit
    does not wait for the WAL's fsync; the narinfo's commit, and a NAR added under its store path, do."""
    nar = _nar()
    with Repo.init(tmp_path / "repo", durable=True) as repo:
        statements: list[str] = []
        repo.index.db.set_trace_callback(statements.append)
        store = RepoNarStore(repo)
        root = store.add_nar(None, [nar]).root
        assert statements.count("PRAGMA synchronous = NORMAL") == 1
        assert statements[-1] == "PRAGMA synchronous = FULL"  # back for every later transaction
        statements.clear()
        store.register_nar(root, _narinfo(nar), verify=False)
        store.add_nar(_narinfo(_nar(2), store_path=f"/nix/store/{'3' * 32}-other-1.0"), [_nar(2)])
        assert "PRAGMA synchronous = NORMAL" not in statements and "COMMIT" in statements
        repo.index.db.set_trace_callback(None)
        assert repo.index.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_root_that_went_incomplete_is_not_named_by_a_narinfo(repo: Repo):
    nar = _nar()
    root = RepoNarStore(repo).add_nar(None, [nar]).root
    repo.index.db.execute("UPDATE roots SET complete = 0 WHERE root = ?", (root.buffer,))
    with pytest.raises(RepoError, match="not held whole"):
        with repo.index.transaction():
            repo.index.name_root(root, "demo", [f"nix:{STORE_HASH}"])
    assert repo.index.resolve_alias(f"nix:{STORE_HASH}") is None
