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
import secrets
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import IO, Any, AsyncContextManager, Awaitable, Callable, Iterable, Protocol, Sequence

import trio

from .buildrecords import RecordStore
from .cacheupload import DaemonBlockSink, frame_blocks, frame_cids, unframe_blocks, unframe_cids  # noqa: F401 (re-exported)
from .content.cacherecord import CacheRecord, check_cache_key, namespace_of
from .content.chunking import DEFAULT_PARAMS, ChunkerParams
from .content.cid import CID
from .content.treemanifest import TreeManifest, iter_blocks
from .errors import CorruptData, InvalidInput, NotFound
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


# -- the record store: p2pcache.buildrecords.RecordStore (the CLI reads the stat cache's pointer there) ---


# -- repo side ----------------------------------------------------------------------------------------------


VERIFY_SLICE = 64  # blocks one worker re-hashes per task: a thread hop per slice, not per block


def put_blocks_parallel(repo: Any, blocks: list[tuple[CID, bytes]], pool: Any) -> tuple[int, int]:
    """Store blocks the repo lacks, each re-hashed against its CID on `pool`'s threads (hashing releases the
    GIL; a slice of blocks per task), then appended to the repo's pack in one write and recorded in one
    index commit. Returns (blocks, bytes) written."""
    known = repo.index.known_blocks([c for c, _ in blocks])
    todo = [(c, d) for c, d in blocks if c.buffer not in known]

    def check(part: list[tuple[CID, bytes]]) -> None:
        for cid, data in part:
            if not cid.verify(data):
                raise CorruptData(f"block {cid} does not match its CID; refusing it")

    if todo:
        list(pool.map(check, [todo[i:i + VERIFY_SLICE] for i in range(0, len(todo), VERIFY_SLICE)]))
        repo.packs.append(todo)
    # Not a durable point of the save (see `ingest_files`): the root's commit in `register_tree` is.
    repo.commit_blocks([(c, len(d)) for c, d in blocks], durable=False)
    return len(todo), sum(len(d) for _, d in todo)


FILES_HASH_AHEAD = 2  # pieces of a file upload being hashed while the next one is cut
MAX_UPLOAD_FILES = 1 << 16  # files in one upload request (their bodies are held until its answer)


def ingest_files(repo: Any, pieces: Iterable[bytes], params: ChunkerParams = DEFAULT_PARAMS) -> dict:
    """The file contents of one upload request (`cacheupload.FILE_HEADER` framing: each file's size, then its
    bytes) stored by a `FileIngest` of their own and recorded in one index commit. Returns {"bodies",
    "new_blocks", "new_bytes"} (see `FileIngest.add`). A truncated upload raises InvalidInput and records
    nothing."""
    files = FileIngest(repo, params)
    try:
        got = files.add(pieces)
        files.commit()
    except BaseException:
        files.abort()
        raise
    return got


class FileIngest:
    """A save's file contents, chunked, hashed and stored by the repo's ingest pipeline, over one or many
    upload requests (`add`): cut here (a whole file at once when it lies in one piece), every chunk's sha256
    and crc32 on the shared `ChunkHasher` threads a piece at a time, the new blocks appended by the ingest's
    writer. The chunk CIDs are computed here, from the bytes: nothing the caller says about them is believed.

    One ingest (its two worker threads) and one index commit (`commit`) for all the requests of a file-socket
    connection that asks to hold them (`FileUploadSession`), instead of a new ingest and a commit per request:
    each commit of a few hundred random CIDs rewrote most of the index's b-tree pages again (43,000 WAL page
    writes and a checkpoint's two fsyncs every 1,000 pages for a 20,000-file save, 29 % of a request's time),
    and each request started and joined two threads. Until the commit the blocks are only appended (pending:
    `load_block` reads them, the index does not know them); `abort` takes them back. Not thread-safe: one
    caller at a time."""

    def __init__(self, repo: Any, params: ChunkerParams = DEFAULT_PARAMS):
        from .content.chunking import Chunker
        from .store.ingest import shared_chunk_hasher

        self.chunker = Chunker(params)
        self.hasher = shared_chunk_hasher()
        # The appends' pages leave the page cache behind the writeback (durable repos): a save is what a job
        # does last, nobody reads the blocks back soon, and fresh page-cache pages are dear on these VMs. A
        # 1 GiB x 20,000-file save on a freshly booted one: the daemon's CPU 6.65-6.87 -> 5.00-5.09 s (system
        # time 3.3-4.3 -> 1.4-1.6 s); once the guest's memory had all been touched, system time 2.0-2.2 -> 1.5-1.6 s
        self.ingest = repo.ingest((), recycle=True)
        self.reported = (0, 0)  # (new blocks, new bytes) that `add` answered so far

    def add(self, pieces: Iterable[bytes]) -> dict:
        """One request's files: {"bodies": each file's tree-manifest body ([size, depth, links], as
        `chunk_contents` makes it), "new_blocks", "new_bytes" (since the last `add`)}. Raises InvalidInput on a
        body that ends inside a file; the caller then aborts (what this request appended is not taken back
        by itself)."""
        from collections import deque

        from .cacheupload import FILE_HEADER
        from .content.cid import RAW
        from .content.manifest import FANOUT
        from .content.narmanifest import INLINE_LINKS, ChunkTree

        chunker, hasher, ingest = self.chunker, self.hasher, self.ingest
        header_size = FILE_HEADER.size
        bodies: list[list[Any]] = []
        hashing: deque[tuple[list[Any], list[Any]]] = deque()
        # The current file's chunk links; a file with more than fit in its body goes on in a ChunkTree (made
        # only then: most files of a build directory are one chunk, and need neither a tree nor an index node)
        links: list[list[Any]] = []
        tree: ChunkTree | None = None
        index_out: list[Any] = []
        from_digest = CID.from_digest

        def take() -> None:
            nonlocal tree, links
            items, parts = hashing.popleft()
            digests = iter(hasher.result(parts) if parts else ())
            blocks: list[Any] = []
            crcs: list[int | None] = []
            for item in items:
                if type(item) is int:  # the end of a file of this size
                    if tree is None:
                        bodies.append([item, 0, links])
                    else:
                        depth, top = tree.finish(INLINE_LINKS, index_out)
                        bodies.append([item, depth, [[c, n] for c, n in top]])
                        tree = None
                    links = []
                else:
                    digest, crc = next(digests)
                    cid = from_digest(RAW, digest)
                    blocks.append((cid, item))
                    crcs.append(crc)
                    if tree is not None:
                        tree.add(cid, len(item), index_out)
                    else:
                        links.append([cid, len(item)])
                        if len(links) > INLINE_LINKS:
                            tree = ChunkTree(FANOUT)
                            for c, n in links:
                                tree.add(c, n, index_out)
                if index_out:
                    blocks += index_out
                    crcs += [None] * len(index_out)
                    index_out.clear()
            if blocks:
                ingest.put(blocks, crcs)

        left: int | None = None  # bytes of the current file still to come; None: a header is next
        streaming = False  # the current file started in an earlier piece (fed to the chunker piecewise)
        carry = b""  # a header cut by the end of a piece
        files = 0
        for piece in pieces:
            view = memoryview(piece)
            items: list[Any] = []
            chunks: list[memoryview] = []
            pos, end = 0, len(view)
            while pos < end:
                if left is None:
                    if carry or end - pos < header_size:
                        need = header_size - len(carry)
                        carry += bytes(view[pos:pos + need])
                        pos += need
                        if len(carry) < header_size:
                            break
                        (left,), carry = FILE_HEADER.unpack(carry), b""
                    else:
                        (left,) = FILE_HEADER.unpack_from(view, pos)
                        pos += header_size
                    size = left
                    files += 1
                    if files > MAX_UPLOAD_FILES:
                        raise InvalidInput(f"file upload: more than {MAX_UPLOAD_FILES} files in one request; "
                                           "send them in smaller batches")
                    if left == 0:
                        items.append(0)
                        left = None
                        continue
                n = min(left, end - pos)
                part = view[pos:pos + n]
                pos += n
                left -= n
                if left == 0 and not streaming:
                    cut = list(chunker.whole(part))
                else:
                    streaming = True
                    cut = list(chunker.feed(part))
                    if left == 0:
                        cut += chunker.finish()
                        streaming = False
                chunks += cut
                items += cut
                if left == 0:
                    items.append(size)
                    left = None
            hashing.append((items, hasher.submit(chunks) if chunks else []))
            if len(hashing) > FILES_HASH_AHEAD:
                take()
        if left is not None or carry:
            raise InvalidInput("file upload: the body ends inside a file; nothing of it was stored")
        while hashing:
            take()
        before, self.reported = self.reported, (ingest.new_blocks, ingest.new_bytes)
        return {"bodies": bodies, "new_blocks": ingest.new_blocks - before[0], "new_bytes": ingest.new_bytes - before[1]}

    def commit(self) -> None:
        """Record every block added so far in one index transaction, after their bytes are flushed.

        Blocks only: the save that follows claims them with its root. Their bytes are flushed before these
        rows (the commit order crash safety needs), but the rows need not be durable yet: until the root
        claims them nothing relies on them across a restart (a power cut that takes them back leaves garbage,
        or a save that uploads them again), and the root's own commit (`register_tree`, durable) makes them
        durable with it, the WAL being synced whole and in order. So a save pays one WAL fsync at its end."""
        self.ingest.commit(lambda index: None, durable=False)

    def abort(self) -> None:
        """Take back what was appended and not committed (the ingest's workers stop)."""
        import sqlite3

        from .errors import RepoError

        try:
            self.ingest.abort()
        except (OSError, RepoError, sqlite3.Error) as e:
            # the error that ended the upload is the one to see; what stays pending is dead at restart
            log.warning("build cache: taking back an unfinished upload's blocks failed: %s", e)


class RepoBlockSink:
    """A save's blocks straight into a writable repo (no daemon running): each re-hashed on the way in."""

    def __init__(self, repo: Any):
        self.repo = repo
        self.pool: Any = None
        self.new_blocks = 0
        self.new_bytes = 0

    def missing(self, cids: list[CID]) -> set[CID]:
        known = self.repo.index.known_blocks(cids)
        return {c for c in cids if c.buffer not in known}

    def offer(self, blocks: list[tuple[CID, bytes]]) -> None:
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cache-write")
        n, size = put_blocks_parallel(self.repo, blocks, self.pool)
        self.new_blocks += n
        self.new_bytes += size

    def files(self, length: int, pieces: Iterable[bytes]) -> "Future[list]":
        """Files' contents (`cacheupload.FILE_HEADER` framing) chunked and stored here; their bodies."""
        fut: Future[list] = Future()
        try:
            got = ingest_files(self.repo, pieces)
        except BaseException as e:
            fut.set_exception(e)
            return fut
        self.new_blocks += got["new_blocks"]
        self.new_bytes += got["new_bytes"]
        fut.set_result(got["bodies"])
        return fut

    def close(self) -> tuple[int, int]:
        """Release the writer threads (a later `offer` starts new ones); (new blocks, new bytes) so far."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        out = (self.new_blocks, self.new_bytes)
        self.new_blocks = self.new_bytes = 0
        return out


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
    cids: dict[CID, int] = {root: -1}
    batch: list[tuple[CID, int]] = []

    def check(batch: list[tuple[CID, int]]) -> None:  # one index query per batch, not per block
        found = repo.index.locate_many([c for c, _ in batch])
        for cid, size in batch:
            loc = found.get(cid.buffer)
            if loc is None:
                raise NotFound(f"tree {root} is missing block {cid}; save again")
            if loc.size != size:
                raise CorruptData(f"block {cid} has {loc.size} bytes, tree {root} says {size}")

    for cid, size in iter_blocks(manifest, repo.load_block):
        seen = cids.get(cid)
        if seen is None:
            cids[cid] = size
            batch.append((cid, size))
            if len(batch) >= 2048:
                check(batch)
                batch = []
        elif seen != size and seen >= 0:
            raise CorruptData(f"tree {root} links block {cid} with sizes {seen} and {size}")
    check(batch)
    with repo.index.transaction():
        repo.index.put_root(root, TREE_KIND, manifest.size, name, TREE_MEDIA_TYPE, (), cids)
    return repo.root_info(root)


class FileUploadSession:
    """The file uploads of one file-socket connection (`p2pcache.filesocket`), in the order they came.

    A request that asks to hold its blocks (`hold`, what `cacheupload.FileSocket` sends) goes into the
    connection's one `FileIngest`, which `commit` records (the saver asks for it before it claims its root);
    the ingest also commits by itself every `HOLD_BYTES` of new blocks, so the commit at the end stays
    small. A request that does not (an older saver) gets an ingest and a commit of its own, as before. A
    failed request aborts the held ingest too (the saver fails its save on the error), and so does the
    connection's end without a commit (a saver killed mid-save): nothing it uploaded is recorded then, and
    the bytes appended are taken back."""

    HOLD_BYTES = 256 << 20

    def __init__(self, cache: "BuildCache"):
        self.cache = cache
        self.files: FileIngest | None = None

    async def add(self, files: list[tuple[int, int, bytes]], lease: str | None, hold: bool) -> dict:
        if not hold:
            return await self.cache.accept_fds(files, lease)
        from .buildtree import fd_pieces

        if len(files) > MAX_UPLOAD_FILES:
            raise InvalidInput(f"file upload: more than {MAX_UPLOAD_FILES} files in one request")

        def work() -> dict:
            if self.files is None:
                self.files = FileIngest(self.cache.repo)
            try:
                got = self.files.add(fd_pieces(files))
                if self.files.ingest.new_bytes >= self.HOLD_BYTES:
                    self.files.commit()
                    self.files = None
            except BaseException:
                self._abort()
                raise
            return {**got, "held": True}

        got = await self.cache._in_upload(lease, lambda: trio.to_thread.run_sync(work))
        self.cache.stats.files_by_descriptor += len(files)
        return got

    async def commit(self, lease: str | None) -> dict:
        """Record what the held requests stored; {"committed": True}."""
        def work() -> None:
            if self.files is not None:
                files, self.files = self.files, None
                try:
                    files.commit()
                except BaseException:
                    files.abort()
                    raise

        await self.cache._in_upload(lease, lambda: trio.to_thread.run_sync(work))
        return {"committed": True}

    def _abort(self) -> None:
        files, self.files = self.files, None
        if files is not None:
            files.abort()

    async def close(self) -> None:
        """The connection ended: what was not committed is taken back."""
        if self.files is not None:
            log.info("build cache: a file upload ended without its commit; its blocks are not kept")
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._abort)


# -- the swarm as the service sees it -----------------------------------------------------------------------


class Swarm(Protocol):
    def record_peers(self, namespace: str) -> Awaitable[list[Any]]: ...
    def ask_records(self, peer: Any, key: str, prefix: bool) -> Awaitable[list[CacheRecord]]: ...
    def fetch_tree(self, root: CID, peers: list[Any], claim: Callable[[], Awaitable[object]],
                   started: Callable[[], None] | None = None) -> Awaitable[int]:
        """Fetch the tree's blocks; `claim()` once all are stored, where no gc can take them meanwhile.
        `started()` once the tree is known to fit the quota, before its first block is stored."""
    def announce(self, root: CID, aliases: list[str]) -> None: ...
    def withdraw(self, root: CID) -> None: ...


class Signer(Protocol):
    def sign(self, data: bytes) -> bytes: ...


class UploadGuard(Protocol):
    """The node's guard over blocks no root claims yet (`node.QuotaKeeper`): no gc runs while a `working()`
    scope is open, and `exclusive()` waits until none is."""

    def working(self) -> AsyncContextManager[Any]: ...
    def exclusive(self) -> AsyncContextManager[Any]: ...


LEASE_SECONDS = 600.0  # an upload lease nobody renews for this long ends (a saver that died)


class UploadLeases:
    """Open uploads: a local saver's blocks reach the daemon in many requests, and no root claims them until
    the save at the end. Each saver holds a lease (renewed by every request naming it) and, while any
    lease is live, one `working()` scope of the guard is held, so neither a quota gc nor idle expiry's gc
    can take blocks that a save in progress uploaded or found present (and so did not upload again).
    A gc that expiry wanted meanwhile is owed and runs when the last lease ends."""

    def __init__(self, guard: UploadGuard, ttl: float = LEASE_SECONDS):
        self.guard = guard
        self.ttl = ttl
        self.deadlines: dict[str, float] = {}
        self.held = False
        self._held_event = trio.Event()
        self._changed = trio.Event()
        self.on_idle: Callable[[], Awaitable[object]] | None = None
        self.expired = 0

    def live(self) -> bool:
        return bool(self.deadlines)

    async def open(self) -> str:
        """A new lease; returns once the guard is held for it."""
        lease = secrets.token_hex(16)
        await self.renew(lease)
        return lease

    async def renew(self, lease: str) -> None:
        """Extend `lease` (a lease that had ended is opened again: what it covered before may be gone,
        which the save then reports as a missing block)."""
        if len(lease) > 64:
            raise InvalidInput("upload lease: malformed id")
        self.deadlines[lease] = trio.current_time() + self.ttl
        self._changed.set()
        while not self.held:
            await self._held_event.wait()

    def release(self, lease: str | None) -> None:
        if lease is not None and self.deadlines.pop(lease, None) is not None:
            self._changed.set()

    async def run(self) -> None:
        """Hold the guard while any lease is live (run in the node's nursery)."""
        while True:
            while not self.deadlines:
                await self._changed.wait()
                self._changed = trio.Event()
            async with self.guard.working():
                self.held = True
                self._held_event.set()
                try:
                    while True:
                        now = trio.current_time()
                        for lease in [k for k, d in self.deadlines.items() if d <= now]:
                            del self.deadlines[lease]
                            self.expired += 1
                            log.warning("build cache: upload lease %s… not renewed for %.0f s; released", lease[:8],
                                        self.ttl)
                        if not self.deadlines:
                            break
                        with trio.move_on_at(min(self.deadlines.values())):
                            await self._changed.wait()
                        self._changed = trio.Event()
                finally:
                    self.held = False
                    self._held_event = trio.Event()
            if self.on_idle is not None:
                await self.on_idle()


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
    files_by_descriptor: int = 0  # saved files a local saver handed over as descriptors (`accept_fds`)


class BuildCache:
    def __init__(self, repo: Any, store: RecordStore, signer: Signer, writer: bytes, config: BuildCacheConfig,
                 swarm: Swarm | None = None, clock: Callable[[], float] = time.time, guard: UploadGuard | None = None):
        self.repo = repo
        self.store = store
        self.signer = signer
        self.writer = writer  # our libp2p public key (protobuf encoding)
        self.config = config
        self.policy = TrustPolicy(config.writers)
        self.swarm = swarm
        self.clock = clock
        self.stats = BuildCacheStats()
        # In a daemon, uploads span requests: leases keep gc off their blocks (see UploadLeases).
        self.leases = UploadLeases(guard) if guard is not None else None
        self._gc_owed = False
        if self.leases is not None:
            self.leases.on_idle = self._owed_gc
        self._writers: Any = None

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
                     paths_id: str | None = None, on_fetch: Callable[[dict], None] | None = None) -> dict:
        """The tree for `key`, else for the newest key starting with the first of `restore_keys` that
        matches any; made local unless `lookup_only`. `{"match": "exact"|"prefix"|"none", ...}`.

        `on_fetch({"root", "key"})` is called when a tree has to be fetched from the swarm, before the
        fetch starts, so a caller can write the tree's files as its blocks arrive (streaming restore). It
        may be called again for an older record when that fetch fails; only the returned root is whole."""
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
                    fetched = await self._make_local(record, peers, on_fetch)
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

    async def _make_local(self, record: CacheRecord, peers: list[Any],
                          on_fetch: Callable[[dict], None] | None = None) -> int:
        info = self.repo.index.get_root(record.root)
        fetched = 0
        if info is None or not info.complete:
            if self.swarm is None:
                raise NotFound(f"the tree of {record.key!r} ({record.root}) is not in the repo and no daemon is "
                               "running to fetch it; start `p2pcache daemon`")
            # Registered where the fetch's blocks are still guarded: a quota gc that the fetch's end
            # wakes would otherwise take them, unclaimed, before the root claims them.
            fetched = await self.swarm.fetch_tree(record.root, peers, lambda: trio.to_thread.run_sync(
                register_tree, self.repo, record.root, record.key),
                started=None if on_fetch is None else lambda: on_fetch({"root": str(record.root), "key": record.key}))
            self.stats.trees_fetched += 1
            self.stats.bytes_fetched += fetched
        else:
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
                   scan_time: float | None = None, lease: str | None = None, scan_digest: bytes | None = None) -> dict:
        """Claim the uploaded tree `root` under `key`: refuse an existing key unless `force`, check the
        tree is whole, register it, sign and keep the record, announce root and namespace. The upload
        `lease` ends here, whatever the outcome (the root claims its blocks, or the save failed)."""
        try:
            return await self._save(key, root, force, paths_id, scan_time, scan_digest)
        finally:
            if self.leases is not None:
                self.leases.release(lease)

    async def _save(self, key: str, root: CID, force: bool, paths_id: str | None, scan_time: float | None,
                    scan_digest: bytes | None = None) -> dict:
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
            self.store.set_save(paths_id, root, scan_time or self.clock(), scan_digest)
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
        if self.leases is None:
            root, counts = await feed_thread(pieces, lambda it: tree_from_tar(self.repo, it, paths))
            return {**await self.save(key, root, force), "tree": counts}
        async with self.leases.guard.working():  # no gc between the blocks going in and the root claiming them
            root, counts = await feed_thread(pieces, lambda it: tree_from_tar(self.repo, it, paths))
            return {**await self.save(key, root, force), "tree": counts}

    def missing(self, cids: list[CID]) -> list[CID]:
        known = self.repo.index.known_blocks(cids)
        return [c for c in cids if c.buffer not in known]

    def put_blocks(self, blocks: list[tuple[CID, bytes]]) -> tuple[int, int]:
        """Blocks uploaded by a local saver: each is re-hashed against its CID before it is stored.
        Returns (blocks, bytes) written."""
        if self._writers is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cache-put")
        return put_blocks_parallel(self.repo, blocks, self._writers)

    async def open_upload(self) -> dict:
        """A lease for a save's uploads (daemon only): blocks it uploads or finds present stay until the
        save claims them, or the lease is not renewed for `LEASE_SECONDS`."""
        if self.leases is None:
            raise InvalidInput("upload leases exist only in a running daemon")
        return {"lease": await self.leases.open(), "ttl": self.leases.ttl}

    async def accept_blocks(self, blocks: list[tuple[CID, bytes]], lease: str | None) -> tuple[int, int]:
        """`put_blocks` for an upload request: renews its lease, and no gc runs while the blocks go in."""
        return await self._in_upload(lease, lambda: trio.to_thread.run_sync(self.put_blocks, blocks))

    async def accept_files(self, body: Any, lease: str | None) -> dict:
        """A save's file contents streamed in one request (`ingest_files` on a worker thread as the body
        arrives): renews its lease, and no gc runs while the blocks go in."""
        from .aio import feed_thread

        return await self._in_upload(lease, lambda: feed_thread(body, lambda pieces: ingest_files(self.repo, pieces)))

    async def accept_fds(self, files: list[tuple[int, int, bytes]], lease: str | None) -> dict:
        """`accept_files` for files a local saver handed over as open descriptors ((fd, size, name), see
        `p2pcache.filesocket`): read here, with pread, on the ingest's worker thread."""
        from .buildtree import fd_pieces

        if len(files) > MAX_UPLOAD_FILES:
            raise InvalidInput(f"file upload: more than {MAX_UPLOAD_FILES} files in one request")
        got = await self._in_upload(lease, lambda: trio.to_thread.run_sync(
            lambda: ingest_files(self.repo, fd_pieces(files))))
        self.stats.files_by_descriptor += len(files)
        return got

    def file_session(self) -> "FileUploadSession":
        """The uploads of one file-socket connection (`p2pcache.filesocket`)."""
        return FileUploadSession(self)

    async def _in_upload(self, lease: str | None, work: Callable[[], Awaitable[Any]]) -> Any:
        """Run an upload request's `work` where no gc takes what it stores: under its lease (renewed), or,
        for an old client that names none, under a scope of the request's own."""
        if self.leases is None:
            return await work()
        if lease:
            # The lease's scope covers these blocks. No scope of our own: a gc waiting for the leases to
            # end holds the guard's lock, and a new scope would wait for that gc — a deadlock.
            await self.leases.renew(lease)
            return await work()
        async with self.leases.guard.working():
            return await work()

    async def missing_for(self, cids: list[CID], lease: str | None) -> list[CID]:
        """`missing` for an upload request: renews its lease first, so what it reports present stays."""
        if self.leases is not None and lease:
            await self.leases.renew(lease)
        return await trio.to_thread.run_sync(self.missing, cids)

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
    def _evict_idle(self) -> list[CID]:
        limit = self.clock() - self.config.idle_expiry
        gone = []
        for info in self.repo.index.list_roots():
            if info.kind == TREE_KIND and not info.pinned and info.last_access < limit:
                with self.repo.readers.evicting(info.root) as free:
                    if not free:  # a restore is reading it (here, or a CLI reading the daemon's repo)
                        continue
                    with self.repo.index.transaction():
                        self.repo.index.remove_root(info.root)
                self.store.drop_root(info.root)
                if self.swarm is not None:
                    self.swarm.withdraw(info.root)
                gone.append(info.root)
        self.stats.expired += len(gone)
        return gone

    def expire(self) -> dict:
        """Evict every unpinned tree not saved or restored for `idle_expiry` seconds, with its records, and
        collect their blocks. For a repo no daemon runs on; a daemon calls `expire_async`."""
        gone = self._evict_idle()
        report = self.repo.gc(None) if gone else None
        return {"expired": [str(r) for r in gone], "bytes_freed": report.bytes_freed if report else 0}

    async def expire_async(self) -> dict:
        """`expire` in the daemon: the gc waits for no upload being in flight (`UploadLeases`); while a
        lease is live it is owed, and runs when the last one ends."""
        if self.leases is None:
            return await trio.to_thread.run_sync(self.expire)
        gone = await trio.to_thread.run_sync(self._evict_idle)
        freed = 0
        if gone:
            self._gc_owed = True
            if not self.leases.live():
                freed = await self._owed_gc()
        return {"expired": [str(r) for r in gone], "bytes_freed": freed, "gc_deferred": self._gc_owed}

    async def _owed_gc(self) -> int:
        if not self._gc_owed or self.leases is None or self.leases.live():
            return 0
        async with self.leases.guard.exclusive():
            self._gc_owed = False
            report = await trio.to_thread.run_sync(self.repo.gc, None)
        return report.bytes_freed

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
        if pending:
            sink.offer(list(pending))
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
    counts["new_bytes"] = sink.close()[1]
    return root, counts
