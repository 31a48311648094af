"""Signed key records, the trust policy, the cache-records wire format, the record store, lookup order and
idle expiry — pure code and a real repo, no network."""

import time

import pytest
import trio

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2pcache import config as config_mod
from p2pcache.buildcache import (BuildCache, BuildCacheConfig, RecordStore, RepoBlockSink, TrustPolicy, WriterRule,
                                 frame_blocks, unframe_blocks)
from p2pcache.buildtree import save_tree
from p2pcache.content import dagcbor
from p2pcache.content.cacherecord import CacheRecord, namespace_of
from p2pcache.content.cid import CID, DAG_CBOR
from p2pcache.errors import InvalidInput, MalformedBlock
from p2pcache.routing.cacherecords import decode_records, encode_records
from p2pcache.routing.errors import ResolveProtocolError

ROOT = CID.for_block(DAG_CBOR, dagcbor.encode({"x": 1}))


def writer():
    pair = create_new_key_pair()
    return pair, pair.public_key.serialize(), ID.from_pubkey(pair.public_key).to_base58()


def test_record_round_trip_and_tampering():
    pair, pub, pid = writer()
    r = CacheRecord.create("main/linux-abc", ROOT, 1_700_000_000_000, pub, pair.private_key)
    back = CacheRecord.decode(r.encode())
    assert back == r and back.writer_id == pid and back.namespace == "main"
    node = dagcbor.decode(r.encode())
    for field, value in (("key", "main/linux-abd"), ("time", 1_700_000_000_001), ("root", CID.for_block(DAG_CBOR, b"\xa0"))):
        forged = dagcbor.encode({**node, field: value})
        with pytest.raises(MalformedBlock, match="bad signature"):
            CacheRecord.decode(forged)
    with pytest.raises(MalformedBlock, match="namespace"):
        CacheRecord.decode(dagcbor.encode({**node, "namespace": "pr"}))
    other_pair, other_pub, _ = writer()
    with pytest.raises(MalformedBlock, match="bad signature"):  # someone else's key under the same signature
        CacheRecord.decode(dagcbor.encode({**node, "writer": other_pub}))
    assert namespace_of("plain-key") == "" and namespace_of("pr/12/x") == "pr"


def test_trust_policy_first_matching_rule_decides():
    policy = TrustPolicy([WriterRule("main/*", ("12D3KooWProtected",)), WriterRule("pr/*", ("*",))])
    assert policy.check("12D3KooWProtected", "main/linux") is None
    assert "not trusted for keys 'main/*'" in policy.check("12D3KooWOther", "main/linux")
    assert policy.check("12D3KooWOther", "pr/3/linux") is None
    assert "no writer rule" in policy.check("12D3KooWProtected", "release/1")


def test_config_writers_section(tmp_path):
    (tmp_path / "config.toml").write_text('[buildcache]\nidle_expiry_days = 2\n'
                                          'writers = [{ keys = "main/*", peers = ["A"] }, { keys = "pr/*", peers = ["*"] }]\n')
    cfg = config_mod.load(tmp_path).buildcache
    assert cfg.idle_expiry == 2 * 86400 and cfg.writers == [WriterRule("main/*", ("A",)), WriterRule("pr/*", ("*",))]
    (tmp_path / "config.toml").write_text('[buildcache]\nwriters = [{ keys = "main/*" }]\n')
    with pytest.raises(InvalidInput, match="writers rule"):
        config_mod.load(tmp_path)


def test_wire_drops_bad_records_and_keeps_good_ones():
    pair, pub, _ = writer()
    good = CacheRecord.create("pr/1/a", ROOT, 5, pub, pair.private_key)
    other = CacheRecord.create("pr/2/a", ROOT, 6, pub, pair.private_key)
    forged = CacheRecord(good.namespace, good.key, good.root, 7, good.writer, good.sig)  # time changed
    frame = encode_records([good, other, forged])
    payload = frame[1:] if frame[0] < 0x80 else frame[2:]
    got = decode_records(payload, "pr/1/", prefix=True)
    assert got.records == [good] and got.rejected == 2  # forged: bad signature; other: does not match
    with pytest.raises(ResolveProtocolError):
        decode_records(b"\xff\xff", "pr/1/", prefix=True)


def test_block_upload_framing():
    blocks = [(CID.for_block(DAG_CBOR, dagcbor.encode({"i": i})), dagcbor.encode({"i": i})) for i in range(3)]
    assert unframe_blocks(frame_blocks(blocks)) == blocks
    with pytest.raises(InvalidInput):
        unframe_blocks(frame_blocks(blocks)[:-1])


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


def service(repo, tmp_path, clock, rules=None):
    pair = create_new_key_pair()
    cfg = BuildCacheConfig(writers=rules) if rules else BuildCacheConfig()
    return BuildCache(repo, RecordStore(tmp_path / "bc.sqlite"), pair.private_key, pair.public_key.serialize(), cfg,
                      clock=clock)


def tree(repo, tmp_path, name: str, data: bytes) -> CID:
    d = tmp_path / name
    d.mkdir()
    (d / "f").write_bytes(data)
    return save_tree([str(d)], RepoBlockSink(repo)).root


def test_lookup_exact_then_prefixes_in_order_newest_wins_and_stale_ignored(repo, tmp_path, caplog):
    clock = Clock()
    bc = service(repo, tmp_path, clock)
    roots = [tree(repo, tmp_path, f"t{i}", bytes([i]) * 3000) for i in range(4)]

    async def go():
        await bc.save("feature/x-1", roots[0])
        clock.now += 10
        await bc.save("main/x-1", roots[1])
        clock.now += 10
        await bc.save("main/x-2", roots[2])
        again = await bc.save("main/x-2", roots[3])
        assert again == {"saved": False, "reason": "exists", "key": "main/x-2", "existing": again["existing"]}
        exact = await bc.lookup("main/x-1", ["main/"], lookup_only=True)
        assert exact["match"] == "exact" and exact["root"] == str(roots[1])
        # own branch first, then the default branch: the first prefix that matches anything decides
        mine = await bc.lookup("feature/x-9", ["feature/x-", "main/x-"], lookup_only=True)
        assert (mine["match"], mine["key"], mine["prefix"]) == ("prefix", "feature/x-1", "feature/x-")
        main = await bc.lookup("other/x-9", ["other/", "main/x-"], lookup_only=True)
        assert (main["key"], main["root"]) == ("main/x-2", str(roots[2]))
        forced = await bc.save("main/x-2", roots[3], force=True)
        assert forced["saved"] and forced["replaced"]
        assert (await bc.lookup("main/x-2", lookup_only=True))["root"] == str(roots[3])
        clock.now += 31 * 86400  # every record is now older than record_max_age
        assert (await bc.lookup("main/x-2", ["main/"], lookup_only=True))["match"] == "none"

    trio.run(go)
    assert "stale (older than 30 days)" in caplog.text


def test_a_node_cannot_save_a_key_its_policy_forbids(repo, tmp_path):
    bc = service(repo, tmp_path, Clock(), rules=[WriterRule("main/*", ("12D3KooWSomeoneElse",)), WriterRule("pr/*", ("*",))])
    root = tree(repo, tmp_path, "t", b"z" * 100)
    with pytest.raises(InvalidInput, match="not trusted for keys 'main/\\*'"):
        trio.run(bc.save, "main/x", root)
    assert trio.run(bc.save, "pr/5/x", root)["saved"]


def test_idle_trees_expire_pinned_ones_stay(repo, tmp_path):
    clock = Clock()
    bc = service(repo, tmp_path, clock)
    old = tree(repo, tmp_path, "old", b"o" * 50_000)
    kept = tree(repo, tmp_path, "kept", b"k" * 50_000)
    fresh = tree(repo, tmp_path, "fresh", b"f" * 50_000)
    for key, root in (("main/old", old), ("main/kept", kept), ("main/fresh", fresh)):
        trio.run(bc.save, key, root)
    bc.set_pinned("main/kept", True)
    for root in (old, kept):  # not used for 8 days
        repo.index.db.execute("UPDATE roots SET last_access = ? WHERE root = ?", (clock.now - 8 * 86400, root.buffer))
    report = bc.expire()
    assert report["expired"] == [str(old)] and report["bytes_freed"] >= 50_000
    assert repo.index.get_root(old) is None and repo.index.get_root(kept) is not None
    assert trio.run(bc.lookup, "main/old", [], True)["match"] == "none"
    assert {k["key"] for k in bc.list_keys()} == {"main/kept", "main/fresh"}
    # an idle tree that a restore is reading (`Repo.readers`) stays until the read is over
    repo.index.db.execute("UPDATE roots SET last_access = ? WHERE root = ?", (clock.now - 8 * 86400, fresh.buffer))
    with repo.readers.reading(fresh):
        assert bc.expire()["expired"] == [] and repo.index.get_root(fresh) is not None
    assert bc.expire()["expired"] == [str(fresh)]


def test_a_record_whose_tree_is_gone_is_skipped_for_the_next(repo, tmp_path):
    clock = Clock()
    bc = service(repo, tmp_path, clock)
    older = tree(repo, tmp_path, "older", b"a" * 40_000)
    newer = tree(repo, tmp_path, "newer", b"b" * 40_000)
    trio.run(bc.save, "main/y-1", older)
    clock.now += 5
    trio.run(bc.save, "main/y-2", newer)
    with repo.index.transaction():
        repo.index.remove_root(newer)  # evicted by `gc --max-size`; the record stays behind
    repo.gc(None)
    got = trio.run(bc.lookup, "main/y-3", ["main/y-"])
    assert (got["match"], got["key"]) == ("prefix", "main/y-1")
