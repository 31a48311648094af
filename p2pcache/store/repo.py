"""The local repo: add archives, read them back verified, pin, garbage-collect, compact, verify.

Layout of a repo directory (format 2):

    version            repo format version ("2"; "1" is file-per-block, see migrate.py)
    repo.lock          flock()ed by the one process that may write (holds its pid)
    readers.lock       empty; a read-only process reading a root holds a shared lock on one byte of it
                       (`RootReaders`), so the writer's gc does not evict that root under it
    index.sqlite       the SQLite index (WAL mode; see index.py): CID -> (pack, offset, size, crc32)
    packs/<id>.pack    append-only pack files of block records (see blockstore.py)

Crash safety rests on one order: pack records are appended and flushed (`flush`, one fdatasync per batch)
before the index transaction that refers to them commits; and index rows are deleted (committed) before the
bytes they pointed at are reclaimed (a pack file removed, or cut back). A kill -9 at any instant therefore
leaves only dead bytes behind — a pack tail no row points into, or a pack with no rows — which `verify` reports
and `gc` reclaims; it never leaves an index row pointing at missing or torn bytes.

Where bytes are checked against their CID: once before they are appended (an add derives the CID from the
bytes; blocks from peers are re-hashed in `write_blocks`), again in full by `verify`; every read re-checks the
record's crc32 (blockstore.py says why that is enough). The whole archive's sha256 is checked once per root:
computed by `add`, or on the first full read of a root that came from peers (`roots.verified`), so serving a
verified root hashes nothing twice.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import errno
import fcntl
import hashlib
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from ..content.chunking import DEFAULT_PARAMS, ChunkerParams, Chunker
from ..content.cid import CID, RAW
from ..content.keys import HashKey, RootKey, parse_key
from ..content.manifest import ArchiveManifest, ManifestBuilder, iter_blocks, iter_chunks, sniff_media_type
from ..errors import CorruptData, NotFound, RepoError, RepoLocked
from .blockstore import PACK_MAGIC, RECORD_HEADER, Location, PackFiles, disk_error
from .index import Index, RootInfo
from .ingest import READ_SIZE, BufferPool, FileWriter, Ingest, StreamHasher, read_pieces, shared_chunk_hasher

# Set by `Repo.recording_blocks`: where `write_blocks` / `commit_blocks` note what they appended and recorded.
_committed_blocks: contextvars.ContextVar[list[CID] | None] = contextvars.ContextVar("committed_blocks", default=None)
_UNOWNED = object()  # the claim of blocks written outside `recording_blocks`, ended by their `commit_blocks`

REPO_VERSION = "2"
MIGRATING_VERSION = "2-migrating"  # written while `p2pcache migrate` runs; format-1 code refuses it
COMPACT_BELOW = 0.75  # gc rewrites a pack whose live share fell below this
READ_BATCH = 512  # blocks looked up and read per batch on the warm path
COMPACT_BATCH = 16 << 20  # bytes copied per flush + transaction when compacting
SERVE_PIECE = 1 << 20  # pieces handed out by `stream` (blocks joined up to this size)
TOUCH_WRITE_EVERY = 30.0  # seconds between writes of remembered last-access times (`Repo.touch`)
GET_WRITE = 1 << 20  # `get_to_file` writes about this much per writev
INGEST_BUFFERS = 8  # read buffers an ingest reuses (bytes in flight: INGEST_BUFFERS × READ_SIZE)
HASH_AHEAD = 2  # read buffers chunked and being hashed before the caller takes the oldest one's CIDs
Progress = Callable[[int], None]


def default_repo_path() -> Path:
    env = os.environ.get("P2PCACHE_REPO")
    if env:
        return Path(env)
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "p2pcache"


@dataclass(frozen=True)
class AddResult:
    root: CID
    size: int
    hashes: dict[str, bytes]
    name: str | None
    media_type: str
    chunks: int
    new_blocks: int
    new_bytes: int
    already_present: bool

    def to_json(self) -> dict:
        sha256 = HashKey("sha256", self.hashes["sha256"])
        sha512 = HashKey("sha512", self.hashes["sha512"]) if "sha512" in self.hashes else None
        return {
            "root": str(self.root),
            "name": self.name,
            "size": self.size,
            "sha256": self.hashes["sha256"].hex(),
            # sha512 is computed when first asked for (Repo.sha512): null until then
            "sha512": sha512.digest.hex() if sha512 else None,
            "sha512_known": sha512 is not None,
            "sri": sha256.sri,
            "sri_sha512": sha512.sri if sha512 else None,
            "nix32": sha256.nix32,
            "format": self.media_type,
            "chunks": self.chunks,
            "new_blocks": self.new_blocks,
            "new_bytes": self.new_bytes,
            "already_present": self.already_present,
        }


@dataclass
class GcReport:
    roots_removed: list[CID] = field(default_factory=list)
    blocks_removed: int = 0
    bytes_freed: int = 0
    garbage_files_removed: int = 0
    bytes_after: int = 0
    over_quota: bool = False
    packs_compacted: int = 0  # packs rewritten because their live share fell below COMPACT_BELOW
    disk_bytes_reclaimed: int = 0  # pack bytes given back to the file system (compaction + dead packs)
    disk_bytes_after: int = 0  # size of all pack files after gc
    roots_kept_in_use: int = 0  # roots eviction passed over because something was reading them

    def to_json(self) -> dict:
        return {
            "roots_removed": [str(r) for r in self.roots_removed],
            "roots_kept_in_use": self.roots_kept_in_use,
            "blocks_removed": self.blocks_removed,
            "bytes_freed": self.bytes_freed,
            "garbage_files_removed": self.garbage_files_removed,
            "bytes_after": self.bytes_after,
            "over_quota": self.over_quota,
            "packs_compacted": self.packs_compacted,
            "disk_bytes_reclaimed": self.disk_bytes_reclaimed,
            "disk_bytes_after": self.disk_bytes_after,
        }


@dataclass
class VerifyReport:
    blocks_checked: int = 0
    corrupt: list[CID] = field(default_factory=list)
    missing: list[CID] = field(default_factory=list)
    garbage_files: list[str] = field(default_factory=list)
    refcount_errors: int = 0
    roots_incomplete: list[CID] = field(default_factory=list)
    repaired: bool = False
    dead_bytes: int = 0  # pack bytes no index row points at (crash tails, dropped blocks): gc reclaims them

    @property
    def consistent(self) -> bool:
        """No index entry points at a bad or absent block. Garbage files alone are fine (crash leftovers)."""
        return not (self.corrupt or self.missing or self.refcount_errors)

    def to_json(self) -> dict:
        return {
            "blocks_checked": self.blocks_checked,
            "corrupt": [str(c) for c in self.corrupt],
            "missing": [str(c) for c in self.missing],
            "garbage_files": len(self.garbage_files),
            "refcount_errors": self.refcount_errors,
            "roots_incomplete": [str(r) for r in self.roots_incomplete],
            "repaired": self.repaired,
            "dead_bytes": self.dead_bytes,
            "consistent": self.consistent,
        }


class RootReaders:
    """Which roots are being read, so gc never evicts a root (and sweeps its blocks) under its reader.
    In the process that may write the repo (the daemon, or a CLI with no daemon) a count per root; a
    read-only process (the CLI reading a daemon's repo) holds a shared POSIX record lock on one byte of
    `readers.lock` per root it reads, which the writer's gc tests with a non-blocking exclusive lock on
    that byte before it evicts the root, and holds while it does. A read lock needs only read access to
    the file, and dies with its process: a killed reader holds nothing. (POSIX record locks are per
    process: two Repo objects on one repo in one process, as some tests open, do not exclude each other.)"""

    FILE = "readers.lock"

    def __init__(self, path: Path, writable: bool) -> None:
        self.writable = writable
        self._counts: dict[bytes, int] = {}
        self._lock = threading.Lock()
        try:
            self._fd: int | None = (os.open(path / self.FILE, os.O_RDWR | os.O_CREAT, 0o644) if writable
                                    else os.open(path / self.FILE, os.O_RDONLY))
        except OSError:  # a read-only open of a repo whose writer predates the file: counts only
            self._fd = None

    @staticmethod
    def _byte(root: CID) -> int:
        return int.from_bytes(hashlib.sha256(root.buffer).digest()[:8], "big") >> 2  # < 2**62, any off_t

    @contextlib.contextmanager
    def reading(self, root: CID) -> Iterator[None]:
        """Around a read of `root`: the caller checks that the root is (still) there once inside."""
        key = root.buffer
        with self._lock:  # the file lock is per process, not per read: taken by the first, dropped by the last
            n = self._counts.get(key, 0)
            if n == 0 and not self.writable and self._fd is not None:
                fcntl.lockf(self._fd, fcntl.LOCK_SH, 1, self._byte(root))  # waits out an eviction of it
            self._counts[key] = n + 1
        try:
            yield
        finally:
            with self._lock:
                n = self._counts.pop(key) - 1
                if n:
                    self._counts[key] = n
                elif not self.writable and self._fd is not None:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._byte(root))

    @contextlib.contextmanager
    def evicting(self, root: CID) -> Iterator[bool]:
        """Around the writer's removal of `root`: True if no one reads it (and none starts until the end)."""
        with self._lock:
            if root.buffer in self._counts:
                yield False
                return
            at = self._byte(root)
            if self._fd is not None:
                try:
                    fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, at)
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    yield False  # another process is reading it
                    return
            try:
                yield True
            finally:
                if self._fd is not None:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, at)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Repo:
    def __init__(self, path: Path, writable: bool, durable: bool | None = None):
        self.path = Path(path)
        self.writable = writable
        # durable: fdatasync pack appends before the index commit that refers to them. Without it a
        # kill -9 is still safe (the page cache survives); a power cut may leave torn records that the
        # crc32 check refuses and `verify --repair` drops. Ephemeral CI runners lose nothing by turning it off.
        if durable is None:
            durable = os.environ.get("P2PCACHE_FSYNC", "1").lower() not in ("0", "no", "false", "off")
        self.durable = durable
        self.packs = PackFiles(self.path, writeback_ahead=durable and writable)
        # Blocks an unfinished ingest or fetch relies on (appended or found in the index, not yet referenced by a
        # root it recorded), by owner: a failing one takes back only what no other claims (`take_back_pending`,
        # `drop_unclaimed_blocks`). One owner of this state: the repo, under `_claims_lock`.
        self._claims: dict[bytes, set[int]] = {}
        self._claims_lock = threading.Lock()
        # Last-access times of roots read (`touch`), written in one transaction at most every TOUCH_WRITE_EVERY
        # seconds, before gc orders roots by them, and at close: a read is not an fsync'd commit of its own.
        self._touched: dict[CID, float] = {}
        self._touch_lock = threading.Lock()
        self._touches_written = time.monotonic()
        self._lock_fd: int | None = None
        if writable:
            self._take_lock()
        try:
            self.index = Index(self.path / "index.sqlite")
            self.readers = RootReaders(self.path, writable)
            if writable:
                self.packs.create_dirs()
                self.packs.start(self.index.committed_end)
        except OSError as e:
            self._release_lock()
            raise disk_error(e, self.path) from None
        except Exception:
            self._release_lock()
            raise

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def init(cls, path: Path | str, durable: bool | None = None) -> "Repo":
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            PackFiles(path).create_dirs()
            from .. import config

            config.write_default(path)
            version = path / "version"
            if not version.exists():
                write_version(path, REPO_VERSION)
        except OSError as e:
            raise disk_error(e, path) from None
        return cls.open(path, writable=True, durable=durable)

    @classmethod
    def exists(cls, path: Path | str) -> bool:
        return (Path(path) / "version").exists()

    @classmethod
    def open(cls, path: Path | str, writable: bool = False, durable: bool | None = None) -> "Repo":
        path = Path(path)
        version = path / "version"
        if not version.exists():
            raise RepoError(f"no p2pcache repo at {path}; run `p2pcache init` (or set --repo / P2PCACHE_REPO)")
        found = version.read_text().strip()
        if found in ("1", MIGRATING_VERSION):
            raise RepoError(f"repo {path} has format {found} (one file per block); run `p2pcache migrate` "
                            f"(with the same --repo) to convert it to pack files in place (resumable)")
        if found != REPO_VERSION:
            raise RepoError(f"repo {path} has format version {found!r}; this p2pcache reads version {REPO_VERSION}")
        return cls(path, writable, durable)

    def _take_lock(self) -> None:
        lock_path = self.path / "repo.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RepoLocked(
                f"repo {self.path} is in use by another p2pcache process (pid {holder}); "
                "stop it, or talk to its daemon instead"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        self.write_touches()
        self.index.close()
        self.packs.close()
        self.readers.close()
        self._release_lock()

    def __enter__(self) -> "Repo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        """Make appended blocks durable before an index commit refers to them (if `durable`)."""
        if self.durable:
            self.packs.barrier()

    def require_writable(self) -> None:
        if not self.writable:
            raise RepoError("internal: repo opened read-only")

    # -- claims of unfinished writers ------------------------------------------------------------
    def claim_blocks(self, owner: object, keys: Iterable[bytes]) -> None:
        """`owner` (an ingest, a fetch's recording) relies on these blocks until it unclaims them."""
        o = id(owner)
        with self._claims_lock:
            claims = self._claims
            for k in keys:
                held = claims.get(k)
                if held is None:
                    claims[k] = {o}
                else:
                    held.add(o)

    def unclaim_blocks(self, owner: object, keys: Iterable[bytes]) -> list[bytes]:
        """End `owner`'s claims; the keys that no one claims any more (or never did)."""
        o = id(owner)
        free = []
        with self._claims_lock:
            claims = self._claims
            for k in keys:
                held = claims.get(k)
                if held is not None:
                    held.discard(o)
                    if held:
                        continue
                    del claims[k]
                free.append(k)
        return free

    def take_back_pending(self, owner: object, appended: Iterable[bytes], claimed: Iterable[bytes]) -> int:
        """A failed ingest: end its claims; what it appended and no other writer claims stops being pending
        (dead bytes from now on), and the dead tail of the pack is cut off. Returns the blocks taken back."""
        free = set(self.unclaim_blocks(owner, claimed))
        gone = self.packs.forget_pending([k for k in appended if k in free])
        if gone:
            with self.index.transaction():  # no other transaction's rows half there while the tail is cut
                self.packs.cut_back(self.index.committed_end)
        return len(gone)

    def ingest(self, algos: tuple[str, ...] = ("sha256",), recycle: bool = False) -> Ingest:
        """A new ingest into this repo (see ingest.py): the pipeline `add_stream` and NAR ingest use.
        `recycle`: its pack pages leave the page cache as writeback passes them (`PackFiles._recycle`)."""
        return Ingest(self, algos, recycle=recycle)

    def record_blocks(self, written: list[tuple[CID, Location]]) -> None:
        """Inside an index transaction: rows for blocks this process appended (after `flush`)."""
        self.index.put_blocks(written)

    def blocks_committed(self, written: list[tuple[CID, Location]]) -> None:
        """After the transaction that recorded them committed: they are no longer pending."""
        self.packs.committed(c.buffer for c, _ in written)

    # -- adding ------------------------------------------------------------------------------
    def add_file(self, path: Path | str, name: str | None = None, progress: Progress | None = None,
                 params: ChunkerParams = DEFAULT_PARAMS) -> AddResult:
        path = Path(path)
        try:
            f = open(path, "rb", buffering=0)
        except IsADirectoryError:
            raise RepoError(f"cannot add {path}: it is a directory (add files, or a tar of the directory)") from None
        except OSError as e:
            raise RepoError(f"cannot read {path}: {e.strerror}") from None
        with f:
            return self.add_stream(f, name=name if name is not None else path.name, progress=progress, params=params)

    def add_stream(self, stream: BinaryIO | Iterable[bytes], name: str | None = None,
                   progress: Progress | None = None, params: ChunkerParams = DEFAULT_PARAMS,
                   expect: HashKey | None = None) -> AddResult:
        """Chunk, hash and store a stream (a binary file object or an iterable of byte pieces); commit
        it to the index only once every block is durable. With `expect`, an archive whose hash differs
        is refused (CorruptData) and nothing is recorded."""
        self.require_writable()
        pool = BufferPool(INGEST_BUFFERS, READ_SIZE) if hasattr(stream, "readinto") else None
        source: BinaryIO | Iterable[bytes] | _IterReader = stream
        if not hasattr(stream, "read"):
            source = _IterReader(iter(stream))  # an iterable of pieces, read back in READ_SIZE pieces
        chunker = Chunker(params)
        builder = ManifestBuilder(params)
        chunks = 0
        head = b""
        # Read buffers whose chunks are being hashed (ChunkHasher): the CIDs of buffer k are taken while k+1
        # is chunked and hashed, so the caller, the hashing threads and the ingest workers overlap.
        hashing: collections.deque[tuple[bytearray | None, list[memoryview], list]] = collections.deque()

        def take(ingest: Ingest) -> None:
            nonlocal chunks
            buf, pieces, parts = hashing.popleft()
            chunks += len(pieces)
            blocks: list[tuple[CID, bytes | memoryview]] = []
            crcs: list[int | None] = []
            for piece, (digest, crc) in zip(pieces, hasher.result(parts) if parts else []):
                cid = CID.from_digest(RAW, digest)
                blocks.append((cid, piece))
                crcs.append(crc)
                for block in builder.add_chunk(cid, len(piece)):
                    blocks.append(block)
                    crcs.append(None)
            ingest.put(blocks, crcs)
            if buf is not None and pool is not None:
                ingest.release(pool, buf)  # reused once hashed and every block in it written

        # sha512 is not computed here (see `sha512`), unless the caller expects a sha512 hash
        hasher = shared_chunk_hasher()
        with self.ingest(("sha256", "sha512") if expect is not None and expect.algo == "sha512"
                         else ("sha256",)) as ingest:
            for buf, view in read_pieces(source, pool, name or "input"):
                if len(head) < 512:
                    head += bytes(view[: 512 - len(head)])
                ingest.hash(view)
                pieces = list(chunker.feed(view))
                hashing.append((buf, pieces, hasher.submit(pieces) if pieces else []))
                if len(hashing) > HASH_AHEAD:
                    take(ingest)
                if progress:
                    progress(len(view))
            pieces = list(chunker.finish())
            hashing.append((None, pieces, hasher.submit(pieces) if pieces else []))
            while hashing:
                take(ingest)
            hashes = ingest.digests()
            size = ingest.size
            if expect is not None and hashes.get(expect.algo) != expect.digest:
                raise CorruptData(f"{name or 'input'} does not match the expected {expect.algo} "
                                  f"({expect.sri}); got {HashKey(expect.algo, hashes[expect.algo]).sri}")
            media_type = sniff_media_type(head)
            root, root_data, index_blocks = builder.finish(size, hashes, media_type, name)
            ingest.put(index_blocks + [(root, root_data)])
            aliases = [HashKey(a, d).alias for a, d in hashes.items()]
            new_root = ingest.commit(lambda index: index.put_root(
                root, "archive", size, name, media_type, aliases, ingest.seen.keys(), verified=True))
        if "sha512" not in hashes:
            known = self.index.known_digest(root, "sha512")
            if known is not None:
                hashes["sha512"] = known
        return AddResult(root, size, hashes, name, media_type, chunks, ingest.new_blocks, ingest.new_bytes,
                         not new_root)

    def add_nar(self, stream, narinfo=None, store_path=None, params: ChunkerParams = DEFAULT_PARAMS):
        """Ingest a NAR stream as a NAR manifest (see narstore.RepoNarStore.add_nar)."""
        from .narstore import RepoNarStore

        return RepoNarStore(self).add_nar(narinfo, stream, store_path=store_path, params=params)

    def stream_nar(self, store_hash: str) -> Iterator[bytes]:
        """The NAR of the store path with this 32-character hash, verified (see narstore)."""
        from .narstore import RepoNarStore

        return RepoNarStore(self).stream_nar(store_hash)

    # -- blocks from elsewhere (the swarm) ---------------------------------------------------
    def put_blocks(self, blocks: list[tuple[CID, bytes]]) -> int:
        """Store blocks that arrived from a peer. Each is re-hashed against its CID here, whoever
        checked it before; a mismatch raises CorruptData and stores nothing. Returns the bytes written.
        The blocks stay unreferenced (gc may collect them) until `register_root` claims them."""
        written = self.write_blocks(blocks)
        self.commit_blocks([(c, len(d)) for c, d in blocks])
        return written

    def write_blocks(self, blocks: list[tuple[CID, bytes]], verified: bool = False) -> int:
        """The first half of `put_blocks`: verify and append the blocks (one write for the batch), so
        `load_block` can read them at once, without recording them yet. Until `commit_blocks`, they are
        dead bytes to `verify` and `gc`. Inside `recording_blocks`, the recording claims them (and those of
        them another writer appended or recorded already), so no other failing writer takes them back.
        `verified=True` only from a receiver that has itself just hashed each of these bytes against its
        CID (the bitswap engine, the DAG stream's order check): hashing them again proves nothing new."""
        self.require_writable()
        if not verified:
            for cid, data in blocks:
                if not cid.verify(data):
                    raise CorruptData(f"block {cid} does not match its CID; refusing to store it")
        recording = _committed_blocks.get()
        self.claim_blocks(recording if recording is not None else _UNOWNED, [c.buffer for c, _ in blocks])
        known = self.index.known_blocks([c for c, _ in blocks])
        pending = self.packs.pending
        todo = [(c, d) for c, d in blocks if c.buffer not in known]
        new = sum(len(d) for c, d in todo if c.buffer not in pending)
        self.packs.append(todo)  # shares the records of pending ones; DiskFull leaves none pending, cuts back
        if recording is not None:  # appended, maybe never recorded: a failed fetch takes these back too
            recording.extend(c for c, _ in todo)
        return new

    def commit_blocks(self, blocks: list[tuple[CID, int]], drop_cached: bool = False, durable: bool = True) -> None:
        """The second half: one flush to disk, then the index rows (the order crash safety needs). With
        `drop_cached`, the blocks' pages leave the page cache once durable (`PackFiles.drop_cached`: for a
        fetch streaming blocks nobody reads back soon). `durable=False`: the rows' commit does not wait for
        the WAL's fsync (`Index.transaction`), for blocks no root claims yet; the bytes are flushed first
        all the same."""
        self.require_writable()
        pending = self.packs.pending
        written = [(c, loc) for c, _ in blocks if (loc := pending.get(c.buffer)) is not None]
        if not written:
            return
        self.flush()
        with self.index.transaction(durable):
            self.record_blocks(written)
        self.blocks_committed(written)
        if drop_cached and self.durable:
            self.packs.drop_cached(loc for _, loc in written)
        recording = _committed_blocks.get()
        if recording is not None:
            recording.extend(c for c, _ in written)
        else:
            self.unclaim_blocks(_UNOWNED, [c.buffer for c, _ in written])

    @contextlib.contextmanager
    def recording_blocks(self) -> Iterator[list[CID]]:
        """Collect the CIDs `write_blocks` appends and `commit_blocks` records inside this block (this task, the
        tasks it starts and the worker threads they call: a context variable), so a failed fetch can take them
        back (`drop_unclaimed_blocks`). The recording claims them until the block ends."""
        recording: list[CID] = []
        token = _committed_blocks.set(recording)
        try:
            yield recording
        finally:
            _committed_blocks.reset(token)
            self.unclaim_blocks(recording, [c.buffer for c in recording])

    def drop_unclaimed_blocks(self, cids: list[CID]) -> int:
        """Take back those of `cids` (the list `recording_blocks` gave) that no root references and no other
        unfinished writer claims (what a failed fetch stored): a block only appended stops being pending, a
        recorded one loses its index row (rows before bytes, as in gc). Their bytes are dead space then, not
        counted by `stored_bytes`: the dead tail of the pack being appended to is cut off at once, a pack left
        with no record is removed, and dead records between live ones wait for gc's compaction. Returns how
        many blocks were taken back."""
        self.require_writable()
        keys = self.unclaim_blocks(cids, dict.fromkeys(c.buffer for c in cids))
        if not keys:
            return 0
        locations = self.packs.forget_pending(keys)
        removed = len(locations)
        with self.index.transaction():
            for key in keys:
                cid = CID(key)
                loc = self.index.locate(cid)
                cur = self.index.db.execute("DELETE FROM blocks WHERE cid = ? AND refs <= 0", (key,))
                if cur.rowcount:
                    removed += 1
                    if loc is not None:
                        locations.append(loc)
            self.packs.cut_back(self.index.committed_end)  # inside: no other transaction's rows half there
        for pack in {loc.pack for loc in locations} - {self.packs.active}:
            self._remove_if_dead(pack)
        return removed

    def has_block(self, cid: CID) -> bool:
        return self.index.has_block(cid)

    def register_root(self, root: CID) -> RootInfo:
        """Claim an archive whose blocks are all stored (e.g. fetched from peers): check the manifest
        tree and sizes, then record the root, its aliases and its block references in one transaction.
        Its whole-archive sha256 is checked on its first full read (`stream`)."""
        self.require_writable()
        manifest = self.manifest(root)
        cids = self.stored_links(root, iter_blocks(manifest, self.load_block), "the manifest of", raw_only=True)
        aliases = [HashKey(a, d).alias for a, d in manifest.hashes.items() if a in ("sha256", "sha512")]
        with self.index.transaction():
            self.index.put_root(root, "archive", manifest.size, manifest.name, manifest.media_type, aliases, cids)
        return self.root_info(root)

    def stored_links(self, root: CID, links: Iterable[tuple[CID, int]], what: str = "the manifest of",
                     raw_only: bool = False) -> dict[CID, None]:
        """The root and every block it links (`links`: (CID, size), as a manifest walk yields them), checked to
        be stored with the sizes the manifest says (one index query per batch): what `put_root` records as its
        references. NotFound or CorruptData names the first block that is not. `raw_only`: sizes are checked
        for raw blocks only (an archive manifest records its index nodes' sizes loosely)."""
        cids: dict[CID, None] = {root: None}
        batch: list[tuple[CID, int]] = []

        def check() -> None:
            have = self.index.block_sizes([c for c, _ in batch])
            for cid, size in batch:
                bsize = have.get(cid.buffer)
                if bsize is None:
                    raise NotFound(f"{root} is missing block {cid}; fetch it before registering it")
                if bsize != size and (not raw_only or cid.codec == RAW):
                    raise CorruptData(f"block {cid} has {bsize} bytes, {what} {root} says {size}")
                cids[cid] = None
            batch.clear()

        for link in links:
            batch.append(link)
            if len(batch) >= READ_BATCH:
                check()
        check()
        return cids

    def add_aliases(self, root: CID, aliases: Iterable[str]) -> None:
        """Record more aliases of a complete root: only hashes the caller verified against its bytes
        (lock-file sha1/sha384/h1 hashes, see prefetch.py)."""
        self.require_writable()
        with self.index.transaction():
            self.index.add_aliases(root, aliases)

    # -- reading -----------------------------------------------------------------------------
    def resolve(self, key: str | HashKey | RootKey) -> CID:
        parsed = parse_key(key) if isinstance(key, str) else key
        if isinstance(parsed, RootKey):
            if self.index.get_root(parsed.cid) is None:
                raise NotFound(f"{parsed.cid} is not in the repo")
            return parsed.cid
        root = self.index.resolve_alias(parsed.alias)
        if root is None and getattr(parsed, "algo", None) == "sha512":
            root = self._find_by_lazy_hash(parsed)
        if root is None:
            raise NotFound(f"no archive with {parsed.alias} in the repo")
        return root

    # -- lazy hashes -------------------------------------------------------------------------
    # sha256 is every archive's key and is computed at add; sha512 (npm integrity, the /sha512/ mirror) only
    # when first asked for: `sha512(root)`, or a lookup by a sha512 key that no recorded alias answers, which
    # hashes the archives that have none yet. A writable repo records what it computed (an alias), so each
    # archive is hashed once; the daemon also hashes new archives in the background (node.py).
    def sha512(self, root: CID) -> bytes:
        """The archive's sha512: recorded, else computed now from its verified bytes (and recorded)."""
        known = self.index.known_digest(root, "sha512")
        if known is None:
            manifest = self.manifest(root)
            known = manifest.hashes.get("sha512")
        if known is None:
            h = hashlib.sha512()
            for data in self.stream(root):
                h.update(data)
            known = h.digest()
            self._record_alias(root, HashKey("sha512", known).alias)
        return known

    def fill_hashes(self, roots: Iterable[CID] | None = None) -> list[CID]:
        """Compute and record the sha512 of these archives (default: every complete one without it)."""
        todo = list(roots) if roots is not None else self.index.archives_without("sha512")
        done = []
        for root in todo:
            info = self.index.get_root(root)
            if info is None or info.kind != "archive" or not info.complete:
                continue
            if self.index.known_digest(root, "sha512") is None:
                self.sha512(root)
                done.append(root)
        return done

    def _find_by_lazy_hash(self, key: HashKey) -> CID | None:
        for root in self.index.archives_without(key.algo):
            try:
                if self.sha512(root) == key.digest:
                    return root
            except (CorruptData, NotFound):
                continue  # an archive that cannot be read whole cannot be the answer
        return None

    def _record_alias(self, root: CID, alias: str) -> None:
        if not self.writable:
            return  # computed for this caller only; a writable open records it
        with self.index.transaction():
            self.index.add_alias(root, alias)

    def root_info(self, root: CID) -> RootInfo:
        info = self.index.get_root(root)
        if info is None:
            raise NotFound(f"{root} is not in the repo")
        return info

    def _locate(self, cid: CID) -> Location:
        # Pending before the index, never the other way round: a commit records a block's row and only then
        # stops it being pending (`commit_blocks`), so a block stored all along is found in one of the two
        # whenever the commit lands. Index first, a commit between the two looks left it in neither (a
        # fetch's digest or a NAR streamed while it arrives failed with "missing" at random).
        loc = self.packs.pending.get(cid.buffer) or self.index.locate(cid)
        if loc is None:
            raise NotFound(f"block {cid} is not in the repo")
        return loc

    def load_block(self, cid: CID) -> bytes:
        """A block's bytes, checked against the crc32 recorded when they were verified and appended."""
        return self.packs.read(cid, self._locate(cid), self._relocate)

    def _relocate(self, cid: CID) -> Location | None:
        return self.index.locate(cid)

    def load_blocks(self, links: Iterable[tuple[CID, int]]) -> Iterator[bytes]:
        """Many blocks' bytes in order, read in batches: one index query per `READ_BATCH` blocks and one
        pread per run of adjacent records (the warm path: no thread hop, no hashing beyond the crc32)."""
        batch: list[tuple[CID, int]] = []
        for link in links:
            batch.append(link)
            if len(batch) >= READ_BATCH:
                yield from self._load_batch(batch)
                batch = []
        if batch:
            yield from self._load_batch(batch)

    def _locate_batch(self, batch: list[tuple[CID, int]]) -> list[tuple[CID, Location]]:
        # Pending ones first, then the index for the rest (the order `_locate` explains).
        pending = self.packs.pending
        found = {k: loc for c, _ in batch if (loc := pending.get(k := c.buffer)) is not None} if pending else {}
        rest = [c for c, _ in batch if c.buffer not in found] if found else [c for c, _ in batch]
        if rest:
            found.update(self.index.locate_many(rest))
        items = []
        for cid, size in batch:
            loc = found.get(cid.buffer)
            if loc is None:
                raise NotFound(f"block {cid} is missing from the repo; run `p2pcache verify --repair`")
            if loc.size != size:
                raise CorruptData(f"block {cid} has {loc.size} bytes, its manifest says {size}")
            items.append((cid, loc))
        return items

    def _load_batch(self, batch: list[tuple[CID, int]]) -> Iterator[bytes]:
        yield from self.packs.read_many(self._locate_batch(batch), relocate=self._relocate)

    def manifest(self, root: CID) -> ArchiveManifest:
        return ArchiveManifest.decode(self.load_block(root))

    def load_views(self, links: Iterable[tuple[CID, int]]) -> Iterator[memoryview]:
        """As `load_blocks`, as views into each run's read buffer (no copy per block)."""
        batch: list[tuple[CID, int]] = []
        for link in links:
            batch.append(link)
            if len(batch) >= READ_BATCH:
                yield from self.packs.read_views(self._locate_batch(batch), relocate=self._relocate)
                batch = []
        if batch:
            yield from self.packs.read_views(self._locate_batch(batch), relocate=self._relocate)

    def stream(self, root: CID, progress: Progress | None = None) -> Iterator[bytes]:
        """The archive's original bytes, every block checked; a root whose whole sha256 was never checked
        here (fetched from peers) is checked on this read, before the iterator finishes (CorruptData)."""
        info = self.root_info(root)
        if info.kind == "nar":  # a NAR manifest: reassembled from its file tree, checked against narHash
            from .narstore import stream_nar_root

            yield from stream_nar_root(self, root, progress)
            return
        with self.readers.reading(root):  # gc evicts it only once this read is over
            for data in coalesce(self._archive_views(root, self.root_info(root))):
                yield data
                if progress:
                    progress(len(data))

    def _archive_views(self, root: CID, info: RootInfo) -> Iterator[memoryview]:
        """An archive root's bytes as views, each block crc-checked and, for a root never checked here, the
        whole against its sha256 (CorruptData before the iterator ends)."""
        if not info.complete:
            raise CorruptData(f"{root} is incomplete in this repo (blocks missing or corrupt); add or fetch it again")
        manifest = self.manifest(root)
        check = not self.index.is_verified(root)
        hasher = StreamHasher(("sha256",)) if check else None
        total = 0
        try:
            for data in self.load_views(iter_chunks(manifest, self.load_block)):
                if hasher:
                    hasher.update(data)  # a view of an immutable read buffer: safe on the hash thread
                total += len(data)
                yield data
            digest = hasher.result()["sha256"] if hasher else manifest.hashes["sha256"]
        except BaseException:
            if hasher:
                hasher.abandon()
            raise
        if total != manifest.size or digest != manifest.hashes["sha256"]:
            raise CorruptData(f"{root}: reassembled bytes do not match the archive's sha256; run `p2pcache verify`")
        if check:
            self.mark_verified(root)
        self.touch(root)

    def mark_verified(self, root: CID) -> None:
        if self.writable:
            try:
                self.index.set_verified(root)
            except Exception:
                pass  # advisory: the next read checks again

    def touch(self, root: CID) -> None:
        """Remember that `root` was read now; recorded with the others every TOUCH_WRITE_EVERY seconds (a
        WAL commit with synchronous=FULL per served NAR cost 8-24 ms of fsync on these VMs, before the
        response's last bytes went out)."""
        with self._touch_lock:
            self._touched[root] = time.time()
            due = time.monotonic() - self._touches_written >= TOUCH_WRITE_EVERY
        if due:
            self.write_touches()

    def write_touches(self) -> None:
        """Record the remembered last-access times (one transaction). Advisory: a busy index must not fail a
        read, and what it could not record is kept for the next time."""
        with self._touch_lock:
            touched, self._touched = self._touched, {}
            self._touches_written = time.monotonic()
        if not touched or not self.writable:
            return
        try:
            with self.index.transaction():
                for root, at in touched.items():
                    self.index.touch(root, at)
        except Exception:
            with self._touch_lock:
                for root, at in touched.items():
                    self._touched.setdefault(root, at)

    def get_to_file(self, root: CID, out: Path | str, progress: Progress | None = None) -> int:
        """Write the archive to `out` atomically: temp file, fsync, verify, rename. Every block is checked
        (crc32 of its record, see blockstore.py) as it is read, and a root never checked here against its
        sha256 before the rename. This thread reads and checks; a writer thread (`FileWriter`) writes
        `writev`s of views into the read buffers (no copy to join them) of about `GET_WRITE` bytes and starts
        the disk writing as the file grows, so the fsync at the end waits for the last few MiB only."""
        with self.readers.reading(root):  # gc evicts it only once this read is over
            return self._get_to_file(root, Path(out), progress)

    def _get_to_file(self, root: CID, out: Path, progress: Progress | None) -> int:
        tmp = out.with_name(f".{out.name}.p2pcache-{os.getpid()}.part")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                info = self.root_info(root)
                nar = info.kind == "nar"  # a NAR is reassembled from its file tree (narstore), progress and all
                pieces: Iterable[bytes | memoryview] = self.stream(root, progress) if nar else self._archive_views(root, info)
                with FileWriter(fd) as writer:
                    group: list[bytes | memoryview] = []
                    have = 0
                    for data in pieces:
                        group.append(data)
                        have += len(data)
                        if have >= GET_WRITE or len(group) >= 512:
                            writer.write(group, have)
                            if progress and not nar:
                                progress(have)
                            group, have = [], 0
                    if group:
                        writer.write(group, have)
                        if progress and not nar:
                            progress(have)
                    written = writer.finish()
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, out)
        except OSError as e:
            _unlink_quietly(tmp)
            raise disk_error(e, out) from None
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return written

    # -- pins, GC ----------------------------------------------------------------------------
    def set_pinned(self, key: str, pinned: bool) -> CID:
        self.require_writable()
        root = self.resolve(key)
        self.index.set_pinned(root, pinned)
        return root

    def stored_bytes(self) -> int:
        return self.index.total_block_bytes()

    def disk_bytes(self) -> int:
        """Bytes of all pack files (live records plus dead space gc has not reclaimed yet)."""
        return sum(self.packs.file_size(p) or 0 for p in self.packs.pack_ids())

    def gc(self, max_size: int | None = None, compact_below: float = COMPACT_BELOW) -> GcReport:
        """Drop unreferenced blocks; with `max_size`, evict least-recently-used unpinned roots until the
        blocks fit; then give the space back: remove packs no row points into and compact packs whose live
        share fell below `compact_below`. A block still used by a kept root is never removed."""
        self.require_writable()
        report = GcReport()
        self._drop_unreferenced(report)
        if max_size is not None:
            self.write_touches()  # the eviction order is by last access
            for root in self.index.lru_unpinned():
                if self.index.total_block_bytes() <= max_size:
                    break
                with self.readers.evicting(root) as free:
                    if not free:  # being read (here or by another process): kept this time
                        report.roots_kept_in_use += 1
                        continue
                    with self.index.transaction():
                        self.index.remove_root(root)
                report.roots_removed.append(root)
                self._drop_unreferenced(report)
            report.over_quota = self.index.total_block_bytes() > max_size
        self.compact(compact_below, report)
        report.bytes_after = self.index.total_block_bytes()
        report.disk_bytes_after = self.disk_bytes()
        return report

    def _drop_unreferenced(self, report: GcReport) -> None:
        with self.index.transaction():
            rows = self.index.db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blocks WHERE refs <= 0").fetchone()
            self.index.db.execute("DELETE FROM blocks WHERE refs <= 0")
        # Only rows went: the bytes they pointed at are dead space until `compact` rewrites their pack.
        report.blocks_removed += rows[0]
        report.bytes_freed += rows[1]

    def compact(self, compact_below: float = COMPACT_BELOW, report: GcReport | None = None) -> GcReport:
        """Reclaim dead pack space. A pack with no live rows is removed; a pack whose live share is below
        `compact_below` has its live records copied to the active pack (flushed), the rows pointed at the
        copies in one transaction, and only then is the old pack removed. A kill at any instant leaves either
        the old rows (the copies are a dead tail) or the new ones (the old pack is a pack with no rows)."""
        self.require_writable()
        report = report or GcReport()
        for path in self.packs.stray_files():
            _unlink_quietly(path)
            report.garbage_files_removed += 1
        usage = self.index.pack_usage()
        active = self.packs.active
        active_size = self.packs.file_size(active) or 0 if active is not None else 0
        if active is not None and active_size > len(PACK_MAGIC) and usage.get(active, 0) < compact_below * active_size:
            self.packs.roll()  # the pack being appended to qualifies too: appends move on to a new one
        for pack in self.packs.pack_ids():
            if pack == self.packs.active:
                continue
            size = self.packs.file_size(pack) or 0
            live = usage.get(pack, 0)
            if live == 0:
                if self._remove_if_dead(pack):
                    report.disk_bytes_reclaimed += size
                    report.garbage_files_removed += 1
                continue
            if live >= compact_below * size:
                continue
            self._compact_pack(pack)
            if self._remove_if_dead(pack):
                report.disk_bytes_reclaimed += size
                report.packs_compacted += 1
        return report

    def _remove_if_dead(self, pack: int) -> bool:
        """Remove a pack no row points into. Pending appends are checked before the rows: a concurrent add
        commits its rows before it stops being pending, so a pack seen with neither can gain no row."""
        if self.packs.has_pending(pack) or self.index.committed_end(pack):
            return False
        self.packs.forget_pack(pack)
        return True

    def _compact_pack(self, pack: int) -> None:
        rows = self.index.blocks_in_pack(pack)
        parts: list[list[tuple[CID, Location]]] = [[]]
        size = 0
        for row in rows:  # batches of at most COMPACT_BATCH bytes: memory stays flat whatever the pack holds
            if size >= COMPACT_BATCH:
                parts.append([])
                size = 0
            parts[-1].append(row)
            size += row[1].size
        for part in parts:
            good, crcs, bad = [], [], []
            for (cid, loc), data in zip(part, self.packs.read_many(part, check=False)):
                if len(data) == loc.size and zlib.crc32(data) == loc.crc:
                    good.append((cid, data))
                    crcs.append(loc.crc)
                else:
                    bad.append(cid)
            moved = self.packs.append(good, crcs)
            self.flush()
            with self.index.transaction():
                self.index.set_locations(moved, from_pack=pack)
                for cid in bad:  # never carry damaged bytes over: drop the block, its roots become incomplete
                    self.index.drop_block(cid)
            self.blocks_committed(moved)

    # -- verification ------------------------------------------------------------------------
    def verify(self, repair: bool = False) -> VerifyReport:
        """Re-hash every block against its CID (pack order, one pread per run of records); report (and with
        `repair`, drop) corrupt and missing ones, marking the roots that used them incomplete; report packs no
        row points into as garbage (removed by `repair` and by `gc`) and dead bytes inside packs."""
        if repair:
            self.require_writable()
        report = VerifyReport(repaired=repair)
        live: dict[int, int] = {}
        for part in self.index.iter_locations():
            for (cid, loc), data in zip(part, self.packs.read_many(part, check=False)):
                report.blocks_checked += 1
                live[loc.pack] = live.get(loc.pack, 0) + loc.size + RECORD_HEADER.size + len(cid.buffer)
                if len(data) != loc.size:
                    report.missing.append(cid)
                elif not cid.verify(data):
                    report.corrupt.append(cid)
        report.missing.extend(c for c, _ in self.index.unmigrated(1 << 62))  # rows with no bytes in any pack
        garbage_packs = []
        pack_ids = list(self.packs.pack_ids())
        newest = max(pack_ids, default=None)
        for pack in pack_ids:
            size = self.packs.file_size(pack) or 0
            # The newest pack with nothing past its header is where the next writer appends (a fresh repo's,
            # or one a failed fetch was cut back to): empty, not garbage, whether or not a writer has it open.
            if pack == newest and size <= len(PACK_MAGIC):
                continue
            if pack not in live and pack != self.packs.active:
                garbage_packs.append(pack)
                report.garbage_files.append(str(self.packs.path(pack)))
            else:
                report.dead_bytes += max(0, size - len(PACK_MAGIC) - live.get(pack, 0))
        report.garbage_files.extend(str(p) for p in self.packs.stray_files())
        report.refcount_errors = len(self.index.check_refcounts())
        if repair:
            with self.index.transaction():
                affected: set[CID] = set()
                for cid in report.corrupt + report.missing:
                    affected.update(self.index.drop_block(cid))
                affected.update(self.index.roots_missing_blocks())
                self.index.mark_incomplete(affected)
                self.index.fix_refcounts()
            report.roots_incomplete = sorted(affected, key=lambda c: c.buffer)
            for pack in garbage_packs:
                self._remove_if_dead(pack)
            for p in self.packs.stray_files():
                _unlink_quietly(p)
        else:
            affected = set(self.index.roots_missing_blocks())
            for cid in report.corrupt + report.missing:
                affected.update(self.index.roots_of_block(cid))
            report.roots_incomplete = sorted(affected, key=lambda c: c.buffer)
        return report


class _IterReader:
    """A `.read(n)` view of an iterator of byte pieces (pieces may be any size)."""

    def __init__(self, pieces: Iterator[bytes]):
        self.pieces = pieces
        self.rest = b""

    def read(self, n: int = -1) -> bytes:
        parts, have = [self.rest], len(self.rest)
        while n < 0 or have < n:
            piece = next(self.pieces, None)
            if piece is None:
                break
            parts.append(piece)
            have += len(piece)
        data = b"".join(parts)
        if n < 0 or len(data) <= n:
            self.rest = b""
            return data
        self.rest = data[n:]
        return data[:n]


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def coalesce(pieces: Iterable[bytes | memoryview], size: int = SERVE_PIECE) -> Iterator[bytes]:
    """Join small pieces (one per block) into bytes of about `size`: a consumer that hands each piece to
    another thread (an HTTP response) then hops once per MiB, not once per block."""
    parts: list[bytes | memoryview] = []
    have = 0
    for piece in pieces:
        if not parts and len(piece) >= size:
            yield piece if type(piece) is bytes else bytes(piece)
            continue
        parts.append(piece)
        have += len(piece)
        if have >= size:
            yield b"".join(parts)
            parts, have = [], 0
    if parts:
        yield b"".join(parts)


def write_version(path: Path, version: str) -> None:
    """Replace the repo's `version` file atomically (and durably: the format decides how it is read)."""
    tmp = path / "version.tmp"
    with open(tmp, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / "version")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
