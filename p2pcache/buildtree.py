"""The caller's side of the build cache: walk build directories into a tree manifest, write a tree back
safely, and set timestamps so make-style tools rebuild exactly what changed.

Owns everything that touches the paths a user names. It runs in the process of the user who named them
(the `p2pcache cache` command), never in the daemon: the daemon only ever sees blocks (content-addressed
bytes it re-hashes) and a root CID, so it cannot be made to read or write a path on a caller's behalf, and
a caller gets nothing its own permissions would not give it. Blocks leave through a `BlockSink` (the repo
itself when no daemon runs, the daemon's upload API when one does); restore reads verified blocks through
a `load(cid)`.

Saving: entries are (top-level path, relative path, st_mode, st_mtime_ns, body) in sorted order; files that
fit in their entry are read here, larger ones are streamed to the sink in batches, which chunks and hashes
them (`buildcache.ingest_files`, in the daemon when one runs) and answers their bodies. A *stat cache* — the
previous save or restore of the same paths on this machine — lets a file whose type, mode, size and mtime
are unchanged (and whose mtime was at least a second older than that scan, against same-second rewrites)
reuse its previous body without being read, so an unchanged re-save reads no file contents. Special files
(devices, FIFOs, sockets) are skipped and reported.

Restoring is safe against a hostile manifest: every entry with an absolute path, `..`, `.` or empty
components, a device or other special file, a symlink whose target is absolute or leads outside the target
(checked lexically before and by real resolution after the restore) is refused and reported; the restore
never writes through a symlink (each directory is opened component by component with O_NOFOLLOW);
setuid, setgid and sticky bits are stripped; each file is written to a temp file, given its mode and
mtime, and renamed into place. Existing files that are not in the cache are left alone; a directory in
the way of a file is refused, not removed.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import stat
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

from .cacheupload import FILE_HEADER, open_for_upload
from .content.chunking import DEFAULT_PARAMS, ChunkerParams
from .content.cid import CID
from .content.treemanifest import (
    TreeEntry,
    TreeManifest,
    TreeManifestBuilder,
    file_chunks,
    iter_entries,
    iter_sources,
    path_problem,
    previous_tree,
)
from .errors import CorruptData, InvalidInput, NotFound, RepoError

__all__ = ["ArrivingBlocks", "BlockSink", "FilePieces", "PathScan", "RestoreReport", "SaveReport", "TreeSuperseded",
           "fd_pieces", "file_pieces",
           "paths_id", "previous_entries", "reading_tree", "restore_tree", "save_tree", "scan_paths", "unchanged_tree", "undo_restore"]

READ_SIZE = 4 << 20
BATCH_BYTES = 8 << 20  # page blocks offered to the sink at a time
UPLOAD_BATCH_BYTES = 32 << 20  # file bytes per upload to the sink (one request to a daemon)
UPLOAD_BATCH_FILES = 4096
UPLOADS_AHEAD = 2  # upload batches in flight while the tree takes the bodies of earlier ones
PIECE_BYTES = 1 << 20  # an upload body's pieces
DRAIN_EVERY = 256  # entries walked between two looks at which bodies came back
GROUP_FILES = 64  # files of one directory written by one restore task, their chunks read in one batch
RACY_NS = 1_000_000_000  # a file modified within this long before a scan is re-read next time
_tmp_counter = itertools.count()


class BlockSink(Protocol):
    """Where a save's blocks go: the repo, or the daemon that owns it. `offer` stores those of the blocks
    the sink lacks and may work in the background (the saver never waits on it while it reads); `files`
    takes files' contents (`file_pieces`), chunks them, stores their blocks and answers their bodies (the
    sink computes every CID itself); `close` waits for both, raises what they met, and returns (new
    blocks, new bytes) stored since the last close."""

    def missing(self, cids: list[CID]) -> set[CID]: ...
    def offer(self, blocks: list[tuple[CID, bytes]]) -> None: ...
    def files(self, length: int, pieces: Iterable[bytes]) -> "Future[list]": ...
    def close(self) -> tuple[int, int]: ...


def paths_id(paths: list[str]) -> str:
    """A stable name for "these paths on this machine", for the stat cache (real paths, in order)."""
    real = "\0".join(os.path.realpath(p) for p in paths)
    return hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()


# -- saving ---------------------------------------------------------------------------------------------


Digest = bytes


@dataclass
class SaveReport:
    root: CID | None = None
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0  # logical bytes of regular files
    files_read: int = 0  # files whose contents were read (not reused from the stat cache)
    new_blocks: int = 0
    new_bytes: int = 0
    sources: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    scan_time: float = 0.0
    scan_digest: "Digest | None" = None  # the walk's `PathScan.digest` (None with sources: those are hashed anew)

    def to_json(self) -> dict:
        return {"root": str(self.root), "files": self.files, "dirs": self.dirs, "symlinks": self.symlinks,
                "bytes": self.bytes, "files_read": self.files_read, "new_blocks": self.new_blocks,
                "new_bytes": self.new_bytes, "sources": self.sources,
                "skipped": [f"{p} ({why})" for p, why in self.skipped]}


def _walk(top: str) -> Iterator[tuple[bytes, os.stat_result]]:
    """(relative path, lstat) of `top` and everything under it, not following symlinks; unsorted."""
    st = os.lstat(top)
    yield b"", st
    if not stat.S_ISDIR(st.st_mode):
        return
    todo = [(os.fsencode(top), b"")]
    while todo:
        full, rel = todo.pop()
        try:
            it = os.scandir(full)
        except OSError as e:
            raise RepoError(f"cannot read directory {os.fsdecode(full)}: {e.strerror}") from None
        with it:
            for entry in it:
                name = entry.name if isinstance(entry.name, bytes) else os.fsencode(entry.name)
                path = rel + b"/" + name if rel else name
                est = entry.stat(follow_symlinks=False)
                yield path, est
                if stat.S_ISDIR(est.st_mode):
                    todo.append((os.path.join(full, name), path))


def _top_links(body: object) -> list[CID]:
    return [link[0] for link in body[2]] if isinstance(body, list) else []


@dataclass
class PathScan:
    """One walk of the paths to save: every entry's lstat in tree order, when the walk began, and a digest
    of everything of each entry that goes into a tree besides file contents (top-level path as given,
    relative path, st_mode, mtime, size of a file, target of a symlink; the chunker parameters).

    Two walks with the same digest describe the same tree whenever the files' contents are those the
    stat cache trusts (same size and mtime, not racily new): a save whose walk has the digest of the
    save that made the previous tree, with no file racily new, *is* that tree again, so it is neither
    read nor rebuilt (`unchanged_tree`)."""

    paths: list[str]
    entries: list[tuple[int, bytes, os.stat_result]]
    time: float
    digest: bytes
    newest_mtime_ns: int


def scan_paths(paths: list[str], params: ChunkerParams = DEFAULT_PARAMS) -> PathScan:
    if not paths:
        raise InvalidInput("cache save needs at least one PATH")
    started = time.time()
    entries: list[tuple[int, bytes, os.stat_result]] = []
    for top, p in enumerate(paths):
        try:
            found = sorted(_walk(p), key=lambda e: e[0])
        except FileNotFoundError:
            raise InvalidInput(f"cannot save {p}: it does not exist") from None
        except OSError as e:
            raise RepoError(f"cannot read {p}: {e.strerror}") from None
        entries += [(top, rel, st) for rel, st in found]
    h = hashlib.sha256(b"p2pcache scan 1\0%r\0%d\0" % (params.to_ipld(), len(paths)))
    for p in paths:
        h.update(os.fsencode(p) + b"\0")
    newest = 0
    parts: list[bytes] = []
    for top, rel, st in entries:
        mode = st.st_mode
        extra = b""
        if stat.S_ISREG(mode):
            extra = b"%d" % st.st_size
            newest = max(newest, st.st_mtime_ns)
        elif stat.S_ISLNK(mode):
            full = os.path.join(os.fsencode(paths[top]), rel) if rel else os.fsencode(paths[top])
            try:
                extra = os.readlink(full)
            except OSError:
                extra = b"\0unreadable"
        parts.append(b"%d\0%s\0%d\0%d\0%s\0\0" % (top, rel, mode, st.st_mtime_ns, extra))
    h.update(b"".join(parts))
    return PathScan(list(paths), entries, started, h.digest(), newest)


def unchanged_tree(scan: PathScan, root: CID, digest: bytes | None, scan_time: float) -> SaveReport | None:
    """The report of a save of `scan` if it is exactly the tree `root` saved with scan `digest` at
    `scan_time` (see `PathScan`), else None. Reads no file and builds no block."""
    if digest is None or digest != scan.digest or scan.newest_mtime_ns >= int(scan_time * 1e9) - RACY_NS:
        return None
    report = SaveReport(root=root, scan_time=scan.time, scan_digest=scan.digest)
    for top, rel, st in scan.entries:
        mode = st.st_mode
        if stat.S_ISREG(mode):
            report.files += 1
            report.bytes += st.st_size
        elif stat.S_ISDIR(mode):
            report.dirs += 1
        elif stat.S_ISLNK(mode):
            report.symlinks += 1
        else:
            report.skipped.append((os.path.join(scan.paths[top], os.fsdecode(rel)) if rel else scan.paths[top],
                                   "special file"))
    return report


class _Upload:
    """One batch of files going to the sink (`BlockSink.files`) and, once it came back, their bodies."""

    __slots__ = ("files", "bytes", "future", "bodies")

    def __init__(self) -> None:
        self.files: list[tuple[bytes, int]] = []
        self.bytes = 0
        self.future: Future | None = None
        self.bodies: list | None = None

    def take(self) -> None:
        assert self.future is not None
        bodies = self.future.result()
        if len(bodies) != len(self.files):
            raise RepoError(f"the daemon answered {len(bodies)} bodies for an upload of {len(self.files)} files")
        self.bodies = bodies

    def body(self, i: int, size: int) -> object:
        assert self.bodies is not None
        body = self.bodies[i]
        if not (isinstance(body, list) and len(body) == 3 and body[0] == size):
            raise RepoError(f"the daemon answered a malformed body for {os.fsdecode(self.files[i][0])}")
        return body


def _read_small(full: bytes, size: int) -> bytes:
    """A file small enough to live in its entry, checked against the size its stat said."""
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise RepoError(f"cannot read {os.fsdecode(full)}: {e.strerror}") from None
    try:
        data = os.read(fd, size + 1)
        while len(data) < size + 1:  # short reads happen only at the end of a regular file, but be sure
            more = os.read(fd, size + 1 - len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    if len(data) != size:
        raise _changed(full, len(data), size)
    return data


def _changed(full: bytes, got: int, size: int) -> InvalidInput:
    more = "+" if got > size else ""
    return InvalidInput(f"{os.fsdecode(full)}: file changed while it was read ({got}{more} bytes, stat said {size}); "
                        "save again once the build has finished")


class FilePieces:
    """The upload body of `files` ((path, the size its stat said), in order), iterated: each file's
    `FILE_HEADER` and bytes, in pieces of about `PIECE_BYTES`. A file whose size is no longer what stat
    said raises InvalidInput (wherever the reader is: the upload ends there), so a torn file is never
    saved. A sink that can take the files as open descriptors (`cacheupload.DaemonBlockSink` over the
    daemon's file socket) reads `files` instead of iterating."""

    __slots__ = ("files",)

    def __init__(self, files: list[tuple[bytes, int]]):
        self.files = files

    def __iter__(self) -> Iterator[bytes]:
        return _pieces(self._opened(), os.read)

    def _opened(self) -> Iterator[tuple[int, int, bytes]]:
        for full, size in self.files:
            yield open_for_upload(full), size, full


file_pieces = FilePieces


def fd_pieces(files: Iterable[tuple[int, int, bytes]]) -> Iterator[bytes]:
    """`FilePieces`' body from descriptors already open ((fd, the size its stat said, its path for error
    lines)), read with pread (a descriptor handed over by another process shares its file offset with
    it); each is checked to be a regular file. The caller closes the descriptors."""
    def regular() -> Iterator[tuple[int, int, bytes]]:
        for fd, size, full in files:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidInput(f"{os.fsdecode(full)}: not a regular file; only regular files are saved")
            yield fd, size, full
    return _pieces(regular(), None, close=False)


def _pieces(files: Iterable[tuple[int, int, bytes]], read: Callable[[int, int], bytes] | None,
            close: bool = True) -> Iterator[bytes]:
    """The framed body of `files` ((fd, size, path)): `read(fd, n)` reads on (None: pread from 0)."""
    parts: list[bytes] = []
    have = 0
    for fd, size, full in files:
        try:
            parts.append(FILE_HEADER.pack(size))
            have += FILE_HEADER.size
            left = size
            while True:
                want = min(left + 1, READ_SIZE)  # one more than is left: a file that grew shows at once
                try:
                    buf = read(fd, want) if read is not None else os.pread(fd, want, size - left)
                except OSError as e:
                    raise RepoError(f"cannot read {os.fsdecode(full)}: {e.strerror}") from None
                if len(buf) > left:
                    raise _changed(full, size + 1, size)
                left -= len(buf)
                if len(buf) >= PIECE_BYTES:
                    if parts:
                        yield b"".join(parts)
                        parts, have = [], 0
                    yield buf
                elif buf:
                    parts.append(buf)
                    have += len(buf)
                    if have >= PIECE_BYTES:
                        yield b"".join(parts)
                        parts, have = [], 0
                if len(buf) < want:  # the end of the file
                    if left:
                        raise _changed(full, size - left, size)
                    break
        finally:
            if close:
                os.close(fd)
    if parts:
        yield b"".join(parts)


def save_tree(paths: list[str], sink: BlockSink, *, sources_dir: str | None = None,
              previous: "PreviousTree | None" = None, previous_scan: float = 0.0, threads: int = 4,
              progress: Callable[[int], None] | None = None, scan: PathScan | None = None) -> SaveReport:
    """Walk `paths` (or take the walk `scan` of them), store every block `sink` lacks, and return the
    report with the tree's root CID and the walk's digest.

    Files up to the manifest's inline size are read here and kept in their entries; larger ones go to
    the sink in batches (`BlockSink.files`: the sink reads them through `file_pieces`, and chunks and
    stores them), at most `UPLOADS_AHEAD` batches at a time, while the entries before them go into the
    tree as their bodies come back. `threads` hash the sources."""
    params = DEFAULT_PARAMS  # what the sink chunks with (`buildcache.ingest_files`)
    scan = scan_paths(paths, params) if scan is None else scan
    report = SaveReport(scan_time=scan.time, scan_digest=scan.digest if sources_dir is None else None)
    entries = scan.entries
    # Which files may reuse their previous body: same type, mode, size and mtime, not racily new, and
    # their blocks still in the repo (gc may have taken them).
    old_files = previous.files if previous is not None else {}
    racy_limit = int(previous_scan * 1e9) - RACY_NS
    reuse: dict[tuple[int, bytes], TreeEntry] = {}
    for top, rel, st in entries:
        old = old_files.get((top, rel))
        if (old is not None and old.is_file and old.mode == st.st_mode and old.size == st.st_size
                and old.mtime_ns == st.st_mtime_ns and st.st_mtime_ns < racy_limit):
            reuse[(top, rel)] = old
    # ... and their blocks, and the previous pages to be reused whole, still in the repo (gc may have run).
    pages = dict(previous.pages) if previous is not None else {}
    if (reuse or pages) and not (previous is not None and previous.held):
        links = list({c: None for e in reuse.values() for c in _top_links(e.body)})
        links += [cid for _, cid in pages.values()]
        gone: set[CID] = set()
        for i in range(0, len(links), 4096):
            gone |= sink.missing(links[i:i + 4096])
        if gone:
            reuse = {k: e for k, e in reuse.items() if not any(c in gone for c in _top_links(e.body))}
            pages = {k: v for k, v in pages.items() if v[1] not in gone}
    builder = TreeManifestBuilder(list(paths), params, sources_path=sources_dir, previous_pages=pages)
    inline = builder.inline
    pending: list[tuple[CID, bytes]] = []
    pending_bytes = 0

    def emit(blocks: list) -> None:
        nonlocal pending, pending_bytes
        for cid, data in blocks:
            pending.append((cid, bytes(data)))
            pending_bytes += len(data)
        if pending_bytes >= BATCH_BYTES:
            sink.offer(pending)
            pending, pending_bytes = [], 0

    # Entries wait here, in order, until their bodies are known: (top, rel, lstat, body, None, 0), or for a
    # file being uploaded (top, rel, lstat, None, its batch, its index in the batch).
    waiting: deque[tuple[int, bytes, os.stat_result, object, _Upload | None, int]] = deque()
    uploads: deque[_Upload] = deque()
    batch = _Upload()

    def drain(until: "_Upload | None" = None) -> None:
        """Add the waiting entries whose bodies are known to the tree; wait for the batch `until` (the
        oldest in flight) when the first waiting entry is one of its files."""
        while waiting:
            top, rel, st, body, up, i = waiting[0]
            if up is not None:
                if up.bodies is None:
                    if up.future is None or (up is not until and not up.future.done()):
                        return
                    up.take()
                    uploads.remove(up)
                body = up.body(i, st.st_size)
            waiting.popleft()
            emit(builder.add(TreeEntry(top, rel, st.st_mode, st.st_mtime_ns, body)))
            if progress and stat.S_ISREG(st.st_mode):
                progress(st.st_size)

    def submit() -> None:
        nonlocal batch
        if not batch.files:
            return
        while len(uploads) >= UPLOADS_AHEAD:
            drain(uploads[0])
        batch.future = sink.files(batch.bytes + len(batch.files) * FILE_HEADER.size, FilePieces(batch.files))
        uploads.append(batch)
        batch = _Upload()

    walked = 0
    for top, rel, st in entries:
        mode = st.st_mode
        full = os.path.join(os.fsencode(paths[top]), rel) if rel else os.fsencode(paths[top])
        if stat.S_ISREG(mode):
            report.files += 1
            report.bytes += st.st_size
            old = reuse.get((top, rel))
            if old is not None:
                waiting.append((top, rel, st, old.body, None, 0))
            elif st.st_size <= inline:
                report.files_read += 1
                waiting.append((top, rel, st, _read_small(full, st.st_size), None, 0))
            else:
                report.files_read += 1
                waiting.append((top, rel, st, None, batch, len(batch.files)))
                batch.files.append((full, st.st_size))
                batch.bytes += st.st_size
                if batch.bytes >= UPLOAD_BATCH_BYTES or len(batch.files) >= UPLOAD_BATCH_FILES:
                    submit()
        elif stat.S_ISDIR(mode):
            report.dirs += 1
            waiting.append((top, rel, st, None, None, 0))
        elif stat.S_ISLNK(mode):
            report.symlinks += 1
            waiting.append((top, rel, st, os.readlink(full), None, 0))
        else:
            report.skipped.append((os.path.join(paths[top], os.fsdecode(rel)) if rel else paths[top], "special file"))
        walked += 1
        if walked % DRAIN_EVERY == 0:
            drain()
    submit()
    while uploads:
        drain(uploads[0])
    drain()
    if sources_dir is not None:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache-sources") as pool:
            for rel, digest, mtime in _hash_sources(sources_dir, paths, pool):
                report.sources += 1
                emit(builder.add_source(rel, digest, mtime))
    root, root_data, blocks = builder.finish()
    emit(blocks + [(root, root_data)])
    if pending:
        sink.offer(pending)
    report.new_blocks, report.new_bytes = sink.close()
    report.root = root
    return report


def _hash_file(full: bytes) -> bytes:
    h = hashlib.sha256()
    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while True:
            buf = os.read(fd, READ_SIZE)
            if not buf:
                return h.digest()
            h.update(buf)
    finally:
        os.close(fd)


def _source_files(sources_dir: str, exclude: list[str]) -> list[tuple[bytes, os.stat_result]]:
    """Regular files under `sources_dir` (not under .git, not under the cached paths), sorted by path."""
    skip = {os.fsencode(os.path.realpath(p)) for p in exclude}
    base = os.fsencode(sources_dir)
    try:
        walked = sorted(_walk(sources_dir), key=lambda e: e[0])
    except OSError as e:
        raise InvalidInput(f"cannot read sources {sources_dir}: {e.strerror}") from None
    out = []
    pruned: list[bytes] = []
    for rel, st in walked:
        if any(rel.startswith(d + b"/") for d in pruned):
            continue
        if stat.S_ISDIR(st.st_mode) and rel and (
                rel.rsplit(b"/", 1)[-1] == b".git" or os.path.realpath(os.path.join(base, rel)) in skip):
            pruned.append(rel)
        elif stat.S_ISREG(st.st_mode) and rel:
            out.append((rel, st))
    return out


def _hash_sources(sources_dir: str, exclude: list[str], pool: ThreadPoolExecutor) -> Iterator[tuple[bytes, bytes, int]]:
    files = _source_files(sources_dir, exclude)
    base = os.fsencode(sources_dir)
    futures = [pool.submit(_hash_file, os.path.join(base, rel)) for rel, _ in files]
    for (rel, st), fut in zip(files, futures):
        yield rel, fut.result(), st.st_mtime_ns


def previous_entries(manifest: TreeManifest, load: Callable[[CID], bytes]) -> "PreviousTree":
    """The stat cache for the next save: a previous tree's file entries and pages (see `previous_tree`)."""
    files, pages = previous_tree(manifest, load)
    return PreviousTree(files, pages)


@dataclass
class PreviousTree:
    files: dict[tuple[int, bytes], TreeEntry]
    pages: dict
    # True when the tree was found complete in the repo after this save's upload lease was taken: then
    # none of its blocks can go before the save claims them (gc waits for the lease), and the saver
    # need not ask the daemon about each block it reuses.
    held: bool = False


# -- restoring ------------------------------------------------------------------------------------------


WrittenEntry = tuple[str, bytes]  # (target directory, relative path)


@dataclass
class RestoreReport:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)
    stripped: int = 0  # setuid/setgid/sticky bits removed
    sources_unchanged: int = 0
    sources_changed: list[str] = field(default_factory=list)
    sources_new: list[str] = field(default_factory=list)
    sources_deleted: list[str] = field(default_factory=list)
    # (target directory, relative path) of every file and symlink this restore put in place, for `undo_restore`
    written: "list[WrittenEntry]" = field(default_factory=list, repr=False)

    def refused_line(self) -> str | None:
        if not self.refused:
            return None
        shown = ", ".join(f"{p} ({why})" for p, why in self.refused[:8])
        more = f" and {len(self.refused) - 8} more" if len(self.refused) > 8 else ""
        return f"refused {len(self.refused)} entr{'y' if len(self.refused) == 1 else 'ies'}: {shown}{more}"

    def to_json(self) -> dict:
        return {"files": self.files, "dirs": self.dirs, "symlinks": self.symlinks, "bytes": self.bytes,
                "refused": [{"path": p, "why": w} for p, w in self.refused], "stripped": self.stripped,
                "sources": {"unchanged": self.sources_unchanged, "changed": self.sources_changed,
                            "new": self.sources_new, "deleted": self.sources_deleted}}


class _Refused(Exception):
    pass


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _open_dir(root_fd: int, parts: list[bytes], create: bool) -> int:
    """The directory `parts` under `root_fd`, opened without following any symlink on the way."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise _Refused("parent directory missing") from None
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _Refused("a parent is a symlink or not a directory") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _safe_mode(mode: int, report: RestoreReport) -> int:
    if mode & 0o7000:
        report.stripped += 1
    return mode & 0o777


def _current_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _write_file(dir_fd: int, name: bytes, entry: TreeEntry, chunks: "Iterable[bytes | memoryview]", umask: int = 0o777) -> int:
    """Write one file atomically: a temp file in the same directory, given its bytes (`entry`'s inline body,
    else `chunks`: its chunks' bytes, in order, sizes already checked), mode and mtime, then renamed over.
    The temp file is created with its final permission bits (never setuid/setgid/sticky); only when the
    process `umask` takes some of them away does a chmod follow."""
    mode = entry.mode & 0o777
    tmp = b".%s.p2pcache-%d-%d.tmp" % (name[:100], os.getpid(), next(_tmp_counter))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                 mode, dir_fd=dir_fd)
    try:
        try:
            written = 0
            if isinstance(entry.body, bytes):
                os.write(fd, entry.body)
                written = len(entry.body)
            else:
                for data in chunks:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    written += len(data)
                if written != entry.size:
                    raise CorruptData(f"{os.fsdecode(name)}: its chunks hold {written} bytes, its entry says {entry.size}")
            if mode & umask:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except IsADirectoryError:
            raise _Refused("a directory is in the way") from None
        return written
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


LoadMany = Callable[[list[tuple[CID, int]]], Iterator["bytes | memoryview"]]


def load_each(load: Callable[[CID], bytes]) -> LoadMany:
    """A `load_many` over a one-block `load`: each block's size checked against its link."""
    def many(links: list[tuple[CID, int]]) -> Iterator[bytes]:
        for cid, size in links:
            data = load(cid)
            if len(data) != size:
                raise CorruptData(f"chunk {cid} has {len(data)} bytes, its manifest says {size}")
            yield data
    return many


def symlink_escapes(rel: bytes, target: bytes) -> bool:
    if target.startswith(b"/"):
        return True
    joined = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    return joined == b".." or joined.startswith(b"../") or joined.startswith(b"/")


def restore_tree(root: CID, load: Callable[[CID], bytes], targets: list[str], *, threads: int = 4,
                 progress: Callable[[int], None] | None = None, load_many: LoadMany | None = None,
                 report: RestoreReport | None = None) -> tuple[RestoreReport, TreeManifest, list[int]]:
    """Write the tree `root` into `targets` (one per saved top-level path, by position). Returns the report,
    the manifest and the mtimes (ns) of every file restored, for `fix_timestamps`. `load_many(links)`
    reads many chunks at once, sizes checked (`Repo.load_blocks`: one index query and few preads for a
    whole group of files); without it, chunks are read one by one through `load`. A `report` passed in
    is filled in place, so a caller still has its `written` list when the restore raises."""
    report = RestoreReport() if report is None else report
    manifest = TreeManifest.decode(load(root))
    if len(targets) != len(manifest.paths):
        raise InvalidInput(f"the cache holds {len(manifest.paths)} path(s) ({', '.join(manifest.paths)}); "
                           f"restore got {len(targets)}: give the same number of PATHs, in the same order")
    mtimes: list[int] = []
    for top, target in enumerate(targets):
        try:
            _restore_top(manifest, top, target, load, load_many or load_each(load), report, mtimes, threads, progress)
        except OSError as e:
            raise RepoError(f"cannot restore into {target}: {e.strerror or e}") from None
    return report, manifest, mtimes


def _restore_top(manifest: TreeManifest, top: int, target: str, load: Callable[[CID], bytes], load_many: LoadMany,
                 report: RestoreReport, mtimes: list[int], threads: int,
                 progress: Callable[[int], None] | None) -> None:
    # Entries stream from the pages as they decode; files are written on the pool in runs of one directory
    # while later pages still decode. Metadata only: bodies are links.
    # Pages are not re-encoded to check their canonical form: they are blocks of the repo, each decoded
    # strictly by the daemon that stored it (`register_tree` for a save, the fetch's walk for a fetch).
    entries: Iterator[TreeEntry] = (e for e in iter_entries(manifest, load, recheck=False) if e.top == top)
    head = next(entries, None)
    if head is None:
        return
    def shown(rel: bytes) -> str:  # as the entry says, not normalised: the report must show `..` as it came
        return f"{target.rstrip('/')}/{os.fsdecode(rel)}" if rel else target
    if head.path == b"" and not head.is_dir:
        # A single saved file (or symlink) at the top: written into the target's parent directory.
        top_parent, top_name = os.path.split(os.path.abspath(target))
        os.makedirs(top_parent, exist_ok=True)
        head = TreeEntry(top, os.fsencode(top_name), head.mode, head.mtime_ns, head.body)
        entries = iter(())
        target = top_parent
    os.makedirs(target, exist_ok=True)
    umask = _current_umask()  # read once, before the writer threads start
    root_fd = os.open(target, _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        dirs: list[TreeEntry] = []
        links: list[TreeEntry] = []
        refused_dirs: list[bytes] = []

        def write_group(parent: bytes, group: list[TreeEntry]) -> list[tuple[TreeEntry, int | str]]:
            out: list[tuple[TreeEntry, int | str]] = []
            try:
                dfd = _open_dir(root_fd, parent.split(b"/") if parent else [], create=True)
            except _Refused as r:
                return [(e, str(r)) for e in group]
            try:
                # The chunks of the whole group in one batched read, handed to each file in turn.
                counts: list[int] = []
                wanted: list[tuple[CID, int]] = []
                for e in group:
                    if not isinstance(e.body, bytes):
                        refs = [(ref.cid, ref.size) for ref in file_chunks(e, load)]
                        counts.append(len(refs))
                        wanted += refs
                data = load_many(wanted)
                next_count = iter(counts)
                for e in group:
                    chunks = itertools.islice(data, next(next_count)) if not isinstance(e.body, bytes) else iter(())
                    try:
                        out.append((e, _write_file(dfd, e.path.rpartition(b"/")[2], e, chunks, umask)))
                        report.written.append((target, e.path))  # here: known even if a later group fails
                    except _Refused as r:
                        deque(chunks, maxlen=0)  # keep the shared read in step for the next file
                        out.append((e, str(r)))
            finally:
                os.close(dfd)
            return out

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache-restore") as pool:
            futures: list[Future] = []
            run: list[TreeEntry] = []
            run_parent = b""

            def submit() -> None:
                nonlocal run
                if run:
                    futures.append(pool.submit(write_group, run_parent, run))
                    run = []

            for e in itertools.chain((head,), entries):
                problem = path_problem(e.path)
                if problem is None and any(e.path.startswith(d + b"/") for d in refused_dirs):
                    problem = "inside a refused directory"
                if problem is None:
                    if e.is_dir:
                        dirs.append(e)  # created on the way to its files, or at the end if it has none
                    elif e.is_file:
                        parent = e.path.rpartition(b"/")[0]
                        if parent != run_parent or len(run) >= GROUP_FILES:
                            submit()
                            run_parent = parent
                        run.append(e)
                    elif e.is_symlink:
                        if not isinstance(e.body, bytes) or symlink_escapes(e.path, e.body):
                            problem = "symlink pointing outside the target"
                        else:
                            links.append(e)
                    else:
                        problem = "device or special file"
                if problem is not None:
                    report.refused.append((shown(e.path), problem))
                    if e.is_dir:
                        refused_dirs.append(e.path)
            submit()
            for fut in futures:
                for e, result in fut.result():
                    if isinstance(result, str):
                        report.refused.append((shown(e.path), result))
                        continue
                    report.files += 1
                    report.bytes += result
                    mtimes.append(e.mtime_ns)
                    if e.mode & 0o7000:
                        report.stripped += 1
                    if progress:
                        progress(result)
        for e in links:
            parent, _, name = e.path.rpartition(b"/")
            try:
                dfd = _open_dir(root_fd, parent.split(b"/") if parent else [], create=True)
            except _Refused as r:
                report.refused.append((shown(e.path), str(r)))
                continue
            try:
                tmp = b".%s.p2pcache-%d-%d.tmp" % (name[:100], os.getpid(), next(_tmp_counter))
                os.symlink(e.body, tmp, dir_fd=dfd)  # type: ignore[arg-type]
                try:
                    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except IsADirectoryError:
                    os.unlink(tmp, dir_fd=dfd)
                    report.refused.append((shown(e.path), "a directory is in the way"))
                    continue
                os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            finally:
                os.close(dfd)
            report.symlinks += 1
            report.written.append((target, e.path))
        # Symlinks that resolve outside once everything is in place (through other symlinks, or through
        # what was already on disk) are removed again.
        real_root = os.path.realpath(target)
        for e in links:
            full = os.path.join(os.fsencode(target), e.path)
            real = os.path.realpath(full)
            if real != os.fsencode(real_root) and not real.startswith(os.fsencode(real_root) + b"/"):
                try:
                    os.unlink(full)
                except OSError:
                    pass
                report.symlinks -= 1
                report.refused.append((shown(e.path), "symlink resolving outside the target"))
        for e in reversed(dirs):  # deepest last in sorted order: set children before parents
            try:
                dfd = _open_dir(root_fd, e.path.split(b"/") if e.path else [], create=True)
            except _Refused as r:
                report.refused.append((shown(e.path), str(r)))
                continue
            except OSError as err:
                report.refused.append((shown(e.path), err.strerror or str(err)))
                continue
            try:
                os.fchmod(dfd, _safe_mode(e.mode, report) | 0o700)
                os.utime(dfd, ns=(e.mtime_ns, e.mtime_ns))
            finally:
                os.close(dfd)
            report.dirs += 1
    finally:
        os.close(root_fd)


@contextmanager
def reading_tree(repo: Any, root: CID, what: str, registered: bool = True) -> Iterator[None]:
    """Around a restore's reads of the tree `root` from `repo` (`Repo.readers`): the repo's gc evicts it only
    once the reads are over, whether gc runs in this process or in the daemon that owns the repo (a
    read-only process holds a shared lock that the daemon's gc tests before it evicts). With `registered`
    the tree must be (still) complete in the repo once the scope is entered, else NotFound: gc took it
    between the lookup and the read. A tree being fetched (`registered=False`) has no root yet; its blocks
    are the fetch's until it registers the root, which happens inside this scope."""
    with repo.readers.reading(root):
        if registered:
            require_tree(repo, root, what)
        yield


def require_tree(repo: Any, root: CID, what: str) -> None:
    info = repo.index.get_root(root)
    if info is None or not info.complete:
        raise NotFound(f"the tree of {what} ({root}) left the repo before it was read (evicted by gc); "
                       "restore again")


def undo_restore(report: RestoreReport) -> int:
    """Remove every file and symlink `report`'s restore put in place (a streaming restore whose tree did not
    arrive whole). Directories it created stay; a file it replaced is not brought back (both are cache
    entries: the build makes them again). Never follows a symlink. Returns how many were removed."""
    removed = 0
    for target, rel in report.written:
        parent, _, name = rel.rpartition(b"/")
        try:
            root_fd = os.open(target, _DIR_FLAGS & ~os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            dfd = _open_dir(root_fd, parent.split(b"/") if parent else [], create=False)
        except (_Refused, OSError):
            os.close(root_fd)
            continue
        try:
            os.unlink(name, dir_fd=dfd)
            removed += 1
        except OSError:
            pass
        finally:
            os.close(dfd)
            os.close(root_fd)
    report.written = []
    return removed


class TreeSuperseded(RepoError):
    """The tree being restored while it arrives will not arrive whole (its fetch failed, or the lookup
    settled on another record): what was written must be undone."""


class ArrivingBlocks:
    """Reads of a tree a daemon is fetching right now, for `restore_tree`: each read waits until its blocks
    are in the repo (the daemon commits verified blocks as they arrive; the reader sees them in the index),
    so files are written while later blocks are still on the way, in tree order, which is the order the
    fetch walks. `end(root)` says the fetch is over: for `root` this tree, every block is there, and one
    still missing is the repo's own error; for another root (or None: the lookup failed) every read that
    waits raises TreeSuperseded. Polls the index (one query per wait step), backing off to `max_poll`."""

    def __init__(self, root: CID, load: Callable[[CID], bytes], load_many: "LoadMany",
                 present: Callable[[list[CID]], set[bytes]], max_poll: float = 0.05):
        import threading

        self.root = root
        self._load, self._load_many, self._present = load, load_many, present
        self.max_poll = max_poll
        self._ended = threading.Event()
        self._outcome: CID | None = None
        self.waits = 0  # wait steps taken (for the bench's report)

    def end(self, root: CID | None) -> None:
        self._outcome = root
        self._ended.set()

    def _wait_for(self, cids: list[CID]) -> None:
        delay = 0.002
        while cids:
            # Blocks arrive about in tree order: while the last one wanted is missing, asking for it alone
            # (one index row) says the wait goes on; once it is there, one query for all the rest.
            have = set() if len(cids) > 1 and not self._present(cids[-1:]) else self._present(cids)
            cids = [c for c in cids if c.buffer not in have]
            if not cids:
                return
            if self._ended.is_set():
                if self._outcome != self.root:
                    raise TreeSuperseded(f"tree {self.root} did not arrive whole; the lookup ended on "
                                         f"{self._outcome or 'an error'}")
                return  # all of it was stored before the fetch ended: the repo read says what is wrong
            self.waits += 1
            self._ended.wait(delay)
            delay = min(delay * 2, self.max_poll)

    def load(self, cid: CID) -> bytes:
        self._wait_for([cid])
        return self._load(cid)

    def load_many(self, links: list[tuple[CID, int]]) -> Iterator["bytes | memoryview"]:
        for i in range(0, len(links), 256):
            part = links[i:i + 256]
            self._wait_for([c for c, _ in part])
            yield from self._load_many(part)


# -- timestamps -----------------------------------------------------------------------------------------


MTIME_MODES = ("ordered", "exact")


def fix_timestamps(manifest: TreeManifest, load: Callable[[CID], bytes], sources_dir: str, targets: list[str],
                   restored_mtimes: list[int], report: RestoreReport, mode: str = "ordered",
                   now_ns: int | None = None) -> None:
    """Compare the sources now under `sources_dir` with those recorded at save time, by (path, sha256),
    and set their mtimes so make-style tools rebuild exactly what changed:

    - changed and new sources become newer than every restored file (and not older than now);
    - unchanged sources become older than every restored file (`ordered`), or get back exactly the mtime
      they had when the cache was saved (`exact`: the relation ninja's log and cargo's fingerprints
      compare against);
    - sources recorded but gone are reported (a tool that tracks deletions must notice them itself).
    """
    if mode not in MTIME_MODES:
        raise InvalidInput(f"mtime mode must be one of {', '.join(MTIME_MODES)}, not {mode!r}")
    saved = {p: (d, m) for p, d, m in iter_sources(manifest, load)}
    now_ns = time.time_ns() if now_ns is None else now_ns
    newest = max(restored_mtimes, default=now_ns)
    oldest = min(restored_mtimes, default=now_ns)
    fresh = max(now_ns, newest + RACY_NS)
    old = oldest - RACY_NS
    base = os.fsencode(sources_dir)
    current = _source_files(sources_dir, targets)
    seen = set()
    for rel, st in current:
        seen.add(rel)
        full = os.path.join(base, rel)
        digest = _hash_file(full)
        known = saved.get(rel)
        if known is not None and known[0] == digest:
            report.sources_unchanged += 1
            t = known[1] if mode == "exact" else old
        else:
            (report.sources_changed if known is not None else report.sources_new).append(os.fsdecode(rel))
            t = fresh
        os.utime(full, ns=(t, t), follow_symlinks=False)
    report.sources_deleted = sorted(os.fsdecode(p) for p in saved if p not in seen)
