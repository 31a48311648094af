"""The shared DAG walk and the DAG stream order, pure: a server's walk and an asker's check agree, the
depth-first order is the order a NAR is read in, and a fetch driven through `DagWalk` (block by block as
bitswap asks, or by subtrees as the DAG protocol asks) gets every missing block exactly once."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pcache.content import dagcbor
from p2pcache.content.cid import CID, DAG_CBOR, RAW
from p2pcache.content.narmanifest import NarAssembly, NarManifest
from p2pcache.errors import CorruptData
from p2pcache.transfer import DagWalk, DfsOrder, OutOfOrder
from p2pcache.transfer.walk import dag_links

from .test_narmanifest import ingest, nar_of, trees

SETTINGS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def server_walk(blocks, roots, have=(), nodes_only=False):
    order = DfsOrder(roots, have, nodes_only)
    out = []
    while (cid := order.peek()) is not None:
        order.give(cid, blocks[cid] if cid.codec == DAG_CBOR else None)
        out.append(cid)
    return out


@settings(**SETTINGS)
@given(tree=trees)
def test_depth_first_order_is_nar_order_and_the_asker_checks_it(tree):
    nar = nar_of(tree)
    root, blocks, _ = ingest(nar)
    seq = server_walk(blocks, [root])
    assert set(seq) == set(blocks) and len(seq) == len(blocks)
    # NAR bytes come out of the blocks in exactly this order (first needs; a repeated file needs twice).
    asm = NarAssembly(NarManifest.decode(blocks[root]), coalesce=1)
    out, needs = b"".join(asm.start()), []
    while (cid := asm.need()) is not None:
        needs.append(cid)
        out += b"".join(asm.give(blocks[cid]))
    assert out == nar
    assert list(dict.fromkeys(needs)) == seq[1:]
    # The asker's mirror accepts the server's sequence as it arrives ...
    mirror = DfsOrder([root])
    for cid in seq:
        mirror.expect(cid, blocks[cid])
    assert mirror.done
    with pytest.raises(OutOfOrder, match="after the end"):
        mirror.expect(root, blocks[root])


@settings(**SETTINGS)
@given(tree=trees, n=st.integers(1, 9), nodes_only=st.booleans(), skip=st.integers(0, 5))
def test_upcoming_names_the_blocks_the_walk_takes_next_and_takes_none(tree, n, nodes_only, skip):
    # A tree holding one file twice sends its chunks once: `upcoming` skips the second place as `give` does.
    root, blocks, _ = ingest(nar_of(("dir", {b"a": tree, b"b": tree, b"c": tree})))
    full = server_walk(blocks, [root], nodes_only=nodes_only)
    have = full[1:][:skip][::2]  # some subtrees the asker holds
    expected = server_walk(blocks, [root], have=have, nodes_only=nodes_only)
    order, got = DfsOrder([root], have, nodes_only), []
    while (ahead := order.upcoming(n)):
        assert len(ahead) <= n
        assert all(c.codec == RAW for c in ahead[:-1])  # a run of leaves, a node at most last
        before = order.sent
        for cid in ahead:
            assert order.peek() == cid
            order.give(cid, blocks[cid] if cid.codec == DAG_CBOR else None)
        assert order.sent == before + len(ahead)
        got += ahead
    assert got == expected and order.done and order.upcoming(n) == []
    assert DfsOrder([root]).upcoming(0) == []


def test_upcoming_names_a_leaf_a_run_holds_twice_once():
    x, y, z = (random.Random(i).randbytes(300) for i in range(3))
    cx, cy, cz = (CID.for_block(RAW, b) for b in (x, y, z))
    inner = dagcbor.encode({"l": [cz]})
    ci = CID.for_block(DAG_CBOR, inner)
    top = dagcbor.encode({"l": [cx, cy, cx, ci, cx]})  # x twice in the first run, again after the node
    ct = CID.for_block(DAG_CBOR, top)
    blocks = {cx: x, cy: y, cz: z, ci: inner, ct: top}
    order = DfsOrder([ct])
    order.give(ct, blocks[ct])
    assert order.upcoming(10) == [cx, cy, ci]
    assert order.upcoming(2) == [cx, cy]
    assert server_walk(blocks, [ct]) == [ct, cx, cy, ci, cz]


def test_the_asker_rejects_swapped_corrupt_and_foreign_blocks():
    nar = nar_of(("dir", {b"a": ("file", False, random.Random(1).randbytes(5000)),
                          b"b": ("file", True, random.Random(2).randbytes(3000))}))
    root, blocks, _ = ingest(nar)
    seq = server_walk(blocks, [root])
    mirror = DfsOrder([root])
    mirror.expect(root, blocks[root])
    with pytest.raises(OutOfOrder, match="out of order"):
        mirror.expect(seq[2], blocks[seq[2]])
    with pytest.raises(OutOfOrder, match="does not hash"):
        mirror.expect(seq[1], b"x" + blocks[seq[1]][1:])
    mirror.expect(seq[1], blocks[seq[1]])  # a failed check consumed nothing


def test_a_nar_that_does_not_match_its_hash_never_gets_its_last_bytes():
    nar = nar_of(("file", False, random.Random(3).randbytes(9000)))
    root, blocks, _ = ingest(nar)
    manifest = NarManifest.decode(blocks[root])
    bad = NarManifest(b"\0" * 32, manifest.nar_size, manifest.chunker, manifest.inline, manifest.root)
    asm = NarAssembly(bad, coalesce=1)
    out = b"".join(asm.start())
    with pytest.raises(CorruptData):
        while (cid := asm.need()) is not None:
            out += b"".join(asm.give(blocks[cid]))
    assert len(out) < len(nar)


@settings(**SETTINGS)
@given(tree=trees, seed=st.integers(0, 2**16), held_share=st.sampled_from([0.0, 0.3, 0.9]), batched=st.booleans())
def test_block_by_block_walk_fetches_every_missing_block_once(tree, seed, held_share, batched):
    """bitswap's use: any delivery order, some failures, blocks already held are never asked for
    (asked of `held` one CID at a time, or of `held_many` a batch at a time, as the DAG driver does)."""
    rng = random.Random(seed)
    root, blocks, _ = ingest(nar_of(tree))
    held = {c for c in blocks if c != root and rng.random() < held_share}

    def one_by_one(cid):
        raise AssertionError("held asked one CID at a time although held_many was given")

    walk = (DagWalk(root, one_by_one, held_many=lambda cids: [c in held for c in cids]) if batched
            else DagWalk(root, held.__contains__))
    asked: list = []
    outstanding: list = []
    while not walk.finished:
        wants = walk.next_wants(rng.randint(1, 8))
        for cid in walk.take_loads():
            assert walk.on_block(cid, blocks[cid], local=True)
        asked += wants
        outstanding += wants
        if not outstanding:
            continue
        cid = outstanding.pop(rng.randrange(len(outstanding)))
        if rng.random() < 0.1:
            walk.on_failed(cid)
            asked.remove(cid)
        else:
            assert walk.on_block(cid, blocks[cid])
    assert not held & set(asked) and len(asked) == len(set(asked))
    # Everything reachable that was not held, reachable through held nodes included.
    reachable = set(server_walk(blocks, [root]))
    need = {c for c in reachable if c not in held}
    assert set(asked) <= need and walk.stats.blocks == len(asked)


@settings(**SETTINGS)
@given(tree=trees, seed=st.integers(0, 2**16), held_share=st.sampled_from([0.0, 0.5]))
def test_subtree_requests_as_the_dag_driver_makes_them(tree, seed, held_share):
    """The DAG driver's use: a want stands for its subtree of inner nodes, a server streams each request
    in order, a request may break midway and its blocks go back to the walk."""
    rng = random.Random(seed)
    root, blocks, _ = ingest(nar_of(tree))
    held = {c for c in blocks if c != root and c.codec == RAW and rng.random() < held_share}
    walk = DagWalk(root, held.__contains__, cover_nodes=True)
    received: list = []
    while not walk.finished:
        wants = walk.next_wants(rng.randint(1, 6))
        for cid in walk.take_loads():
            walk.on_block(cid, blocks[cid], local=True)
        if not wants:
            continue
        sent = server_walk(blocks, wants, nodes_only=True)
        mirror = DfsOrder(wants, nodes_only=True)
        cut = rng.randrange(len(sent) + 1) if rng.random() < 0.2 else len(sent)
        for cid in sent[:cut]:
            mirror.expect(cid, blocks[cid])
            if walk.on_block(cid, blocks[cid]):
                received.append(cid)
        for cid in mirror.remaining():
            walk.on_failed(cid)
    assert not held & set(received)
    assert len(received) == len(set(received))
    assert set(received) | held >= set(server_walk(blocks, [root])) - held


def test_have_and_scope_nodes_shape_the_walk_on_both_sides():
    tree = ("dir", {b"a": ("file", False, random.Random(7).randbytes(20000)),
                    b"b": ("dir", {b"c": ("file", True, random.Random(8).randbytes(9000))}),
                    b"d": ("file", False, random.Random(7).randbytes(20000))})  # same bytes as a: shared blocks
    root, blocks, _ = ingest(nar_of(tree))
    full = server_walk(blocks, [root])
    assert len(full) == len(set(full)) == len(blocks)  # a repeated subtree is sent once
    inner = [c for c in full if c.codec == DAG_CBOR]
    assert server_walk(blocks, [root], nodes_only=True) == inner
    skipped = inner[1]  # an inner node: it and everything only it links to are left out
    below = set(server_walk(blocks, [skipped]))
    walk = server_walk(blocks, [root], have=[skipped])
    assert skipped not in walk and len(walk) < len(full) and set(walk) | below == set(full)
    mirror = DfsOrder([root], have=[skipped])
    for cid in walk:
        mirror.expect(cid, blocks[cid])
    assert mirror.done


@settings(**SETTINGS)
@given(tree=trees, seed=st.integers(0, 2**16))
def test_wants_follow_depth_first_order_whatever_order_inner_nodes_arrive_in(tree, seed):
    """A NAR streamed to Nix needs its blocks in DFS order: inner nodes arriving in any order must not
    reorder the blocks wanted after them."""
    rng = random.Random(seed)
    root, blocks, _ = ingest(nar_of(tree))
    dfs = server_walk(blocks, [root])
    pos = {c: i for i, c in enumerate(dfs)}
    links = [link for c in dfs for link in dag_links(c, blocks[c])]
    # A block linked from two places belongs at the first; until that parent arrives the walk can only
    # place it at the one it knows, so batches are in final DFS order only when nothing is shared.
    shared = len(links) != len(set(links))
    walk = DagWalk(root, lambda c: False)
    pending: list = []
    asked: list = []
    while not walk.finished:
        wants = walk.next_wants(rng.choice([1, 3, 1000]))
        assert shared or wants == sorted(wants, key=pos.__getitem__)  # each batch in DFS order
        asked += wants
        pending += wants
        rng.shuffle(pending)  # blocks come back in any order
        cid = pending.pop()
        walk.on_block(cid, blocks[cid])
    assert sorted(asked, key=pos.__getitem__) == dfs
    # With every inner node in (each after its parent, siblings and cousins in a shuffled order), the
    # leaves come out in exactly the NAR's order.
    walk = DagWalk(root, lambda c: False, cover_nodes=True)
    open_inner = walk.next_wants(1)
    while open_inner:
        cid = open_inner.pop(rng.randrange(len(open_inner)))
        walk.on_block(cid, blocks[cid])
        open_inner = [c for c in dfs if c.codec == DAG_CBOR and walk.is_open(c)]
    assert walk.next_wants(10**6) == [c for c in dfs if c.codec == RAW]


def test_link_order_ranks_each_nodes_children_and_every_block_is_still_wanted_once():
    """simnet's rarest-first stand-in: a node's links wanted in the order `link_order` ranks them."""
    from simnet.payload import build_artifact

    art = build_artifact(64 << 10, 5, "synthetic", block_size=256)  # a root of 256 chunks
    root, blocks = art.root, art.blocks
    walk = DagWalk(root, lambda c: False, link_order=lambda cid, n: list(range(n))[::-1])
    asked = []
    while not walk.finished:
        wants = walk.next_wants(1000)
        asked += wants
        for cid in wants:
            walk.on_block(cid, blocks[cid])
    assert sorted(asked, key=lambda c: c.buffer) == sorted(blocks, key=lambda c: c.buffer)  # each once
    leaves = [c for c in asked if c.codec == RAW]
    assert leaves == [c for c in server_walk(blocks, [root]) if c.codec == RAW][::-1]  # reversed ranks


def test_held_many_is_asked_once_per_batch_of_wants():
    """The DAG driver checks a request's worth of frontier CIDs against the index in one query; held
    ones do not take a want's room, so the walk asks again for the rest, in order."""
    leaves = [CID.for_block(RAW, b"leaf %d" % i) for i in range(40)]
    node = dagcbor.encode({"links": leaves})
    root = CID.for_block(DAG_CBOR, node)
    held = set(leaves[::2])
    calls: list[int] = []

    def held_many(cids):
        calls.append(len(cids))
        return [c in held for c in cids]

    walk = DagWalk(root, lambda c: c in held, held_many=held_many)
    assert walk.next_wants(128) == [root] and calls == [1]
    walk.on_block(root, node)
    calls.clear()
    wants = walk.next_wants(10)
    assert wants == [c for c in leaves if c not in held][:10]
    assert calls == [10, 5, 3, 1, 1]  # 20 frontier CIDs looked at in 5 queries, not 20
    assert walk.stats.held_blocks == 10
