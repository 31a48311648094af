"""Filesystem trees to NAR and back, byte-exact with `nix-store --dump` / `--restore`, without running Nix.

Owns the I/O around `p2pcache.content.nar`: `dump_path` walks a path (usually a store path) and streams its
NAR, reading files in pieces and listing directories in byte order; `restore_path` unpacks a NAR stream into a
new directory tree, refusing anything that could land outside it. Neither holds a whole file or NAR in memory.
It does not know about store databases, narinfo or signatures.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ..content.nar import (
    Contents,
    DirectoryEnd,
    DirectoryStart,
    Entry,
    Event,
    InvalidNar,
    NarReader,
    RegularFile,
    Symlink,
    write_nar,
)
from ..errors import InvalidInput, P2PCacheError

__all__ = ["DumpError", "RestoreError", "dump_events", "dump_path", "restore_path"]

_PIECE = 1 << 20


class DumpError(P2PCacheError):
    """A path cannot be serialised: unreadable, an unsupported file type, or changed while being read."""


class RestoreError(InvalidInput):
    """A NAR cannot be unpacked at the destination."""


def _fs(path: bytes) -> str:
    return os.fsdecode(path)


def _file_events(path: bytes, st: os.stat_result, piece: int) -> Iterator[Event]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DumpError(f"cannot open {_fs(path)!r} to serialise it: {e.strerror}") from None
    try:
        st2 = os.fstat(fd)
        if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(st2.st_mode):
            raise DumpError(f"{_fs(path)!r} was replaced while being serialised; retry on a stable tree")
        size = st2.st_size
        # Nix marks a file executable when its owner may execute it.
        yield RegularFile(size, bool(st2.st_mode & stat.S_IXUSR))
        left = size
        while left:
            data = os.read(fd, min(piece, left))
            if not data:
                raise DumpError(f"{_fs(path)!r} shrank while being serialised; retry on a stable tree")
            left -= len(data)
            yield Contents(data)
        if os.read(fd, 1):
            raise DumpError(f"{_fs(path)!r} grew while being serialised; retry on a stable tree")
    except OSError as e:
        raise DumpError(f"cannot read {_fs(path)!r}: {e.strerror}") from None
    finally:
        os.close(fd)


def _lstat(path: bytes) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as e:
        raise DumpError(f"cannot serialise {_fs(path)!r}: {e.strerror}") from None


def dump_events(path: str | os.PathLike[str] | bytes, piece: int = _PIECE) -> Iterator[Event]:
    """The NAR events of the tree at `path` (not following a symlink at `path` itself, as Nix)."""
    root = os.fsencode(path)
    # An explicit stack of sorted-name iterators: trees may be deeper than Python's recursion limit.
    stack: list[tuple[bytes, Iterator[bytes]]] = []
    current = root
    while True:
        st = _lstat(current)
        mode = st.st_mode
        if stat.S_ISREG(mode):
            yield from _file_events(current, st, piece)
        elif stat.S_ISLNK(mode):
            try:
                target = os.readlink(current)
            except OSError as e:
                raise DumpError(f"cannot read symlink {_fs(current)!r}: {e.strerror}") from None
            yield Symlink(target)
        elif stat.S_ISDIR(mode):
            try:
                listing = sorted(os.listdir(current))  # bytes sort in byte order, as std::map<std::string>
            except OSError as e:
                raise DumpError(f"cannot list directory {_fs(current)!r}: {e.strerror}") from None
            yield DirectoryStart()
            stack.append((current, iter(listing)))
        else:
            raise DumpError(f"{_fs(current)!r} has an unsupported file type (not a file, directory or symlink)")
        # Find the next entry to visit, closing finished directories.
        while stack:
            parent, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                yield DirectoryEnd()
                continue
            yield Entry(name)
            current = os.path.join(parent, name)
            break
        else:
            return


def dump_path(path: str | os.PathLike[str] | bytes, piece: int = _PIECE) -> Iterator[bytes]:
    """The NAR serialisation of `path`, as `nix-store --dump` writes it, in pieces of up to about `piece` bytes.

    Raises DumpError if a file is unreadable, of an unsupported type, or changes size while it is read.
    """
    try:
        yield from write_nar(dump_events(path, piece))
    except InvalidNar as e:  # a name or target the NAR format cannot hold
        raise DumpError(f"cannot serialise {os.fsdecode(os.fsencode(path))!r}: {e}") from None


def restore_path(nar: Iterable[bytes], dest: str | os.PathLike[str] | bytes) -> None:
    """Unpack the NAR whose bytes are `nar` to `dest`, which must not exist yet.

    Entries are created relative to open directory descriptors with O_NOFOLLOW/O_EXCL, so no entry can be
    written outside `dest`. Files get mode 0o666 or 0o777 (executable) less the umask, like `nix-store
    --restore`. On error the partly restored tree is left for the caller to remove: restore into a temporary
    name and rename it into place when this returns.
    """
    dest_b = os.fsencode(dest)
    reader = NarReader()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    dir_fds: list[int] = []  # open directories, innermost last
    pending_name: bytes | None = None  # name of the entry whose node comes next (None: the root)
    file_fd: int | None = None
    left = 0

    def target_args() -> tuple[bytes, int | None]:
        if pending_name is None:
            return dest_b, None
        return pending_name, dir_fds[-1]

    try:
        for chunk in nar:
            for ev in reader.feed(chunk):
                cls = type(ev)
                if cls is Contents:
                    if TYPE_CHECKING:  # `type(ev) is` is the fast dispatch; tell the checker what it proved
                        assert isinstance(ev, Contents) and file_fd is not None
                    view = memoryview(ev.data)
                    while view:
                        n = os.write(file_fd, view)
                        view = view[n:]
                    left -= len(ev.data)
                    if not left:
                        os.close(file_fd)
                        file_fd = None
                elif cls is Entry:
                    if TYPE_CHECKING:
                        assert isinstance(ev, Entry)
                    pending_name = ev.name
                elif cls is RegularFile:
                    if TYPE_CHECKING:
                        assert isinstance(ev, RegularFile)
                    name, dir_fd = target_args()
                    file_fd = os.open(name, flags, 0o777 if ev.executable else 0o666, dir_fd=dir_fd)
                    left = ev.size
                    if not left:
                        os.close(file_fd)
                        file_fd = None
                elif cls is Symlink:
                    if TYPE_CHECKING:
                        assert isinstance(ev, Symlink)
                    name, dir_fd = target_args()
                    os.symlink(ev.target, name, dir_fd=dir_fd)
                elif cls is DirectoryStart:
                    name, dir_fd = target_args()
                    os.mkdir(name, 0o777, dir_fd=dir_fd)
                    dir_fds.append(
                        os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                                dir_fd=dir_fd)
                    )
                elif cls is DirectoryEnd:
                    os.close(dir_fds.pop())
        reader.end()
    except OSError as e:
        raise RestoreError(f"cannot restore NAR to {_fs(dest_b)!r}: {e.strerror} ({_fs(e.filename or b'') or 'entry'})") from None
    finally:
        if file_fd is not None:
            os.close(file_fd)
        for fd in dir_fds:
            os.close(fd)
