"""The DAG transfer protocol between real daemons on loopback, and hostile peers speaking it badly."""

import hashlib
import io
import json
import random
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from p2pcache.content.chunking import ChunkerParams
from p2pcache.content.cid import CID, DAG_CBOR, RAW
from p2pcache.content.manifest import iter_blocks
from p2pcache.net.bitswap import BitswapExchange, RepoBlockSource
from p2pcache.net.dagxfer import PROTOCOL, DagConfig, DagServer, DagTransfer, encode_request
from p2pcache.net.host import HostConfig, load_identity, open_host
from p2pcache.transfer import DfsOrder
from p2pcache.store.repo import Repo

from .helpers.daemons import start_daemon

BAD_DAG_NODE = str(Path(__file__).parent / "helpers" / "bad_dag_node.py")
MODES = ("corrupt", "order", "endless", "stall", "empty")
MiB = 1 << 20


def _leech_repo(tmp_path: Path, name: str) -> Path:
    repo = tmp_path / name
    repo.mkdir()
    (repo / "config.toml").write_text("[transfer]\nstall_timeout = 2.0\n")  # the stall case waits this long
    return repo


def test_archive_moves_over_one_dag_stream_per_request(tmp_path, rng, daemons):
    data = rng.randbytes(12 * MiB + 777)
    src = tmp_path / "a.tar"
    src.write_bytes(data)
    a = start_daemon(tmp_path / "a")
    daemons.append(a)
    b = start_daemon(tmp_path / "b", bootstrap=[a.addr])
    daemons.append(b)
    a.cli("add", str(src))
    a.wait_announced(3)
    out = tmp_path / "out.tar"
    b.cli("get", "sha256:" + hashlib.sha256(data).hexdigest(), "-o", str(out), timeout=60)
    assert out.read_bytes() == data
    st, sa = b.status(), a.status()
    xfer = st["transfer"]
    assert xfer["bitswap_fallbacks"] == 0 and xfer["peers_dropped"] == 0
    # ~200 chunks in requests of at most 512 CIDs (one provider), plus the tree's inner nodes: a handful of streams
    assert 1 <= xfer["streams"] <= 6
    assert len(data) <= xfer["bytes"] < len(data) + 64 * 1024 and xfer["duplicate_bytes"] == 0
    assert sa["transfer"]["served_bytes"] >= len(data)
    assert st["roots_incomplete"] == 0


def test_hostile_dag_peers_are_banned_nothing_unverified_is_kept_honest_peer_completes(tmp_path, rng, daemons):
    # A stalling peer is the exception: silence proves no lie (load or the network look the same), so its
    # share ends with one log line and it is asked again later, never banned.
    leech = start_daemon(_leech_repo(tmp_path, "leech"))
    daemons.append(leech)
    bad, files = {}, {}
    for mode in MODES:
        d = start_daemon(tmp_path / mode, bootstrap=[leech.addr], entry=[BAD_DAG_NODE],
                         env={"P2PCACHE_BAD_DAG": mode})
        daemons.append(d)
        data = rng.randbytes(3 * MiB + len(mode))
        (tmp_path / f"{mode}.bin").write_bytes(data)
        d.cli("add", str(tmp_path / f"{mode}.bin"))
        bad[mode], files[mode] = d, data
    for d in bad.values():
        d.wait_announced(3)

    for mode, data in files.items():  # the only provider is hostile: a clean one-line failure
        out = tmp_path / ("endless.got" if mode == "endless" else "x")
        proc = leech.cli("get", "sha256:" + hashlib.sha256(data).hexdigest(), "-o", str(out),
                         check=False, timeout=60)
        if mode == "endless" and proc.returncode == 0:
            # The manifest root came with the lookup, so the first request named the leaves: every block
            # arrived (verified) before the frames after the end, which still ban the peer (below).
            assert out.read_bytes() == data
            continue
        assert proc.returncode != 0, mode
        err = proc.stderr.decode().strip()
        assert len(err.splitlines()) == 1 and "every provider was dropped" in err, (mode, err)
    st = leech.status()
    assert sorted(st["peers_penalised"]) == sorted(d.info["peer_id"] for m, d in bad.items() if m != "stall")
    stalled = st["transfer"]["providers_stalled"]
    assert stalled >= 1  # once per attempt: the node looks again and retries a failed fetch
    log = (tmp_path / "leech.log").read_text()
    for mode, d in bad.items():  # one line each, saying what was wrong
        said = "provider" if mode == "stall" else "dropping peer"
        lines = [ln for ln in log.splitlines() if re.search(f"{said} {d.info['peer_id']}", ln)]
        assert len(lines) == (stalled if mode == "stall" else 1), (mode, lines)  # a stall: one per fetch attempt
        assert ("not banned" in lines[0]) == (mode == "stall"), (mode, lines[0])
        why = {"corrupt": "does not hash", "order": "out of order", "endless": "after the end",
               "stall": "stalled", "empty": "unsent"}[mode]
        assert why in lines[0], (mode, lines[0])
    assert not (tmp_path / "x").exists()
    # Nothing unverified was kept: every block the leech holds hashes to its CID.
    verify = leech.cli("verify", "--json", check=False)
    assert verify.returncode == 0, verify.stderr.decode()
    report = json.loads(verify.stdout.decode().splitlines()[-1])
    assert report["consistent"] and report["corrupt"] == [] and report["garbage_files"] == 0, report

    honest = start_daemon(tmp_path / "honest", bootstrap=[leech.addr])
    daemons.append(honest)
    for mode in MODES:
        honest.cli("add", str(tmp_path / f"{mode}.bin"))
    honest.wait_announced(3 * len(MODES))
    for mode, data in files.items():
        out = tmp_path / f"{mode}.out"
        leech.cli("get", "sha256:" + hashlib.sha256(data).hexdigest(), "-o", str(out), timeout=60)
        assert out.read_bytes() == data
    st = leech.status()
    assert st["roots_incomplete"] == 0
    # the staller is still not banned, and its file came whole from the honest peer (whether the staller's
    # lane stalls again before the honest one has stolen its share and ended the fetch is a race: not checked)
    assert bad["stall"].info["peer_id"] not in st["peers_penalised"]


# -- in one process: real py-libp2p hosts (TCP, Noise, Yamux) on loopback ---------------------------------

SMALLER = ChunkerParams(min_size=4096, avg_size=8192, max_size=16384)  # many blocks in a few MiB


class _FlippingSource(RepoBlockSource):
    """What a lying provider serves: its repo's blocks with raw ones corrupted."""

    def get(self, cid):
        data = super().get(cid)
        return bytes([data[0] ^ 1]) + data[1:] if data is not None and cid.codec == RAW else data


class _SlowSource(RepoBlockSource):
    """A provider with a slow disk (or uplink): 30 ms per raw block."""

    def get(self, cid):
        if cid.codec == RAW:
            time.sleep(0.03)
        return super().get(cid)


@asynccontextmanager
async def peer(tmp_path, name, *, lying=False, slow=False, config=None, handshake_timeout=5.0):
    repo = Repo.init(tmp_path / f"repo-{name}", durable=False)
    cfg = HostConfig(identity=tmp_path / f"{name}.key", listen=("/ip4/127.0.0.1/tcp/0",),
                     handshake_timeout=handshake_timeout)
    async with open_host(cfg) as host:
        ex = BitswapExchange(host, RepoBlockSource(repo))
        async with trio.open_nursery() as nursery:
            await nursery.start(ex.run)
            dag = DagTransfer(host, ex, config)
            source = (_FlippingSource if lying else _SlowSource if slow else RepoBlockSource)(repo)
            DagServer(source, ex.is_banned, dag.config, dag.stats).register(host)
            dag.repo = repo
            yield dag
            nursery.cancel_scope.cancel()
    repo.close()


@pytest.mark.trio
async def test_several_providers_share_the_work_a_liar_is_dropped_and_a_resume_fetches_only_the_rest(tmp_path):
    data = random.Random(5).randbytes(6 * MiB)
    cfg = DagConfig(request_blocks=16, stall_seconds=5)
    async with peer(tmp_path, "a") as a, peer(tmp_path, "c") as c, peer(tmp_path, "liar", lying=True) as liar, \
            peer(tmp_path, "b", config=cfg) as b:
        for p in (a, c, liar):
            root = p.repo.add_stream(io.BytesIO(data), name="x.tar", params=SMALLER).root
        chunks = [(cid, size) for cid, size in iter_blocks(a.repo.manifest(root), a.repo.load_block) if cid.codec == RAW]
        # b already holds every third chunk (an earlier, interrupted fetch): only the rest moves.
        held = chunks[::3]
        b.repo.put_blocks([(cid, a.repo.load_block(cid)) for cid, _ in held])
        providers = [p.exchange.host.addrs()[0] for p in (liar, a, c)]
        with trio.fail_after(60):
            fetched = await b.fetch(root, providers, b.repo)
        b.repo.register_root(root)
        assert b"".join(b.repo.stream(root)) == data
        missing = sum(s for cid, s in chunks) - sum(s for _, s in held)
        assert missing <= fetched <= missing + 64 * 1024  # chunks not held, plus the manifest's inner nodes
        assert [p for p, _ in b.exchange.penalised] == [liar.exchange.host.peer_id]
        assert b.stats.peers_dropped == 1 and b.stats.bitswap_fallbacks == 0
        # both honest providers carried a share
        assert a.stats.served_blocks > 16 and c.stats.served_blocks > 16
        assert b.stats.duplicate_bytes < 2 * MiB


@pytest.mark.trio
async def test_a_provider_that_cannot_be_reached_takes_no_share_of_the_walk(tmp_path):
    """A departed runner's record still in the DHT: its address takes the TCP connection and never answers.
    Its lanes dial before they take wants, so the live provider fetches everything and the fetch ends
    without waiting for that dial to fail (old: its lanes held two requests' worth of wants until the dial
    timed out, and the peer was counted lost); until a second provider is reachable the fetch is a lone
    provider's."""
    from libp2p.peer.id import ID

    data = random.Random(8).randbytes(2 * MiB)
    held = []

    async def hold(conn):
        held.append(conn)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, hold, 0)
        port = next(l.socket.getsockname()[1] for l in listeners if l.socket.family.name == "AF_INET")
        ghost = ID.from_pubkey(load_identity(tmp_path / "ghost.key").public_key)
        async with peer(tmp_path, "a") as a, \
                peer(tmp_path, "b", config=DagConfig(request_blocks=16), handshake_timeout=60) as b:
            root = a.repo.add_stream(io.BytesIO(data), name="x.bin", params=SMALLER).root
            with trio.fail_after(120):
                await b.fetch(root, [f"/ip4/127.0.0.1/tcp/{port}/p2p/{ghost}", a.exchange.host.addrs()[0]], b.repo)
            b.repo.register_root(root)
            assert b"".join(b.repo.stream(root)) == data
            assert held  # it was dialled
            assert b.stats.providers_lost == 0 and b.stats.bitswap_fallbacks == 0  # and never waited for
            assert not b.host.is_connected(ghost)
            # and the live provider's fetch ran as a lone provider's: a few large requests (solo_request_blocks),
            # not request_blocks = 16 at a time as when two providers share a fetch
            assert a.stats.served_streams <= 3
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_an_asker_that_stops_reading_is_cut_and_gives_its_serve_slot_back(tmp_path):
    cfg = DagConfig(serve_min_rate=1 << 20, serve_grace=1.0, serve_streams=1)
    data = random.Random(6).randbytes(8 * MiB)
    async with peer(tmp_path, "a", config=cfg) as a, peer(tmp_path, "b") as b:
        root = a.repo.add_stream(io.BytesIO(data), name="x.bin").root
        addr = a.exchange.host.addrs()[0]
        await b.host.connect(addr)
        stream = await b.host.new_stream(a.exchange.host.peer_id, [PROTOCOL])
        await stream.write(encode_request([root], nodes_only=False))  # everything, and then never read
        with trio.fail_after(20):
            while a.stats.slow_askers_cut == 0:
                await trio.sleep(0.1)
        assert a.stats.served_streams == 1
        # the one serve slot is free again: an honest fetch goes through
        with trio.fail_after(60):
            await b.fetch(root, [addr], b.repo)
        b.repo.register_root(root)
        assert b"".join(b.repo.stream(root)) == data and a.stats.refused == 0


@pytest.mark.trio
async def test_a_slow_providers_tail_is_taken_by_a_faster_one(tmp_path):
    """Not silent, only slow: the fast provider takes the share of the slow one's tail its speed earns."""
    data = random.Random(7).randbytes(4 * MiB)
    cfg = DagConfig(request_blocks=64, steal_measure=0.5)
    async with peer(tmp_path, "fast") as fast, peer(tmp_path, "slow", slow=True, config=DagConfig(read_blocks=1)) as slow, \
            peer(tmp_path, "b", config=cfg) as b:
        for p in (fast, slow):
            root = p.repo.add_stream(io.BytesIO(data), name="x.bin", params=SMALLER).root
        blocks = sum(1 for cid, _ in iter_blocks(fast.repo.manifest(root), fast.repo.load_block) if cid.codec == RAW)
        with trio.fail_after(60):
            await b.fetch(root, [p.exchange.host.addrs()[0] for p in (slow, fast)], b.repo)
        b.repo.register_root(root)
        assert b"".join(b.repo.stream(root)) == data
        assert b.stats.steals >= 1 and b.stats.peers_dropped == 0
        # the slow one was asked for two requests' worth at first; it delivered only part of them
        assert slow.stats.served_blocks < min(2 * 64, blocks) and fast.stats.served_blocks > blocks // 2


@pytest.mark.trio
async def test_the_first_leaves_are_handed_on_after_a_small_batch_not_a_whole_store_batch(tmp_path):
    """A NAR streaming to Nix sees a leaf only once its batch is hashed: the first batches are small
    (FIRST_LEAF_BATCH, doubling up to store_batch_bytes), so the reader starts within the first few blocks
    instead of after the first 4 MiB."""
    from p2pcache.net.dagxfer import FIRST_LEAF_BATCH

    data = random.Random(8).randbytes(8 * MiB)
    async with peer(tmp_path, "a") as a, peer(tmp_path, "b") as b:
        root = a.repo.add_stream(io.BytesIO(data), name="x.bin").root
        assert b.exchange.config.store_batch_bytes >= 4 * MiB
        seen = [0]
        batches: list[int] = []  # leaf bytes handed on when each stored batch was reported

        def verified(cid, block):
            if cid.codec == RAW:
                seen[0] += len(block)

        def stored(cids):
            if any(c.codec == RAW for c in cids):
                batches.append(seen[0])

        with trio.fail_after(60):
            await b.fetch(root, [a.exchange.host.addrs()[0]], b.repo, on_stored=stored, on_verified=verified)
        b.repo.register_root(root)
        assert b"".join(b.repo.stream(root)) == data
        biggest = max(size for _, size in iter_blocks(a.repo.manifest(root), a.repo.load_block))
        assert batches[0] < 1 * MiB  # a whole 4 MiB store batch before, as in the fetch's later batches
        assert batches[0] <= FIRST_LEAF_BATCH + biggest
        assert len(batches) >= 4 and batches[-1] == len(data)


@pytest.mark.trio
async def test_the_very_first_leaves_are_handed_on_as_they_arrive_before_any_is_stored(tmp_path):
    """A fetch someone reads as it arrives (a NAR streaming to Nix) hashes its first FIRST_LEAF_BATCH of leaves
    on arrival and hands each on at once: the first NAR byte waited for a worker thread to hash and append a
    batch (tens of ms under load). They are still stored, and a leaf that does not hash is still no leaf."""
    from p2pcache.net.dagxfer import FIRST_LEAF_BATCH

    data = random.Random(9).randbytes(2 * MiB)
    async with peer(tmp_path, "a") as a, peer(tmp_path, "b") as b:
        root = a.repo.add_stream(io.BytesIO(data), name="x.bin").root
        first: list[tuple[CID, bool]] = []  # (leaf, appended to b's packs when it was handed on), the first few
        seen = [0]
        appended: set[CID] = set()
        write_blocks = b.repo.write_blocks

        def writing(blocks, *args, **kw):
            blocks = list(blocks)
            appended.update(cid for cid, _ in blocks)
            return write_blocks(blocks, *args, **kw)

        b.repo.write_blocks = writing

        def verified(cid, block):
            if cid.codec == RAW and seen[0] < FIRST_LEAF_BATCH:
                first.append((cid, cid in appended))
            if cid.codec == RAW:
                seen[0] += len(block)

        with trio.fail_after(60):
            await b.fetch(root, [a.exchange.host.addrs()[0]], b.repo, on_verified=verified)
        assert first and not any(held for _, held in first)
        assert all(b.repo.has_block(cid) for cid, _ in first)
        b.repo.register_root(root)
        assert b"".join(b.repo.stream(root)) == data


@pytest.mark.trio
async def test_a_hashed_batchs_leaves_are_handed_on_while_it_is_appended_not_after(tmp_path):
    """A NAR stream gets a batch's leaves once the writer's thread has hashed them, while it appends them
    (the copy into the pack and the crc32 took the stream's time too); `on_stored` still comes after the
    append, and every leaf is stored by the end."""
    data = random.Random(12).randbytes(6 * MiB)
    async with peer(tmp_path, "a") as a, peer(tmp_path, "b") as b:
        root = a.repo.add_stream(io.BytesIO(data), name="x.bin").root
        seen: set[CID] = set()
        stored_seen: set[CID] = set()
        early: list[int] = []  # per leaf batch appended: how many of its leaves were handed on before the append ended
        write_blocks = b.repo.write_blocks

        def writing(blocks, *args, **kw):
            blocks = list(blocks)
            leaves = [cid for cid, _ in blocks if cid.codec == RAW]
            time.sleep(0.2)  # (a slow append: the loop runs meanwhile)
            out = write_blocks(blocks, *args, **kw)
            if leaves:
                early.append(sum(1 for c in leaves if c in seen))
            return out

        b.repo.write_blocks = writing

        def verified(cid, block):
            seen.add(cid)

        def stored(cids):
            stored_seen.update(cids)

        with trio.fail_after(60):
            await b.fetch(root, [a.exchange.host.addrs()[0]], b.repo, on_stored=stored, on_verified=verified)
        leaf_batches = [n for n in early if n]
        assert len(early) >= 3 and len(leaf_batches) >= len(early) - 1, early  # (the first leaves: on arrival)
        assert {c for c in seen if c.codec == RAW} <= stored_seen
        b.repo.register_root(root)
        assert b"".join(b.repo.stream(root)) == data


@pytest.mark.trio
async def test_an_error_of_the_reader_of_a_hashed_batch_fails_the_fetch_not_the_node(tmp_path):
    """The leaves of a hashed batch arrive from a callback outside any task: what the reader (`on_verified`)
    raises there fails the fetch, through the writer's task, instead of ending the process's trio run."""
    from p2pcache.net.dagxfer import FIRST_LEAF_BATCH

    data = random.Random(13).randbytes(4 * MiB)
    async with peer(tmp_path, "a") as a, peer(tmp_path, "b") as b:
        root = a.repo.add_stream(io.BytesIO(data), name="x.bin").root
        seen = [0]

        def verified(cid, block):
            seen[0] += len(block)
            if cid.codec == RAW and seen[0] > 2 * FIRST_LEAF_BATCH:  # past the leaves hashed on arrival
                raise RuntimeError("the reader broke")

        with trio.fail_after(60), pytest.raises(BaseExceptionGroup) as raised:  # (through the fetch's nurseries)
            await b.fetch(root, [a.exchange.host.addrs()[0]], b.repo, on_verified=verified)
        assert raised.group_contains(RuntimeError, match="the reader broke", depth=None)
        await trio.sleep(0.2)  # the node runs on: a later fetch still works
        with trio.fail_after(60):
            await b.fetch(root, [a.exchange.host.addrs()[0]], b.repo)
        b.repo.register_root(root)
        assert b"".join(b.repo.stream(root)) == data


@pytest.mark.trio
async def test_a_served_streams_first_read_is_a_few_blocks_then_whole_read_batches(tmp_path):
    """The asker's first bytes wait for the server's whole first read (and its write): it reads
    FIRST_READ_BLOCKS blocks first, then `read_blocks` or `read_bytes` at a time, whichever comes first,
    where every read was `read_blocks` (about 2 MiB of a NAR before its first byte left); the leaves' sizes
    that cut the batches are one query per batch."""
    from p2pcache.content.chunking import MAX_BLOCK_SIZE
    from p2pcache.net.dagxfer import FIRST_READ_BLOCKS

    reads: list[tuple[int, int]] = []
    size_queries = {"size": 0, "sizes": 0}

    class Counting(RepoBlockSource):
        def get_many(self, cids):
            got = super().get_many(cids)
            reads.append((len(cids), sum(len(d or b"") for d in got)))
            return got

        def size(self, cid):
            size_queries["size"] += 1
            return super().size(cid)

        def sizes(self, cids):
            size_queries["sizes"] += 1
            return super().sizes(cids)

    data = random.Random(10).randbytes(4 * MiB)
    async with peer(tmp_path, "a") as a, peer(tmp_path, "b") as b:
        root = a.repo.add_stream(io.BytesIO(data), name="x.bin", params=SMALLER).root
        DagServer(Counting(a.repo), a.exchange.is_banned, a.config, a.stats).register(a.exchange.host)
        with trio.fail_after(60):
            await b.fetch(root, [a.exchange.host.addrs()[0]], b.repo)
        b.repo.register_root(root)
        assert b"".join(b.repo.stream(root)) == data
    leaf_reads = [r for r in reads if r[0] > 1]  # (a manifest node is read alone: its bytes tell what comes next)
    cfg = a.config
    assert leaf_reads[0][0] <= FIRST_READ_BLOCKS < cfg.read_blocks
    assert all(n <= cfg.read_blocks and size < cfg.read_bytes + MAX_BLOCK_SIZE for n, size in leaf_reads)
    full = [r for r in leaf_reads[1:] if r[0] == cfg.read_blocks or r[1] >= cfg.read_bytes]
    assert len(full) >= len(leaf_reads) // 2, leaf_reads  # all but each request's last
    # the sizes the batches are cut by (and super-seeding asks about) come in one index query per read,
    # not one per leaf
    assert size_queries["size"] == 0 and 0 < size_queries["sizes"] <= len(reads), (size_queries, len(reads))



@pytest.mark.trio
async def test_a_trees_nodes_are_read_in_batches_of_one_thread_hop_each(tmp_path):
    """A NAR of many small files is mostly manifest nodes (pages, chunk indexes): the server walks on from
    each node it loads to the next in the same worker thread, so a request for the tree's nodes costs a
    thread hop per batch (`read_blocks` / `read_bytes`), not one per node."""
    from p2pcache.content.nar import Contents, DirectoryEnd, DirectoryStart, Entry, RegularFile, write_nar
    from p2pcache.content.narmanifest import NarIngest

    rng = random.Random(11)
    events: list = [DirectoryStart()]
    for i in range(600):
        body = rng.randbytes(rng.randrange(1, 3000))
        events += [Entry(b"f%05d" % i), RegularFile(len(body), False), Contents(body)]
    events.append(DirectoryEnd())
    # small pages: a few hundred files make a tree of many nodes, as a build dir of 20,000 files does
    ingest = NarIngest(SMALLER, page_bytes=4096, dir_inline_bytes=1024)
    blocks = [b for piece in write_nar(events) for b in ingest.feed(piece)]
    root, root_block, _ = ingest.finish()
    hops: list[int] = []

    class Counting(DagServer):
        def _load_walking(self, walk, cids, limit, peer):
            loaded = super()._load_walking(walk, cids, limit, peer)
            if loaded[0][0].codec == DAG_CBOR:
                hops.append(len(loaded))
            return loaded

    async with peer(tmp_path, "a") as a, peer(tmp_path, "b") as b:
        a.repo.put_blocks([*blocks, (root, root_block)])
        walk, nodes = DfsOrder([root], nodes_only=True), 0
        while (cid := walk.peek()) is not None:
            walk.give(cid, a.repo.load_block(cid))
            nodes += 1
        Counting(RepoBlockSource(a.repo), a.exchange.is_banned, a.config, a.stats).register(a.exchange.host)
        with trio.fail_after(60):
            await b.fetch(root, [a.exchange.host.addrs()[0]], b.repo)
        assert b.repo.has_block(root)
    assert sum(hops) >= nodes > 20
    assert len(hops) <= nodes // 8, hops  # many nodes, few hops


# -- in simnet: real Nodes on simulated hosts, virtual time -------------------------------------------------


def test_a_provider_whose_connection_closes_is_dropped_at_once_and_never_asked_again():
    """One of two providers stops mid-fetch (its host leaves: every connection to it closes). The
    fetcher sees its streams break and the peer gone, moves its share to the others at once and opens no
    new stream to it (which would wait out a dial to a dead peer, 5 s, while holding its blocks)."""
    from dataclasses import replace

    import trio.testing

    from simnet.hostsim import repo_work_inline
    from simnet.nodefetch import NodeWorld, repos_without_fsync, scratch_dir

    data = random.Random(12).randbytes(8 * MiB)

    async def main(tmp: Path):
        world = NodeWorld(4, tmp / "nodes")  # two seeds and the fetcher
        async with trio.open_nursery() as nursery:
            await nursery.start(world.run)
            for i in range(3):
                await world.start_node("wan-100m-40ms" if i < 2 else "lan-1g", world.nodes[:])
            *seeds, fetcher = world.nodes
            while not all(fetcher.host.is_connected(n.host.peer_id) for n in seeds):
                await trio.sleep(0.1)
            for node in seeds:
                root = node.repo.add_stream(io.BytesIO(data), name="a.bin", params=SMALLER).root
            victim = seeds[0]
            asked: list[tuple[float, object]] = []
            new_stream = fetcher.host.new_stream

            async def counting_new_stream(peer, protocols):
                asked.append((trio.current_time(), peer))
                return await new_stream(peer, protocols)

            fetcher.host.new_stream = counting_new_stream
            # three leaf requests for four lanes (two per provider): the victim has one or two, and a lane
            # that waits for work (as at the end of any fetch) must not take its share back to the dead peer
            fetcher.dag.config = replace(fetcher.dag.config, request_blocks=300)
            killed: list[float] = []

            async def kill_once_it_serves() -> None:
                while victim.dag.stats.served_bytes < 256 << 10:  # well into a leaf request
                    await trio.sleep(0.005)
                world.stop_node(victim)
                killed.append(trio.current_time())

            with trio.fail_after(60):
                async with trio.open_nursery() as inner:
                    inner.start_soon(kill_once_it_serves)
                    await fetcher.fetch_dag(root, [n.host.peer_id for n in seeds])
                    done = trio.current_time()
                    inner.cancel_scope.cancel()
            assert killed and killed[0] < done, ([n.dag.stats.served_bytes for n in seeds], fetcher.dag.stats, [(round(t, 3), str(p)[-4:]) for t, p in asked], [str(n.host.peer_id)[-4:] for n in seeds])
            fetcher.repo.register_root(root)
            assert b"".join(fetcher.repo.stream(root)) == data
            assert fetcher.dag.stats.providers_lost == 1 and fetcher.dag.stats.bitswap_fallbacks == 0
            assert [t for t, p in asked if p == victim.host.peer_id and t > killed[0]] == []
            assert done - killed[0] < 4.0  # nothing waited for the dead peer's dial or silence
            world.stop()

    with scratch_dir() as tmp, repo_work_inline(), repos_without_fsync():
        trio.run(main, Path(tmp), clock=trio.testing.MockClock(autojump_threshold=0))


# -- pure pieces: the stream's frames, the server's batch reads ----------------------------------------


def test_frames_are_read_back_however_the_stream_cuts_them_and_other_layouts_go_through_protobuf():
    from p2pcache.content.cid import CID
    from p2pcache.net.dagxfer import MAX_FRAME, _block_frame, _end_frame, _Frames, pb
    from p2pcache.exchange import ProtocolViolation

    rng = random.Random(9)
    blocks = [rng.randbytes(n) for n in (0, 1, 127, 128, 5000, 70000, 300000)]
    cids = [CID.for_block(RAW, b) for b in blocks]
    for c, b in zip(cids, blocks):  # the hand-written layout is protobuf's own (bar an empty data field)
        if b:
            assert _block_frame(c, b) == _frame_by_protobuf(pb.DagFrame(block=pb.DagBlock(cid=c.buffer, data=b)))
    # a block frame with its fields the other way round: valid protobuf, read by protobuf
    swapped = pb.DagBlock(data=blocks[4]).SerializeToString() + pb.DagBlock(cid=cids[4].buffer).SerializeToString()
    odd = _frame_by_protobuf_bytes(b"\x0a" + _uvarint(len(swapped)) + swapped)
    wire = b"".join(_block_frame(c, b) for c, b in zip(cids, blocks)) + odd + _end_frame(pb.DagEnd.NOT_FOUND, cids[0], "gone")
    for step in (1, 3, 4096, 65507, len(wire)):
        frames, got = _Frames(), []
        for i in range(0, len(wire), step):
            got += frames.feed(wire[i:i + step])
        assert got[:-1] == [(c.buffer, b) for c, b in zip(cids, blocks)] + [(cids[4].buffer, blocks[4])], step
        assert got[-1].status == pb.DagEnd.NOT_FOUND and got[-1].missing == cids[0].buffer
    with pytest.raises(ProtocolViolation, match="over the"):
        _Frames().feed(_uvarint(MAX_FRAME + 1))  # refused on its length prefix alone
    with pytest.raises(ProtocolViolation, match="malformed frame"):
        _Frames().feed(b"\x03\xff\xff\xff")
    with pytest.raises(ProtocolViolation, match="neither a block nor an end"):
        _Frames().feed(b"\x00")


def _uvarint(n):
    from p2pcache.content.varint import encode
    return encode(n)


def _frame_by_protobuf(msg):
    return _frame_by_protobuf_bytes(msg.SerializeToString())


def _frame_by_protobuf_bytes(payload):
    return _uvarint(len(payload)) + payload


def test_a_batch_read_serves_blocks_in_order_and_stops_at_the_first_missing_or_corrupt_one(tmp_path):
    repo = Repo.init(tmp_path / "r", durable=False)
    data = random.Random(4).randbytes(3 * MiB)
    root = repo.add_stream(io.BytesIO(data), name="x", params=SMALLER).root
    chunks = [cid for cid, _ in iter_blocks(repo.manifest(root), repo.load_block) if cid.codec == RAW]
    source = RepoBlockSource(repo)
    assert source.get_many(chunks) == [repo.load_block(c) for c in chunks]
    from p2pcache.content.cid import CID
    stranger = CID.for_block(RAW, b"not here")
    assert source.get_many(chunks[:3] + [stranger] + chunks[3:5]) == [repo.load_block(c) for c in chunks[:3]] + [None]
    # a block whose bytes on disk no longer match its crc32 is not served, and nothing after it
    loc = repo.index.locate(chunks[5])
    with open(repo.packs.path(loc.pack), "r+b") as f:
        f.seek(loc.offset)
        f.write(bytes([f.read(1)[0] ^ 1]))
    assert source.get_many(chunks[4:8]) == [repo.load_block(chunks[4]), None]
    # a subclass that changes `get` is asked block by block (the liar above serves its own bytes)
    assert _FlippingSource(repo).get_many(chunks[:2]) == [_FlippingSource(repo).get(c) for c in chunks[:2]]
    # the daemon's source counts what it serves and still reads a run in one index query, not one per block
    from p2pcache.node import _CountingSource
    counting = _CountingSource(repo)
    queries = {"locate": 0, "locate_many": 0}
    for name in queries:
        real = getattr(repo.index, name)

        def counted(*a, _real=real, _name=name, **k):
            queries[_name] += 1
            return _real(*a, **k)
        setattr(repo.index, name, counted)
    assert counting.get_many(chunks[:4]) == [repo.load_block(c) for c in chunks[:4]]
    assert queries["locate_many"] == 1 and queries["locate"] == 4  # (the 4 are load_block's just above)
    assert counting.blocks_served == 4 and counting.bytes_served == sum(len(repo.load_block(c)) for c in chunks[:4])
    repo.close()


@pytest.mark.trio
async def test_one_providers_next_request_is_sent_in_the_tail_of_the_one_streaming(tmp_path):
    """With one provider, its second lane asks only once the request streaming has at most
    `pipeline_blocks` leaves left (two streams of one provider interleaved cost both sides CPU), and
    its requests are `solo_request_blocks` long."""
    data = random.Random(9).randbytes(3 * MiB)
    solo = DagConfig(solo_request_blocks=48, pipeline_blocks=8, request_blocks=16)
    async with peer(tmp_path, "a") as a, peer(tmp_path, "b", config=solo) as b:
        root = a.repo.add_stream(io.BytesIO(data), name="x.bin", params=SMALLER).root
        blocks = list(iter_blocks(a.repo.manifest(root), a.repo.load_block))
        nodes = sum(1 for cid, _ in blocks if cid.codec == DAG_CBOR)
        leaves = len(blocks) - nodes
        assert leaves > 4 * 48
        # at each DAG stream b opens: the blocks a has served so far
        opened: list[int] = []
        new_stream = b.host.new_stream

        async def counting_new_stream(peer_id, protocols):
            if protocols == [PROTOCOL]:
                opened.append(a.stats.served_blocks)
            return await new_stream(peer_id, protocols)

        b.host.new_stream = counting_new_stream
        with trio.fail_after(60):
            await b.fetch(root, [a.exchange.host.addrs()[0]], b.repo)
        b.repo.register_root(root)
        assert b"".join(b.repo.stream(root)) == data
    # the nodes' request first, then one per 48 leaves; leaf request i (from 0) was sent only once a had
    # served the nodes and at least all but 8 of the leaves of the requests before it
    assert len(opened) == 1 + -(-leaves // 48)
    for i, served in enumerate(opened[2:], start=1):
        assert served >= nodes + 48 * i - 8, (i, opened)
