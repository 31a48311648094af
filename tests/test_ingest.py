"""The repo's ingest pipeline (store/ingest.py) and the claims of unfinished writers: a failing add or fetch
takes back only what no other writer relies on, and leaves nothing pending behind."""

import contextvars
import io
import os

import pytest

from p2pcache.content.cid import CID, RAW
from p2pcache.content.keys import HashKey
from p2pcache.errors import CorruptData, DiskFull, RepoError
from p2pcache.store.ingest import BufferPool, Ingest
from p2pcache.store.repo import Repo


def block(size: int = 100_000) -> tuple[CID, bytes]:
    data = os.urandom(size)
    return CID.for_block(RAW, data), data


class Fetch:
    """A fetch as the node runs one: its own context, inside `recording_blocks`."""

    def __init__(self, repo: Repo):
        self.repo = repo
        self.ctx = contextvars.Context()
        self.cm = repo.recording_blocks()
        self.written = self.ctx.run(self.cm.__enter__)

    def write(self, blocks):
        return self.ctx.run(self.repo.write_blocks, blocks)

    def commit(self, blocks):
        self.ctx.run(self.repo.commit_blocks, [(c, len(d)) for c, d in blocks])

    def fail(self) -> int:
        dropped = self.ctx.run(self.repo.drop_unclaimed_blocks, self.written)
        self.end()
        return dropped

    def end(self) -> None:
        self.ctx.run(self.cm.__exit__, None, None, None)


def pack_sizes(repo: Repo) -> dict[int, int | None]:
    return {p: repo.packs.file_size(p) for p in repo.packs.pack_ids()}


def test_a_failed_fetch_leaves_a_shared_pending_block_to_the_fetch_that_also_wrote_it(repo):
    shared, a, b = block(), block(), block()
    one, two = Fetch(repo), Fetch(repo)
    one.write([shared, a])
    two.write([shared, b])  # `shared` is pending already: two shares one's record
    assert one.fail() == 1  # only `a`: `shared` is still claimed by two
    assert shared[0].buffer in repo.packs.pending and a[0].buffer not in repo.packs.pending
    two.commit([shared, b])
    two.end()
    assert repo.load_block(shared[0]) == shared[1] and repo.load_block(b[0]) == b[1]
    assert repo.verify().consistent and not repo.packs.pending


def test_a_failed_fetch_keeps_the_rows_another_unfinished_fetch_recorded(repo):
    shared, own = block(), block()
    one, two = Fetch(repo), Fetch(repo)
    one.write([shared, own])
    two.write([shared])
    two.commit([shared])  # recorded (refs 0 until two registers its root)
    assert one.fail() == 1  # its own block only
    assert repo.has_block(shared[0]) and not repo.has_block(own[0]) and own[0].buffer not in repo.packs.pending
    two.end()
    assert not repo._claims and repo.verify().consistent


def test_a_failed_add_takes_back_its_appends_and_cuts_the_pack_back(repo, rng):
    kept = repo.add_stream(io.BytesIO(rng.randbytes(300_000)), name="kept")
    before = pack_sizes(repo)
    data = rng.randbytes(3 << 20)
    with pytest.raises(CorruptData):
        repo.add_stream(io.BytesIO(data), expect=HashKey("sha256", b"\0" * 32))
    assert not repo.packs.pending and not repo._claims
    assert pack_sizes(repo) == before  # the dead tail is gone at once, not at the next restart
    assert repo.stored_bytes() == kept.size + repo.index.block_size(kept.root)
    assert repo.verify().dead_bytes == 0
    again = repo.add_stream(io.BytesIO(data))  # nothing of the failed add is mistaken for stored
    assert again.new_bytes >= len(data) and repo.verify().consistent


def test_a_reader_error_mid_add_takes_back_what_was_appended(repo, rng):
    before = pack_sizes(repo)

    class Broken(io.RawIOBase):
        def __init__(self):
            self.left = 3

        def readable(self):
            return True

        def readinto(self, buf):
            if not self.left:
                raise OSError(5, "Input/output error")
            self.left -= 1
            n = min(len(buf), 1 << 20)
            buf[:n] = rng.randbytes(n)
            return n

    with pytest.raises(RepoError, match="cannot read"):
        repo.add_stream(Broken(), name="broken")
    assert not repo.packs.pending and pack_sizes(repo) == before


def test_a_failed_fetch_does_not_take_back_what_a_running_add_shares(repo, rng):
    data = rng.randbytes(2 << 20)
    fetch = Fetch(repo)
    with repo.ingest() as ingest:  # an add that meets a block the fetch appended and has not recorded
        ingest.hash(data)
        chunks = [(CID.for_block(RAW, data[i:i + (1 << 20)]), data[i:i + (1 << 20)]) for i in (0, 1 << 20)]
        fetch.write(chunks[:1])
        ingest.put(chunks)
        ingest.digests()
        assert fetch.fail() == 0  # the ingest claims it
        root = chunks[1][0]  # any block will do as the "root" in this unit of the pipeline
        ingest.commit(lambda index: index.put_root(root, "archive", len(data), None, None, [],
                                                   [c for c, _ in chunks], verified=True))
    assert all(repo.load_block(c) == d for c, d in chunks)
    assert repo.verify().consistent and not repo.packs.pending and not repo._claims


def test_disk_full_in_the_worker_comes_out_of_put_or_commit_and_leaves_nothing_pending(repo, monkeypatch):
    real = repo.packs.append
    calls = []

    def full(blocks, crcs=None):
        calls.append(len(blocks))
        if len(calls) > 1:
            raise DiskFull("disk full while writing packs: free space")
        return real(blocks, crcs)

    monkeypatch.setattr(repo.packs, "append", full)
    with pytest.raises(DiskFull):
        with repo.ingest() as ingest:
            for _ in range(4):
                ingest.put([block()])
            ingest.commit(lambda index: True)
    assert not repo.packs.pending and not repo._claims


def test_pooled_buffers_are_reused_only_after_the_worker_is_done_with_them(repo):
    pool = BufferPool(count=2, size=64 << 10)
    blocks = []
    with repo.ingest() as ingest:
        for i in range(6):  # three times round a pool of two
            buf = pool.get()
            buf[:] = os.urandom(len(buf))
            cid = CID.for_block(RAW, buf)
            blocks.append((cid, bytes(buf)))
            ingest.hash(memoryview(buf))
            ingest.put([(cid, memoryview(buf))])
            ingest.release(pool, buf)
        ingest.commit(lambda index: True)
    assert all(repo.load_block(c) == d for c, d in blocks)  # nothing overwritten before it was written


def test_an_ingest_is_used_once(repo):
    ingest = repo.ingest()
    ingest.commit(lambda index: True)
    with pytest.raises(RepoError):
        ingest.put([block()])


def test_a_read_only_repo_refuses_an_ingest(tmp_path):
    Repo.init(tmp_path / "r").close()
    with Repo.open(tmp_path / "r") as ro, pytest.raises(RepoError):
        Ingest(ro)


def test_chunk_hasher_gives_each_chunks_sha256_and_crc32_in_order():
    import hashlib
    import zlib

    from p2pcache.store.ingest import ChunkHasher

    with ChunkHasher(threads=2) as hasher:
        for n in (1, 3, 4, 37):  # fewer chunks than two per thread go as one part
            chunks = [memoryview(os.urandom(1000 + i)) for i in range(n)]
            got = hasher.result(hasher.submit(chunks))
            assert got == [(hashlib.sha256(c).digest(), zlib.crc32(c)) for c in chunks]


def test_an_add_records_the_crc32_its_hashing_threads_computed(repo, rng):
    import zlib

    data = rng.randbytes(9 << 20)  # a few read buffers: CIDs taken while later buffers are hashed
    res = repo.add_stream(io.BytesIO(data))
    rows = repo.index.db.execute("SELECT cid, size, crc FROM blocks").fetchall()
    assert len(rows) > 100
    for cid, size, crc in rows:
        assert zlib.crc32(repo.load_block(CID(cid))) == crc
    assert b"".join(repo.stream(res.root)) == data
    assert repo.verify().consistent


def test_a_durable_repo_starts_writeback_as_it_appends(tmp_path, rng, monkeypatch):
    from p2pcache.store import blockstore

    Repo.init(tmp_path / "r").close()
    with Repo.open(tmp_path / "r", writable=True, durable=True) as repo:
        if repo.packs._writeback is None:
            pytest.skip("no sync_file_range on this platform")
        kicks = []
        real = repo.packs._writeback
        repo.packs._writeback = lambda fd, off, n, flags: (kicks.append((off, n)), real(fd, off, n, flags))[1]
        monkeypatch.setattr(blockstore, "WRITEBACK_STEP", 1 << 20)
        data = rng.randbytes(6 << 20)
        res = repo.add_stream(io.BytesIO(data))
        assert kicks and all(a + n <= b for (a, n), (b, _) in zip(kicks, kicks[1:]))  # ranges in order
        assert b"".join(repo.stream(res.root)) == data
    with Repo.open(tmp_path / "r", writable=True, durable=False) as repo:
        assert repo.packs._writeback is None  # nothing to wait for without a barrier


def test_the_active_pack_reserves_blocks_ahead_and_gives_them_back_when_it_stops_growing(tmp_path, rng, monkeypatch):
    from p2pcache.store import blockstore

    monkeypatch.setattr(blockstore, "PREALLOC_STEP", 4 << 20)
    Repo.init(tmp_path / "r").close()
    with Repo.open(tmp_path / "r", writable=True) as repo:
        if repo.packs._fallocate is None:
            pytest.skip("no fallocate on this platform")
        data = rng.randbytes(3 << 20)
        res = repo.add_stream(io.BytesIO(data))
        pack = repo.packs.active
        path = repo.packs.path(pack)
        size = path.stat().st_size
        if repo.packs._fallocate is None:
            pytest.skip("this file system cannot reserve blocks")
        assert path.stat().st_blocks * 512 >= size + (2 << 20)  # reserved past the end, its size unchanged
        repo.packs.roll()  # a pack that stops being appended to is cut back to its records
        assert path.stat().st_size == size
        assert path.stat().st_blocks * 512 < size + (1 << 20)
    with Repo.open(tmp_path / "r", writable=True) as repo:
        assert b"".join(repo.stream(res.root)) == data
        assert repo.verify().consistent
    assert path.stat().st_blocks * 512 < size + (1 << 20)  # closing gave the new pack's reserve back too


def test_a_new_root_whose_block_vanished_meanwhile_is_refused(repo):
    from p2pcache.store.blockstore import Location

    (a, _), (b, _) = block(10), block(10)
    root = CID.for_block(RAW, b"root")
    with pytest.raises(RepoError, match="removed by a gc"):
        with repo.index.transaction():
            repo.index.put_blocks([(a, Location(1, 0, 10, 0)), (b, Location(1, 10, 10, 0))])
            repo.index.db.execute("DELETE FROM blocks WHERE cid = ?", (b.buffer,))  # a gc took it meanwhile
            repo.index.put_root(root, "archive", 20, None, None, [], [a, b])
    assert repo.index.get_root(root) is None
    with repo.index.transaction():  # with both there, the root is recorded and each block counted once
        repo.index.put_blocks([(a, Location(1, 0, 10, 0)), (b, Location(1, 10, 10, 0))])
        assert repo.index.put_root(root, "archive", 20, None, None, [], [a, b])
    refs = dict(repo.index.db.execute("SELECT cid, refs FROM blocks"))
    assert refs == {a.buffer: 1, b.buffer: 1}
