import hashlib

import dag_cbor as independent
import pytest
from hypothesis import given, settings, strategies as st

from p2pcache.content import dagcbor
from p2pcache.content.chunking import DEFAULT_PARAMS, chunk_buffers
from p2pcache.content.cid import CID, DAG_CBOR, RAW
from p2pcache.content.manifest import (FANOUT, ArchiveManifest, ChunkIndex, ManifestBuilder, iter_blocks,
                                       iter_chunks, sniff_media_type)
from p2pcache.errors import MalformedBlock


def build(chunks: list[bytes], fanout: int):
    store: dict[CID, bytes] = {}
    builder = ManifestBuilder(DEFAULT_PARAMS, fanout=fanout)
    leaves = []
    for data in chunks:
        cid = CID.for_block(RAW, data)
        store[cid] = data
        leaves.append(cid)
        for icid, idata in builder.add_chunk(cid, len(data)):
            store[icid] = idata
    whole = b"".join(chunks)
    hashes = {"sha256": hashlib.sha256(whole).digest(), "sha512": hashlib.sha512(whole).digest()}
    root, root_data, rest = builder.finish(len(whole), hashes, "application/gzip", "x.tar.gz")
    for icid, idata in rest:
        store[icid] = idata
    store[root] = root_data
    return root, store, leaves, whole


def load_verified(store):
    def load(cid: CID) -> bytes:
        data = store[cid]
        assert cid.verify(data)
        return data
    return load


@settings(max_examples=150)
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=80), st.integers(min_value=2, max_value=6))
def test_build_and_reassemble_any_tree_shape(chunks, fanout):
    root, store, leaves, whole = build(chunks, fanout)
    manifest = ArchiveManifest.decode(store[root])
    assert manifest.size == len(whole) and manifest.name == "x.tar.gz"
    got = list(iter_chunks(manifest, load_verified(store)))
    assert [c for c, _ in got] == leaves
    assert b"".join(store[c] for c, _ in got) == whole
    # every stored block is reachable from the root, and every node respects the fan-out
    reachable = {root} | {c for c, _ in iter_blocks(manifest, load_verified(store))}
    assert reachable == set(store)
    for cid, data in store.items():
        if cid.codec == DAG_CBOR and cid != root:
            assert len(ChunkIndex.decode(data).children) <= fanout
    assert len(manifest.children) <= fanout


def test_manifest_of_a_real_stream_records_params_and_hashes():
    data = hashlib.sha256(b"seed").digest() * 40000
    root, store, _, whole = build([bytes(c) for c in chunk_buffers([data])], FANOUT)
    m = ArchiveManifest.decode(store[root])
    assert m.chunker == DEFAULT_PARAMS
    assert m.hashes["sha256"] == hashlib.sha256(data).digest()
    assert m.hashes["sha512"] == hashlib.sha512(data).digest()
    # an independent dag-cbor decoder reads the same manifest
    theirs = independent.decode(store[root])
    assert theirs["size"] == len(data) and theirs["chunker"]["avg"] == DEFAULT_PARAMS.avg_size
    assert bytes(theirs["children"][0][0]) == m.children[0][0].buffer


def test_full_fanout_node_stays_well_under_one_mebibyte():
    links = tuple((CID.for_block(RAW, i.to_bytes(4, "big")), 1 << 20) for i in range(FANOUT))
    data = ChunkIndex(0, links).encode()
    assert len(data) < 256 * 1024
    # a 1 TiB archive of 1 MiB chunks needs 2**20 leaves: depth 2 with FANOUT=4096, root of 64 links
    builder = ManifestBuilder(DEFAULT_PARAMS)
    leaf = CID.for_block(RAW, b"x")
    emitted = 0
    for _ in range(3 * FANOUT + 5):
        emitted += len(builder.add_chunk(leaf, 1))
    root, root_data, rest = builder.finish(3 * FANOUT + 5, {"sha256": b"\0" * 32, "sha512": b"\0" * 64})
    assert emitted + len(rest) == 4
    m = ArchiveManifest.decode(root_data)
    assert m.depth == 1 and len(m.children) == 4


def _root_ipld(**changes):
    leaf = CID.for_block(RAW, b"abc")
    node = {"type": "p2pcache/archive", "version": 1, "size": 3,
            "hashes": {"sha256": b"\0" * 32, "sha512": b"\0" * 64}, "format": "application/octet-stream",
            "chunker": DEFAULT_PARAMS.to_ipld(), "depth": 0, "children": [[leaf, 3]]}
    node.update(changes)
    return {k: v for k, v in node.items() if v is not None}


def test_valid_hand_built_root_decodes():
    assert ArchiveManifest.decode(dagcbor.encode(_root_ipld())).size == 3


@pytest.mark.parametrize("changes", [
    dict(type="something-else"), dict(version=2), dict(size=4), dict(size=-1), dict(depth=1),
    dict(hashes={"sha512": b"\0" * 64}), dict(hashes={"sha256": b"\0" * 31, "sha512": b"\0" * 64}),
    dict(chunker={"alg": "rabin"}), dict(children=[[CID.for_block(DAG_CBOR, b"abc"), 3]]),
    dict(children=[["not a cid", 3]]), dict(children=[[CID.for_block(RAW, b"abc"), True]]),
    dict(extra="field"), dict(name=5), dict(children=[[CID.for_block(RAW, b"x"), 2 << 20]], size=2 << 20),
])
def test_malformed_roots_rejected(changes):
    with pytest.raises(MalformedBlock):
        ArchiveManifest.decode(dagcbor.encode(_root_ipld(**changes)))


def test_index_node_with_wrong_size_is_caught_while_walking():
    root, store, _, _ = build([b"a" * 10, b"b" * 10, b"c" * 10], fanout=2)
    m = ArchiveManifest.decode(store[root])
    assert m.depth == 1
    bad_index = ChunkIndex(0, ((CID.for_block(RAW, b"a" * 10), 9),)).encode()
    bad_cid = CID.for_block(DAG_CBOR, bad_index)
    store[bad_cid] = bad_index
    forged = ArchiveManifest(m.size, m.hashes, m.chunker, 1, ((bad_cid, 10),) + m.children[1:], m.media_type)
    with pytest.raises(MalformedBlock):
        list(iter_chunks(forged, store.__getitem__))


@pytest.mark.parametrize("head,expected", [
    (b"\x1f\x8b\x08\x00", "application/gzip"),
    (b"\xfd7zXZ\x00\x00", "application/x-xz"),
    (b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00", "application/x-nix-archive"),
    (b"\0" * 257 + b"ustar\x0000", "application/x-tar"),
    (b"hello", "application/octet-stream"),
])
def test_media_type_sniffing(head, expected):
    assert sniff_media_type(head) == expected
