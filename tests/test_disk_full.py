"""Disk full, for real: a daemon whose repo lives on an 8 MiB tmpfs fetches a 12 MiB archive from a peer.
The CLI exits 6 with one line, the failure is counted, and the repo is left as it was: consistent, with no
block that no root claims and no garbage file. (Mounting a tmpfs needs root, as the Nix tests do.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import httpx
import pytest

from p2pcache.content import nixbase32
from p2pcache.errors import DiskFull, P2PCacheError, leaf_error
from p2pcache.store.blockstore import PACK_MAGIC
from p2pcache.store.nixstore import dump_path

from .helpers.daemons import start_daemon
from .test_nix_uploads import _narinfo


def _tree(path):
    path.mkdir()
    (path / "big").write_bytes(os.urandom(12 << 20))
    (path / "small").write_text("hello\n")
    return path


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_fetch_onto_a_full_disk_exits_6_counts_it_and_leaves_nothing_behind(tmp_path, small_disk):
    a = start_daemon(tmp_path / "a")
    b = start_daemon(small_disk / "b", bootstrap=[a.addr])
    try:
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(12 << 20))
        sha = hashlib.sha256(big.read_bytes()).hexdigest()
        before = a.status()["announce"]["provided"]
        a.cli("add", str(big))
        a.wait_announced(before + 3)
        stored_before = b.status()["stored_bytes"]

        proc = b.cli("get", f"sha256:{sha}", "-o", str(tmp_path / "out.bin"), check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 6, err
        # Refused before the first block (the free-space check) or cut off when the disk fills: one line either way.
        assert len(err.strip().splitlines()) == 1 and ("disk full" in err or "bytes free" in err), err
        assert "Traceback" not in err, err
        st = b.status()
        assert st["disk_full"] == 1 and st["fetch_failures"] == 1
        metrics = httpx.get(b.api + "/metrics", timeout=10).text
        assert 'p2pcache_disk_full_total{operation="fetch"} 1.0' in metrics
        assert st["stored_bytes"] == stored_before and st["roots"] == 0

        # the same for a NAR that Nix asks B for, streamed from A's blocks: the stream is cut short
        # (Nix sees a truncated transfer), counted, and what B stored of it is taken back
        nar = b"".join(dump_path(_tree(tmp_path / "tree")))
        store_hash = nixbase32.encode(os.urandom(20))
        url = f"nar/{nixbase32.encode(hashlib.sha256(nar).digest())}.nar"
        assert httpx.put(headers=a.auth, url=f"{a.api}/{url}", content=nar, timeout=60).status_code == 200
        before = a.status()["announce"]["provided"]
        assert httpx.put(headers=a.auth, url=f"{a.api}/{store_hash}.narinfo", content=_narinfo(store_hash, url, "none", nar, nar),
                         timeout=30).status_code == 200
        a.wait_announced(before + 2)
        info = httpx.get(f"{b.api}/{store_hash}.narinfo", timeout=30)
        assert info.status_code == 200, info.text
        nar_url = next(line.split(": ", 1)[1] for line in info.text.splitlines() if line.startswith("URL: "))
        got = b""
        try:
            with httpx.stream("GET", f"{b.api}/{nar_url}", timeout=60) as r:
                for piece in r.iter_bytes():
                    got += piece
        except httpx.HTTPError:
            pass  # cut short, as it must be
        assert got != nar
        metrics = httpx.get(b.api + "/metrics", timeout=10).text
        assert 'p2pcache_disk_full_total{operation="nar-from-peers"} 1.0' in metrics, metrics
        assert b.status()["stored_bytes"] == stored_before
    finally:
        b.stop()
        a.stop()
    verify = subprocess.run([sys.executable, "-m", "p2pcache", "--repo", str(small_disk / "b"), "--json", "verify"],
                            capture_output=True)
    assert verify.returncode == 0, verify.stderr.decode()
    report = json.loads(verify.stdout)
    assert report["consistent"] and report["dead_bytes"] == 0, report
    assert report["blocks_checked"] == 0  # no block of no root
    # what the fetches appended went back at once, not left for gc: the packs hold their headers only
    packs = list((small_disk / "b" / "packs").glob("*.pack"))
    assert packs and all(p.stat().st_size == len(PACK_MAGIC) for p in packs), [p.stat().st_size for p in packs]
    assert "Traceback" not in (small_disk / "b.log").read_text()
    assert not (small_disk / "b" / "blocks").exists()  # format 2: nothing outside the packs
    # no stray file: the only "garbage" is empty packs other than the newest (the next writer's)
    assert report["garbage_files"] == len(packs) - 1


def test_leaf_error_digs_disk_full_out_of_nested_groups():
    full = DiskFull("disk full while writing x")
    group = ExceptionGroup("outer", [ValueError("other"), ExceptionGroup("inner", [P2PCacheError("p"), full])])
    assert leaf_error(group) is full
    assert isinstance(leaf_error(ExceptionGroup("g", [ValueError("v"), P2PCacheError("p")])), P2PCacheError)
    plain = KeyError("k")
    assert leaf_error(plain) is plain


def test_taking_back_on_packs_keeps_what_a_root_claims_and_gives_the_tail_back(tmp_path, small_disk):
    """Real repo on a real 8 MiB tmpfs: an add claims its blocks; a "fetch" then records some blocks and
    appends more, until an append hits the full disk. That append leaves nothing pending or recorded and
    cuts its partial bytes off; taking back drops the fetch's rows and pending records and gives the pack
    tail back, and the add's blocks stay readable."""
    from p2pcache.content.cid import CID, RAW
    from p2pcache.store.repo import Repo

    with Repo.init(small_disk / "r") as r:
        kept = tmp_path / "kept.bin"
        kept.write_bytes(os.urandom(300 << 10))
        added = r.add_file(kept)
        stored, pack_sizes = r.stored_bytes(), {p: r.packs.file_size(p) for p in r.packs.pack_ids()}

        def blocks(n, size=256 << 10):
            out = []
            for _ in range(n):
                data = os.urandom(size)
                out.append((CID.for_block(RAW, data), data))
            return out

        with r.recording_blocks() as written:
            recorded = blocks(4)
            r.put_blocks(recorded)
            only_appended = blocks(4)
            r.write_blocks(only_appended)
            assert r.stored_bytes() == stored + 4 * (256 << 10)
            end = r.packs._end
            with pytest.raises(DiskFull):
                r.write_blocks(blocks(1, 16 << 20))  # more than the disk holds
        assert r.packs._end == end and r.packs.file_size(r.packs.active) == end  # nothing half-written
        assert len(r.packs.pending) == 4 and len(set(written)) == 8  # the failed append noted nothing
        assert r.drop_unclaimed_blocks(written) == 8
        assert r.stored_bytes() == stored and not r.packs.pending
        assert {p: r.packs.file_size(p) for p in r.packs.pack_ids()} == pack_sizes
        assert not any(r.has_block(c) for c, _ in recorded)
        assert b"".join(r.stream(added.root)) == kept.read_bytes()
    with Repo.open(small_disk / "r", writable=True) as r:
        report = r.verify()
        assert report.consistent and report.dead_bytes == 0 and report.blocks_checked > 0
