"""Tree manifests and the safe save/restore of build directories, on a real repo and real files."""

import os
import random
import stat
from pathlib import Path

import pytest

from p2pcache.buildcache import RepoBlockSink, register_tree
from p2pcache.buildtree import previous_entries, restore_tree, save_tree
from p2pcache.content import dagcbor
from p2pcache.content.cid import CID, DAG_CBOR
from p2pcache.content.treemanifest import (PAGE_TYPE, TreeEntry, TreeManifest, TreeManifestBuilder,
                                           chunk_contents, iter_entries)
from p2pcache.errors import MalformedBlock


def build_dir(root: Path, n: int = 300, seed: int = 7) -> Path:
    rng = random.Random(seed)
    for i in range(n):
        d = root / f"m{i % 11}" / f"s{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.o").write_bytes(rng.randbytes(rng.choice([0, 40, 900, 20_000, 150_000])))
    return root


def test_resave_unchanged_is_the_same_tree_and_a_change_stores_little(repo, tmp_path):
    src = build_dir(tmp_path / "b")
    sink = RepoBlockSink(repo)
    first = save_tree([str(src)], sink)
    register_tree(repo, first.root, "k")
    assert first.files == 300 and first.new_bytes >= first.bytes
    # Unchanged, read in full: the same root, nothing new
    again = save_tree([str(src)], sink)
    assert again.root == first.root and again.new_blocks == 0 and again.files_read == 300
    # Unchanged, with the previous tree as stat cache: no file is even read
    prev = previous_entries(TreeManifest.decode(repo.load_block(first.root)), repo.load_block)
    cached = save_tree([str(src)], sink, previous=prev, previous_scan=first.scan_time + 2)
    assert cached.root == first.root and cached.files_read == 0 and cached.new_blocks == 0
    # Change 3 files: new bytes are those files' chunks plus a few pages, not the directory
    changed = 0
    for i in (5, 150, 299):
        p = src / f"m{i % 11}" / f"s{i % 3}" / f"f{i}.o"
        data = os.urandom(60_000)
        p.write_bytes(data)
        changed += len(data)
    third = save_tree([str(src)], sink, previous=prev, previous_scan=first.scan_time + 2)
    assert third.root != first.root and third.files_read == 3
    assert changed <= third.new_bytes <= changed + 64 * 1024


def test_uploaded_files_are_chunked_as_chunk_contents_chunks_them(repo, monkeypatch):
    """The sink's chunking (`ingest_files`, what a daemon does with a save's file upload) gives every file
    the body and blocks `chunk_contents` gives it, however the upload is cut into pieces (headers and
    files split across pieces, a file spanning many); a body that ends inside a file stores nothing."""
    from p2pcache import buildcache
    from p2pcache.buildcache import ingest_files
    from p2pcache.cacheupload import FILE_HEADER
    from p2pcache.errors import InvalidInput

    rng = random.Random(3)
    files = [rng.randbytes(n) for n in (1, 5_000, 17_000, 70_000, 300_000, 3_000_000, 2_000, 64 << 10)]
    body = b"".join(FILE_HEADER.pack(len(d)) + d for d in files)
    expected = [chunk_contents([d], len(d), inline=0) for d in files]
    for cuts in ([len(body)], [3, 4, 9, 10_000, 1 << 20], [rng.randint(1, 200_000) for _ in range(40)]):
        pieces, pos = [], 0
        for n in cuts + [len(body)]:
            pieces.append(body[pos:pos + n])
            pos += n
        got = ingest_files(repo, (p for p in pieces if p))
        assert got["bodies"] == [b for b, _ in expected]
    assert any(b[1] > 0 for b, _ in expected)  # one file has a chunk-index tree
    for _, blocks in expected:
        for cid, data in blocks:
            assert repo.load_block(cid) == bytes(data)
    # a new file's upload cut short: refused, its chunks never recorded
    fresh = rng.randbytes(200_000)
    with pytest.raises(InvalidInput, match="ends inside a file"):
        ingest_files(repo, iter([FILE_HEADER.pack(len(fresh)) + fresh[:150_000]]))
    chunks = [c for c, _ in chunk_contents([fresh], len(fresh), inline=0)[1]]
    assert not repo.index.known_blocks(chunks)
    # one request holds a bounded number of files (their bodies wait for the answer)
    monkeypatch.setattr(buildcache, "MAX_UPLOAD_FILES", 3)
    with pytest.raises(InvalidInput, match="more than 3 files"):
        ingest_files(repo, iter([FILE_HEADER.pack(2) + b"ab"] * 4))


def test_a_file_that_changes_while_it_is_uploaded_is_not_saved(tmp_path):
    from p2pcache.buildtree import file_pieces
    from p2pcache.errors import InvalidInput

    f = tmp_path / "obj.o"
    f.write_bytes(b"x" * 50_000)
    for now in (b"x" * 40_000, b"x" * 50_001):
        f.write_bytes(now)
        with pytest.raises(InvalidInput, match="changed while it was read"):
            list(file_pieces([(os.fsencode(f), 50_000)]))
    f.write_bytes(b"y" * 50_000)
    assert b"".join(file_pieces([(os.fsencode(f), 50_000)])).endswith(b"y" * 50_000)


def test_racy_files_are_read_again(repo, tmp_path):
    src = build_dir(tmp_path / "b", n=5)
    sink = RepoBlockSink(repo)
    first = save_tree([str(src)], sink)
    register_tree(repo, first.root, "k")
    prev = previous_entries(TreeManifest.decode(repo.load_block(first.root)), repo.load_block)
    # the previous scan happened within a second of these files' mtimes: they are not trusted
    assert save_tree([str(src)], sink, previous=prev, previous_scan=first.scan_time).files_read == 5


@pytest.mark.parametrize("batched, umask", [(False, None), (True, 0o077), ("views", None)])
def test_restore_round_trip_modes_mtimes_symlinks_and_several_paths(repo, tmp_path, batched, umask):
    a = build_dir(tmp_path / "a", n=30)
    (a / "tool").write_bytes(b"#!/bin/sh\n")
    (a / "tool").chmod(0o750)
    (a / "link").symlink_to("m1/s1/f1.o")
    os.utime(a / "m1", ns=(1_500_000_000_123_456_789,) * 2)
    single = tmp_path / "one.bin"
    single.write_bytes(b"x" * 5000)
    r = save_tree([str(a), str(single)], RepoBlockSink(repo))
    register_tree(repo, r.root, "k")
    old_umask = os.umask(umask) if umask is not None else None  # the saved modes come back whatever the umask
    try:
        report, manifest, mtimes = restore_tree(r.root, repo.load_block, [str(tmp_path / "ra"), str(tmp_path / "r1.bin")],
                                                load_many=(repo.load_views if batched == "views" else
                                                           repo.load_blocks if batched else None))
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    assert report.refused == [] and report.files == 32 and report.symlinks == 1
    assert (tmp_path / "r1.bin").read_bytes() == b"x" * 5000
    for p in a.rglob("*"):
        q = tmp_path / "ra" / p.relative_to(a)
        st, sq = os.lstat(p), os.lstat(q)
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(sq.st_mode), p
        assert st.st_mtime_ns == sq.st_mtime_ns, p
        if p.is_symlink():
            assert os.readlink(q) == os.readlink(p)
        elif p.is_file():
            assert q.read_bytes() == p.read_bytes()
    assert len(mtimes) == 32


def _store(repo, blocks):
    repo.put_blocks([(c, bytes(d)) for c, d in blocks])


def hostile_tree(repo) -> CID:
    b = TreeManifestBuilder(["evil"])
    blocks = []
    body, chunks = chunk_contents([os.urandom(100_000)], 100_000)
    blocks += chunks
    reg = stat.S_IFREG | 0o644
    entries = [
        TreeEntry(0, b"", stat.S_IFDIR | 0o755, 0, None),
        TreeEntry(0, b"/abs", reg, 0, b"absolute"),
        TreeEntry(0, b"../escape", reg, 0, b"up"),
        TreeEntry(0, b"a/../../x", reg, 0, b"up2"),
        TreeEntry(0, b"dev", stat.S_IFCHR | 0o666, 0, None),
        TreeEntry(0, b"fifo", stat.S_IFIFO | 0o644, 0, None),
        TreeEntry(0, b"good", reg, 0, b"fine"),
        TreeEntry(0, b"pre/x", reg, 0, b"through a symlink already on disk"),
        TreeEntry(0, b"setuid", stat.S_IFREG | 0o4755, 0, body),
        TreeEntry(0, b"sub", stat.S_IFDIR | 0o2755, 0, None),
        TreeEntry(0, b"sub/abs-link", stat.S_IFLNK | 0o777, 0, b"/etc/passwd"),
        TreeEntry(0, b"sub/up-link", stat.S_IFLNK | 0o777, 0, b"../../outside"),
        TreeEntry(0, b"x", stat.S_IFLNK | 0o777, 0, b"."),
        TreeEntry(0, b"y", stat.S_IFLNK | 0o777, 0, b"x/.."),  # lexically inside, really the parent
    ]
    for e in sorted(entries, key=lambda e: e.path):
        blocks += b.add(e)
    root, data, rest = b.finish()
    _store(repo, blocks + rest + [(root, data)])
    return root


def test_hostile_entries_are_refused_and_reported(repo, tmp_path):
    root = hostile_tree(repo)
    target = tmp_path / "box" / "target"
    target.mkdir(parents=True)
    outside = tmp_path / "box" / "outside-dir"
    outside.mkdir()
    (target / "pre").symlink_to(outside)
    report, _, _ = restore_tree(root, repo.load_block, [str(target)])
    refused = {p.removeprefix(f"{target}/"): why for p, why in report.refused}
    assert refused == {
        "/abs": "absolute path",
        "../escape": "path component '..'",
        "a/../../x": "path component '..'",
        "dev": "device or special file",
        "fifo": "device or special file",
        "pre/x": "a parent is a symlink or not a directory",
        "sub/abs-link": "symlink pointing outside the target",
        "sub/up-link": "symlink pointing outside the target",
        "y": "symlink resolving outside the target",
    }
    line = report.refused_line()
    assert "\n" not in line and line.startswith("refused 9 entries: ")
    assert (target / "good").read_bytes() == b"fine"
    assert stat.S_IMODE(os.stat(target / "setuid").st_mode) == 0o755  # setuid stripped
    assert stat.S_IMODE(os.stat(target / "sub").st_mode) & 0o7000 == 0  # setgid stripped
    assert report.stripped == 2
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "box" / "escape").exists() and not (tmp_path / "x").exists()
    assert not os.path.lexists(target / "y") and os.readlink(target / "x") == "."
    assert sorted(os.listdir(target)) == ["good", "pre", "setuid", "sub", "x"]


def test_restore_over_existing_files_replaces_only_cache_entries(repo, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "cached.o").write_bytes(b"new")
    (src / "blocked").write_bytes(b"file")
    r = save_tree([str(src)], RepoBlockSink(repo))
    register_tree(repo, r.root, "k")
    target = tmp_path / "t"
    (target / "d").mkdir(parents=True)
    (target / "d" / "cached.o").write_bytes(b"old")
    (target / "d" / "mine.txt").write_bytes(b"keep me")
    (target / "blocked").mkdir()
    (target / "blocked" / "inside").write_bytes(b"keep")
    report, _, _ = restore_tree(r.root, repo.load_block, [str(target)])
    assert (target / "d" / "cached.o").read_bytes() == b"new"
    assert (target / "d" / "mine.txt").read_bytes() == b"keep me"
    assert (target / "blocked" / "inside").read_bytes() == b"keep"
    assert [why for _, why in report.refused] == ["a directory is in the way"]
    assert not [p for p in target.rglob("*") if ".p2pcache-" in p.name]  # no temp files left


def test_manifest_decoding_is_strict_about_shape():
    b = TreeManifestBuilder(["p"])
    page = dagcbor.encode({"type": PAGE_TYPE, "version": 1, "entries": [
        [0, b"b", stat.S_IFREG | 0o644, 0, b"x"], [0, b"a", stat.S_IFREG | 0o644, 0, b"y"]]})
    cid = CID.for_block(DAG_CBOR, page)
    m = TreeManifest(b.params, 1024, ("p",), 2, 2, ((cid, 2),), None)
    with pytest.raises(MalformedBlock, match="increasing order"):
        list(iter_entries(m, {cid: page}.__getitem__))
    bad = dagcbor.encode({"type": PAGE_TYPE, "version": 1, "entries": [[0, b"a", stat.S_IFDIR | 0o755, 0, b"body"]]})
    cid2 = CID.for_block(DAG_CBOR, bad)
    m2 = TreeManifest(b.params, 1024, ("p",), 1, 0, ((cid2, 1),), None)
    with pytest.raises(MalformedBlock, match="only files and symlinks"):
        list(iter_entries(m2, {cid2: bad}.__getitem__))
    with pytest.raises(MalformedBlock):
        TreeManifest.decode(dagcbor.encode({"type": "p2pcache/tree", "version": 1}))


def test_huge_trees_put_page_links_into_index_blocks(monkeypatch):
    import p2pcache.content.treemanifest as tm

    monkeypatch.setattr(tm, "ROOT_PAGES", 8)  # as if the tree had more than 1024 pages
    blocks = {}

    def build(n):
        b = TreeManifestBuilder(["p"])
        for i in range(n):
            for c, d in b.add(TreeEntry(0, b"d%06d" % i, stat.S_IFDIR | 0o755, i, None)):
                blocks[c] = bytes(d)
        root, data, rest = b.finish()
        blocks.update((c, bytes(d)) for c, d in rest)
        return TreeManifest.decode(data)

    m = build(3000)
    assert len(m.pages) <= 8
    assert [e.path for e in iter_entries(m, blocks.__getitem__)] == [b"d%06d" % i for i in range(3000)]
    listed = {c for c, _ in tm.iter_blocks(m, blocks.__getitem__)}
    assert listed == set(blocks) and any(dagcbor.decode(blocks[c])["type"] == tm.INDEX_TYPE for c in listed)
    # one more entry at the end leaves most index blocks as they were
    before = set(blocks)
    blocks.clear()
    m2 = build(3001)
    assert m2.entries == 3001 and len(set(blocks) - before) <= 6


def _arriving_copy(src_repo, root, dst_path, *, stop_at=None, then=None):
    """What a daemon's fetch does to the repo a streaming restore reads: the tree's blocks, in the
    order `iter_blocks` walks them (root, then each page and its files' chunks), committed in small batches from
    another thread and another repo handle."""
    import threading

    from p2pcache.content.treemanifest import iter_blocks
    from p2pcache.store.repo import Repo

    manifest = TreeManifest.decode(src_repo.load_block(root))
    order = [root] + list(dict.fromkeys(c for c, _ in iter_blocks(manifest, src_repo.load_block)))
    events = {"half": threading.Event()}
    stop_after = None if stop_at is None else int(len(order) * stop_at) // 16 * 16

    def run(arriving, report):
        dst = Repo.open(dst_path, writable=True)
        try:
            for i in range(0, len(order), 16):
                if stop_after is not None and i >= stop_after:
                    arriving.end(then)
                    return
                dst.put_blocks([(c, src_repo.load_block(c)) for c in order[i:i + 16]])
                if i >= len(order) // 2 and not events["half"].is_set():
                    events["half"].set()
                    # files must be written before the tree is whole: wait for the restore to write one
                    for _ in range(1000):
                        if report.written:
                            break
                        threading.Event().wait(0.01)
                    events["written_early"] = bool(report.written)
            arriving.end(root)
        finally:
            dst.close()

    return order, run, events


def test_streaming_restore_writes_files_as_their_blocks_arrive(repo, tmp_path):
    import threading

    from p2pcache.buildtree import ArrivingBlocks, RestoreReport
    from p2pcache.store.repo import Repo

    src = build_dir(tmp_path / "b", n=200)
    r = save_tree([str(src)], RepoBlockSink(repo))
    Repo.init(tmp_path / "dst").close()
    reader = Repo.open(tmp_path / "dst", writable=False)
    try:
        order, run, events = _arriving_copy(repo, r.root, tmp_path / "dst")
        arriving = ArrivingBlocks(r.root, reader.load_block, reader.load_views,
                                  lambda cids: set(reader.index.locate_many(cids)))
        report = RestoreReport()
        copier = threading.Thread(target=run, args=(arriving, report))
        copier.start()
        restore_tree(r.root, arriving.load, [str(tmp_path / "out")], load_many=arriving.load_many, report=report)
        copier.join()
    finally:
        reader.close()
    assert events["written_early"] and arriving.waits > 0
    assert report.files == 200 and report.refused == []
    for p in src.rglob("*"):
        if p.is_file():
            assert (tmp_path / "out" / p.relative_to(src)).read_bytes() == p.read_bytes()


def test_streaming_restore_of_a_tree_that_will_not_arrive_is_undone(repo, tmp_path):
    import threading

    from p2pcache.buildtree import ArrivingBlocks, RestoreReport, TreeSuperseded, undo_restore
    from p2pcache.store.repo import Repo

    src = build_dir(tmp_path / "b", n=200)
    r = save_tree([str(src)], RepoBlockSink(repo))
    out = tmp_path / "out"
    (out / "m1").mkdir(parents=True)
    (out / "m1" / "mine.txt").write_bytes(b"not a cache entry")
    Repo.init(tmp_path / "dst").close()
    reader = Repo.open(tmp_path / "dst", writable=False)
    other = CID.for_block(DAG_CBOR, b"another tree")
    try:
        order, run, _ = _arriving_copy(repo, r.root, tmp_path / "dst", stop_at=0.75, then=other)
        arriving = ArrivingBlocks(r.root, reader.load_block, reader.load_views,
                                  lambda cids: set(reader.index.locate_many(cids)))
        report = RestoreReport()
        copier = threading.Thread(target=run, args=(arriving, report))
        copier.start()
        with pytest.raises(TreeSuperseded):
            restore_tree(r.root, arriving.load, [str(out)], load_many=arriving.load_many, report=report)
        copier.join()
    finally:
        reader.close()
    assert report.written, "some files were written before the fetch gave up"
    assert undo_restore(report) > 0
    assert [p for p in out.rglob("*") if p.is_file()] == [out / "m1" / "mine.txt"]


def test_a_walk_with_the_last_saves_digest_is_that_tree_again(repo, tmp_path):
    from p2pcache.buildtree import scan_paths, unchanged_tree

    src = build_dir(tmp_path / "b", n=40)
    (src / "link").symlink_to("m1/s1/f1.o")
    first = save_tree([str(src)], RepoBlockSink(repo))
    assert first.scan_digest is not None
    later = first.scan_time + 2  # as if this save had been recorded two seconds after its walk
    same = unchanged_tree(scan_paths([str(src)]), first.root, first.scan_digest, later)
    assert same is not None and same.root == first.root and same.files_read == 0
    assert (same.files, same.dirs, same.symlinks, same.bytes) == (first.files, first.dirs, first.symlinks, first.bytes)
    # what the walk trusts is what the stat cache trusts: a racily new file, or any metadata change, is not it
    assert unchanged_tree(scan_paths([str(src)]), first.root, first.scan_digest, first.scan_time) is None
    f = src / "m1" / "s1" / "f1.o"
    st = f.stat()
    f.write_bytes(f.read_bytes()[::-1])  # same size, new contents: a new mtime
    assert unchanged_tree(scan_paths([str(src)]), first.root, first.scan_digest, later + 5) is None
    # a tool that puts the old mtime back on purpose is trusted, as by the stat cache (README: `--rehash`)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert unchanged_tree(scan_paths([str(src)]), first.root, first.scan_digest, later) is not None
    for change in (lambda: (src / "link").unlink() or (src / "link").symlink_to("m1/s1/f2.o"),
                   lambda: f.chmod(0o600), lambda: (src / "new").write_bytes(b"")):
        change()
        assert unchanged_tree(scan_paths([str(src)]), first.root, first.scan_digest, later + 5) is None
    # a save with sources hashes them anew: it records no digest
    assert save_tree([str(src)], RepoBlockSink(repo), sources_dir=str(tmp_path / "b" / "m2")).scan_digest is None


def test_a_save_has_one_durable_point_its_root(tmp_path):
    """A save's uploads (file contents through `ingest_files`, tree pages through `put_blocks_parallel`)
    flush their bytes before the index rows that point at them, but commit those rows without waiting for
    the WAL's fsync: no root claims them yet. The root's commit (`register_tree`) is the save's one durable
    commit, and makes the earlier rows durable with it."""
    from concurrent.futures import ThreadPoolExecutor

    from p2pcache.buildcache import ingest_files, put_blocks_parallel
    from p2pcache.cacheupload import FILE_HEADER
    from p2pcache.store.repo import Repo

    repo = Repo.init(tmp_path / "durable", durable=True)
    try:
        events: list[str] = []
        sync = ["FULL"]

        def traced(sql: str) -> None:
            words = sql.split()
            if words[:2] == ["PRAGMA", "synchronous"]:
                sync[0] = words[-1]
            elif words[:1] == ["COMMIT"]:
                events.append(f"commit {sync[0]}")

        barrier = repo.packs.barrier

        def counted_barrier() -> None:
            events.append("flush")
            barrier()

        repo.packs.barrier = counted_barrier  # type: ignore[method-assign]
        repo.index.db.set_trace_callback(traced)
        rng = random.Random(5)
        files = [rng.randbytes(n) for n in (3_000, 40_000, 200_000)]
        bodies = ingest_files(repo, iter([b"".join(FILE_HEADER.pack(len(d)) + d for d in files)]))["bodies"]
        builder = TreeManifestBuilder(["b"])
        pages = []
        for i, body in enumerate(bodies):
            pages += builder.add(TreeEntry(0, b"f%d" % i, stat.S_IFREG | 0o644, 1, body))
        root, data, rest = builder.finish()
        with ThreadPoolExecutor(2) as pool:
            put_blocks_parallel(repo, [(c, bytes(d)) for c, d in pages + rest + [(root, data)]], pool)
        uploads = list(events)
        assert uploads.count("flush") == 2 and "commit FULL" not in uploads
        # every upload's rows come after its bytes were flushed, and wait for no fsync of their own
        assert uploads == ["flush", "commit NORMAL"] * 2
        register_tree(repo, root, "k")
        assert events[len(uploads):] == ["commit FULL"]
        assert repo.root_info(root).complete
    finally:
        repo.close()
