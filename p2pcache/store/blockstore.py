"""Blocks on disk in append-only pack files (repo format 2), chosen by measurement (bench/store_layouts.py).

Owns the bytes of blocks: `packs/<id>.pack` files, each a header then records appended one after another:

    record = crc32(data) u32 | len(data) u32 | len(cid) u8 | cid bytes | data

The SQLite index (index.py) maps a CID to (pack, offset of its data, size, crc32); a record is trusted only
once the index has a row for it. Bytes without a row (the tail of an interrupted write, blocks that gc
dropped, a compaction's copy that never committed) are dead space: `verify` reports it, `gc` compacts packs
whose live share fell below a threshold and removes packs no row points into.

Writes: many blocks go out in one `pwritev` (no per-block syscall, no per-block file), and durability is one
`fdatasync` per written pack at `barrier()`, which callers run once per batch before the index transaction
that trusts the batch commits. Only the process holding the repo lock appends; it appends to the newest pack
after cutting that pack back to the end of its last indexed record (bytes past it can only be crash garbage),
or starts a new pack when the newest is full.

Reads: one `pread` per block, or one `pread` per run of adjacent records for a batch (`read_many`). Every
record's bytes were hashed against its CID before they were appended (an add computes the CID from them; a
block from a peer is hashed by the receiver that got it, or by `Repo.write_blocks`), so a read re-checks the record's crc32 against the one
in the index: what the disk can do to bytes after they were written (bit rot, a torn or misdirected write, a
truncated file) fails that check, and a wrong block cannot come back under a CID because the index row, not
the pack, says where a CID's bytes are. `verify` re-hashes every block against its CID in full.

Must not: know about roots, manifests or NARs; decide what is garbage (the index does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from isal.isal_zlib import crc32  # zlib's crc32, 3-4x faster (ISA-L, PCLMUL): the same values

from ..content.cid import CID
from ..errors import CorruptData, DiskFull, NotFound, RepoError

PACK_MAGIC = b"p2pcache pack 2\n"
RECORD_HEADER = struct.Struct(">IIB")
PACK_MAX = 256 << 20  # a pack is closed for appends past this size
SPAN_MAX = 8 << 20  # one pread covers adjacent records up to this many bytes
SPAN_GAP = 4096  # ...when the records are at most this far apart (headers, small dead records)
_IOV_MAX = 1024

_libc = None


def syncfs(fd: int) -> None:
    """Flush the file system holding `fd` (Linux syncfs); fall back to a global sync elsewhere."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    if isinstance(_libc, ctypes.CDLL) and hasattr(_libc, "syncfs"):  # _libc is a CDLL or False here
        if _libc.syncfs(fd) == 0:
            return
    os.sync()


SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_STEP = 8 << 20  # with `writeback_ahead`: start writeback of every this many appended bytes


def _libc_fn(name: str, argtypes: list, restype: object = ctypes.c_int) -> Callable[..., int] | None:
    """A libc function with its signature set, or None where libc has none of that name (not Linux)."""
    global _libc
    if _libc is None:
        lib = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(lib, use_errno=True) if lib else False
    fn = getattr(_libc, name, None) if isinstance(_libc, ctypes.CDLL) else None
    if fn is not None:
        fn.argtypes = argtypes
        fn.restype = restype
    return fn


def sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range(fd, offset, nbytes, flags), or None where there is none (not Linux)."""
    return _libc_fn("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])


FALLOC_FL_KEEP_SIZE = 1
PREALLOC_STEP = 32 << 20  # the active pack's disk blocks are reserved this far ahead of its end


def fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(fd, mode, offset, len), or None where there is none (not Linux)."""
    return _libc_fn("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


def write_all(fd: int, parts: list[bytes | memoryview], total: int) -> None:
    """Write `parts` (`total` bytes) at the file position in one writev, finishing a short write piece by piece."""
    n = os.writev(fd, parts)
    if n == total:
        return
    view = memoryview(b"".join(parts))[n:]
    while view:
        n = os.write(fd, view)
        if n == 0:
            raise OSError(errno.ENOSPC, "no space left on device")
        view = view[n:]


def disk_error(e: OSError, where: Path | str) -> Exception:
    """Turn an OSError from a write into the error a user should see."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full while writing {where}: free space or shrink the repo with `p2pcache gc --max-size`")
    return RepoError(f"cannot write {where}: {e.strerror or e}")


@dataclass(frozen=True, slots=True)
class Location:
    """Where a block's bytes are: pack id, offset of the data (past the record header), size, crc32."""

    pack: int
    offset: int
    size: int
    crc: int


def _missing(cid: CID) -> NotFound:
    return NotFound(f"block {cid} is missing from the repo; run `p2pcache verify --repair`")


def _corrupt(cid: CID) -> CorruptData:
    return CorruptData(f"block {cid} is corrupt on disk; run `p2pcache verify --repair`")


class PackFiles:
    """The pack files of one repo. Thread-safe: appends hold a lock; reads are plain preads."""

    def __init__(self, root: Path, pack_max: int = PACK_MAX, writeback_ahead: bool = False):
        self.root = root
        # Start the disk writing appended bytes as they come (sync_file_range WRITE, which does not wait), so
        # the barrier's fdatasync waits only for the last few MiB: for repos that barrier (durable ones).
        self._writeback = sync_file_range() if writeback_ahead else None
        self._kicked = 0  # offset in the active pack up to which writeback was started
        self._recycled = 0  # … and up to which its pages were dropped from the page cache (`_recycle`)
        self._keep_cached = 0  # readers of fresh appends under way (`keeping_cached`): no `_recycle` meanwhile
        self._keep_lock = threading.Lock()
        # Reserve the active pack's disk blocks ahead of its end (fallocate KEEP_SIZE, in PREALLOC_STEP steps):
        # the file system then allocates once per step, not at every writeback, which measured 30-40 % less CPU
        # per appended byte on ext4 (and steadier). The size stays the end of the last record; a pack that
        # stops being appended to is cut back to it, which gives the reserve back.
        self._fallocate = fallocate()
        self._reserved = 0  # offset in the active pack up to which blocks are reserved
        self.dir = root / "packs"
        self.pack_max = pack_max
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one barrier at a time: a barrier returns only once its bytes are synced
        self._read_fds: dict[int, int] = {}
        self._active: int | None = None  # pack being appended to, and its write fd and end
        self._active_fd = -1
        self._end = 0
        self._dirty: set[int] = set()  # packs appended to since the last barrier
        self._dir_dirty = False
        self.pending: dict[bytes, Location] = {}  # appended, not yet in the index

    def create_dirs(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, pack: int) -> Path:
        return self.dir / f"{pack:08d}.pack"

    def pack_ids(self) -> list[int]:
        """Every pack file on disk, by id; stray files are not packs."""
        if not self.dir.exists():
            return []
        out = []
        for entry in os.scandir(self.dir):
            stem, dot, ext = entry.name.partition(".")
            if ext == "pack" and stem.isdigit() and len(stem) == 8:
                out.append(int(stem))
        return sorted(out)

    def stray_files(self) -> list[Path]:
        """Files under packs/ that are not packs (never written by this code; reported as garbage)."""
        if not self.dir.exists():
            return []
        ids = {f"{p:08d}.pack" for p in self.pack_ids()}
        return sorted(Path(e.path) for e in os.scandir(self.dir) if e.name not in ids)

    def file_size(self, pack: int) -> int | None:
        try:
            return os.stat(self.path(pack)).st_size
        except FileNotFoundError:
            return None

    @property
    def active(self) -> int | None:
        return self._active

    # -- writing -----------------------------------------------------------------------------------
    def start(self, committed_end: Callable[[int], int]) -> None:
        """Choose the pack to append to (caller holds the repo lock): the newest, cut back to the end of its
        last indexed record (`committed_end(pack)`), or a new one when it is full or unreadable."""
        with self._lock:
            if self._active is not None:
                return
            ids = self.pack_ids()
            if ids:
                last = ids[-1]
                end = max(committed_end(last), len(PACK_MAGIC))
                try:
                    fd = os.open(self.path(last), os.O_RDWR)
                except OSError:
                    fd = -1
                if fd >= 0:
                    if end < self.pack_max and os.pread(fd, len(PACK_MAGIC), 0) == PACK_MAGIC:
                        try:
                            os.ftruncate(fd, end)
                        except OSError as e:
                            os.close(fd)
                            raise disk_error(e, self.path(last)) from None
                        self._active, self._active_fd, self._end = last, fd, end
                        self._kicked = self._reserved = self._recycled = end
                        return
                    os.close(fd)
            self._new_pack((ids[-1] + 1) if ids else 1)

    def _new_pack(self, pack: int) -> None:
        self._drop_reserve()
        path = self.path(pack)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, PACK_MAGIC)
            except OSError:
                os.close(fd)
                raise
        except OSError as e:
            raise disk_error(e, path) from None
        if self._active_fd >= 0:
            os.close(self._active_fd)
        self._active, self._active_fd, self._end = pack, fd, len(PACK_MAGIC)
        self._kicked = self._recycled = 0
        self._reserved = len(PACK_MAGIC)
        self._dirty.add(pack)
        self._dir_dirty = True

    def _reserve(self, start: int, end: int) -> None:
        """Reserve the active pack's blocks up to `end` and PREALLOC_STEP beyond (advisory: where the file system
        cannot, or the disk is full, the write itself allocates, or reports ENOSPC)."""
        if self._fallocate is None or end <= self._reserved:
            return
        at = max(start, self._reserved)
        if self._fallocate(self._active_fd, FALLOC_FL_KEEP_SIZE, at, end + PREALLOC_STEP - at) == 0:
            self._reserved = end + PREALLOC_STEP
        elif ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            self._fallocate = None  # not on this file system: stop asking

    def _drop_reserve(self) -> None:
        """Give back the blocks reserved past the active pack's end (cutting a file to its own size frees them)."""
        if self._active_fd >= 0 and self._reserved > self._end:
            try:
                os.ftruncate(self._active_fd, self._end)
            except OSError:
                pass
        self._reserved = self._end

    def append(self, blocks: Sequence[tuple[CID, bytes | memoryview]],
               crcs: Sequence[int | None] | None = None, recycle: bool = False) -> list[tuple[CID, Location]]:
        """Append blocks (skipping those already pending) in one vectored write; durable after `barrier()`.
        They are readable through `pending` at once. Returns the new locations. `crcs[i]`, where given and not
        None, is block i's crc32, computed by the caller (an ingest's hashing threads) while the bytes were hot.
        `recycle`: these appends' pages leave the page cache behind the writeback (`_recycle`)."""
        if self._active is None:
            raise RepoError("internal: pack store not started for writing")
        out: list[tuple[CID, Location]] = []
        with self._lock:
            if self._end >= self.pack_max:
                self._new_pack(self._active + 1)
            parts: list[bytes | memoryview] = []
            end = start = self._end
            seen: set[bytes] = set()
            for i, (cid, data) in enumerate(blocks):
                key = cid.buffer
                if key in seen:
                    continue
                seen.add(key)
                old = self.pending.get(key)
                if old is not None:  # appended already (another add, not committed yet): share that record
                    out.append((cid, old))
                    continue
                crc = crcs[i] if crcs is not None else None
                if crc is None:
                    crc = crc32(data)
                header = RECORD_HEADER.pack(crc, len(data), len(key)) + key
                parts.append(header)
                parts.append(data)
                loc = Location(self._active, end + len(header), len(data), crc)
                out.append((cid, loc))
                end = loc.offset + loc.size
            if not parts:
                return out
            self._reserve(start, end)
            try:
                pos = start
                for i in range(0, len(parts), _IOV_MAX):
                    group = parts[i : i + _IOV_MAX]
                    want = sum(len(p) for p in group)
                    n = os.pwritev(self._active_fd, group, pos)
                    if n != want:  # short write: finish it piece by piece (ENOSPC surfaces here)
                        self._write_rest(group, n, pos)
                    pos += want
            except OSError as e:
                try:  # give back what part of the batch reached the disk: nothing of it is pending or indexed
                    os.ftruncate(self._active_fd, start)
                    self._reserved = start
                except OSError:
                    pass
                raise disk_error(e, self.path(self._active)) from None
            self._end = end
            self._dirty.add(self._active)
            for cid, loc in out:
                self.pending[cid.buffer] = loc
            if self._writeback is not None and end - self._kicked >= WRITEBACK_STEP:
                kicked = min(self._kicked, start)
                self._writeback(self._active_fd, kicked, end - kicked, SYNC_FILE_RANGE_WRITE)  # advisory
                if recycle:
                    self._recycle(kicked)
                else:  # what others appended stays cached: a later recycling append starts past it
                    self._recycled = max(self._recycled, kicked)
                self._kicked = end
        return out

    @contextmanager
    def keeping_cached(self) -> Iterator[None]:
        """While this lasts, appends leave their pages in the page cache (no `_recycle`): for a fetch whose
        asker reads each block back as it arrives (a build-cache restore writes the files from them), where a
        dropped page would be read back from disk."""
        with self._keep_lock:
            self._keep_cached += 1
        try:
            yield
        finally:
            with self._keep_lock:
                self._keep_cached -= 1

    def _recycle(self, behind: int) -> None:
        """Drop the active pack's pages before `behind` (where writeback was started one step or more ago, so
        they are clean by now) from the page cache, so that the next appends reuse them: on this project's VMs
        a write into fresh page-cache pages cost 0.26-0.41 CPU-s per 109 MiB against 0.025 into recycled ones
        (the pages a growing page cache takes are handed over by the host on first touch), which was a third of
        a NAR upload's CPU. Pages still dirty or under writeback are skipped by the kernel (advisory, no wait,
        nothing changes for durability); reading a dropped block back is a disk read (0.06 s per 109 MiB
        here). Only for repos that start writeback ahead (durable ones), and only for the appends of NAR
        ingests and build-cache saves (`Repo.ingest(recycle=True)`): a `get` of an archive right after its `add` measured 0.68x of
        sha256 with the pages kept and 0.30x with them dropped (`bench/ingest.py --quick`, loaded: the read
        back and the output's fsync share the disk), where the warm NAR server's CPU did not rise."""
        if not hasattr(os, "posix_fadvise") or behind <= self._recycled or self._keep_cached:
            return
        try:
            os.posix_fadvise(self._active_fd, self._recycled, behind - self._recycled, os.POSIX_FADV_DONTNEED)
        except OSError:
            return
        self._recycled = behind

    def _write_rest(self, group: list, done: int, pos: int) -> None:
        view = memoryview(b"".join(group))[done:]
        pos += done
        while view:
            n = os.pwrite(self._active_fd, view, pos)
            if n == 0:
                raise OSError(errno.ENOSPC, "no space left on device")
            view, pos = view[n:], pos + n

    def barrier(self) -> None:
        """Make every append so far durable: fdatasync each pack written to, and the directory if a pack is new."""
        with self._sync_lock:
            self._barrier()

    def _barrier(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            dir_dirty, self._dir_dirty = self._dir_dirty, False
        try:
            for pack in sorted(dirty):  # its own fd: a concurrent roll may close the append fd
                fd = os.open(self.path(pack), os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            if dir_dirty:
                fd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as e:
            with self._lock:
                self._dirty |= dirty
                self._dir_dirty |= dir_dirty
            raise disk_error(e, self.dir) from None

    def drop_cached(self, locations: Iterable[Location]) -> None:
        """Drop these records' pages from the page cache (posix_fadvise DONTNEED over the span each pack's
        records cover; pages still dirty, and the partial pages at either end, stay): for bytes made durable
        (`barrier()`) that nobody is about to read again, such as a fetch's blocks after its commit. A
        streaming writer that keeps its written pages makes the kernel take fresh pages for every byte, which
        measured 5-10x the CPU of reusing dropped ones on this project's VMs (the pages freed go back to the
        host); reading a dropped block later costs a disk read. Advisory: nothing changes where there is no
        posix_fadvise."""
        if not hasattr(os, "posix_fadvise"):
            return
        spans: dict[int, list[int]] = {}
        for loc in locations:
            span = spans.get(loc.pack)
            if span is None:
                spans[loc.pack] = [loc.offset, loc.offset + loc.size]
            else:
                span[0] = min(span[0], loc.offset)
                span[1] = max(span[1], loc.offset + loc.size)
        for pack, (start, end) in spans.items():
            fd = self._fd(pack)
            if fd >= 0:
                try:
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
                except OSError:
                    pass

    def roll(self) -> None:
        """Start a new pack for appends (so compaction may rewrite the one that was active)."""
        with self._lock:
            if self._active is not None:
                self._new_pack(self._active + 1)

    def has_pending(self, pack: int) -> bool:
        with self._lock:
            return any(loc.pack == pack for loc in self.pending.values())

    def forget_pending(self, cids: Iterable[bytes]) -> list[Location]:
        """Appended blocks that will never be recorded (a failed fetch takes them back): their records are
        dead space from now on (`cut_back`, gc's compaction). Returns the locations of those that were pending."""
        with self._lock:
            return [loc for loc in (self.pending.pop(c, None) for c in cids) if loc is not None]

    def cut_back(self, committed_end: Callable[[int], int]) -> int:
        """Give back the dead tail of the pack being appended to: the bytes past its last indexed
        (`committed_end`, queried with no index transaction in flight) or pending record. Returns the bytes freed."""
        with self._lock:
            pack = self._active
            if pack is None:
                return 0
            end = max([len(PACK_MAGIC), committed_end(pack)]
                      + [loc.offset + loc.size for loc in self.pending.values() if loc.pack == pack])
            if end >= self._end:
                return 0
            try:
                os.ftruncate(self._active_fd, end)
            except OSError:
                return 0
            freed, self._end = self._end - end, end
            self._kicked = min(self._kicked, end)
            self._recycled = min(self._recycled, end)
            self._reserved = end  # the cut freed the reserve too
            self._dirty.add(pack)
            return freed

    def committed(self, cids: Iterable[bytes]) -> None:
        """The index now holds these pending blocks: forget them here."""
        with self._lock:
            for c in cids:
                self.pending.pop(c, None)

    # -- reading -----------------------------------------------------------------------------------
    def _fd(self, pack: int) -> int:
        fd = self._read_fds.get(pack)
        if fd is None:
            try:
                fd = os.open(self.path(pack), os.O_RDONLY)
            except FileNotFoundError:
                return -1
            old = self._read_fds.setdefault(pack, fd)
            if old != fd:
                os.close(fd)
                fd = old
        return fd

    def read(self, cid: CID, loc: Location, relocate: Callable[[CID], Location | None] | None = None) -> bytes:
        """A block's bytes, checked against the crc32 its index row recorded (see `read_many` for `relocate`)."""
        fd = self._fd(loc.pack)
        try:
            data = os.pread(fd, loc.size, loc.offset) if fd >= 0 else b""
        except OSError:
            data = b""
        if len(data) == loc.size and crc32(data) == loc.crc:
            return data
        if relocate is not None:
            moved = relocate(cid)
            if moved is not None and moved != loc:
                return self.read(cid, moved)
        if len(data) != loc.size:
            raise _missing(cid)
        raise _corrupt(cid)

    def _runs(self, items: Sequence[tuple[CID, Location]]) -> Iterator[tuple[int, int, bytes]]:
        """Runs of adjacent records in `items` (same pack, in order, gaps up to SPAN_GAP, up to SPAN_MAX bytes):
        (first index, end index, the run's bytes from one pread; short or empty if the pack is damaged)."""
        i, n = 0, len(items)
        while i < n:
            first = items[i][1]
            j, span_end = i + 1, first.offset + first.size
            while j < n:
                loc = items[j][1]
                if (loc.pack != first.pack or loc.offset < span_end or loc.offset - span_end > SPAN_GAP
                        or loc.offset + loc.size - first.offset > SPAN_MAX):
                    break
                span_end = loc.offset + loc.size
                j += 1
            fd = self._fd(first.pack)
            try:
                span = os.pread(fd, span_end - first.offset, first.offset) if fd >= 0 else b""
            except OSError:
                span = b""
            yield i, j, span
            i = j

    def read_many(self, items: Sequence[tuple[CID, Location]], check: bool = True,
                  relocate: Callable[[CID], Location | None] | None = None) -> Iterator[bytes]:
        """The blocks' bytes in the order asked, one pread per run of adjacent records in a pack. With
        `check`, a record that fails its crc32 or comes back short is looked up again with `relocate` (gc may
        have moved it since it was located) and read once more before it is reported."""
        for i, j, span in self._runs(items):
            base = items[i][1].offset
            for k in range(i, j):
                kcid, loc = items[k]
                a = loc.offset - base
                data = span[a : a + loc.size] if j > i + 1 else span
                if check and (len(data) != loc.size or crc32(data) != loc.crc):
                    data = self.read(kcid, loc, relocate)
                yield data

    def read_views(self, items: Sequence[tuple[CID, Location]],
                   relocate: Callable[[CID], Location | None] | None = None) -> Iterator[memoryview]:
        """As `read_many` with `check`, but each block comes as a view into its run's one pread buffer (no
        copy per block: for a consumer that writes or hashes the bytes and lets them go)."""
        for i, j, raw in self._runs(items):
            span = memoryview(raw)
            base = items[i][1].offset
            for k in range(i, j):
                kcid, loc = items[k]
                a = loc.offset - base
                data = span[a : a + loc.size]
                if len(data) != loc.size or crc32(data) != loc.crc:
                    data = memoryview(self.read(kcid, loc, relocate))
                yield data

    def forget_pack(self, pack: int) -> None:
        """Remove a pack file no index row points into (the caller checked, in a committed transaction)."""
        with self._lock:
            if pack == self._active:
                return
            fd = self._read_fds.pop(pack, None)
            if fd is not None:
                os.close(fd)
            try:
                self.path(pack).unlink()
            except FileNotFoundError:
                pass

    def close(self) -> None:
        with self._lock:
            for fd in self._read_fds.values():
                os.close(fd)
            self._read_fds.clear()
            if self._active_fd >= 0:
                self._drop_reserve()
                os.close(self._active_fd)
            self._active_fd, self._active = -1, None
