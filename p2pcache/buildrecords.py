"""The build cache's record store, `REPO/buildcache.sqlite`: the signed key records this node holds and,
per set of saved paths on this machine, the last tree saved or restored there (the stat cache's pointer).

Plain SQLite: the `cache save` command reads the stat cache's pointer from here without loading the
service (`p2pcache.buildcache`, which re-exports `RecordStore`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from .content.cacherecord import CacheRecord, namespace_of
from .content.cid import CID
from .errors import MalformedBlock

__all__ = ["RecordStore"]

log = logging.getLogger("p2pcache.buildcache")


SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT NOT NULL,
    writer TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    root BLOB NOT NULL,
    data BLOB NOT NULL,
    own INTEGER NOT NULL,
    PRIMARY KEY (key, writer, time_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_root ON records(root);
CREATE TABLE IF NOT EXISTS saves (
    paths_id TEXT PRIMARY KEY,
    root BLOB NOT NULL,
    scan_time REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scans (
    paths_id TEXT PRIMARY KEY,
    root BLOB NOT NULL,
    digest BLOB NOT NULL
) WITHOUT ROWID;
"""


class RecordStore:
    """Signed key records this node holds (its own and those it restored), and, per set of saved paths on
    this machine, the last tree saved or restored there (the stat cache of the next save)."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30, isolation_level=None,
                                      check_same_thread=False)
        else:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def put(self, record: CacheRecord, own: bool) -> None:
        with self._lock:
            self.db.execute("INSERT OR IGNORE INTO records(key, writer, time_ms, root, data, own) VALUES (?,?,?,?,?,?)",
                            (record.key, record.writer_id, record.time_ms, record.root.buffer, record.encode(), int(own)))

    def matching(self, key: str, prefix: bool, limit: int = 64) -> list[CacheRecord]:
        """Records for `key` (or keys starting with it), newest first."""
        with self._lock:
            rows = self._matching_rows(key, prefix, limit)
        out = []
        for (data,) in rows:
            try:
                out.append(CacheRecord.decode(data))
            except MalformedBlock as e:  # our own table: should not happen
                log.warning("build cache: dropping an unreadable stored record: %s", e)
        return out

    def _matching_rows(self, key: str, prefix: bool, limit: int) -> list:
        if prefix:
            rows = self.db.execute("SELECT data FROM records WHERE substr(key, 1, ?) = ? ORDER BY time_ms DESC LIMIT ?",
                                   (len(key), key, limit))
        else:
            rows = self.db.execute("SELECT data FROM records WHERE key = ? ORDER BY time_ms DESC LIMIT ?", (key, limit))
        return rows.fetchall()

    def roots(self) -> list[tuple[CID, str]]:
        """(root, namespace) of every record held."""
        with self._lock:
            rows = self.db.execute("SELECT DISTINCT root, key FROM records").fetchall()
        return [(CID(r), namespace_of(k)) for r, k in rows]

    def all_records(self) -> list[bytes]:
        with self._lock:
            return [d for (d,) in self.db.execute("SELECT data FROM records ORDER BY key, time_ms DESC")]

    def drop_root(self, root: CID) -> int:
        with self._lock:
            return self.db.execute("DELETE FROM records WHERE root = ?", (root.buffer,)).rowcount

    def last_save(self, paths_id: str) -> tuple[CID, float, bytes | None] | None:
        """(root, scan time, scan digest) of the last tree saved or restored at these paths; the digest
        (`buildtree.PathScan.digest` of the save's walk) only when a save recorded one for that root."""
        try:
            with self._lock:
                row = self.db.execute("SELECT root, scan_time FROM saves WHERE paths_id = ?", (paths_id,)).fetchone()
                if row is None:
                    return None
                try:
                    scan = self.db.execute("SELECT root, digest FROM scans WHERE paths_id = ?", (paths_id,)).fetchone()
                except sqlite3.OperationalError:  # a store from before scan digests, opened read-only
                    scan = None
        except sqlite3.OperationalError:
            return None
        digest = scan[1] if scan is not None and scan[0] == row[0] else None
        return CID(row[0]), row[1], digest

    def set_save(self, paths_id: str, root: CID, scan_time: float, digest: bytes | None = None) -> None:
        """Record the tree now at these paths; `digest` if a save's own walk produced it (a restore has none)."""
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO saves(paths_id, root, scan_time) VALUES (?,?,?)",
                            (paths_id, root.buffer, scan_time))
            if digest is not None:
                self.db.execute("INSERT OR REPLACE INTO scans(paths_id, root, digest) VALUES (?,?,?)",
                                (paths_id, root.buffer, digest))
            else:
                self.db.execute("DELETE FROM scans WHERE paths_id = ?", (paths_id,))

