"""The repo's one ingest pipeline: what archive ingest (`Repo.add_stream`) and NAR ingest
(`RepoNarStore.add_nar`) both build on.

Owns the parallel part of an ingest and its commit order. The caller's thread reads, chunks and builds the
manifest; it hands `Ingest` the stream's buffers (`hash`) and its blocks (`put`). Two worker threads take them
in order: one hashes the whole stream, one appends the blocks this repo does not hold yet to the pack (hashlib,
crc32 and pwritev release the GIL on big buffers, so the two run side by side with the caller). An archive's
chunk CIDs and crc32s are computed on `ChunkHasher`'s threads, a read buffer's chunks split in one part per
thread, so that no one thread does two passes over every byte. With `BufferPool`, read buffers are reused once
both workers are done with them (no fresh pages to fault in for every read). A durable repo starts writeback
of what it appended as it goes (blockstore's `writeback_ahead`), so the one flush at the end waits for the last
few MiB. `commit` waits for the workers, makes the appends durable (`Repo.flush`), and records blocks and root
in one index transaction; only then do the blocks stop being pending. `abort` (any failure, also on `with` exit
by an exception) takes the appends back: they stop being pending at once and the pack's dead tail is cut off.

Must not: know manifests, NARs or narinfos (the callers' business); hold more than the pool's buffers (or
the queues' items) in memory; record an index row before the bytes it points at are flushed.
"""

from __future__ import annotations

import hashlib
import queue
import sqlite3
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator, Protocol, Sequence, cast

from ..content.cid import CID
from ..errors import RepoError
from .blockstore import SYNC_FILE_RANGE_WRITE, WRITEBACK_STEP, Location, crc32, sync_file_range, write_all

if TYPE_CHECKING:
    from .index import Index
    from .repo import Repo

Block = tuple[CID, "bytes | memoryview"]


class StreamHasher:
    """Hashes a stream of buffers on a background thread (hashlib releases the GIL on big buffers). Used by
    reads that check a whole archive; an ingest hashes on its own worker (`Ingest.hash`)."""

    _STOP = object()

    def __init__(self, algos: tuple[str, ...], depth: int = 4):
        self.hashes = {a: hashlib.new(a) for a in algos}
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"hash-{'+'.join(algos)}")
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                buf = self.q.get()
                if buf is self._STOP:
                    return
                for h in self.hashes.values():
                    h.update(buf)
        except BaseException as e:  # surfaced by result()
            self.error = e

    def update(self, buf: bytes | memoryview) -> None:
        self.q.put(buf)

    def result(self) -> dict[str, bytes]:
        self.q.put(self._STOP)
        self.thread.join()
        if self.error:
            raise self.error
        return {a: h.digest() for a, h in self.hashes.items()}

    def abandon(self) -> None:
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        self.q.put(self._STOP)


class BufferPool:
    """Read buffers an ingest reuses: `get` blocks until the worker gave one back (which bounds the bytes in
    flight to `count × size`). A buffer is handed back by `Ingest.release`, after the worker hashed it and
    wrote every block that points into it."""

    def __init__(self, count: int = 8, size: int = 4 << 20):
        self.size = size
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._made = 0
        self._count = count

    def get(self) -> bytearray:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._made < self._count:
            self._made += 1
            return bytearray(self.size)
        return self._free.get()

    def put(self, buf: bytearray) -> None:
        self._free.put(buf)


def _digests_and_crcs(chunks: Sequence[bytes | memoryview]) -> list[tuple[bytes, int]]:
    sha256, crc = hashlib.sha256, crc32
    return [(sha256(c).digest(), crc(c)) for c in chunks]  # crc32 right after sha256: the chunk is in cache


def _digests(chunks: Sequence[bytes | memoryview]) -> list[bytes]:
    sha256 = hashlib.sha256
    return [sha256(c).digest() for c in chunks]


class ChunkHasher:
    """The sha256 (for the CID) and crc32 (for the pack record) of every chunk, on `threads` worker threads:
    each batch of chunks is split into one part per thread (both hashes release the GIL on chunk-sized buffers),
    so with the ingest worker hashing the whole stream every core has work. The caller submits a read buffer's
    chunks and takes the answer a buffer or two later (one thread hop per part, none per chunk)."""

    def __init__(self, threads: int = 2):
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cid")

    def submit(self, chunks: Sequence[bytes | memoryview]) -> list[Future[list[tuple[bytes, int]]]]:
        n = len(chunks)
        if n < 2 * self.threads:
            return [self._pool.submit(_digests_and_crcs, chunks)]
        step = -(-n // self.threads)
        return [self._pool.submit(_digests_and_crcs, chunks[i : i + step]) for i in range(0, n, step)]

    def digests(self, chunks: list[memoryview]) -> Callable[[], list[bytes]]:
        """The sha256 digests of `chunks` (no crc32), as a function that waits for them: a NAR manifest
        builder's `hash_chunks`."""
        n = len(chunks)
        step = max(1, -(-n // self.threads))
        parts = [self._pool.submit(_digests, chunks[i : i + step]) for i in range(0, n, step)]

        def wait() -> list[bytes]:
            out: list[bytes] = []
            for f in parts:
                out += f.result()
            return out

        return wait

    @staticmethod
    def result(parts: list[Future[list[tuple[bytes, int]]]]) -> list[tuple[bytes, int]]:
        out: list[tuple[bytes, int]] = []
        for f in parts:
            out += f.result()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ChunkHasher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileWriter:
    """Writes groups of buffers to a file on a thread of its own, in order (`write` returns at once unless
    `depth` groups wait), starting writeback every `WRITEBACK_STEP` bytes (sync_file_range WRITE, which does not
    wait) so that the caller's fsync waits for the tail only. The caller must leave the buffers alone once
    handed over (views of immutable read buffers are what `Repo.get_to_file` hands it). An error in the thread
    comes out of the next `write` or of `finish`; leaving the `with` block stops the thread either way."""

    _STOP = object()

    def __init__(self, fd: int, depth: int = 4):
        self.fd = fd
        self.written = 0
        self._error: BaseException | None = None
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, daemon=True, name="file-writer")
        self._thread.start()

    def _run(self) -> None:
        writeback = sync_file_range()
        kicked = 0
        while True:
            item = self._q.get()
            if item is self._STOP:
                return
            if self._error is not None:
                continue
            group, total = item
            try:
                write_all(self.fd, group, total)
                self.written += total
                if writeback is not None and self.written - kicked >= WRITEBACK_STEP:
                    writeback(self.fd, kicked, self.written - kicked, SYNC_FILE_RANGE_WRITE)  # advisory
                    kicked = self.written
            except BaseException as e:  # re-raised on the caller's thread
                self._error = e

    def write(self, group: list[bytes | memoryview], total: int) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((group, total))

    def finish(self) -> int:
        """Wait until everything handed over is written; the bytes written."""
        self._stop()
        if self._error is not None:
            raise self._error
        return self.written

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._q.put(self._STOP)
            self._thread.join()

    def __enter__(self) -> "FileWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:  # the caller failed: drop what waits, then stop
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
        self._stop()


_shared_hasher: ChunkHasher | None = None
_shared_lock = threading.Lock()


def shared_chunk_hasher() -> ChunkHasher:
    """The process's one `ChunkHasher` (two threads, started on first use): every ingest hands its chunks to it,
    so a small add starts no threads and concurrent ingests share the cores instead of oversubscribing them."""
    global _shared_hasher
    with _shared_lock:
        if _shared_hasher is None:
            _shared_hasher = ChunkHasher()
        return _shared_hasher


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


READ_SIZE = 4 << 20  # bytes per read of an ingest's input (and the size of a BufferPool buffer)


def read_pieces(stream: "BinaryIO | Iterable[bytes] | Readable", pool: BufferPool | None,
                what: str) -> Iterator[tuple[bytearray | None, memoryview]]:
    """(pool buffer or None, the bytes read) of each piece of an ingest's input: a file read into `pool`'s
    buffers (`READ_SIZE` at a time), a stream's `read`s, or an iterable's pieces as they come. A read error is
    one line naming `what`."""
    readinto: Callable[[memoryview], int | None] | None = getattr(stream, "readinto", None)
    read: Callable[[int], bytes] | None = getattr(stream, "read", None)
    if readinto is not None or read is not None:
        while True:
            buf = pool.get() if pool is not None and readinto is not None else None
            try:
                if buf is not None and readinto is not None:
                    view = memoryview(buf)[: read_into(readinto, buf)]
                else:
                    assert read is not None
                    view = memoryview(read(READ_SIZE))
            except OSError as e:
                raise RepoError(f"cannot read {what}: {e.strerror}") from None
            if not view:
                return
            yield buf, view
    else:
        for piece in cast("Iterable[bytes]", stream):  # neither readinto nor read: the pieces themselves
            # A caller's reused bytearray must not change under the workers.
            yield None, memoryview(piece if type(piece) is bytes else bytes(piece))


def read_into(read: Callable[[memoryview], int | None], buf: bytearray) -> int:
    """Fill `buf` from a `readinto` (short reads from pipes and sockets are continued); the bytes read,
    fewer than `len(buf)` only at the end of the stream."""
    view = memoryview(buf)
    have = 0
    while have < len(buf):
        n = read(view[have:])
        if not n:
            break
        have += n
    return have


class _Release:
    """A read buffer to hand back to its pool once both ingest workers are past it."""

    __slots__ = ("pool", "buf", "left", "lock")

    def __init__(self, pool: BufferPool, buf: bytearray):
        self.pool, self.buf, self.left, self.lock = pool, buf, 2, threading.Lock()


class Ingest:
    """One ingest into a writable repo (see the module docstring). Use as a context manager, or call
    `abort` on failure. Not thread-safe: one caller thread drives it."""

    _STOP = object()

    def __init__(self, repo: "Repo", algos: tuple[str, ...] = ("sha256",), depth: int = 16,
                 recycle: bool = False):
        repo.require_writable()
        self.repo = repo
        self.recycle = recycle  # the appends' pages leave the page cache behind the writeback (PackFiles._recycle)
        self.hashes = {a: hashlib.new(a) for a in algos}
        self.seen: dict[CID, int] = {}  # every block of this ingest (new or not): the root's references
        self.new_blocks = 0
        self.new_bytes = 0
        self.size = 0  # bytes hashed
        self.written: list[tuple[CID, Location]] = []
        self._appended: list[bytes] = []  # keys this ingest made (or shares as) pending
        self._error: BaseException | None = None
        self._done = False
        # Two workers, each taking its queue in order: one hashes the whole stream, one appends blocks to the
        # pack (the one pass over the stream and the copy into the pack run side by side, not one after the other).
        self._queues: dict[str, queue.Queue] = {"hash": queue.Queue(maxsize=depth), "write": queue.Queue(maxsize=depth)}
        self._threads = [threading.Thread(target=self._run, args=(q,), daemon=True, name=f"ingest-{n}")
                         for n, q in self._queues.items()]
        for t in self._threads:
            t.start()

    # -- the workers -------------------------------------------------------------------------------------
    def _run(self, q: queue.Queue) -> None:
        packs = self.repo.packs
        while True:
            kind, item = q.get()
            if kind is self._STOP:
                return
            if self._error is not None:
                if kind == "digest":
                    item[0].set()
                continue  # drain: the caller sees the error at its next call
            try:
                if kind == "hash":
                    for h in self.hashes.values():
                        h.update(item)
                elif kind == "blocks":
                    blocks, crcs = item
                    self.written.extend(packs.append(blocks, crcs, recycle=True) if self.recycle
                                        else packs.append(blocks, crcs))
                elif kind == "release":  # both workers are past this buffer: the second one hands it back
                    with item.lock:
                        item.left -= 1
                        if item.left == 0:
                            item.pool.put(item.buf)
                else:  # "digest": the hashes of everything sent before it
                    item[1] = {a: h.digest() for a, h in self.hashes.items()}
                    item[0].set()
            except BaseException as e:  # re-raised on the caller's thread
                self._error = e

    def _send(self, kind: str, item: object) -> None:
        if self._error is not None:
            raise self._error
        if self._done:
            raise RepoError("internal: ingest already committed or aborted")
        if kind == "release":
            for q in self._queues.values():
                q.put((kind, item))
        else:
            self._queues["write" if kind == "blocks" else "hash"].put((kind, item))

    def _stop_workers(self, drain: bool) -> None:
        self._done = True
        for q in self._queues.values():
            if drain:
                try:
                    while True:
                        q.get_nowait()
                except queue.Empty:
                    pass
            q.put((self._STOP, None))
        for t in self._threads:
            t.join()
        self._appended = [c.buffer for c, _ in self.written]

    # -- the caller's side -------------------------------------------------------------------------------
    def hash(self, buf: bytes | memoryview) -> None:
        """Add `buf` to the whole-stream hashes (in order with the blocks; `buf` must not change until
        released)."""
        self.size += len(buf)
        self._send("hash", buf)

    def put(self, blocks: Sequence[Block], crcs: Sequence[int | None] | None = None) -> None:
        """Blocks of the stream (in any order; repeats are fine): those the repo does not hold are appended
        by the worker. One index query per call. `crcs`, if given, are the blocks' crc32s (None: the worker
        computes it), aligned with `blocks`."""
        fresh = []
        fresh_crcs: list[int | None] = []
        seen = self.seen
        for i, (cid, data) in enumerate(blocks):
            if cid not in seen:
                seen[cid] = len(data)
                fresh.append((cid, data))
                fresh_crcs.append(crcs[i] if crcs is not None else None)
        if not fresh:
            return
        known = self.repo.index.known_blocks([c for c, _ in fresh])
        self.repo.claim_blocks(self, [c.buffer for c, _ in fresh])  # a failing fetch must not take them back
        if known:
            keep = [i for i, (c, _) in enumerate(fresh) if c.buffer not in known]
            fresh = [fresh[i] for i in keep]
            fresh_crcs = [fresh_crcs[i] for i in keep]
        if fresh:
            self.new_blocks += len(fresh)
            self.new_bytes += sum(len(d) for _, d in fresh)
            self._send("blocks", (fresh, fresh_crcs))

    def release(self, pool: BufferPool, buf: bytearray) -> None:
        """Give `buf` back to `pool` once both workers are past everything sent so far."""
        self._send("release", _Release(pool, buf))

    def digests(self) -> dict[str, bytes]:
        """The whole-stream digests of everything `hash`ed so far (waits for the worker). Nothing is
        recorded yet: the caller may still `put` the blocks that name them (a manifest's root), then `commit`."""
        box: list = [threading.Event(), None]
        self._send("digest", box)
        box[0].wait()
        if self._error is not None:
            raise self._error
        return box[1]

    def commit(self, record: Callable[["Index"], bool], durable: bool = True) -> bool:
        """Make the appends durable, then in one index transaction record the blocks and call `record(index)`
        (which puts the root and what else belongs to it); returns what `record` returned. `durable=False`:
        the transaction's own commit does not wait for its fsync (`Index.transaction`); the appends are
        flushed before it all the same, so no row can reach the disk before the bytes it points at."""
        if self._done:
            raise RepoError("internal: ingest already committed or aborted")
        self._stop_workers(drain=False)
        if self._error is not None:
            raise self._error
        repo = self.repo
        repo.flush()
        with repo.index.transaction(durable):
            repo.record_blocks(self.written)
            result = record(repo.index)
        repo.blocks_committed(self.written)
        self._appended = []
        repo.unclaim_blocks(self, [c.buffer for c in self.seen])
        return result

    def abort(self) -> None:
        """Stop the worker and take back what it appended (nothing of it was recorded)."""
        if not self._done:
            self._stop_workers(drain=True)
        keys, self._appended = self._appended, []
        self.repo.take_back_pending(self, keys, [c.buffer for c in self.seen])

    def __enter__(self) -> "Ingest":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            try:
                self.abort()
            except (OSError, RepoError, sqlite3.Error):
                pass  # the error that ended the ingest is the one to see; what stays pending is dead at restart

