"""Disk full, for real: a daemon whose repo lives on an 8 MiB tmpfs fetches a 12 MiB archive from a peer.
The CLI exits 6 with one line, the failure is counted, and the repo is left as it was: consistent, with no
block that no root claims and no garbage file. (Mounting a tmpfs needs root, as the Nix tests do.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import httpx
import pytest

from p2pcache.content import nixbase32
from p2pcache.errors import DiskFull, P2PCacheError, leaf_error
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
        assert len(err.strip().splitlines()) == 1 and "disk full" in err and "Traceback" not in err, err
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
    assert b'"consistent": true' in verify.stdout and b'"garbage_files": 0' in verify.stdout, verify.stdout
    assert b'"blocks_checked": 0' in verify.stdout  # no block of no root
    assert "Traceback" not in (small_disk / "b.log").read_text()
    left = [p for p in (small_disk / "b" / "blocks").rglob("*") if p.is_file()]
    assert left == [] and list((small_disk / "b" / "tmp").iterdir()) == []


def test_leaf_error_digs_disk_full_out_of_nested_groups():
    full = DiskFull("disk full while writing x")
    group = ExceptionGroup("outer", [ValueError("other"), ExceptionGroup("inner", [P2PCacheError("p"), full])])
    assert leaf_error(group) is full
    assert isinstance(leaf_error(ExceptionGroup("g", [ValueError("v"), P2PCacheError("p")])), P2PCacheError)
    plain = KeyError("k")
    assert leaf_error(plain) is plain
