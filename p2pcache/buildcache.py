"""The build cache service: cache keys as signed names for tree roots, found through the swarm, trusted
only from the writers allowed for that key; saving, restoring by exact key or prefix, eviction.

Owns the key records this node holds (`RecordStore`, `REPO/buildcache.sqlite`), the trust policy
(`TrustPolicy`: which peer IDs may write which key patterns), the lookup that picks the newest trusted
record for a key or the first of several prefixes that matches, the commit of a saved tree (check every
block is in the repo, register the root, sign and announce the record), and idle expiry. It must not read
or write a path a caller names: a save reaches it as blocks (through `missing`/`put_blocks`) plus a root,
and a restore leaves it as a root the caller then reads from the repo (`p2pcache.buildtree` does both
ends). It has no HTTP in it and does not import the node: the node hands it a `Swarm`.

Why the lookup is correct under churn and concurrent saves (see also README, "Build-directory cache"):
a record is self-certifying (signed by its writer, checked against the policy by every reader), so it
does not matter which node relays it. Every node that holds a record's tree — the writer, and every node
that restored it — keeps the record, serves it on `/p2pcache/cache-records/1.0.0`, and provides the
namespace's DHT key, so a record stays findable while any holder of its blocks is up. A reader asks the
providers of the namespace key and its connected peers at once and takes the union of what they return:
records only ever accumulate (a save never edits another record), so answers from different peers
cannot contradict each other, only be more or less complete, and the newest trusted record of the union
wins by one total order (time, then root, then writer) that every node computes alike. Two concurrent
saves of one key both produce records; every reader then picks the same one.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Awaitable, Protocol, Sequence

import trio

from .content.cacherecord import CacheRecord, check_cache_key, namespace_of
from .content.cid import CID
from .content.treemanifest import TreeManifest, iter_blocks
from .errors import CorruptData, InvalidInput, MalformedBlock, NotFound
from .store.index import RootInfo



def cache_ns_alias(namespace: str) -> str:
    from .routing.keys import cache_ns_alias as alias  # imported late: the CLI must not pay for libp2p

    return alias(namespace)


__all__ = ["BuildCache", "BuildCacheConfig", "RecordStore", "RepoBlockSink", "Swarm", "TrustPolicy", "WriterRule",
           "register_tree"]

log = logging.getLogger(__name__)

TREE_KIND = "tree"
TREE_MEDIA_TYPE = "application/x-p2pcache-tree"
DAY = 86400.0


# -- configuration and trust ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriterRule:
    pattern: str  # fnmatch pattern over the whole key ("*" also matches "/")
    writers: tuple[str, ...]  # peer IDs (base58), or "*" for anyone in the swarm


@dataclass
class BuildCacheConfig:
    idle_expiry: float = 7 * DAY  # a tree nobody saved or restored for this long is evicted (unless pinned)
    record_max_age: float = 30 * DAY  # records older than this are stale: ignored, and a new save may reuse the key
    max_clock_skew: float = 300.0  # records dated further ahead than this are ignored
    lookup_timeout: float = 5.0
    writers: list[WriterRule] = field(default_factory=lambda: [WriterRule("*", ("*",))])

    @classmethod
    def from_toml(cls, values: dict, where: str) -> "BuildCacheConfig":
        cfg = cls()
        for key, value in values.items():
            if key in ("idle_expiry_days", "record_max_age_days") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and value > 0:
                setattr(cfg, key.removesuffix("_days"), value * DAY)
            elif key == "writers" and isinstance(value, list):
                rules = []
                for rule in value:
                    if not (isinstance(rule, dict) and set(rule) == {"keys", "peers"} and isinstance(rule["keys"], str)
                            and isinstance(rule["peers"], list) and all(isinstance(p, str) for p in rule["peers"])):
                        raise InvalidInput(f"{where}: each buildcache.writers rule must be "
                                           '{keys = "main/*", peers = ["12D3Koo…", …] or ["*"]}')
                    rules.append(WriterRule(rule["keys"], tuple(rule["peers"])))
                cfg.writers = rules
            else:
                raise InvalidInput(f"{where}: unknown or mistyped setting buildcache.{key}")
        return cfg


class TrustPolicy:
    """Who may write which keys: the first rule whose pattern matches the key decides; no rule, nobody.

    With the default single rule `*` → `*`, any node in the (private, swarm-keyed) swarm may write any
    key. A team protects its default branch with, in this order: `main/*` → [the protected runners' peer
    IDs], `pr/*` → ["*"]; PR builds then cannot poison `main/…`, since their records fail this check on
    every reader."""

    def __init__(self, rules: list[WriterRule]):
        self.rules = list(rules)

    def check(self, writer_id: str, key: str) -> str | None:
        """None if `writer_id` may write `key`, else why not."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(key, rule.pattern):
                if "*" in rule.writers or writer_id in rule.writers:
                    return None
                return f"writer {writer_id} is not trusted for keys {rule.pattern!r}"
        return f"no writer rule covers key {key[:60]!r}"


# -- the record store ---------------------------------------------------------------------------------------


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

    def last_save(self, paths_id: str) -> tuple[CID, float] | None:
        try:
            with self._lock:
                row = self.db.execute("SELECT root, scan_time FROM saves WHERE paths_id = ?", (paths_id,)).fetchone()
        except sqlite3.OperationalError:
            return None
        return (CID(row[0]), row[1]) if row else None

    def set_save(self, paths_id: str, root: CID, scan_time: float) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO saves(paths_id, root, scan_time) VALUES (?,?,?)",
                            (paths_id, root.buffer, scan_time))


# -- repo side ----------------------------------------------------------------------------------------------


def put_blocks_parallel(repo: Any, blocks: list[tuple[CID, bytes]], pool: Any) -> int:
    """Store blocks the repo lacks, each re-hashed against its CID on `pool`'s threads (hashing releases the
    GIL), then appended to the repo's pack in one write and recorded in one index commit. Returns the
    bytes written."""
    known = repo.index.known_blocks([c for c, _ in blocks])
    todo = [(c, d) for c, d in blocks if c.buffer not in known]

    def one(item: tuple[CID, bytes]) -> None:
        cid, data = item
        if not cid.verify(data):
            raise CorruptData(f"block {cid} does not match its CID; refusing it")

    if todo:
        list(pool.map(one, todo))
        repo.packs.append(todo)
    repo.commit_blocks([(c, len(d)) for c, d in blocks])
    return sum(len(d) for _, d in todo)


class RepoBlockSink:
    """A save's blocks straight into a writable repo (no daemon running): each re-hashed on the way in."""

    def __init__(self, repo: Any):
        self.repo = repo
        self.pool: Any = None

    def missing(self, cids: list[CID]) -> set[CID]:
        known = self.repo.index.known_blocks(cids)
        return {c for c in cids if c.buffer not in known}

    def put(self, blocks: list[tuple[CID, bytes]]) -> None:
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cache-write")
        put_blocks_parallel(self.repo, blocks, self.pool)

    def close(self) -> None:
        """Release the writer threads (a later `put` starts new ones)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


def register_tree(repo: Any, root: CID, name: str | None) -> RootInfo:
    """Claim a tree whose blocks are all in the repo: walk it, check every block is there with the size
    its parent says, record the root (kind 'tree') and its block references in one transaction."""
    info = repo.index.get_root(root)
    if info is not None and info.complete:
        repo.index.touch(root)
        return info
    try:
        manifest = TreeManifest.decode(repo.load_block(root))
    except NotFound:
        raise NotFound(f"tree {root} is not in the repo; upload its blocks first") from None
    cids: dict[CID, None] = {root: None}
    for cid, size in iter_blocks(manifest, repo.load_block):
        have = repo.index.block_size(cid)
        if have is None:
            raise NotFound(f"tree {root} is missing block {cid}; save again")
        if have != size:
            raise CorruptData(f"block {cid} has {have} bytes, tree {root} says {size}")
        cids[cid] = None
    with repo.index.transaction():
        repo.index.put_root(root, TREE_KIND, manifest.size, name, TREE_MEDIA_TYPE, (), cids)
    return repo.root_info(root)


# -- the swarm as the service sees it -----------------------------------------------------------------------


class Swarm(Protocol):
    def record_peers(self, namespace: str) -> Awaitable[list[Any]]: ...
    def ask_records(self, peer: Any, key: str, prefix: bool) -> Awaitable[list[CacheRecord]]: ...
    def fetch_tree(self, root: CID, peers: list[Any]) -> Awaitable[int]: ...
    def announce(self, root: CID, aliases: list[str]) -> None: ...
    def withdraw(self, root: CID) -> None: ...


class Signer(Protocol):
    def sign(self, data: bytes) -> bytes: ...


# -- the service --------------------------------------------------------------------------------------------


@dataclass
class BuildCacheStats:
    saves: int = 0
    restores_exact: int = 0
    restores_prefix: int = 0
    misses: int = 0
    records_ignored: int = 0
    trees_fetched: int = 0
    bytes_fetched: int = 0
    expired: int = 0


class BuildCache:
    def __init__(self, repo: Any, store: RecordStore, signer: Signer, writer: bytes, config: BuildCacheConfig,
                 swarm: Swarm | None = None, clock=time.time):
        self.repo = repo
        self.store = store
        self.signer = signer
        self.writer = writer  # our libp2p public key (protobuf encoding)
        self.config = config
        self.policy = TrustPolicy(config.writers)
        self.swarm = swarm
        self.clock = clock
        self.stats = BuildCacheStats()

    def announce_held(self) -> None:
        """At start: announce every tree we hold a record of, under its CID and its namespace."""
        if self.swarm is None:
            return
        for root, ns in self.store.roots():
            info = self.repo.index.get_root(root)
            if info is not None and info.complete:
                self.swarm.announce(root, [cache_ns_alias(ns)])

    # -- trust ----------------------------------------------------------------------------------------
    def _acceptable(self, record: CacheRecord, source: str) -> bool:
        now = self.clock()
        why = self.policy.check(record.writer_id, record.key)
        if why is None and record.time_ms / 1000 > now + self.config.max_clock_skew:
            why = "dated in the future"
        if why is None and record.time_ms / 1000 < now - self.config.record_max_age:
            why = f"stale (older than {self.config.record_max_age / DAY:g} days)"
        if why is not None:
            self.stats.records_ignored += 1
            log.warning("build cache: ignoring the record for %r from %s: %s", record.key[:80], source, why)
            return False
        return True

    async def find(self, key: str, prefix: bool) -> list[tuple[CacheRecord, list[Any]]]:
        """Trusted records for `key` (or keys starting with it) from this node and the swarm, newest
        first, each with the peers that sent it."""
        found: dict[bytes, tuple[CacheRecord, list[Any]]] = {}
        for r in self.store.matching(key, prefix):
            if self._acceptable(r, "the local store"):
                found[r.sig] = (r, [])
        if self.swarm is not None:
            peers = await self.swarm.record_peers(namespace_of(key))

            async def ask(peer: Any) -> None:
                try:
                    got = await self.swarm.ask_records(peer, key, prefix)  # type: ignore[union-attr]
                except Exception as e:
                    log.info("build cache: asking %s for %r failed: %s", peer, key[:80], e)
                    return
                for r in got:
                    if r.sig in found:
                        found[r.sig][1].append(peer)
                    elif self._acceptable(r, f"peer {peer}"):
                        found[r.sig] = (r, [peer])

            with trio.move_on_after(self.config.lookup_timeout):
                async with trio.open_nursery() as nursery:
                    for peer in peers:
                        nursery.start_soon(ask, peer)
        return sorted(found.values(), key=lambda rp: rp[0].order(), reverse=True)

    # -- restore --------------------------------------------------------------------------------------
    async def lookup(self, key: str, restore_keys: Sequence[str] = (), lookup_only: bool = False,
                     paths_id: str | None = None) -> dict:
        """The tree for `key`, else for the newest key starting with the first of `restore_keys` that
        matches any; made local unless `lookup_only`. `{"match": "exact"|"prefix"|"none", ...}`."""
        check_cache_key(key)
        for p in restore_keys:
            check_cache_key(p, "restore key")
        groups = [("exact", None, key, False)] + [("prefix", p, p, True) for p in restore_keys]
        for match, matched_prefix, text, prefix in groups:
            records = await self.find(text, prefix)
            if records and lookup_only:
                return {"match": match, "requested": key, "prefix": matched_prefix, **records[0][0].to_json()}
            # The newest record whose tree can be had wins; one whose tree is gone everywhere is skipped.
            for record, peers in records:
                try:
                    fetched = await self._make_local(record, peers)
                except NotFound as e:
                    log.warning("build cache: the tree of %r (%s) cannot be had: %s", record.key[:80], record.root, e)
                    continue
                if match == "exact":
                    self.stats.restores_exact += 1
                else:
                    self.stats.restores_prefix += 1
                if paths_id:
                    self.store.set_save(paths_id, record.root, self.clock())
                return {"match": match, "requested": key, "prefix": matched_prefix, **record.to_json(),
                        "bytes_fetched": fetched}
        self.stats.misses += 1
        return {"match": "none", "key": None, "requested": key}

    async def _make_local(self, record: CacheRecord, peers: list[Any]) -> int:
        info = self.repo.index.get_root(record.root)
        fetched = 0
        if info is None or not info.complete:
            if self.swarm is None:
                raise NotFound(f"the tree of {record.key!r} ({record.root}) is not in the repo and no daemon is "
                               "running to fetch it; start `p2pcache daemon`")
            fetched = await self.swarm.fetch_tree(record.root, peers)
            self.stats.trees_fetched += 1
            self.stats.bytes_fetched += fetched
        await trio.to_thread.run_sync(register_tree, self.repo, record.root, record.key)
        self.store.put(record, own=False)  # we hold its tree now: we re-serve the record
        if self.swarm is not None:
            self.swarm.announce(record.root, [cache_ns_alias(record.namespace)])
        return fetched

    # -- save -----------------------------------------------------------------------------------------
    async def exists(self, key: str) -> dict | None:
        found = await self.find(check_cache_key(key), False)
        return found[0][0].to_json() if found else None

    async def save(self, key: str, root: CID, force: bool = False, paths_id: str | None = None,
                   scan_time: float | None = None) -> dict:
        """Claim the uploaded tree `root` under `key`: refuse an existing key unless `force`, check the
        tree is whole, register it, sign and keep the record, announce root and namespace."""
        check_cache_key(key)
        existing = await self.find(key, False)
        if existing and not force:
            return {"saved": False, "reason": "exists", "key": key, "existing": existing[0][0].to_json()}
        why = self.policy.check(_writer_id(self.writer), key)
        if why is not None:
            raise InvalidInput(f"cannot save {key!r}: this node's own record would be ignored by every reader "
                               f"({why}); use a key this node may write")
        await trio.to_thread.run_sync(register_tree, self.repo, root, key)
        now_ms = int(self.clock() * 1000)
        if existing:
            now_ms = max(now_ms, existing[0][0].time_ms + 1)  # --force: newer than what it replaces
        record = CacheRecord.create(key, root, now_ms, self.writer, self.signer)
        self.store.put(record, own=True)
        if paths_id:
            self.store.set_save(paths_id, root, scan_time or self.clock())
        if self.swarm is not None:
            self.swarm.announce(root, [cache_ns_alias(record.namespace)])
        self.stats.saves += 1
        return {"saved": True, "replaced": bool(existing), **record.to_json()}

    async def save_tar(self, key: str, pieces: Any, paths: list[str], force: bool = False) -> dict:
        """A save from a builder that sends a tar stream (see `tree_from_tar`); keys stay immutable."""
        from .aio import feed_thread

        check_cache_key(key)
        if not force and await self.find(key, False):
            return {"saved": False, "reason": "exists", "key": key}
        root, counts = await feed_thread(pieces, lambda it: tree_from_tar(self.repo, it, paths))
        return {**await self.save(key, root, force), "tree": counts}

    def missing(self, cids: list[CID]) -> list[CID]:
        known = self.repo.index.known_blocks(cids)
        return [c for c in cids if c.buffer not in known]

    def put_blocks(self, blocks: list[tuple[CID, bytes]]) -> int:
        """Blocks uploaded by a local saver: each is re-hashed against its CID before it is stored."""
        if getattr(self, "_writers", None) is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cache-put")
        return put_blocks_parallel(self.repo, blocks, self._writers)

    # -- serving --------------------------------------------------------------------------------------
    def records_for_peer(self, key: str, prefix: bool, limit: int) -> list[CacheRecord]:
        """Records we hold whose trees we can serve (complete in the repo), newest first."""
        out = []
        for r in self.store.matching(key, prefix, limit):
            info = self.repo.index.get_root(r.root)
            if info is not None and info.complete:
                out.append(r)
        return out

    # -- eviction -------------------------------------------------------------------------------------
    def expire(self) -> dict:
        """Evict every unpinned tree not saved or restored for `idle_expiry` seconds, with its records."""
        limit = self.clock() - self.config.idle_expiry
        gone = []
        for info in self.repo.index.list_roots():
            if info.kind == TREE_KIND and not info.pinned and info.last_access < limit:
                with self.repo.index.transaction():
                    self.repo.index.remove_root(info.root)
                self.store.drop_root(info.root)
                if self.swarm is not None:
                    self.swarm.withdraw(info.root)
                gone.append(info.root)
        report = self.repo.gc(None) if gone else None
        self.stats.expired += len(gone)
        return {"expired": [str(r) for r in gone], "bytes_freed": report.bytes_freed if report else 0}

    def set_pinned(self, key: str, pinned: bool) -> dict:
        records = self.store.matching(check_cache_key(key), False, 1)
        if not records:
            raise NotFound(f"no cache key {key!r} on this node; restore it first, then pin it")
        root = records[0].root
        if self.repo.index.get_root(root) is None:
            raise NotFound(f"the tree of {key!r} is no longer in the repo")
        self.repo.index.set_pinned(root, pinned)
        return {"key": key, "root": str(root), "pinned": pinned}

    def list_keys(self) -> list[dict]:
        out = []
        for data in self.store.all_records():
            r = CacheRecord.decode(data)
            info = self.repo.index.get_root(r.root)
            out.append({**r.to_json(), "held": bool(info and info.complete), "pinned": bool(info and info.pinned),
                        "last_access": info.last_access if info else None, "size": info.size if info else None})
        return out


def _writer_id(writer: bytes) -> str:
    from .content.cacherecord import peer_id_of

    return peer_id_of(writer)


# -- block uploads from a local saver -----------------------------------------------------------------------


def frame_blocks(blocks: list[tuple[CID, bytes]]) -> bytes:
    """The body of a block upload: (varint, binary CID, varint, bytes) per block."""
    from .content import varint

    parts = []
    for cid, data in blocks:
        raw = cid.buffer
        parts += [varint.encode(len(raw)), raw, varint.encode(len(data)), data]
    return b"".join(parts)


def unframe_blocks(body: bytes) -> list[tuple[CID, bytes]]:
    """Blocks from an upload body; InvalidInput on anything malformed (each block is re-hashed later)."""
    from .content import varint

    out = []
    pos = 0
    view = memoryview(body)
    try:
        while pos < len(body):
            n, pos = varint.decode(view, pos)
            cid = CID.decode(bytes(view[pos:pos + n]))
            pos += n
            n, pos = varint.decode(view, pos)
            if pos + n > len(body):
                raise InvalidInput("block upload: truncated block")
            out.append((cid, bytes(view[pos:pos + n])))
            pos += n
    except (ValueError, IndexError) as e:
        raise InvalidInput(f"block upload: malformed body ({e})") from None
    return out


def frame_cids(cids: list[CID]) -> bytes:
    from .content import varint

    return b"".join(varint.encode(len(c.buffer)) + c.buffer for c in cids)


def unframe_cids(body: bytes) -> list[CID]:
    from .content import varint

    out, pos, view = [], 0, memoryview(body)
    try:
        while pos < len(body):
            n, pos = varint.decode(view, pos)
            out.append(CID.decode(bytes(view[pos:pos + n])))
            pos += n
    except (ValueError, IndexError) as e:
        raise InvalidInput(f"block list: malformed body ({e})") from None
    return out


class DaemonBlockSink:
    """A save's blocks uploaded to the running daemon, which re-hashes each before storing it.

    Uploads run on a background thread (at most `depth` batches queued), so the saver keeps reading and
    chunking while the daemon stores; `close()` waits for the last one and re-raises its error."""

    def __init__(self, client: Any, depth: int = 2):
        self.client = client
        self.depth = depth
        self.q: Any = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        while True:
            body = self.q.get()
            if body is None:
                return
            if self.error is None:
                try:
                    self.client.put_blocks(body)
                except BaseException as e:
                    self.error = e

    def missing(self, cids: list[CID]) -> set[CID]:
        if self.error is not None:
            raise self.error
        return {cids[i] for i in self.client.blocks_missing(frame_cids(cids))}

    def put(self, blocks: list[tuple[CID, bytes]]) -> None:
        if self.error is not None:
            raise self.error
        if self.thread is None:
            import queue

            self.q = queue.Queue(maxsize=self.depth)
            self.thread = threading.Thread(target=self._run, daemon=True, name="cache-upload")
            self.thread.start()
        self.q.put(frame_blocks(blocks))

    def close(self) -> None:
        """Wait for the uploads in flight (a later `put` starts again); re-raise the first error."""
        if self.thread is not None:
            self.q.put(None)
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise self.error


# -- tar streams: the build cache for builders that have curl and tar but not p2pcache (Nix) ----------------
# The daemon still never opens a caller's path: it turns an uploaded tar *stream* into a tree, and a tree
# into a tar stream the builder extracts itself. Sources travel as a sha256sum-format member.

SOURCES_MEMBER = ".p2pcache-build-cache/sources"


def tree_as_tar(manifest: TreeManifest, load: Any) -> Any:
    """The tree as a POSIX (pax) tar stream, entries named `<saved path>/<relative path>`, mtimes to the
    nanosecond; entries a restore would refuse are left out. Ends with the sources member, if any."""
    import stat as st
    import tarfile

    from .buildtree import symlink_escapes
    from .content.treemanifest import file_chunks, iter_entries, iter_sources, path_problem

    def header(info: "tarfile.TarInfo") -> bytes:
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    def pad(n: int) -> bytes:
        return b"\0" * (-n % 512)

    tops = [p.strip("/") for p in manifest.paths]
    for e in iter_entries(manifest, load):
        top = tops[e.top]
        if not top or path_problem(top.encode()) or path_problem(e.path):
            continue
        info = tarfile.TarInfo(top + ("/" + e.path.decode("utf-8", "surrogateescape") if e.path else ""))
        info.mode = e.mode & 0o777
        info.mtime = e.mtime_ns / 1e9
        if e.is_dir:
            info.type = tarfile.DIRTYPE
            yield header(info)
        elif e.is_symlink:
            if not isinstance(e.body, bytes) or symlink_escapes(e.path, e.body):
                continue
            info.type, info.linkname = tarfile.SYMTYPE, e.body.decode("utf-8", "surrogateescape")
            yield header(info)
        elif st.S_ISREG(e.mode):
            info.size = e.size
            yield header(info)
            if isinstance(e.body, bytes):
                yield e.body
            else:
                for ref in file_chunks(e, load):
                    data = load(ref.cid)
                    if len(data) != ref.size:
                        raise CorruptData(f"chunk {ref.cid} has {len(data)} bytes, its manifest says {ref.size}")
                    yield data
            yield pad(e.size)
    if manifest.sources is not None:
        text = "".join(f"{d.hex()}  {p.decode('utf-8', 'surrogateescape')}\n" for p, d, _ in iter_sources(manifest, load)
                       if b"\n" not in p).encode("utf-8", "surrogateescape")
        info = tarfile.TarInfo(SOURCES_MEMBER)
        info.size, info.mode, info.mtime = len(text), 0o644, 0
        yield header(info) + text + pad(len(text))
    yield b"\0" * 1024


class _PieceStream(io.RawIOBase):
    """An iterable of byte pieces as a readable raw stream (tarfile reads it through a BufferedReader)."""

    def __init__(self, pieces: Any):
        self.pieces = iter(pieces)
        self.rest = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.rest:
            piece = next(self.pieces, None)
            if piece is None:
                return 0
            self.rest = memoryview(piece)
        n = min(len(buffer), len(self.rest))
        buffer[:n] = self.rest[:n]
        self.rest = self.rest[n:]
        return n


def _member_file(archive: Any, member: Any) -> IO[bytes]:
    f = archive.extractfile(member)
    if f is None:  # only regular members are extracted; tarfile gives None for others
        raise InvalidInput(f"tar save: member {member.name[:80]!r} has no contents")
    return f


def tree_from_tar(repo: Any, pieces: Any, paths: list[str]) -> tuple[CID, dict]:
    """Store a tar stream's members under `paths` (relative names, as the tar has them) as a tree; the
    member SOURCES_MEMBER, in sha256sum format, becomes the tree's sources. Returns (root, counts)."""
    import stat as st
    import tarfile

    from .content.treemanifest import TreeEntry, TreeManifestBuilder, chunk_contents

    tops = [p.strip("/") for p in paths]
    if not tops or any(not t for t in tops):
        raise InvalidInput("a tar save needs at least one relative path=… parameter")
    sink = RepoBlockSink(repo)
    entries: list[TreeEntry] = []
    sources: list[tuple[bytes, bytes]] = []
    pending: list[tuple[CID, bytes]] = []
    counts = {"files": 0, "bytes": 0, "skipped": 0, "new_bytes": 0}

    def flush() -> None:
        lacking = sink.missing([c for c, _ in pending])
        todo = [(c, d) for c, d in pending if c in lacking]
        if todo:
            sink.put(todo)
        counts["new_bytes"] += sum(len(d) for _, d in todo)
        pending.clear()

    try:
        archive = tarfile.open(fileobj=io.BufferedReader(_PieceStream(pieces), 1 << 20), mode="r|", encoding="utf-8", errors="surrogateescape")
        for m in archive:
            name = m.name.removeprefix("./").rstrip("/")
            if name == SOURCES_MEMBER and m.isreg():
                for line in _member_file(archive, m).read().decode("utf-8", "surrogateescape").splitlines():
                    digest, _, path = line.partition("  ")
                    if len(digest) == 64 and path:
                        sources.append((path.removeprefix("./").encode("utf-8", "surrogateescape"), bytes.fromhex(digest)))
                continue
            top = next((i for i, t in enumerate(tops) if name == t or name.startswith(t + "/")), None)
            if top is None:
                counts["skipped"] += 1
                continue
            rel = name[len(tops[top]) + 1:].encode("utf-8", "surrogateescape")
            mtime = int(round(float(m.mtime) * 1e9))
            if m.isreg():
                f = _member_file(archive, m)
                body, blocks = chunk_contents(iter(lambda: f.read(4 << 20), b""), m.size)
                pending.extend((c, bytes(d)) for c, d in blocks)
                if sum(len(d) for _, d in pending) >= 8 << 20:
                    flush()
                entries.append(TreeEntry(top, rel, st.S_IFREG | (m.mode & 0o777), mtime, body))
                counts["files"] += 1
                counts["bytes"] += m.size
            elif m.isdir():
                entries.append(TreeEntry(top, rel, st.S_IFDIR | (m.mode & 0o777), mtime, None))
            elif m.issym():
                entries.append(TreeEntry(top, rel, st.S_IFLNK | 0o777, mtime, m.linkname.encode("utf-8", "surrogateescape")))
            else:
                counts["skipped"] += 1
    except tarfile.TarError as e:
        raise InvalidInput(f"tar save: the upload is not a readable tar stream ({e})") from None
    builder = TreeManifestBuilder(list(paths), sources_path="." if sources else None)
    out: list = []
    latest = {(e.top, e.path): e for e in entries}  # a tar may hold a name twice: the last one wins, as in tar
    for k in sorted(latest):
        out += builder.add(latest[k])
    for source, source_digest in sorted(dict(sources).items()):
        out += builder.add_source(source, source_digest, 0)
    root, data, rest = builder.finish()
    pending.extend((c, bytes(d)) for c, d in out + rest + [(root, data)])
    flush()
    sink.close()
    return root, counts
