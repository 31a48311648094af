import hashlib
import io
import os
import time

import pytest

from p2pcache.content.chunking import ChunkerParams
from p2pcache.content.cid import CID
from p2pcache.content.keys import HashKey
from p2pcache.errors import CorruptData, NotFound, RepoError, RepoLocked
from p2pcache.store.repo import Repo

from .conftest import write_file


@pytest.mark.parametrize("size", [0, 1, 1000, 300_000, 3 << 20])
def test_add_then_get_gives_the_exact_bytes(repo, tmp_path, rng, size):
    data = rng.randbytes(size)
    res = repo.add_file(write_file(tmp_path / "in", data))
    assert res.size == size
    assert res.hashes["sha256"] == hashlib.sha256(data).digest()
    assert "sha512" not in res.hashes  # computed when first asked for
    assert repo.sha512(res.root) == hashlib.sha512(data).digest()
    assert repo.index.known_digest(res.root, "sha512") == hashlib.sha512(data).digest()  # and recorded
    out = tmp_path / "out"
    assert repo.get_to_file(res.root, out) == size
    assert out.read_bytes() == data


def test_get_to_file_reports_progress_for_every_byte_it_wrote(repo, tmp_path, rng):
    data = rng.randbytes((5 << 20) + 123)  # several writev groups and a short last one
    res = repo.add_stream(io.BytesIO(data))
    seen: list[int] = []
    assert repo.get_to_file(res.root, tmp_path / "out", progress=seen.append) == len(data)
    assert sum(seen) == len(data) and len(seen) > 1
    assert (tmp_path / "out").read_bytes() == data


def test_every_key_form_resolves_to_the_root(repo, rng):
    data = rng.randbytes(100_000)
    res = repo.add_stream(io.BytesIO(data), name="x")
    s256, s512 = HashKey("sha256", res.hashes["sha256"]), HashKey("sha512", hashlib.sha512(data).digest())
    assert repo.resolve(s512.sri) == res.root  # nobody asked for its sha512 before: this lookup computes it
    for key in (str(res.root), s256.alias, s256.sri, s256.nix32, s512.sri, s512.alias, s256.digest.hex()):
        assert repo.resolve(key) == res.root
    with pytest.raises(NotFound):
        repo.resolve(HashKey("sha256", b"\1" * 32).alias)


def test_versions_share_chunks(repo, rng):
    v1 = rng.randbytes(4 << 20)
    v2 = v1[: 1 << 20] + b"a small edit" + v1[(1 << 20) + 100:] + rng.randbytes(10_000)
    first = repo.add_stream(io.BytesIO(v1))
    second = repo.add_stream(io.BytesIO(v2))
    assert first.new_bytes >= len(v1)
    assert second.new_bytes < len(v2) * 0.15, second
    assert repo.stored_bytes() < (len(v1) + len(v2)) * 0.6
    again = repo.add_stream(io.BytesIO(v1))
    assert again.already_present and again.new_blocks == 0 and again.root == first.root


def test_chunker_parameters_are_per_add_and_recorded(repo, rng):
    data = rng.randbytes(500_000)
    params = ChunkerParams(min_size=4096, avg_size=8192, max_size=32768)
    res = repo.add_stream(io.BytesIO(data), params=params)
    assert repo.manifest(res.root).chunker == params
    assert b"".join(repo.stream(res.root)) == data


def _raw_blocks(repo):
    """(cid, location) of every raw block, in pack order."""
    return [(c, loc) for part in repo.index.iter_locations() for c, loc in part if c.codec == 0x55]


def _flip_byte(repo, loc):
    with open(repo.packs.path(loc.pack), "r+b") as f:
        f.seek(loc.offset)
        b = f.read(1)
        f.seek(loc.offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupt_block_is_caught_reported_and_repaired(repo, tmp_path, rng):
    data = rng.randbytes(1 << 20)
    res = repo.add_stream(io.BytesIO(data))
    victim, loc = _raw_blocks(repo)[0]
    _flip_byte(repo, loc)
    out = tmp_path / "out"
    out.write_bytes(b"previous contents")
    with pytest.raises(CorruptData):
        repo.get_to_file(res.root, out)
    assert out.read_bytes() == b"previous contents"  # an aborted get leaves the old file alone
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())
    report = repo.verify()
    assert not report.consistent and len(report.corrupt) == 1 and report.roots_incomplete == [res.root]
    report = repo.verify(repair=True)
    assert report.roots_incomplete == [res.root] and not repo.has_block(victim)
    assert not repo.root_info(res.root).complete
    assert repo.verify().consistent
    with pytest.raises(CorruptData, match="incomplete"):
        list(repo.stream(res.root))
    # adding the same bytes again heals the root
    again = repo.add_stream(io.BytesIO(data))
    assert again.root == res.root and again.new_blocks == 1
    assert repo.root_info(res.root).complete and b"".join(repo.stream(res.root)) == data


def test_missing_block_is_reported(repo, rng):
    res = repo.add_stream(io.BytesIO(rng.randbytes(300_000)))
    victim, loc = _raw_blocks(repo)[-1]
    os.truncate(repo.packs.path(loc.pack), loc.offset + loc.size - 1)  # a pack cut short inside the block
    report = repo.verify()
    assert victim in report.missing and report.roots_incomplete == [res.root] and not report.consistent
    with pytest.raises(NotFound):
        b"".join(repo.stream(res.root))


def test_reads_record_last_access_in_batches_not_a_commit_each(tmp_path, rng):
    repo = Repo.init(tmp_path / "r")
    a = repo.add_stream(io.BytesIO(rng.randbytes(100_000)), name="a")
    before = repo.root_info(a.root).last_access
    time.sleep(0.01)
    list(repo.stream(a.root))
    assert repo.root_info(a.root).last_access == before  # remembered, not yet written
    repo.close()  # ... and written at close (or before gc orders by it, or TOUCH_WRITE_EVERY later)
    again = Repo.open(tmp_path / "r")
    try:
        assert again.root_info(a.root).last_access > before
    finally:
        again.close()


def test_gc_evicts_least_recently_used_unpinned_and_keeps_shared_chunks(repo, rng):
    base = rng.randbytes(2 << 20)
    a = repo.add_stream(io.BytesIO(base), name="a")
    b = repo.add_stream(io.BytesIO(base + rng.randbytes(200_000)), name="b")  # shares a's chunks
    c = repo.add_stream(io.BytesIO(rng.randbytes(1 << 20)), name="c")
    repo.set_pinned(str(c.root), True)
    list(repo.stream(a.root))  # a is now the most recently used
    report = repo.gc(max_size=repo.stored_bytes() - 1)
    assert report.roots_removed == [b.root]  # b is LRU; only its unshared tail goes
    assert report.bytes_freed < 400_000
    assert b"".join(repo.stream(a.root)) == base
    report = repo.gc(max_size=0)
    assert report.roots_removed == [a.root] and report.over_quota
    assert [r.name for r in repo.index.list_roots()] == ["c"]
    assert repo.verify().consistent
    assert repo.stored_bytes() == sum(repo.index.all_blocks().values())


def test_gc_removes_crash_garbage_but_not_live_blocks(repo, rng):
    res = repo.add_stream(io.BytesIO(rng.randbytes(500_000)))
    (repo.packs.dir / "notapack.tmp").write_bytes(b"half a block")
    (repo.packs.dir / "00000099.pack").write_bytes(b"a pack no index row points into")
    repo.packs.append([(CID.for_block(0x55, b"never committed"), b"never committed")])  # a dead tail
    report = repo.verify()
    assert report.consistent and len(report.garbage_files) == 2 and report.dead_bytes > len(b"never committed")
    assert repo.gc().garbage_files_removed == 2
    assert b"".join(repo.stream(res.root))


def test_one_writer_at_a_time(repo):
    with pytest.raises(RepoLocked, match="in use by another p2pcache process"):
        Repo.open(repo.path, writable=True)
    with Repo.open(repo.path) as reader:
        assert reader.index.list_roots() == []


def test_missing_repo_is_a_clear_error(tmp_path):
    with pytest.raises(RepoError, match="run `p2pcache init`"):
        Repo.open(tmp_path / "nothing")


def test_unreadable_input_is_a_clear_error(repo, tmp_path):
    with pytest.raises(RepoError, match="directory"):
        repo.add_file(tmp_path)
    with pytest.raises(RepoError, match="cannot read"):
        repo.add_file(tmp_path / "absent")


def test_blocks_from_a_peer_are_verified_stored_and_claimed_by_register_root(tmp_path, rng):
    data = rng.randbytes(700_000)
    with Repo.init(tmp_path / "a") as a, Repo.init(tmp_path / "b") as b:
        res = a.add_stream(io.BytesIO(data), name="peer.bin")
        blocks = [(cid, a.load_block(cid)) for cid in a.index.root_blocks(res.root)]
        bad_cid, bad_data = blocks[0]
        with pytest.raises(CorruptData):
            b.put_blocks([(bad_cid, bad_data + b"!")])
        assert not b.has_block(bad_cid)
        b.put_blocks([(res.root, a.load_block(res.root))])
        with pytest.raises(NotFound, match="missing block"):
            b.register_root(res.root)
        assert b.put_blocks(blocks) == len(data)  # the root was already there: only chunk bytes are new
        info = b.register_root(res.root)
        assert info.complete and info.name == "peer.bin"
        assert b"".join(b.stream(b.resolve(HashKey("sha256", res.hashes["sha256"]).sri))) == data
        assert b.verify().consistent and b.gc().blocks_removed == 0



@pytest.mark.parametrize("commit_at", ["before", "after"])
@pytest.mark.parametrize("read", ["load_blocks", "load_block"])
def test_a_block_committed_while_it_is_located_is_found(tmp_path, rng, read, commit_at):
    # A fetch stores blocks (pending: appended, no index row yet) and commits them in bigger batches on its
    # writer thread, while its digest and a NAR streamed to Nix read them at once. A commit records the rows,
    # then the blocks stop being pending; here it lands at the read's index lookup, just before or just
    # after it. Looking in the index first and in pending second, "after" found the blocks in neither:
    # "block ... is missing from the repo", the fetch failed and its clean-up gc swept it all (the CI flake).
    data = [rng.randbytes(1000 + i) for i in range(6)]
    blocks = [(CID.for_block(0x55, d), d) for d in data]
    with Repo.init(tmp_path / "r", durable=False) as repo:
        repo.put_blocks(blocks[:2])  # recorded already
        repo.write_blocks(blocks[2:], verified=True)  # stored, not recorded yet
        name = "locate_many" if read == "load_blocks" else "locate"
        lookup = getattr(repo.index, name)

        def commit_at_lookup(*args):
            if commit_at == "before":
                repo.commit_blocks([(c, len(d)) for c, d in blocks[2:]])
            found = lookup(*args)
            if commit_at == "after":
                repo.commit_blocks([(c, len(d)) for c, d in blocks[2:]])
            return found

        setattr(repo.index, name, commit_at_lookup)
        if read == "load_blocks":
            assert list(repo.load_blocks([(c, len(d)) for c, d in blocks])) == data
        else:
            assert repo.load_block(blocks[3][0]) == data[3]
        setattr(repo.index, name, lookup)
        repo.commit_blocks([(c, len(d)) for c, d in blocks[2:]])  # (if the read found them before any lookup)
        assert not repo.packs.pending and repo.index.block_count() == 6
        assert repo.verify().consistent


def test_gc_does_not_evict_a_root_while_it_is_read_here_or_by_another_process(tmp_path, rng):
    # A Nix NAR served, or `p2pcache get`/`cat` reading a daemon's repo: gc (the quota, `gc --max-size`) used
    # to evict the root under the reader and sweep its blocks, so the read failed half-way.
    import subprocess
    import sys

    from .conftest import run_cli

    with Repo.init(tmp_path / "r", durable=False) as repo:
        here, there, idle = (rng.randbytes(3 << 20) for _ in range(3))
        a, b, c = (repo.add_stream(io.BytesIO(d)) for d in (here, there, idle))
        reading = repo.stream(a.root)
        first = next(reading)  # read here, by this process, and not finished
        cat = subprocess.Popen([sys.executable, "-m", "p2pcache", "--repo", str(repo.path), "cat", str(b.root)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # blocks on the full pipe
        head = cat.stdout.read(1 << 16)  # it is reading now
        report = repo.gc(max_size=0)
        assert report.roots_removed == [c.root] and report.roots_kept_in_use == 2 and report.over_quota
        assert first + b"".join(reading) == here
        assert head + cat.stdout.read() == there and cat.wait(timeout=60) == 0, cat.stderr.read()
        report = repo.gc(max_size=0)  # both reads are over
        assert set(report.roots_removed) == {a.root, b.root} and report.roots_kept_in_use == 0
        assert repo.stored_bytes() == 0 and repo.verify().consistent
        gone = run_cli("--repo", str(repo.path), "cat", str(b.root))
        assert gone.returncode != 0 and b"not in the repo" in gone.stderr



def _recording_fadvise(monkeypatch) -> list[tuple[int, int, int]]:
    advised: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def recording(fd, offset, length, advice):
        advised.append((offset, length, advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", recording)
    return advised


def test_a_durable_nar_ingest_drops_the_pages_behind_its_writeback_and_reads_back_intact(tmp_path, rng,
                                                                                          monkeypatch):
    """PackFiles._recycle: pages of the active pack that writeback started on a step ago leave the page cache
    as a NAR ingest goes (so its next appends reuse them instead of fresh ones); nothing ahead of the writeback
    is dropped, and every byte reads back."""
    from p2pcache.content.nar import Contents, RegularFile, write_nar
    from p2pcache.store import blockstore
    from p2pcache.store.narstore import RepoNarStore

    advised = _recording_fadvise(monkeypatch)
    r = Repo.init(tmp_path / "repo", durable=True)
    try:
        data = rng.randbytes(5 * blockstore.WRITEBACK_STEP)
        nar = b"".join(write_nar([RegularFile(len(data)), Contents(data)]))
        store_hash = "0" * 31 + "1"
        res = RepoNarStore(r).add_nar(None, [nar[i:i + (1 << 20)] for i in range(0, len(nar), 1 << 20)],
                                      store_path=f"/nix/store/{store_hash}-big")
        dropped = [(o, n) for o, n, a in advised if a == os.POSIX_FADV_DONTNEED]
        assert dropped, "no pages dropped behind the writeback"
        assert dropped[0][0] == 0
        for (o1, n1), (o2, _) in zip(dropped, dropped[1:]):
            assert o2 == o1 + n1  # contiguous, each span once
        end = dropped[-1][0] + dropped[-1][1]
        assert 2 * blockstore.WRITEBACK_STEP <= end <= len(nar)  # behind the last writeback started, not past it
        assert res.nar_size == len(nar) and res.nar_hash == hashlib.sha256(nar).digest()
        assert b"".join(RepoNarStore(r).stream_nar(store_hash)) == nar
    finally:
        r.close()


def test_a_durable_build_cache_save_drops_the_pages_behind_its_writeback_and_reads_back_intact(tmp_path, rng,
                                                                                               monkeypatch):
    """A save's file upload (`ingest_files`, what a daemon does with `cache save`) recycles its pack pages as a
    NAR ingest does: nobody reads a save back soon, and fresh page-cache pages cost these VMs a CPU-second per
    GiB or more. Every file's blocks read back intact."""
    from p2pcache.buildcache import ingest_files
    from p2pcache.cacheupload import FILE_HEADER
    from p2pcache.content.treemanifest import chunk_contents
    from p2pcache.store import blockstore

    advised = _recording_fadvise(monkeypatch)
    r = Repo.init(tmp_path / "repo", durable=True)
    try:
        files = [rng.randbytes(rng.randint(1, 300_000)) for _ in range(5 * blockstore.WRITEBACK_STEP // 150_000)]
        body = b"".join(FILE_HEADER.pack(len(d)) + d for d in files)
        ingest_files(r, iter([body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)]))
        dropped = [(o, n) for o, n, a in advised if a == os.POSIX_FADV_DONTNEED]
        assert dropped, "no pages dropped behind the writeback"
        assert 2 * blockstore.WRITEBACK_STEP <= dropped[-1][0] + dropped[-1][1] <= len(body)
        for d in files:
            for cid, data in chunk_contents([d], len(d), inline=0)[1]:
                assert r.load_block(cid) == bytes(data)
    finally:
        r.close()


def test_a_durable_add_keeps_its_pages_for_the_get_that_follows(tmp_path, rng, monkeypatch):
    """Archives keep their pack pages cached (a get right after an add read from disk otherwise)."""
    from p2pcache.store import blockstore

    advised = _recording_fadvise(monkeypatch)
    r = Repo.init(tmp_path / "repo", durable=True)
    try:
        data = rng.randbytes(4 * blockstore.WRITEBACK_STEP)
        res = r.add_file(write_file(tmp_path / "in", data))
        assert [a for *_, a in advised if a == os.POSIX_FADV_DONTNEED] == []
        out = tmp_path / "out"
        assert r.get_to_file(res.root, out) == len(data)
        assert out.read_bytes() == data
    finally:
        r.close()


def test_threads_reading_the_index_see_every_block_committed_before_they_asked(repo, rng):
    # A read-only handle read by several threads while another handle commits: a streaming restore's
    # writers reading what the daemon's fetch commits. Sharing one connection, a query joined the read
    # transaction of another thread's query still stepping, and missed blocks committed in between.
    import random
    import threading

    from p2pcache.content.cid import RAW

    blocks = [(CID.for_block(RAW, b), b) for b in (rng.randbytes(64) for _ in range(4000))]
    committed: list[CID] = []
    done = threading.Event()
    missed: list[int] = []

    def write():
        try:
            for i in range(0, len(blocks), 16):
                repo.put_blocks(blocks[i:i + 16])
                committed.extend(c for c, _ in blocks[i:i + 16])
        finally:
            done.set()

    def read(seed: int, many: int):
        pick = random.Random(seed)
        while not done.is_set():
            if not committed:
                continue
            wanted = [committed[pick.randrange(len(committed))] for _ in range(many)]
            found = reader.index.locate_many(wanted)
            missed.extend(1 for c in wanted if c.buffer not in found)

    reader = Repo.open(repo.path, writable=False)
    threads = [threading.Thread(target=write)] + [threading.Thread(target=read, args=(n, m))
                                                   for n, m in enumerate((1, 700, 700, 1))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        reader.close()
    assert len(repo.index.locate_many([c for c, _ in blocks])) == len(blocks)
    assert not missed, f"{len(missed)} reads missed a committed block"


def test_a_pin_or_touch_made_while_another_thread_holds_a_transaction_is_not_rolled_back_with_it(repo, rng, tmp_path):
    # `set_pinned`, `touch` and `set_verified` are called outside transactions (`p2pcache pin`, a build-cache
    # restore, a verified read). On the one writing connection a bare statement joined the transaction another
    # thread had open there (a fetch's commit, an add), and a rollback of that one took the pin with it.
    import threading

    root = repo.add_file(write_file(tmp_path / "in", rng.randbytes(5000))).root
    index = repo.index
    began, wrote = threading.Event(), threading.Event()

    def failing_commit():
        index.begin()
        began.set()
        wrote.wait(0.5)  # the other thread's write waits for this transaction (with the fix) or joins it
        index.rollback()

    def pin():
        began.wait()
        index.set_pinned(root, True)
        index.touch(root, 1234.5)
        index.set_verified(root)
        wrote.set()

    threads = [threading.Thread(target=failing_commit), threading.Thread(target=pin)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    info = index.get_root(root)
    assert info is not None and info.pinned and index.is_verified(root)
    assert root not in index.lru_unpinned()
    row = index.db.execute("SELECT last_access FROM roots WHERE root = ?", (root.buffer,)).fetchone()
    assert row[0] == 1234.5
