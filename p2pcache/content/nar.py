"""The Nix ARchive (NAR) format as a stream of events, read and written incrementally.

Owns the byte-exact NAR grammar, with no I/O:

    nar       = str("nix-archive-1") node
    node      = str("(") str("type") ( regular | symlink | directory ) str(")")
    regular   = str("regular") [ str("executable") str("") ] str("contents") u64(size) bytes(size) pad
    symlink   = str("symlink") str("target") str(target)
    directory = str("directory") { str("entry") str("(") str("name") str(name) str("node") node str(")") }

where u64 is 8 bytes little-endian and str(s) is u64(len(s)), s, then zero bytes up to a multiple of 8.
Entries are strictly increasing in byte order (so no duplicates), as `nix-store --dump` writes them.

A NAR is seen as a flat sequence of events: `DirectoryStart`, `Entry(name)` before each entry's node,
`DirectoryEnd`, `RegularFile(size, executable)` followed by `Contents` pieces adding up to `size`, and
`Symlink(target)`. Names and targets are bytes, as on the filesystem.

`NarReader` is a sans-IO push parser: `feed(bytes) -> list[Event]`, then `end()`. It never buffers a file's
contents: content bytes are passed on as they arrive, as slices of the fed pieces. `NarWriter` turns events
back into NAR bytes, one event at a time. Both accept only canonical NARs (the one encoding `nix-store --dump`
would produce) and raise `InvalidNar`, a one-line error naming the byte offset and the path inside the archive.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, TypeVar, Union

from ..errors import InvalidInput

__all__ = [
    "MAGIC",
    "MAX_DEPTH",
    "MAX_NAME",
    "MAX_TARGET",
    "Contents",
    "DirectoryEnd",
    "DirectoryStart",
    "Entry",
    "Event",
    "InvalidNar",
    "NarReader",
    "NarWriter",
    "RegularFile",
    "Symlink",
    "read_nar",
    "read_nar_file",
    "write_nar",
]


class InvalidNar(InvalidInput):
    pass


MAGIC = b"nix-archive-1"
# Limits on what a sane NAR holds. Names: Linux allows 255 bytes, macOS 255 UTF-16 units (up to 765 bytes of
# UTF-8). Targets: Linux symlinks hold at most 4095 bytes. Depth: PATH_MAX (4096) allows about 2048 levels.
MAX_NAME = 1024
MAX_TARGET = 4096
MAX_DEPTH = 2048
_MAX_TOKEN = 16  # longest fixed token is "nix-archive-1"


@dataclass(frozen=True, slots=True)
class DirectoryStart:
    pass


@dataclass(frozen=True, slots=True)
class DirectoryEnd:
    pass


@dataclass(frozen=True, slots=True)
class Entry:
    """The name of the next entry of the enclosing directory; its node's events follow."""

    name: bytes


@dataclass(frozen=True, slots=True)
class RegularFile:
    """A regular file of `size` bytes; `Contents` events totalling `size` bytes follow."""

    size: int
    executable: bool = False


@dataclass(frozen=True, slots=True)
class Contents:
    data: bytes


@dataclass(frozen=True, slots=True)
class Symlink:
    target: bytes


Event = Union[DirectoryStart, DirectoryEnd, Entry, RegularFile, Contents, Symlink]

if TYPE_CHECKING:
    _T = TypeVar("_T")
    # NarReader's parser steps: they yield for more input, get the next chunk (None: input ended), return _T.
    _Parser = Generator[None, "bytes | bytearray | memoryview | None", _T]


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def _str(s: bytes) -> bytes:
    return _u64(len(s)) + s + b"\0" * (-len(s) % 8)


_PAD = [b"\0" * i for i in range(8)]
_T_MAGIC = _str(MAGIC)
_T_OPEN = _str(b"(")
_T_CLOSE = _str(b")")
_T_ENTRY_NAME = _str(b"entry") + _T_OPEN + _str(b"name")
_T_NODE = _str(b"node")
_T_DIRECTORY = _T_OPEN + _str(b"type") + _str(b"directory")
_T_REGULAR = _T_OPEN + _str(b"type") + _str(b"regular")
_T_EXECUTABLE = _str(b"executable") + _str(b"")
_T_CONTENTS = _str(b"contents")
_T_SYMLINK = _T_OPEN + _str(b"type") + _str(b"symlink") + _str(b"target")
_ENCODED = {t: _str(t) for t in (b"(", b")", b"type", b"node", b"name", b"target", b"entry")}
# A directory entry that holds a regular file, as the writer's tokens above (`NarReader._buffered_files`).
_NODE_REGULAR = _T_NODE + _T_REGULAR
_EXECUTABLE_CONTENTS = _T_EXECUTABLE + _T_CONTENTS
_CLOSE_NODE_ENTRY = _T_CLOSE * 2


def _show(s: bytes, limit: int = 80) -> str:
    text = repr(bytes(s[:limit]))[1:]
    return text + ("..." if len(s) > limit else "")


def name_problem(name: bytes, max_name: int = MAX_NAME) -> str | None:
    """Why `name` cannot be a NAR entry name, or None if it can."""
    if not name:
        return "entry name is empty"
    if name in (b".", b".."):
        return f"entry name {_show(name)} is not allowed"
    if b"/" in name or b"\0" in name:
        return f"entry name {_show(name)} contains '/' or NUL"
    if len(name) > max_name:
        return f"entry name of {len(name)} bytes exceeds the limit of {max_name}"
    return None


def target_problem(target: bytes, max_target: int = MAX_TARGET) -> str | None:
    """Why `target` cannot be a symlink target, or None if it can."""
    if not target:
        return "symlink target is empty"
    if b"\0" in target:
        return f"symlink target {_show(target)} contains NUL"
    if len(target) > max_target:
        return f"symlink target of {len(target)} bytes exceeds the limit of {max_target}"
    return None


class NarReader:
    """Push parser: `feed(piece) -> events`, repeatedly, then `end()`.

    After an error every further call raises the same error.
    """

    def __init__(self, *, max_name: int = MAX_NAME, max_target: int = MAX_TARGET, max_depth: int = MAX_DEPTH):
        self._max_name = max_name
        self._max_target = max_target
        self._max_depth = max_depth
        self._buf = bytearray()
        self._consumed = 0  # bytes of input fully parsed
        self._events: list[Event] = []
        self._path: list[bytes] = []
        self._error: InvalidNar | None = None
        self._finished = False
        self._gen = self._parse()
        next(self._gen)

    @property
    def done(self) -> bool:
        """True once a whole archive has been read (only `end()` or empty input may follow)."""
        return self._finished

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._error is not None:
            raise self._error
        if not data:
            return []
        events: list[Event] = []
        self._events = events
        try:
            self._gen.send(data)
        except InvalidNar as e:
            self._error = e
            raise
        return events

    def end(self) -> None:
        """Declare the input finished; raises InvalidNar if the archive is incomplete."""
        if self._error is not None:
            raise self._error
        try:
            self._gen.send(None)
        except StopIteration:
            return
        except InvalidNar as e:
            self._error = e
            raise

    # -- internals ---------------------------------------------------------------------------------------

    def _where(self) -> str:
        if not self._path:
            return ""
        shown = "/".join(repr(n[:60].decode("utf-8", "backslashreplace"))[1:-1] for n in self._path[-8:])
        return " in " + ("/..." if len(self._path) > 8 else "") + "/" + shown

    def _fail(self, msg: str) -> InvalidNar:
        return InvalidNar(f"invalid NAR at byte {self._consumed}{self._where()}: {msg}")

    def _take(self, n: int) -> _Parser[bytes]:
        buf = self._buf
        while len(buf) < n:
            chunk = yield
            if chunk is None:
                raise InvalidNar(
                    f"NAR is truncated: input ended at byte {self._consumed + len(buf)}{self._where()}; "
                    "the archive is incomplete"
                )
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        self._consumed += n
        return out

    def _string(self, limit: int, what: str) -> _Parser[bytes]:
        buf = self._buf
        if len(buf) >= 8:  # fast path: the whole string is already buffered
            n = int.from_bytes(buf[:8], "little")
            end = 8 + ((n + 7) & ~7)
            if n <= limit and len(buf) >= end:
                data = bytes(buf[8:end])
                if data[n:].strip(b"\0"):
                    del buf[:8]
                    self._consumed += 8
                    raise self._fail(f"non-zero padding after {what}")
                del buf[:end]
                self._consumed += end
                return data[:n]
        raw = yield from self._take(8)
        n = int.from_bytes(raw, "little")
        if n > limit:
            raise self._fail(f"{what} of {n} bytes is longer than the limit of {limit}")
        padded = (n + 7) & ~7
        data = yield from self._take(padded)
        if data[n:].strip(b"\0"):
            self._consumed -= padded  # the string's start, as the buffered path above says it
            raise self._fail(f"non-zero padding after {what}")
        return data[:n]

    def _expect(self, token: bytes) -> _Parser[None]:
        encoded = _ENCODED.get(token) or _str(token)
        buf = self._buf
        if len(buf) >= len(encoded) and buf.startswith(encoded):  # the common case: one comparison
            del buf[: len(encoded)]
            self._consumed += len(encoded)
            return
        raw = yield from self._take(8)
        n = int.from_bytes(raw, "little")
        if n != len(token):
            raise self._fail(f"expected {_show(token)}, got a string of {n} bytes")
        data = yield from self._take((n + 7) & ~7)
        if data[:n] != token:
            raise self._fail(f"expected {_show(token)}, got {_show(data[:n])}")
        if data[n:].strip(b"\0"):
            raise self._fail(f"non-zero padding after {_show(token)}")

    def _contents(self, size: int) -> _Parser[None]:
        emit = self._events.append
        buf = self._buf
        left = size
        if buf and left:
            n = min(left, len(buf))
            with memoryview(buf) as view:
                emit(Contents(bytes(view[:n])))
            del buf[:n]
            self._consumed += n
            left -= n
        while left:
            chunk = yield
            if chunk is None:
                raise InvalidNar(
                    f"NAR is truncated: input ended at byte {self._consumed}{self._where()}, "
                    f"{left} bytes before the end of the file's contents; the archive is incomplete"
                )
            # feed() may have been called since the last yield: emit into its list.
            emit = self._events.append
            n = len(chunk)
            if n <= left:
                emit(Contents(chunk if type(chunk) is bytes else bytes(chunk)))
                left -= n
                self._consumed += n
            else:
                view = memoryview(chunk)
                emit(Contents(bytes(view[:left])))
                buf += view[left:]
                self._consumed += left
                left = 0
        pad = -size % 8
        if pad:
            padding = yield from self._take(pad)
            if padding.strip(b"\0"):
                raise self._fail("non-zero padding after file contents")

    def _buffered_files(self, stack: list[bytes]) -> None:
        """The fast path for a tree of small files: inside a directory, consume every entry that holds a
        regular file and lies whole in the buffer, with one function call per file instead of a generator
        per token. It stops, consuming nothing of it, at the first entry that is anything else, is not whole
        yet, or breaks a rule; the token-by-token parser then takes it (and raises its error). Emits exactly
        the events that parser would."""
        buf = self._buf
        end = len(buf)
        emit = self._events.append
        max_name = self._max_name
        prev = stack[-1]
        at = 0
        name_at = len(_T_ENTRY_NAME) + 8  # the name's bytes, after its length
        while at + name_at <= end and buf.startswith(_T_ENTRY_NAME, at):
            n = int.from_bytes(buf[at + name_at - 8:at + name_at], "little")
            if n > max_name:
                break
            p = at + name_at + ((n + 7) & ~7)
            if p + len(_NODE_REGULAR) + len(_T_CONTENTS) + 8 > end:
                break
            name = bytes(buf[at + name_at:at + name_at + n])
            if buf[at + name_at + n:p].strip(b"\0") or name_problem(name, max_name) or (prev and name <= prev):
                break
            if not buf.startswith(_NODE_REGULAR, p):
                break
            p += len(_NODE_REGULAR)
            executable = False
            if buf.startswith(_EXECUTABLE_CONTENTS, p):
                executable = True
                p += len(_EXECUTABLE_CONTENTS)
            elif buf.startswith(_T_CONTENTS, p):
                p += len(_T_CONTENTS)
            else:
                break
            if p + 8 > end:
                break
            size = int.from_bytes(buf[p:p + 8], "little")
            data_at = p + 8
            p = data_at + ((size + 7) & ~7)
            if (p + len(_CLOSE_NODE_ENTRY) > end or buf[data_at + size:p].strip(b"\0")
                    or not buf.startswith(_CLOSE_NODE_ENTRY, p)):
                break
            emit(Entry(name))
            emit(RegularFile(size, executable))
            if size:
                emit(Contents(bytes(buf[data_at:data_at + size])))
            prev = name
            at = p + len(_CLOSE_NODE_ENTRY)
        if at:
            stack[-1] = prev
            del buf[:at]
            self._consumed += at

    def _parse(self) -> _Parser[None]:
        # Prime: the constructor's next() stops at the first yield inside _take.
        raw = yield from self._take(8)
        if raw != _u64(len(MAGIC)):
            raise self._fail("not a NAR: bad magic (expected 'nix-archive-1')")
        raw = yield from self._take(16)
        if raw != MAGIC + b"\0\0\0":
            raise self._fail("not a NAR: bad magic (expected 'nix-archive-1')")

        path = self._path
        stack: list[bytes] = []  # per open directory: the previous entry name
        while True:
            # One node: either a whole leaf, or the opening of a directory.
            yield from self._expect(b"(")
            yield from self._expect(b"type")
            kind = yield from self._string(_MAX_TOKEN, "node type")
            if kind == b"regular":
                tag = yield from self._string(_MAX_TOKEN, "tag")
                executable = tag == b"executable"
                if executable:
                    raw = yield from self._take(8)
                    if raw != bytes(8):
                        raise self._fail("executable marker has a non-empty value")
                    tag = yield from self._string(_MAX_TOKEN, "tag")
                    if tag != b"contents":
                        raise self._fail(f"expected 'contents' after 'executable', got {_show(tag)}")
                elif tag != b"contents":
                    raise self._fail(f"expected 'executable' or 'contents' in a regular file, got {_show(tag)}")
                raw = yield from self._take(8)
                size = int.from_bytes(raw, "little")
                self._events.append(RegularFile(size, executable))
                yield from self._contents(size)
                yield from self._expect(b")")
                opened = False
            elif kind == b"symlink":
                yield from self._expect(b"target")
                target = yield from self._string(self._max_target, "symlink target")
                problem = target_problem(target, self._max_target)
                if problem:
                    raise self._fail(problem)
                self._events.append(Symlink(target))
                yield from self._expect(b")")
                opened = False
            elif kind == b"directory":
                if len(stack) >= self._max_depth:
                    raise self._fail(f"directories nested deeper than the limit of {self._max_depth}")
                self._events.append(DirectoryStart())
                stack.append(b"")
                opened = True
            else:
                raise self._fail(f"unknown node type {_show(kind)}; expected 'regular', 'symlink' or 'directory'")

            # Close finished nodes until the next entry starts or the root is done.
            while True:
                if not opened:
                    if not stack:
                        break
                    yield from self._expect(b")")  # closes the entry that held the finished node
                    path.pop()
                if len(self._buf) >= 160:
                    self._buffered_files(stack)
                tag = yield from self._string(_MAX_TOKEN, "tag")
                if tag == b")":
                    stack.pop()
                    self._events.append(DirectoryEnd())
                    opened = False
                    continue
                if tag != b"entry":
                    raise self._fail(f"expected 'entry' or ')' in a directory, got {_show(tag)}")
                yield from self._expect(b"(")
                yield from self._expect(b"name")
                name = yield from self._string(self._max_name, "entry name")
                problem = name_problem(name, self._max_name)
                if problem:
                    raise self._fail(problem)
                prev = stack[-1]
                if name <= prev and prev:
                    what = "duplicate entry" if name == prev else "entries out of order:"
                    raise self._fail(f"{what} {_show(name)} after {_show(prev)}")
                stack[-1] = name
                path.append(name)
                self._events.append(Entry(name))
                yield from self._expect(b"node")
                break
            if not opened and not stack:
                break

        self._finished = True
        if self._buf:
            raise self._fail(f"{len(self._buf)}+ bytes of trailing data after the end of the archive")
        while True:
            chunk = yield
            if chunk is None:
                return
            if chunk:
                raise self._fail(f"{len(chunk)}+ bytes of trailing data after the end of the archive")


class NarWriter:
    """Turns events into NAR bytes: `send(event) -> bytes`, then `finish()`.

    Raises InvalidNar for an event that does not fit where it is sent (a bad name, contents beyond the
    declared size, entries out of order, anything after the root node).
    """

    def __init__(self, *, max_name: int = MAX_NAME, max_target: int = MAX_TARGET, max_depth: int = MAX_DEPTH):
        self._max_name = max_name
        self._max_target = max_target
        self._max_depth = max_depth
        self._started = False
        self._stack: list[bytes] = []  # per open directory: the previous entry name
        self._state = "node"  # "node", "dir", "contents" or "done"
        self._left = 0
        self._size = 0

    @property
    def done(self) -> bool:
        return self._state == "done"

    def _node_done(self) -> bytes:
        if self._stack:
            self._state = "dir"
            return _T_CLOSE
        self._state = "done"
        return b""

    def send(self, event: Event) -> bytes:
        state = self._state
        cls = type(event)
        if state == "contents":
            if cls is not Contents:
                raise InvalidNar(f"NAR writer: got {cls.__name__} with {self._left} bytes of file contents missing")
            if TYPE_CHECKING:  # the dispatch above is on type(event); no cast on this hot path
                assert isinstance(event, Contents)
            data = event.data
            n = len(data)
            if n > self._left:
                raise InvalidNar(f"NAR writer: contents exceed the declared file size of {self._size} bytes")
            self._left -= n
            if self._left:
                return data if type(data) is bytes else bytes(data)
            return b"".join((data, _PAD[-self._size % 8], _T_CLOSE, self._node_done()))
        if state == "node":
            head = b"" if self._started else _T_MAGIC
            self._started = True
            if cls is RegularFile:
                if TYPE_CHECKING:  # the dispatch above is on type(event); no cast on this hot path
                    assert isinstance(event, RegularFile)
                file = event
                size = file.size
                if type(size) is not int or not 0 <= size < 1 << 64:
                    raise InvalidNar(f"NAR writer: file size {size!r} is not a 64-bit unsigned integer")
                parts = [head, _T_REGULAR, _T_EXECUTABLE if file.executable else b"", _T_CONTENTS, _u64(size)]
                if size:
                    self._state, self._left, self._size = "contents", size, size
                else:
                    parts += (_T_CLOSE, self._node_done())
                return b"".join(parts)
            if cls is DirectoryStart:
                if len(self._stack) >= self._max_depth:
                    raise InvalidNar(f"NAR writer: directories nested deeper than the limit of {self._max_depth}")
                self._stack.append(b"")
                self._state = "dir"
                return head + _T_DIRECTORY
            if cls is Symlink:
                if TYPE_CHECKING:  # the dispatch above is on type(event); no cast on this hot path
                    assert isinstance(event, Symlink)
                target = event.target
                if not isinstance(target, bytes):
                    raise InvalidNar(f"NAR writer: symlink target must be bytes, got {type(target).__name__}")
                problem = target_problem(target, self._max_target)
                if problem:
                    raise InvalidNar(f"NAR writer: {problem}")
                return b"".join((head, _T_SYMLINK, _str(target), _T_CLOSE, self._node_done()))
            raise InvalidNar(f"NAR writer: expected a node (file, directory or symlink), got {cls.__name__}")
        if state == "dir":
            if cls is Entry:
                if TYPE_CHECKING:  # the dispatch above is on type(event); no cast on this hot path
                    assert isinstance(event, Entry)
                name = event.name
                if not isinstance(name, bytes):
                    raise InvalidNar(f"NAR writer: entry name must be bytes, got {type(name).__name__}")
                problem = name_problem(name, self._max_name)
                if problem:
                    raise InvalidNar(f"NAR writer: {problem}")
                prev = self._stack[-1]
                if prev and name <= prev:
                    what = "duplicate entry" if name == prev else "entries out of order:"
                    raise InvalidNar(f"NAR writer: {what} {_show(name)} after {_show(prev)}")
                self._stack[-1] = name
                self._state = "node"
                return b"".join((_T_ENTRY_NAME, _str(name), _T_NODE))
            if cls is DirectoryEnd:
                self._stack.pop()
                return _T_CLOSE + self._node_done()
            raise InvalidNar(f"NAR writer: expected an entry or the end of a directory, got {cls.__name__}")
        raise InvalidNar(f"NAR writer: got {cls.__name__} after the end of the archive")

    def finish(self) -> None:
        if self._state != "done":
            raise InvalidNar("NAR writer: the archive is incomplete (events stopped before the root node ended)")


def read_nar(chunks: Iterable[bytes], **limits: int) -> Iterator[Event]:
    """Events of the NAR whose bytes are `chunks`; raises InvalidNar on bad or incomplete input."""
    reader = NarReader(**limits)
    for chunk in chunks:
        yield from reader.feed(chunk)
    reader.end()


def read_nar_file(f: BinaryIO, chunk_size: int = 1 << 20, **limits: int) -> Iterator[Event]:
    """Events of the NAR read from a binary file object, `chunk_size` bytes at a time."""
    return read_nar(iter(lambda: f.read(chunk_size), b""), **limits)


def write_nar(events: Iterable[Event], coalesce: int = 1 << 16, **limits: int) -> Iterator[bytes]:
    """NAR bytes of `events`, yielded in pieces: small outputs are gathered up to `coalesce` bytes, large
    contents pieces pass through as they are."""
    writer = NarWriter(**limits)
    pending = bytearray()
    for event in events:
        out = writer.send(event)
        if len(out) >= coalesce:
            if pending:
                yield bytes(pending)
                pending.clear()
            yield out
        elif out:
            pending += out
            if len(pending) >= coalesce:
                yield bytes(pending)
                pending.clear()
    writer.finish()
    if pending:
        yield bytes(pending)
