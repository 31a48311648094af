"""The repo's SQLite index (stdlib sqlite3, WAL): which blocks are stored and trusted and where their bytes
are, which roots exist, the key aliases that resolve to them, pins, last access and per-block reference counts.

A block row means "this block's bytes were verified against its CID, appended to a pack and flushed to disk";
(pack, offset, size, crc) say where they are (see blockstore.py) and `refs` counts the roots that use it. A
format-1 row being migrated has pack NULL (its bytes are still a file under blocks/). A root row with
`complete = 0` is a root some of whose blocks went missing or corrupt.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Iterable, Iterator

from ..content.cid import CID
from ..errors import DiskFull, RepoError
from .blockstore import Location

SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    cid BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    refs INTEGER NOT NULL DEFAULT 0,
    pack INTEGER,
    offset INTEGER,
    crc INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS roots (
    root BLOB PRIMARY KEY,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    name TEXT,
    media_type TEXT,
    added REAL NOT NULL,
    last_access REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    complete INTEGER NOT NULL DEFAULT 1,
    verified INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS roots_lru ON roots(pinned, last_access);
CREATE TABLE IF NOT EXISTS aliases (
    key TEXT NOT NULL,
    root BLOB NOT NULL,
    PRIMARY KEY (key, root)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS aliases_root ON aliases(root);
CREATE TABLE IF NOT EXISTS root_blocks (
    root BLOB NOT NULL,
    cid BLOB NOT NULL,
    PRIMARY KEY (root, cid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS root_blocks_cid ON root_blocks(cid);
CREATE TABLE IF NOT EXISTS nar_infos (
    store_hash TEXT PRIMARY KEY,
    store_path TEXT NOT NULL,
    root BLOB NOT NULL,
    nar_hash BLOB NOT NULL,
    nar_size INTEGER NOT NULL,
    refs TEXT NOT NULL,
    deriver TEXT,
    system TEXT,
    ca TEXT,
    sigs TEXT NOT NULL,
    added REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nar_infos_root ON nar_infos(root);
"""


@dataclass(frozen=True)
class RootInfo:
    root: CID
    kind: str
    size: int
    name: str | None
    media_type: str | None
    added: float
    last_access: float
    pinned: bool
    complete: bool
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class NarInfoRow:
    """What the index keeps of a store path's narinfo: the fields that do not depend on how a NAR is served
    (URL, Compression, FileHash and FileSize are the server's business). References and sigs as in narinfo
    text: base names separated by spaces, signatures one per element."""

    store_hash: str
    store_path: str
    root: CID
    nar_hash: bytes  # sha256
    nar_size: int
    references: tuple[str, ...]
    deriver: str | None
    system: str | None
    ca: str | None
    sigs: tuple[str, ...]
    added: float


@contextmanager
def _disk_full_is_disk_full(path: Path) -> Iterator[None]:
    """SQLite's "database or disk is full" is the same DiskFull a block write raises."""
    try:
        yield
    except sqlite3.OperationalError as e:
        if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(e):
            raise DiskFull(f"disk full while writing {path}: free space or shrink the repo with "
                           "`p2pcache gc --max-size`") from None
        raise


# The connection's page cache. SQLite's default (2 MiB) is smaller than the pages one transaction of a few
# thousand random CIDs dirties in the blocks b-tree (a save's upload commit: ~10,000 rows), so it spilled
# dirty pages into the WAL mid-transaction, the same page again and again; and each look-up of a block
# (`known_blocks`, one per ingested piece) read its path of pages from the file again.
CACHE_KIB = 64 << 10


# A reading thread's own connection caches less: a look-up touches a few pages of the blocks b-tree (its
# inner pages stay cached; leaves come from the OS page cache), and trio runs up to 40 worker threads.
READ_CACHE_KIB = 4 << 10


def _connect(path: Path, cache_kib: int) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 30000")
    db.execute(f"PRAGMA cache_size = -{cache_kib}")
    return db


class Index:
    """The repo's SQLite index. `db` is the writing connection: transactions, and every read made by the
    thread that holds one (it sees its own rows). Any other thread reads through a connection of its own.
    One connection shared by reading threads shares one read transaction: a query started while another
    thread's query was still stepping ran on that query's older snapshot, and missed rows committed in
    between (a streaming restore saw a block arrive, then read it and was told it was missing)."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = path
        self.db = _connect(path, CACHE_KIB)
        self._txn_lock = threading.Lock()
        self._owner: int | None = None  # the thread in a transaction on `db`
        self._readers: dict[int, tuple[threading.Thread, sqlite3.Connection]] = {}
        self._readers_lock = threading.Lock()
        self._closed = False
        if not readonly:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.executescript(SCHEMA)
            self._upgrade_blocks_table()

    def _upgrade_blocks_table(self) -> None:
        """A format-1 index (being migrated) lacks the location columns: add them (NULL = still a file)."""
        cols = {row[1] for row in self.db.execute("PRAGMA table_info(blocks)")}
        for col in ("pack", "offset", "crc"):
            if col not in cols:
                self.db.execute(f"ALTER TABLE blocks ADD COLUMN {col} INTEGER")
        self.db.execute("CREATE INDEX IF NOT EXISTS blocks_pack ON blocks(pack, offset)")
        # roots.verified: 1 once the whole archive/NAR hash was checked in this repo (format 1 had no such flag:
        # its roots are checked again on their first read).
        if "verified" not in {row[1] for row in self.db.execute("PRAGMA table_info(roots)")}:
            self.db.execute("ALTER TABLE roots ADD COLUMN verified INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._readers_lock:
            self._closed = True
            for _, conn in self._readers.values():
                conn.close()
            self._readers.clear()
        self.db.close()

    @property
    def _read(self) -> sqlite3.Connection:
        """The connection this thread reads through (see the class)."""
        me = threading.get_ident()
        if self._owner == me:
            return self.db
        entry = self._readers.get(me)
        if entry is not None and entry[0] is threading.current_thread():
            return entry[1]
        return self._open_reader(me)

    def _open_reader(self, me: int) -> sqlite3.Connection:
        with self._readers_lock:
            if self._closed:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            # Threads come and go (trio's worker threads, a restore's pool): close the connections of
            # those gone, so there are never more than live threads.
            for ident, (thread, conn) in list(self._readers.items()):
                if not thread.is_alive() or ident == me:
                    conn.close()
                    del self._readers[ident]
            conn = _connect(self.path, READ_CACHE_KIB)
            self._readers[me] = (threading.current_thread(), conn)
            return conn

    # -- transactions --------------------------------------------------------------------------
    # The writing connection serves the daemon's trio thread and its worker threads (adds, fetched blocks):
    # transactions hold this lock so two threads never interleave statements of different transactions.
    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[None]:
        """One write transaction. `durable=False`: its commit does not wait for the WAL's fsync (synchronous
        NORMAL for this one): a kill -9 keeps it as any commit, a power cut may take it back, and the next
        durable commit's fsync makes it durable too (the WAL is one file, synced whole, in order). For rows
        that nothing relies on across a restart (an upload's NAR before its narinfo names it)."""
        with self._txn_lock, _disk_full_is_disk_full(self.path):  # SQLITE_FULL: nothing of it was recorded
            if not durable:
                self.db.execute("PRAGMA synchronous = NORMAL")
            try:
                self.db.execute("BEGIN IMMEDIATE")
                self._owner = threading.get_ident()
                try:
                    yield
                except BaseException:
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")
                    raise
                try:
                    self.db.execute("COMMIT")
                except BaseException:
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")
                    raise
            finally:
                self._owner = None
                if not durable:
                    self.db.execute("PRAGMA synchronous = FULL")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """For a one-statement write a caller may make outside a transaction: inside its own (the caller's,
        if this thread holds one). Run bare on `db`, the statement joined whatever transaction another
        thread had open there, and was committed or rolled back with that one."""
        if self._owner == threading.get_ident():
            yield
            return
        with self.transaction():
            yield

    # The explicit form of `transaction()`: begin(), then exactly one of commit() or rollback().
    def begin(self) -> None:
        self._txn_lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._txn_lock.release()
            raise
        self._owner = threading.get_ident()

    def commit(self) -> None:
        with _disk_full_is_disk_full(self.path):  # if this raises the transaction is still ours: the caller rolls back
            self.db.execute("COMMIT")
        self._owner = None
        self._txn_lock.release()

    def rollback(self) -> None:
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        finally:
            self._owner = None
            self._txn_lock.release()

    # -- blocks --------------------------------------------------------------------------------
    def has_block(self, cid: CID) -> bool:
        return self._read.execute("SELECT 1 FROM blocks WHERE cid = ?", (cid.buffer,)).fetchone() is not None

    def known_blocks(self, cids: list[CID]) -> set[bytes]:
        """The subset of `cids` (as binary CIDs) that the index holds; one query per 500."""
        out: set[bytes] = set()
        for i in range(0, len(cids), 500):
            part = [c.buffer for c in cids[i : i + 500]]
            marks = ",".join("?" * len(part))
            out.update(c for (c,) in self._read.execute(f"SELECT cid FROM blocks WHERE cid IN ({marks})", part))
        return out

    def block_size(self, cid: CID) -> int | None:
        row = self._read.execute("SELECT size FROM blocks WHERE cid = ?", (cid.buffer,)).fetchone()
        return row[0] if row else None

    def block_sizes(self, cids: list[CID]) -> dict[bytes, int]:
        """Sizes of those of `cids` the index holds (by binary CID); one query per 500."""
        out: dict[bytes, int] = {}
        for i in range(0, len(cids), 500):
            part = [c.buffer for c in cids[i : i + 500]]
            marks = ",".join("?" * len(part))
            out.update(self._read.execute(f"SELECT cid, size FROM blocks WHERE cid IN ({marks})", part))
        return out

    def put_blocks(self, blocks: Iterable[tuple[CID, Location]]) -> None:
        """Record appended blocks; a block that already has a row keeps it (its bytes are the same)."""
        self.db.executemany(
            "INSERT INTO blocks(cid, size, refs, pack, offset, crc) VALUES (?, ?, 0, ?, ?, ?) "
            "ON CONFLICT(cid) DO NOTHING",
            ((c.buffer, loc.size, loc.pack, loc.offset, loc.crc) for c, loc in blocks),
        )

    def locate(self, cid: CID) -> Location | None:
        row = self._read.execute("SELECT pack, offset, size, crc FROM blocks WHERE cid = ?", (cid.buffer,)).fetchone()
        return Location(*row) if row and row[0] is not None else None

    def locate_many(self, cids: list[CID]) -> dict[bytes, Location]:
        """Locations of those of `cids` the index holds; one query per 500."""
        out: dict[bytes, Location] = {}
        for i in range(0, len(cids), 500):
            part = [c.buffer for c in cids[i : i + 500]]
            marks = ",".join("?" * len(part))
            for c, p, o, n, crc in self._read.execute(
                    f"SELECT cid, pack, offset, size, crc FROM blocks WHERE cid IN ({marks})", part):
                if p is not None:
                    out[c] = Location(p, o, n, crc)
        return out

    def set_locations(self, rows: Iterable[tuple[CID, Location]], from_pack: int | None = None) -> None:
        """Point blocks at new bytes: migrated files (from_pack None: rows still without a pack) or records a
        compaction copied out of `from_pack` (rows that moved or went meanwhile are left alone)."""
        if from_pack is None:
            self.db.executemany("UPDATE blocks SET pack = ?, offset = ?, crc = ? WHERE cid = ? AND pack IS NULL",
                                ((loc.pack, loc.offset, loc.crc, c.buffer) for c, loc in rows))
        else:
            self.db.executemany("UPDATE blocks SET pack = ?, offset = ?, crc = ? WHERE cid = ? AND pack = ?",
                                ((loc.pack, loc.offset, loc.crc, c.buffer, from_pack) for c, loc in rows))

    def blocks_in_pack(self, pack: int) -> list[tuple[CID, Location]]:
        return [(CID(c), Location(pack, o, n, crc)) for c, o, n, crc in self._read.execute(
            "SELECT cid, offset, size, crc FROM blocks WHERE pack = ? ORDER BY offset", (pack,))]

    def iter_locations(self, batch: int = 4096) -> Iterator[list[tuple[CID, Location]]]:
        """Every located block in pack order, in lists of up to `batch` (keyset pagination: bounded memory)."""
        last = (-1, -1)
        while True:
            rows = self._read.execute(
                "SELECT cid, pack, offset, size, crc FROM blocks WHERE pack IS NOT NULL AND (pack, offset) > (?, ?) "
                "ORDER BY pack, offset LIMIT ?", (*last, batch)).fetchall()
            if not rows:
                return
            yield [(CID(c), Location(p, o, n, crc)) for c, p, o, n, crc in rows]
            last = (rows[-1][1], rows[-1][2])

    def pack_usage(self) -> dict[int, int]:
        """Live bytes per pack."""
        return dict(self._read.execute("SELECT pack, SUM(size) FROM blocks WHERE pack IS NOT NULL GROUP BY pack"))

    def committed_end(self, pack: int) -> int:
        """The end of the last indexed record in a pack (0 if none)."""
        row = self._read.execute("SELECT MAX(offset + size) FROM blocks WHERE pack = ?", (pack,)).fetchone()
        return row[0] or 0

    def unmigrated(self, limit: int) -> list[tuple[CID, int]]:
        return [(CID(c), n) for c, n in self._read.execute(
            "SELECT cid, size FROM blocks WHERE pack IS NULL LIMIT ?", (limit,))]

    def count_unmigrated(self) -> int:
        return self._read.execute("SELECT COUNT(*) FROM blocks WHERE pack IS NULL").fetchone()[0]

    def drop_block(self, cid: CID) -> list[CID]:
        """Forget a block; the roots that used it become incomplete. Returns those roots."""
        roots = self.roots_of_block(cid)
        self.db.executemany("UPDATE roots SET complete = 0 WHERE root = ?", ((r.buffer,) for r in roots))
        self.db.execute("DELETE FROM blocks WHERE cid = ?", (cid.buffer,))
        return roots

    def roots_of_block(self, cid: CID) -> list[CID]:
        return [CID(r) for (r,) in self._read.execute("SELECT root FROM root_blocks WHERE cid = ?", (cid.buffer,))]

    def total_block_bytes(self) -> int:
        return self._read.execute("SELECT COALESCE(SUM(size), 0) FROM blocks").fetchone()[0]

    def block_count(self) -> int:
        return self._read.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]

    def all_blocks(self) -> dict[bytes, int]:
        return dict(self._read.execute("SELECT cid, size FROM blocks"))

    def unreferenced_blocks(self) -> list[CID]:
        return [CID(c) for (c,) in self._read.execute("SELECT cid FROM blocks WHERE refs <= 0")]

    # -- roots ---------------------------------------------------------------------------------
    def put_root(
        self,
        root: CID,
        kind: str,
        size: int,
        name: str | None,
        media_type: str | None,
        aliases: Iterable[str],
        block_cids: Iterable[CID],
        verified: bool = False,
    ) -> bool:
        """Record a complete root and its blocks (which must already have rows). True if it was new.
        `verified`: the caller checked the whole archive's hash (an add computed it)."""
        now = time.time()
        existed = self.db.execute("SELECT 1 FROM roots WHERE root = ?", (root.buffer,)).fetchone() is not None
        self.db.execute(
            "INSERT INTO roots(root, kind, size, name, media_type, added, last_access, verified) "
            "VALUES (?,?,?,?,?,?,?,?) "
            "ON CONFLICT(root) DO UPDATE SET complete = 1, last_access = excluded.last_access, "
            "name = COALESCE(roots.name, excluded.name), verified = MAX(roots.verified, excluded.verified)",
            (root.buffer, kind, size, name, media_type, now, now, int(verified)),
        )
        self.db.executemany(
            "INSERT OR IGNORE INTO aliases(key, root) VALUES (?, ?)", ((a, root.buffer) for a in aliases)
        )
        links = [(root.buffer, c.buffer) for c in block_cids]
        if existed:  # healing or re-adding: count only links this root did not have yet
            have = {c for (c,) in self.db.execute("SELECT cid FROM root_blocks WHERE root = ?", (root.buffer,))}
            links = [link for link in links if link[1] not in have]
        self.db.executemany("INSERT OR IGNORE INTO root_blocks(root, cid) VALUES (?, ?)", links)
        # A block the caller found stored may have been collected since by a gc in another thread (it was
        # unreferenced until this root): then the root is not whole, and recording it would be a lie.
        if existed:
            self.db.executemany("UPDATE blocks SET refs = refs + 1 WHERE cid = ?", ((c,) for _, c in links))
            lost = self.db.execute("SELECT COUNT(*) FROM root_blocks rb LEFT JOIN blocks b ON b.cid = rb.cid "
                                   "WHERE rb.root = ? AND b.cid IS NULL", (root.buffer,)).fetchone()[0]
        else:  # every link of the root is new: one statement counts them all, and says how many have a block
            found = self.db.execute("UPDATE blocks SET refs = refs + 1 WHERE cid IN "
                                    "(SELECT cid FROM root_blocks WHERE root = ?)", (root.buffer,)).rowcount
            lost = self.db.execute("SELECT COUNT(*) FROM root_blocks WHERE root = ?",
                                   (root.buffer,)).fetchone()[0] - found
        if lost:
            raise RepoError(f"{lost} blocks of {root} were removed by a gc running at the same time; "
                            "add or fetch it again")
        return not existed

    def add_aliases(self, root: CID, aliases: Iterable[str]) -> None:
        """More names for a recorded root (lock-file hashes verified against its bytes)."""
        self.db.executemany(
            "INSERT OR IGNORE INTO aliases(key, root) VALUES (?, ?)", ((a, root.buffer) for a in aliases)
        )

    def remove_root(self, root: CID) -> None:
        self.db.execute(
            "UPDATE blocks SET refs = refs - 1 WHERE cid IN (SELECT cid FROM root_blocks WHERE root = ?)",
            (root.buffer,),
        )
        self.db.execute("DELETE FROM root_blocks WHERE root = ?", (root.buffer,))
        self.db.execute("DELETE FROM aliases WHERE root = ?", (root.buffer,))
        self.db.execute("DELETE FROM nar_infos WHERE root = ?", (root.buffer,))
        self.db.execute("DELETE FROM roots WHERE root = ?", (root.buffer,))

    def _root_from_row(self, row: tuple) -> RootInfo:
        root = CID(row[0])
        aliases = tuple(a for (a,) in self._read.execute("SELECT key FROM aliases WHERE root = ? ORDER BY key", (row[0],)))
        return RootInfo(root, row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), bool(row[8]), aliases)

    _ROOT_COLS = "root, kind, size, name, media_type, added, last_access, pinned, complete"

    def get_root(self, root: CID) -> RootInfo | None:
        row = self._read.execute(f"SELECT {self._ROOT_COLS} FROM roots WHERE root = ?", (root.buffer,)).fetchone()
        return self._root_from_row(row) if row else None

    def name_root(self, root: CID, name: str | None, aliases: Iterable[str], verified: bool = False) -> None:
        """Add a name (if it has none) and aliases to a root recorded complete already, whose block references
        stand: what `put_root` does for it, without re-reading its links (one query per block link). RepoError
        if it is not complete any more (a gc evicted it, or `verify --repair` found a block of it corrupt)."""
        if not self.db.execute("UPDATE roots SET last_access = ?, name = COALESCE(name, ?), "
                               "verified = MAX(verified, ?) WHERE root = ? AND complete = 1",
                               (time.time(), name, int(verified), root.buffer)).rowcount:
            raise RepoError(f"{root} is not held whole here any more (a gc or repair removed it meanwhile); "
                            "add or fetch it again")
        self.db.executemany(
            "INSERT OR IGNORE INTO aliases(key, root) VALUES (?, ?)", ((a, root.buffer) for a in aliases)
        )

    def resolve_alias(self, alias: str) -> CID | None:
        row = self._read.execute(
            "SELECT a.root FROM aliases a JOIN roots r ON r.root = a.root WHERE a.key = ? "
            "ORDER BY r.complete DESC, r.last_access DESC LIMIT 1",
            (alias,),
        ).fetchone()
        return CID(row[0]) if row else None

    def list_roots(self) -> list[RootInfo]:
        rows = self._read.execute(f"SELECT {self._ROOT_COLS} FROM roots ORDER BY added, root").fetchall()
        return [self._root_from_row(r) for r in rows]

    def lru_unpinned(self) -> list[CID]:
        return [CID(r) for (r,) in self._read.execute("SELECT root FROM roots WHERE pinned = 0 ORDER BY last_access, root")]

    def set_pinned(self, root: CID, pinned: bool) -> None:
        with self._writing():
            self.db.execute("UPDATE roots SET pinned = ? WHERE root = ?", (int(pinned), root.buffer))

    def known_digest(self, root: CID, algo: str) -> bytes | None:
        """A root's whole-archive digest under `algo` if recorded (its `algo:<hex>` alias)."""
        row = self._read.execute("SELECT key FROM aliases WHERE root = ? AND key >= ? AND key < ? LIMIT 1",
                              (root.buffer, f"{algo}:", f"{algo};")).fetchone()
        return bytes.fromhex(row[0].split(":", 1)[1]) if row else None

    def archives_without(self, algo: str) -> list[CID]:
        """Complete archive roots with no `algo:` alias yet (their hash is computed when first asked for)."""
        return [CID(r) for (r,) in self._read.execute(
            "SELECT root FROM roots WHERE kind = 'archive' AND complete = 1 AND root NOT IN "
            "(SELECT root FROM aliases WHERE key >= ? AND key < ?) ORDER BY added", (f"{algo}:", f"{algo};"))]

    def add_alias(self, root: CID, alias: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO aliases(key, root) VALUES (?, ?)", (alias, root.buffer))

    def is_verified(self, root: CID) -> bool:
        row = self._read.execute("SELECT verified FROM roots WHERE root = ?", (root.buffer,)).fetchone()
        return bool(row and row[0])

    def set_verified(self, root: CID) -> None:
        with self._writing():
            self.db.execute("UPDATE roots SET verified = 1 WHERE root = ?", (root.buffer,))

    def touch(self, root: CID, at: float | None = None) -> None:
        with self._writing():
            self.db.execute("UPDATE roots SET last_access = ? WHERE root = ?",
                            (time.time() if at is None else at, root.buffer))

    def root_blocks(self, root: CID) -> list[CID]:
        return [CID(c) for (c,) in self._read.execute("SELECT cid FROM root_blocks WHERE root = ?", (root.buffer,))]

    def roots_missing_blocks(self) -> list[CID]:
        """Complete roots with a block the index does not hold (should be none)."""
        return [
            CID(r)
            for (r,) in self._read.execute(
                "SELECT DISTINCT rb.root FROM root_blocks rb JOIN roots r ON r.root = rb.root "
                "LEFT JOIN blocks b ON b.cid = rb.cid WHERE b.cid IS NULL AND r.complete = 1"
            )
        ]

    def mark_incomplete(self, roots: Iterable[CID]) -> None:
        self.db.executemany("UPDATE roots SET complete = 0 WHERE root = ?", ((r.buffer,) for r in roots))

    def check_refcounts(self) -> list[tuple[CID, int, int]]:
        """Blocks whose stored refcount disagrees with root_blocks: (cid, stored, actual)."""
        rows = self._read.execute(
            "SELECT b.cid, b.refs, COUNT(rb.root) FROM blocks b LEFT JOIN root_blocks rb ON rb.cid = b.cid "
            "GROUP BY b.cid HAVING b.refs != COUNT(rb.root)"
        ).fetchall()
        return [(CID(c), s, a) for c, s, a in rows]

    def fix_refcounts(self) -> None:
        self.db.execute(
            "UPDATE blocks SET refs = (SELECT COUNT(*) FROM root_blocks rb WHERE rb.cid = blocks.cid)"
        )

    # -- narinfo of NAR roots ----------------------------------------------------------------------
    def put_narinfo(self, row: NarInfoRow) -> None:
        """Record (or replace) the narinfo of a store path; its root must be recorded in the same transaction."""
        self.db.execute(
            "INSERT OR REPLACE INTO nar_infos(store_hash, store_path, root, nar_hash, nar_size, refs, deriver, "
            "system, ca, sigs, added) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (row.store_hash, row.store_path, row.root.buffer, row.nar_hash, row.nar_size, " ".join(row.references),
             row.deriver, row.system, row.ca, "\n".join(row.sigs), row.added),
        )

    def get_narinfo(self, store_hash: str) -> NarInfoRow | None:
        try:
            row = self._read.execute(
                "SELECT store_hash, store_path, root, nar_hash, nar_size, refs, deriver, system, ca, sigs, added "
                "FROM nar_infos WHERE store_hash = ?", (store_hash,)).fetchone()
        except sqlite3.OperationalError:  # an index opened read-only before the table existed
            return None
        if row is None:
            return None
        return NarInfoRow(row[0], row[1], CID(row[2]), row[3], row[4], tuple(row[5].split()), row[6], row[7],
                          row[8], tuple(s for s in row[9].split("\n") if s), row[10])
