"""NAR manifests, pure: NAR -> blocks -> NAR is byte-exact for any tree, blocks stay small, versions share
chunks, and whole-NAR verification withholds the last piece of a wrong NAR."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pcache.content import dagcbor
from p2pcache.content.chunking import MAX_BLOCK_SIZE, ChunkerParams, chunk_buffers
from p2pcache.content.cid import CID, DAG_CBOR, RAW
from p2pcache.content.nar import (
    Contents,
    DirectoryEnd,
    DirectoryStart,
    Entry,
    RegularFile,
    Symlink,
    name_problem,
    write_nar,
)
from p2pcache.content.narmanifest import (
    PAGE_TYPE,
    NarIngest,
    NarManifest,
    NarManifestBuilder,
    VerifiedStream,
    iter_blocks,
    iter_plan,
    nar_stream,
    verified_nar_stream,
)
from p2pcache.errors import CorruptData, InvalidInput, MalformedBlock
from p2pcache.store.nixstore import dump_path

TINY = ChunkerParams(min_size=64, avg_size=256, max_size=1024)
# Thresholds small enough that a few KiB of tree exercise every node shape.
TINY_OPTIONS = dict(inline=16, inline_links=2, fanout=3, page_bytes=1024, dir_inline_bytes=1024)


def _content(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def tree_events(tree) -> list:
    """Events of a tree given as ('file', executable, bytes) | ('link', target) | ('dir', {name: tree})."""
    out: list = []
    stack = [tree]
    # Iterative, so deep test trees work: ("close",) marks a directory end.
    while stack:
        node = stack.pop()
        kind = node[0]
        if kind == "close":
            out.append(DirectoryEnd())
        elif kind == "entry":
            out.append(Entry(node[1]))
        elif kind == "file":
            data = node[2]
            out.append(RegularFile(len(data), node[1]))
            # Contents in uneven pieces, as a reader would pass them on.
            for i in range(0, len(data), 777):
                out.append(Contents(data[i : i + 777]))
        elif kind == "link":
            out.append(Symlink(node[1]))
        else:
            out.append(DirectoryStart())
            stack.append(("close",))
            for name in sorted(node[1], reverse=True):
                stack.append(node[1][name])
                stack.append(("entry", name))
    return out


def nar_of(tree) -> bytes:
    return b"".join(write_nar(tree_events(tree)))


def ingest(nar: bytes, piece: int = 4093, params: ChunkerParams = TINY, **options):
    options = options or TINY_OPTIONS
    ing = NarIngest(params, **options)
    blocks: dict[CID, bytes] = {}
    for i in range(0, len(nar), piece):
        for cid, data in ing.feed(nar[i : i + piece]):
            assert cid.verify(data)
            blocks[cid] = bytes(data)
    root, root_data, digest = ing.finish()
    assert digest == hashlib.sha256(nar).digest()
    blocks[root] = root_data
    return root, blocks, ing


def reassemble(root: CID, blocks: dict[CID, bytes]) -> bytes:
    manifest = NarManifest.decode(blocks[root])
    return b"".join(verified_nar_stream(manifest, blocks.__getitem__))


# -- hypothesis: any tree round-trips -----------------------------------------------------------------------

names = st.binary(min_size=1, max_size=12).filter(lambda n: name_problem(n) is None)
files = st.builds(
    lambda x, seed, size: ("file", x, _content(seed, size)),
    st.booleans(),
    st.integers(0, 2**32),
    st.one_of(st.just(0), st.integers(1, 40), st.integers(0, 6000)),
)
links = st.builds(lambda t: ("link", t), st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t))
trees = st.recursive(
    st.one_of(files, links),
    lambda children: st.builds(lambda d: ("dir", d), st.dictionaries(names, children, max_size=12)),
    max_leaves=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, piece=st.sampled_from([1, 7, 100, 4096, 1 << 20]))
def test_any_tree_round_trips_byte_exact(tree, piece):
    nar = nar_of(tree)
    root, blocks, _ = ingest(nar, piece)
    assert reassemble(root, blocks) == nar
    manifest = NarManifest.decode(blocks[root])
    assert manifest.nar_size == len(nar) and manifest.nar_hash == hashlib.sha256(nar).digest()
    # iter_blocks reaches every block that was emitted, and nothing else.
    assert {c for c, _ in iter_blocks(manifest, blocks.__getitem__)} | {root} == set(blocks)
    for cid, size in iter_blocks(manifest, blocks.__getitem__):
        assert len(blocks[cid]) == size
    # The same NAR cut into other pieces builds the same manifest.
    assert ingest(nar, 1 << 20)[0] == root


def _build_with_hash_chunks(nar: bytes, piece: int, hash_chunks, lag: bool = False) -> tuple[CID, dict[CID, bytes]]:
    """With `lag`, as `RepoNarStore.add_nar` does: a piece's blocks are resolved once the next piece is parsed."""
    from p2pcache.content.nar import NarReader

    reader = NarReader()
    builder = NarManifestBuilder(TINY, hash_chunks=hash_chunks, **TINY_OPTIONS)
    blocks: dict[CID, bytes] = {}
    waiting: list[tuple[list, int]] = []

    def store(out: list, mark: int) -> None:
        builder.resolve_until(mark)
        for cid, data in builder.resolved(out):
            assert type(cid) is CID and cid.verify(data)
            blocks[cid] = bytes(data)

    for i in range(0, len(nar), piece):
        out: list = []
        for event in reader.feed(nar[i : i + piece]):
            out += builder.add(event)
        waiting.append((out, builder.mark()))
        while len(waiting) > (1 if lag else 0):
            store(*waiting.pop(0))
    reader.end()
    for out, mark in waiting:
        store(out, mark)
    root, data = builder.finish(hashlib.sha256(nar).digest(), len(nar))
    blocks[root] = data
    return root, blocks


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, piece=st.sampled_from([7, 4096, 1 << 20]), lag=st.booleans())
def test_chunk_cids_hashed_elsewhere_build_the_same_manifest(tree, piece, lag):
    """With `hash_chunks`, nothing is encoded before its chunks' CIDs are known (the hashing here happens only
    when waited for), and the blocks and root are the ones the inline hashing gives."""
    def lazy(chunks):
        return lambda: [hashlib.sha256(c).digest() for c in chunks]

    nar = nar_of(tree)
    root, blocks, _ = ingest(nar, piece)
    assert _build_with_hash_chunks(nar, piece, lazy, lag) == (root, blocks)


def test_chunk_cids_from_the_store_hashing_threads_build_the_same_manifest():
    from p2pcache.store.ingest import ChunkHasher

    tree = ("dir", {b"big": ("file", False, _content(1, 300_000)),  # index nodes sealed (fanout 3)
                    b"sub": ("dir", {f"f{i}".encode(): ("file", i % 2 == 1, _content(i, 3000)) for i in range(40)})})
    nar = nar_of(tree)
    root, blocks, _ = ingest(nar, 1 << 16)
    with ChunkHasher(threads=2) as hasher:
        assert _build_with_hash_chunks(nar, 1 << 16, hasher.digests) == (root, blocks)
        assert _build_with_hash_chunks(nar, 1 << 16, hasher.digests, lag=True) == (root, blocks)


@settings(max_examples=40, deadline=None)
@given(tree=trees)
def test_default_parameters_round_trip(tree):
    nar = nar_of(tree)
    root, blocks, _ = ingest(nar, 1 << 16, params=ChunkerParams(), inline=1024)
    assert reassemble(root, blocks) == nar


# -- shapes ------------------------------------------------------------------------------------------------


def test_real_tree_round_trips_with_default_parameters():
    src = Path(__file__).resolve().parent.parent / "p2pcache"
    nar = b"".join(dump_path(src))
    root, blocks, ing = ingest(nar, 1 << 20, params=ChunkerParams(), inline=1024)
    assert reassemble(root, blocks) == nar
    assert ing.builder.files > 20


def test_huge_directory_is_split_into_pages_below_the_block_limit():
    entries = {f"file-{i:06d}.h".encode(): ("file", i % 3 == 0, f"#define X{i} {i}\n".encode() * 3) for i in range(60_000)}
    entries[b"link"] = ("link", b"file-000001.h")
    tree = ("dir", {b"include": ("dir", entries), b"zz": ("file", False, b"last")})
    nar = nar_of(tree)
    root, blocks, _ = ingest(nar, 1 << 20, params=ChunkerParams(), inline=1024, **{})
    assert reassemble(root, blocks) == nar
    assert max(len(b) for b in blocks.values()) <= MAX_BLOCK_SIZE // 2
    pages = [dagcbor.decode(b) for c, b in blocks.items() if c.codec == DAG_CBOR and c != root]
    assert len(pages) >= 4 and all(p["type"] == PAGE_TYPE for p in pages)
    assert len(blocks[root]) < 4096  # the big directory is a list of page links in the root
    # Nothing is lost between pages: the entry names come back in order.
    manifest = NarManifest.decode(blocks[root])
    got = [e.name for e in iter_plan(manifest, blocks.__getitem__) if isinstance(e, Entry)]
    assert got == [b"include"] + sorted(entries) + [b"zz"]


def test_large_directory_of_chunked_files_stays_below_the_block_limit():
    # 20k files each with a few chunk links: a page holds fewer entries, but stays well under 1 MiB.
    tree = ("dir", {f"f{i:05d}".encode(): ("file", False, _content(i, 5000)) for i in range(20_000)})
    nar = nar_of(tree)
    root, blocks, _ = ingest(nar, 1 << 20, params=TINY, inline=16, page_bytes=256 << 10, dir_inline_bytes=64 << 10)
    assert reassemble(root, blocks) == nar
    assert max(len(b) for c, b in blocks.items() if c.codec == DAG_CBOR) <= 300 << 10


def test_deep_tree_round_trips():
    tree = ("file", True, b"bottom")
    for depth in range(300):
        tree = ("dir", {b"d%d" % depth: tree, b"x": ("link", b"../x")})
    nar = nar_of(tree)
    root, blocks, _ = ingest(nar, 1 << 16, params=ChunkerParams(), inline=1024)
    assert reassemble(root, blocks) == nar


def test_big_file_uses_a_chunk_index_tree():
    data = _content(7, 3 << 20)
    nar = nar_of(("file", False, data))
    root, blocks, ing = ingest(nar, 1 << 20, params=TINY, inline=16, inline_links=4, fanout=16)
    manifest = NarManifest.decode(blocks[root])
    kind, executable, size, depth, links = manifest.root
    assert (kind, size) == ("chunked", len(data)) and depth >= 2 and len(links) <= 4
    assert reassemble(root, blocks) == nar
    assert ing.builder.chunks == sum(1 for c in blocks if c.codec == RAW)


def test_small_files_are_inline_and_empty_files_have_no_chunks():
    tree = ("dir", {b"empty": ("file", False, b""), b"small": ("file", True, b"x" * 1024),
                    b"big": ("file", False, _content(1, 1025))})
    root, blocks, _ = ingest(nar_of(tree), params=ChunkerParams(), inline=1024)
    manifest = NarManifest.decode(blocks[root])
    kinds = {name: node[0] for name, node in manifest.root[1]}
    assert kinds == {b"empty": "file", b"small": "file", b"big": "chunked"}
    assert sum(1 for c in blocks if c.codec == RAW) == 1


# -- dedup -------------------------------------------------------------------------------------------------


def _package(version: int) -> tuple:
    """A package tree: 80 files shared between versions, 4 changed, one added in v2, a version file."""
    rng = random.Random(99)
    lib = {}
    for i in range(80):
        data = rng.randbytes(rng.randrange(2_000, 300_000))
        if version == 2 and i % 20 == 0:
            data = data[:100] + b"patched in v2" + data[100:]  # an edit near the start of the file
        lib[f"mod{i:03d}.py".encode()] = ("file", False, data)
    if version == 2:
        lib[b"new.py"] = ("file", False, random.Random(5).randbytes(50_000))
    return ("dir", {
        b"bin": ("dir", {b"tool": ("file", True, b"#!/bin/sh\nexec tool-%d\n" % version)}),
        b"lib": ("dir", lib),
        b"VERSION": ("file", False, b"%d\n" % version),
        b"share": ("link", b"lib"),
    })


def test_two_versions_share_the_chunks_of_their_unchanged_files():
    params = ChunkerParams()
    v1, v2 = nar_of(_package(1)), nar_of(_package(2))
    root1, blocks1, _ = ingest(v1, 1 << 20, params=params, inline=1024)
    root2, blocks2, _ = ingest(v2, 1 << 20, params=params, inline=1024)
    assert reassemble(root1, blocks1) == v1 and reassemble(root2, blocks2) == v2
    raw1 = {c: len(b) for c, b in blocks1.items() if c.codec == RAW}
    raw2 = {c: len(b) for c, b in blocks2.items() if c.codec == RAW}
    # Every chunk of every unchanged file is shared.
    unchanged = [n for n, f in _package(1)[1][b"lib"][1].items() if _package(2)[1][b"lib"][1][n] == f]
    assert len(unchanged) == 76
    for name in unchanged:
        data = _package(1)[1][b"lib"][1][name][2]
        for piece in chunk_buffers([data], params):
            assert CID.for_block(RAW, piece) in raw1 and CID.for_block(RAW, piece) in raw2
    new_bytes = sum(s for c, s in raw2.items() if c not in raw1)
    assert new_bytes < 0.08 * sum(raw2.values())
    # Chunking each NAR as one stream shares less (chunks straddle file boundaries).
    whole1 = {CID.for_block(RAW, p): len(p) for p in chunk_buffers([v1], params)}
    whole2 = {CID.for_block(RAW, p): len(p) for p in chunk_buffers([v2], params)}
    whole_new = sum(s for c, s in whole2.items() if c not in whole1)
    assert new_bytes < whole_new


# -- verification ------------------------------------------------------------------------------------------


def test_wrong_nar_hash_withholds_the_last_piece():
    nar = nar_of(("dir", {b"a": ("file", False, _content(3, 200_000)), b"b": ("file", False, b"bb")}))
    root, blocks, _ = ingest(nar, params=ChunkerParams(), inline=1024)
    manifest = NarManifest.decode(blocks[root])
    lying = NarManifest(hashlib.sha256(b"other").digest(), manifest.nar_size, manifest.chunker, manifest.inline,
                        manifest.root)
    got = []
    with pytest.raises(CorruptData, match="does not match"):
        for piece in verified_nar_stream(lying, blocks.__getitem__):
            got.append(piece)
    assert 0 < sum(map(len, got)) < len(nar)
    assert b"".join(nar_stream(lying, blocks.__getitem__)) == nar  # the unverified stream would have passed it
    wrong_size = NarManifest(manifest.nar_hash, manifest.nar_size - 8, manifest.chunker, manifest.inline, manifest.root)
    with pytest.raises(CorruptData, match="longer"):
        b"".join(verified_nar_stream(wrong_size, blocks.__getitem__))


def test_a_chunk_of_the_wrong_size_is_refused():
    nar = nar_of(("file", False, _content(3, 5000)))
    root, blocks, _ = ingest(nar, params=TINY, inline=16)
    chunk = next(c for c in blocks if c.codec == RAW)
    blocks[chunk] = blocks[chunk][:-1]  # a load() that returns short data
    with pytest.raises(CorruptData, match="manifest says"):
        reassemble(root, blocks)


def test_verified_stream_is_sans_io():
    data = [b"ab", b"cd", b"ef"]
    v = VerifiedStream.sha256(hashlib.sha256(b"abcdef").digest(), 6)
    assert [v.push(p) for p in data] == [b"", b"ab", b"cd"]
    assert v.finish() == b"ef"
    bad = VerifiedStream.sha256(hashlib.sha256(b"abcdeX").digest(), 6)
    assert [bad.push(p) for p in data] == [b"", b"ab", b"cd"]
    with pytest.raises(CorruptData):
        bad.finish()
    short = VerifiedStream.sha256(hashlib.sha256(b"abcdef").digest(), 7)
    for p in data:
        short.push(p)
    with pytest.raises(CorruptData, match="6 bytes, expected 7"):
        short.finish()


def test_ingest_checks_expected_hash_and_size():
    nar = nar_of(("file", False, b"hello"))
    ing = NarIngest(expected_size=len(nar) - 1)
    with pytest.raises(CorruptData, match="longer"):
        ing.feed(nar)
    ing = NarIngest(expected_hash=hashlib.sha256(b"x").digest(), expected_size=len(nar))
    ing.feed(nar)
    with pytest.raises(CorruptData, match="does not match"):
        ing.finish()
    ing = NarIngest()
    ing.feed(nar[:-8])
    with pytest.raises(InvalidInput, match="truncated"):
        ing.finish()


# -- strict decoding ---------------------------------------------------------------------------------------


def _root_with(node) -> tuple[CID, dict]:
    manifest = NarManifest(bytes(32), 1000, ChunkerParams(), 1024, node)
    data = manifest.encode()
    cid = CID.for_block(DAG_CBOR, data)
    return cid, {cid: data}


@pytest.mark.parametrize("node, message", [
    (["dir", [[b"b", ["symlink", b"x"]], [b"a", ["symlink", b"x"]]]], "increasing order"),
    (["dir", [[b"a", ["symlink", b"x"]], [b"a", ["symlink", b"x"]]]], "increasing order"),
    (["dir", [[b"..", ["symlink", b"x"]]]], "not allowed"),
    (["dir", [[b"a/b", ["symlink", b"x"]]]], "contains '/'"),
    (["file", False, 3, b"ab"], "inline file"),
    (["chunked", False, 10, 0, [[CID.for_block(RAW, b"x" * 9), 9]]], "add up"),
    (["chunked", False, 9, 0, [[CID.for_block(DAG_CBOR, b"x" * 9), 9]]], "bad chunk link"),
    (["symlink", b""], "symlink"),
    (["socket"], "unknown"),
    (["pages", 1, [[CID.for_block(RAW, b"p"), 1]]], "page link"),
])
def test_malformed_nodes_are_refused(node, message):
    root, blocks = _root_with(node)
    with pytest.raises(MalformedBlock, match=message):
        reassemble(root, blocks)


def test_malformed_root_blocks_are_refused():
    good = NarManifest(bytes(32), 1000, ChunkerParams(), 1024, ["symlink", b"x"]).to_ipld()
    for change, message in (({"type": "p2pcache/archive"}, "not a p2pcache NAR"), ({"version": 2}, "version"),
                            ({"narHash": bytes(31)}, "narHash"), ({"extra": 1}, "fields"),
                            ({"inline": -1}, "inline")):
        with pytest.raises(MalformedBlock, match=message):
            NarManifest.decode(dagcbor.encode({**good, **change}))


def test_page_counts_must_match():
    page = dagcbor.encode({"type": PAGE_TYPE, "version": 1, "entries": [[b"a", ["symlink", b"x"]]]})
    pcid = CID.for_block(DAG_CBOR, page)
    for node, message in ((["pages", 2, [[pcid, 1]]], "directory says 2"), (["pages", 1, [[pcid, 2]]], "parent says 2")):
        root, blocks = _root_with(node)
        blocks[pcid] = page
        with pytest.raises(MalformedBlock, match=message):
            reassemble(root, blocks)


def test_builder_refuses_events_out_of_place():
    b = NarManifestBuilder()
    b.add(RegularFile(3))
    with pytest.raises(InvalidInput):
        b.add(Symlink(b"x"))
    b = NarManifestBuilder()
    b.add(Symlink(b"x"))
    with pytest.raises(InvalidInput, match="after the end"):
        b.add(Symlink(b"y"))
    with pytest.raises(InvalidInput, match="before its root"):
        NarManifestBuilder().finish(bytes(32), 100)
