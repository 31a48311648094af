"""The bitswap driver with real py-libp2p hosts on loopback (TCP + Noise + Yamux) in one trio process."""

import contextlib
import io
import random
from contextlib import asynccontextmanager

import pytest
import trio

from p2pcache.content.chunking import ChunkerParams
from p2pcache.content.cid import CID, RAW
from p2pcache.exchange.message import PROTOCOL_1_2_0, uvarint
from p2pcache.net.bitswap import BitswapExchange, FetchError, RepoBatcher, RepoBlockSource
from p2pcache.net.host import HostConfig, open_host
from p2pcache.store.repo import Repo

SMALL = ChunkerParams(min_size=256, avg_size=256, max_size=1024)  # > 4096 chunks in 4 MiB: index nodes


def host_cfg(tmp_path, name):
    return HostConfig(identity=tmp_path / f"{name}.key", listen=("/ip4/127.0.0.1/tcp/0",), handshake_timeout=5)


@asynccontextmanager
async def node(tmp_path, name, source=None, repo=None, **kw):
    """A host + exchange; serves `source` (default: a fresh repo's blocks)."""
    if repo is None:
        repo = Repo.init(tmp_path / f"repo-{name}", durable=False)
    async with open_host(host_cfg(tmp_path, name)) as host:
        ex = BitswapExchange(host, source if source is not None else RepoBlockSource(repo), **kw)
        async with trio.open_nursery() as nursery:
            await nursery.start(ex.run)
            ex.repo = repo
            yield ex
            nursery.cancel_scope.cancel()
    repo.close()


def add_archive(repo, data, params=SMALL):
    return repo.add_stream(io.BytesIO(data), name="blob.tar", params=params)


def seed_blocks(repo, n, size):
    """`n` raw blocks of about `size` bytes, stored in `repo`: (cids, blocks)."""
    blocks = [random.Random(i).randbytes(size + i) for i in range(n)]
    cids = [CID.for_block(RAW, d) for d in blocks]
    repo.put_blocks(list(zip(cids, blocks)))
    return cids, blocks


def all_blocks(repo, root):
    from p2pcache.content.manifest import iter_blocks
    return [root] + [c for c, _ in iter_blocks(repo.manifest(root), repo.load_block)]


class CorruptSource(RepoBlockSource):
    """A seeder that serves flipped bytes for every raw chunk it has."""

    def get(self, cid):
        data = super().get(cid)
        if data is not None and cid.codec == RAW:
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data


class SlowSource(RepoBlockSource):
    """A seeder that counts what it serves (to stop it mid-transfer)."""

    served = 0

    def get(self, cid):
        self.served += 1
        return super().get(cid)


@pytest.mark.trio
async def test_fetch_archive_byte_exact_with_index_nodes(tmp_path):
    data = random.Random(1).randbytes(4 << 20)
    async with node(tmp_path, "a") as a, node(tmp_path, "b") as b:
        added = add_archive(a.repo, data)
        assert a.repo.manifest(added.root).depth >= 1  # the tree has index nodes to walk
        with trio.fail_after(60):
            info = await b.fetch_archive(added.root, [a.host.addrs()[0]], b.repo)
        assert info.root == added.root if hasattr(info, "root") else True
        assert b.repo.resolve(str(added.root)) == added.root
        assert b"".join(b.repo.stream(added.root)) == data
        for cid in all_blocks(b.repo, added.root):
            assert cid.verify(b.repo.load_block(cid))
        # the hashes in the manifest resolve too (aliases were recorded)
        assert b.repo.resolve("sha256:" + __import__("hashlib").sha256(data).hexdigest()) == added.root


@pytest.mark.trio
async def test_fetch_blocks_and_missing_block_fails_cleanly(tmp_path):
    async with node(tmp_path, "a") as a, node(tmp_path, "b") as b:
        cids, blocks = seed_blocks(a.repo, 5, 1000)
        with trio.fail_after(30):
            got = await b.fetch_blocks(cids, [a.host.addrs()[0]])
            assert got == dict(zip(cids, blocks))
            missing = CID.for_block(RAW, b"nobody has this")
            with pytest.raises(FetchError, match="could not fetch 1 of 1"):
                await b.fetch_blocks([missing], [a.host.addrs()[0]])


@pytest.mark.trio
async def test_a_block_whose_pack_region_rotted_is_answered_dont_have(tmp_path):
    from .conftest import corrupt_raw_block

    async with node(tmp_path, "a") as a, node(tmp_path, "b") as b:
        cids, _ = seed_blocks(a.repo, 3, 5000)
        victim = corrupt_raw_block(a.repo.path, 1)
        assert victim in a.repo.verify().corrupt
        with trio.fail_after(30):
            got = await b.fetch_blocks([c for c in cids if c != victim], [a.host.addrs()[0]])
            assert len(got) == 2
            with pytest.raises(FetchError, match="could not fetch 1 of 1"):
                await b.fetch_blocks([victim], [a.host.addrs()[0]])
        assert not b.repo.has_block(victim)
        ledger = a.server.ledger(b.host.peer_id)
        assert ledger.dont_haves_sent >= 1 and ledger.blocks_sent == 2, ledger


@pytest.mark.trio
async def test_corrupt_seeder_is_dropped_and_honest_one_completes(tmp_path):
    data = random.Random(2).randbytes(2 << 20)  # ~30 chunks: more than one peer window
    bad_repo = Repo.init(tmp_path / "repo-bad", durable=False)
    added = add_archive(bad_repo, data, ChunkerParams())
    async with (
        node(tmp_path, "bad", source=CorruptSource(bad_repo), repo=bad_repo) as bad,
        node(tmp_path, "good") as good,
        node(tmp_path, "leech") as leech,
    ):
        add_archive(good.repo, data, ChunkerParams())
        with trio.fail_after(60):
            # the corrupt seeder first, so it is asked
            info = await leech.fetch_archive(added.root, [bad.host.addrs()[0], good.host.addrs()[0]], leech.repo)
        assert b"".join(leech.repo.stream(added.root)) == data
        assert any(p == bad.host.peer_id for p, _ in leech.penalised)
        assert all(p != good.host.peer_id for p, _ in leech.penalised)
        assert leech.client.peer_stats(good.host.peer_id) is not None
        del info


@pytest.mark.trio
async def test_malformed_message_drops_connection_and_node_keeps_serving(tmp_path):
    async with node(tmp_path, "server") as server, node(tmp_path, "honest") as honest:
        evil_repo_data = random.Random(3).randbytes(50_000)
        cid = CID.for_block(RAW, evil_repo_data)
        server.repo.put_blocks([(cid, evil_repo_data)])
        async with open_host(host_cfg(tmp_path, "evil")) as evil:
            with trio.fail_after(20):
                await evil.connect(server.host.addrs()[0])
                s = await evil.new_stream(server.host.peer_id, [PROTOCOL_1_2_0])
                await s.write(uvarint(20) + b"\xff" * 20)  # a frame whose body is not protobuf
                while evil.is_connected(server.host.peer_id):
                    await trio.sleep(0.01)
                assert [p for p, _ in server.penalised] == [evil.peer_id]
                assert "does not parse" in server.penalised[0][1]
                # an oversized frame announcement from a fresh identity is refused the same way
        async with open_host(host_cfg(tmp_path, "evil2")) as evil2:
            with trio.fail_after(20):
                await evil2.connect(server.host.addrs()[0])
                s = await evil2.new_stream(server.host.peer_id, [PROTOCOL_1_2_0])
                await s.write(uvarint(64 << 20))
                while evil2.is_connected(server.host.peer_id):
                    await trio.sleep(0.01)
                assert "over the" in server.penalised[-1][1]
                # a banned peer that comes back is cut off again
                try:
                    await evil2.connect(server.host.addrs()[0])
                except Exception:
                    pass
                while evil2.is_connected(server.host.peer_id):
                    await trio.sleep(0.01)
        with trio.fail_after(20):
            assert await honest.fetch_blocks([cid], [server.host.addrs()[0]]) == {cid: evil_repo_data}


@pytest.mark.trio
async def test_seeder_disappearing_mid_transfer_second_completes(tmp_path):
    data = random.Random(4).randbytes(4 << 20)
    repo1 = Repo.init(tmp_path / "repo-s1", durable=False)
    added = add_archive(repo1, data, ChunkerParams())
    src1 = SlowSource(repo1)
    async with node(tmp_path, "s2") as s2, node(tmp_path, "leech") as leech:
        add_archive(s2.repo, data, ChunkerParams())
        async with trio.open_nursery() as outer:
            s1_scope = trio.CancelScope()

            async def run_s1(task_status=trio.TASK_STATUS_IGNORED):
                with s1_scope:
                    async with node(tmp_path, "s1", source=src1, repo=repo1) as s1:
                        task_status.started(s1)
                        await trio.sleep_forever()

            s1 = await outer.start(run_s1)

            async def kill_s1_midway():
                while src1.served < 10:
                    await trio.sleep(0.001)
                s1_scope.cancel()  # the seeder's host goes away: connections close

            outer.start_soon(kill_s1_midway)
            with trio.fail_after(90):
                # s1 is the only provider named at first; s2 is connected, so it is a candidate too
                await leech.host.connect(s2.host.addrs()[0])
                await leech.fetch_archive(added.root, [s1.host.addrs()[0]], leech.repo)
        assert 10 <= src1.served
        assert b"".join(leech.repo.stream(added.root)) == data
        assert leech.client.peer_stats(s2.host.peer_id).blocks > 0


def _blocks(n, size, seed):
    rng = random.Random(seed)
    return [(CID.for_block(RAW, d), d) for d in (rng.randbytes(size) for _ in range(n))]


@pytest.mark.trio
@pytest.mark.parametrize("how", ["error", "cancel"])
async def test_a_batcher_ended_by_an_error_or_a_cancel_records_what_it_wrote(tmp_path, how):
    """A fetch that fails (or is cancelled) after its writer appended batches: those blocks are recorded
    (a retry then resumes from them, and the repo counts their disk), not left pending until a restart;
    what was only held is not written."""
    repo = Repo.init(tmp_path / "r")  # durable, as the daemon
    written = _blocks(12, 16 << 10, 1)  # three batches of 64 KiB ...
    held = _blocks(2, 16 << 10, 2)  # ... and less than one more, never handed to the writer
    stored: list[CID] = []
    committed: list[CID] = []
    all_stored = trio.Event()

    def on_stored(cids):
        stored.extend(cids)
        if len(stored) == len(written):
            all_stored.set()

    with trio.CancelScope() as scope:
        with pytest.raises(RuntimeError) if how == "error" else contextlib.nullcontext():
            # commits only every 1 GiB: nothing is recorded before the exit
            async with RepoBatcher(repo, 64 << 10, 1 << 30, on_stored=on_stored, on_committed=committed.extend) as store:
                for cid, data in written:
                    await store.add(cid, data)
                await all_stored.wait()
                assert not any(repo.index.known_blocks([c for c, _ in written]))
                for cid, data in held:
                    await store.add(cid, data)
                if how == "error":
                    raise RuntimeError("the peer went away")
                scope.cancel()
                await trio.sleep_forever()
    assert scope.cancelled_caught == (how == "cancel")
    assert set(committed) == {c for c, _ in written} and len(committed) == len(written)
    assert not repo.packs.pending
    repo.close()
    repo = Repo.open(tmp_path / "r")  # recorded on disk, not just in memory
    try:
        assert all(repo.has_block(c) and repo.load_block(c) == d for c, d in written)
        assert not any(repo.has_block(c) for c, _ in held)
        assert repo.stored_bytes() == sum(len(d) for _, d in written)  # the held ones were never written
        report = repo.verify()
        assert report.consistent and report.blocks_checked == len(written) and report.dead_bytes == 0
    finally:
        repo.close()


@pytest.mark.trio
async def test_wants_a_provider_refused_are_asked_again_when_it_reconnects(tmp_path):
    # The daemon's own engine settings. The provider says DONT_HAVE and keeps the wants, then the
    # connection drops and its server forgets them; it gets the blocks and the peers reconnect. The
    # fetch must resume at once, not sit on watches that are gone until dont_have_wait fails it.
    from p2pcache.config import NodeConfig
    from p2pcache.node import exchange_configs

    client_cfg, server_cfg = exchange_configs(NodeConfig())
    assert client_cfg.dont_have_wait >= 5.0
    async with node(tmp_path, "a", server_config=server_cfg) as a, \
            node(tmp_path, "b", client_config=client_cfg, server_config=server_cfg) as b:
        blocks = [random.Random(i).randbytes(3000 + i) for i in range(4)]
        cids = [CID.for_block(RAW, d) for d in blocks]
        got: dict = {}

        async def fetch():
            got.update(await b.fetch_blocks(cids, [a.host.addrs()[0]]))

        with trio.fail_after(client_cfg.dont_have_wait - 1):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch)
                while b.client.stats().dont_haves < len(cids):  # every CID parked on a's watch
                    await trio.sleep(0.01)
                await b.host.disconnect(a.host.peer_id)
                while a.server.ledger(b.host.peer_id) is not None:  # a forgot b's wants with the connection
                    await trio.sleep(0.01)
                a.repo.put_blocks(list(zip(cids, blocks)))
                a.blocks_added(cids)
                await b.host.connect(a.host.addrs()[0])
        assert got == dict(zip(cids, blocks))
