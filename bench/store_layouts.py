"""Which on-disk layout for many small blocks: measured on real FastCDC chunks (48 KiB average).

Three layouts, each written the way a repo would use it (one durability barrier and one index transaction per
batch of ~64 MiB, as `Repo.add_stream` does):

- files:  one file per block (format 1: temp file + rename into `blocks/XY/<cid>`, syncfs per batch);
- packs:  append-only pack files (records appended with one write() per batch, fdatasync per batch), the
          SQLite index maps CID -> (pack, offset, length), like git/restic packs (format 2);
- sqlite: the blocks as BLOBs in the index database itself (WAL, synchronous=FULL, one transaction per batch).

LMDB (py-lmdb) was the third candidate in issue 10, but no py-lmdb wheel is installable on these machines.

Operations: write everything; random read of 10,000 blocks (page cache warm: dropping caches on a shared
machine would disturb others); sequential read of everything in write order; delete a random half and reclaim
the space (files: unlink; packs: drop rows, then rewrite packs whose live share fell below 75%; sqlite:
DELETE + VACUUM), with bytes on disk after. The corpus is real files of this machine (/usr/lib, /usr/share)
concatenated, so chunk sizes follow the real distribution.

Prints a table on stderr and JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pcache.content.chunking import DEFAULT_PARAMS, Chunker  # noqa: E402
from p2pcache.content.cid import CID, RAW  # noqa: E402
from p2pcache.store.blockstore import syncfs  # noqa: E402

MiB = 1 << 20
BATCH = 64 * MiB


def emit(metric: str, value: float, unit: str, better: str, **extra) -> None:
    print(json.dumps({"bench": "store_layouts", "metric": metric, "value": round(value, 4), "unit": unit,
                      "better": better, **extra}), flush=True)


def corpus(size: int) -> list[bytes]:
    """`size` bytes of real files from this machine, chunked with the project's chunker."""
    chunker = Chunker(DEFAULT_PARAMS)
    chunks: list[bytes] = []
    have = 0
    for top in ("/usr/lib", "/usr/share", "/usr/bin"):
        for dirpath, _, names in os.walk(top):
            for n in sorted(names):
                p = os.path.join(dirpath, n)
                try:
                    if os.path.islink(p) or not os.path.isfile(p):
                        continue
                    with open(p, "rb") as f:
                        data = f.read(64 * MiB)
                except OSError:
                    continue
                for c in chunker.feed(data):
                    chunks.append(bytes(c))
                have += len(data)
                if have >= size:
                    chunks.extend(bytes(c) for c in chunker.finish())
                    return chunks
    chunks.extend(bytes(c) for c in chunker.finish())
    return chunks


def du(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                total += os.stat(os.path.join(dirpath, n)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def batches(blocks):
    batch, size = [], 0
    for b in blocks:
        batch.append(b)
        size += len(b[1])
        if size >= BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class Files:
    name = "files"

    def __init__(self, root: Path):
        self.root = root
        (root / "tmp").mkdir(parents=True)
        alphabet = "abcdefghijklmnopqrstuvwxyz234567"
        for a in alphabet:
            for b in alphabet:
                (root / "blocks" / (a + b)).mkdir(parents=True)
        self.n = 0

    def path(self, cid: CID) -> str:
        s = str(cid)
        return f"{self.root}/blocks/{s[-3:-1]}/{s}"

    def write(self, blocks):
        for batch in batches(blocks):
            for cid, data in batch:
                tmp = f"{self.root}/tmp/{self.n}.part"
                self.n += 1
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, data)
                os.close(fd)
                os.rename(tmp, self.path(cid))
            fd = os.open(self.root, os.O_RDONLY)
            syncfs(fd)
            os.close(fd)

    def read(self, cid: CID) -> bytes:
        with open(self.path(cid), "rb", buffering=0) as f:
            return f.readall()

    def delete(self, cids):
        for c in cids:
            os.unlink(self.path(c))

    def close(self):
        pass


class Packs:
    name = "packs"
    PACK_MAX = 256 * MiB

    def __init__(self, root: Path):
        self.root = root
        (root / "packs").mkdir(parents=True)
        self.db = sqlite3.connect(root / "index.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("CREATE TABLE blocks (cid BLOB PRIMARY KEY, pack INTEGER, off INTEGER, len INTEGER) "
                        "WITHOUT ROWID")
        self.fds: dict[int, int] = {}
        self.pack = 0
        self.end = 0

    def fd(self, pack: int) -> int:
        fd = self.fds.get(pack)
        if fd is None:
            fd = self.fds[pack] = os.open(self.root / "packs" / f"{pack}.pack", os.O_RDWR | os.O_CREAT, 0o644)
        return fd

    def _append(self, batch, rows):
        parts = []
        for cid, data in batch:
            header = len(data).to_bytes(4, "big") + cid.buffer
            parts.append(header)
            parts.append(data)
            rows.append((cid.buffer, self.pack, self.end + len(header), len(data)))
            self.end += len(header) + len(data)
        os.write(self.fd(self.pack), b"".join(parts))

    def write(self, blocks):
        for batch in batches(blocks):
            if self.end >= self.PACK_MAX:
                self.pack, self.end = self.pack + 1, 0
            rows: list = []
            os.lseek(self.fd(self.pack), self.end, os.SEEK_SET)
            self._append(batch, rows)
            os.fdatasync(self.fd(self.pack))
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO blocks VALUES (?,?,?,?)", rows)
            self.db.execute("COMMIT")

    def read(self, cid: CID) -> bytes:
        pack, off, n = self.db.execute("SELECT pack, off, len FROM blocks WHERE cid = ?", (cid.buffer,)).fetchone()
        return os.pread(self.fd(pack), n, off)

    def delete(self, cids):
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM blocks WHERE cid = ?", ((c.buffer,) for c in cids))
        self.db.execute("COMMIT")
        # Reclaim: rewrite every pack whose live share is below 75% into a new pack, then drop the old file.
        for pack in sorted(self.fds):
            live = self.db.execute("SELECT cid, off, len FROM blocks WHERE pack = ? ORDER BY off", (pack,)).fetchall()
            size = os.fstat(self.fd(pack)).st_size
            if sum(n for _, _, n in live) >= 0.75 * size:
                continue
            self.pack, self.end = max(self.fds) + 1, 0
            rows: list = []
            batch = []
            for c, off, n in live:
                batch.append((CID(c), os.pread(self.fd(pack), n, off)))
                if len(batch) >= 1024:
                    self._append(batch, rows)
                    batch = []
            self._append(batch, rows)
            os.fdatasync(self.fd(self.pack))
            self.db.execute("BEGIN")
            self.db.executemany("UPDATE blocks SET pack = ?, off = ?, len = ? WHERE cid = ?",
                                ((p, o, n, c) for c, p, o, n in rows))
            self.db.execute("COMMIT")
            os.close(self.fds.pop(pack))
            os.unlink(self.root / "packs" / f"{pack}.pack")

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.db.close()


class Blobs:
    name = "sqlite"

    def __init__(self, root: Path):
        root.mkdir(parents=True)
        self.db = sqlite3.connect(root / "index.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("CREATE TABLE blocks (cid BLOB PRIMARY KEY, data BLOB) WITHOUT ROWID")

    def write(self, blocks):
        for batch in batches(blocks):
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO blocks VALUES (?, ?)", ((c.buffer, d) for c, d in batch))
            self.db.execute("COMMIT")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def read(self, cid: CID) -> bytes:
        return self.db.execute("SELECT data FROM blocks WHERE cid = ?", (cid.buffer,)).fetchone()[0]

    def delete(self, cids):
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM blocks WHERE cid = ?", ((c.buffer,) for c in cids))
        self.db.execute("COMMIT")
        self.db.execute("VACUUM")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self):
        self.db.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="MiB of corpus (default 1024)")
    ap.add_argument("--reads", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="256 MiB")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.quick:
        args.size = 256
    chunks = corpus(args.size * MiB)
    blocks = [(CID.for_block(RAW, c), c) for c in chunks]
    blocks = list({c: (c, d) for c, d in blocks}.values())  # a store holds each block once
    total = sum(len(d) for _, d in blocks)
    print(f"corpus: {total / MiB:.0f} MiB of real files, {len(blocks)} distinct FastCDC chunks, "
          f"mean {total / len(blocks) / 1024:.1f} KiB", file=sys.stderr)
    rng = random.Random(1)
    sample = [blocks[rng.randrange(len(blocks))][0] for _ in range(args.reads)]
    doomed = [c for c, _ in blocks if rng.random() < 0.5]
    work = Path(tempfile.mkdtemp(prefix="p2pcache-layouts-", dir=args.workdir))
    rows = []
    try:
        for cls in (Files, Packs, Blobs):
            root = work / cls.name
            store = cls(root)
            t = time.perf_counter()
            store.write(blocks)
            w = time.perf_counter() - t
            t = time.perf_counter()
            for c in sample:
                store.read(c)
            rr = time.perf_counter() - t
            t = time.perf_counter()
            for c, _ in blocks:
                store.read(c)
            sr = time.perf_counter() - t
            disk_full = du(root)
            t = time.perf_counter()
            store.delete(doomed)
            d = time.perf_counter() - t
            disk_after = du(root)
            store.close()
            shutil.rmtree(root)
            rows.append((cls.name, w, rr, sr, d, disk_full, disk_after))
            for metric, value, unit, better in (
                ("write_throughput", total / w / 1e6, "MB/s", "higher"),
                ("random_read", args.reads / rr, "blocks/s", "higher"),
                ("sequential_read_throughput", total / sr / 1e6, "MB/s", "higher"),
                ("delete_half_and_reclaim", d, "s", "lower"),
                ("disk_after_reclaim", disk_after / MiB, "MiB", "lower"),
            ):
                emit(f"{cls.name}_{metric}", value, unit, better, size_mib=args.size)
        base = rows[0]
        print(f"{'layout':8} {'write MB/s':>11} {'rand rd blk/s':>14} {'seq rd MB/s':>12} {'del+reclaim s':>14} "
              f"{'disk MiB':>9} {'after':>7}", file=sys.stderr)
        for name, w, rr, sr, d, full, after in rows:
            print(f"{name:8} {total / w / 1e6:11.0f} {args.reads / rr:14.0f} {total / sr / 1e6:12.0f} {d:14.2f} "
                  f"{full / MiB:9.0f} {after / MiB:7.0f}", file=sys.stderr)
        for name, w, rr, sr, d, _, _ in rows[1:]:
            emit(f"{name}_write_vs_files", base[1] / w, "ratio", "higher")
            emit(f"{name}_random_read_vs_files", base[2] / rr, "ratio", "higher")
            emit(f"{name}_sequential_read_vs_files", base[3] / sr, "ratio", "higher")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
