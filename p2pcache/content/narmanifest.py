"""NAR manifests: dag-cbor blocks that mirror a NAR's file tree, with each file's contents cut into chunks.

A whole NAR chunked as one stream shares little between two versions of a package: a changed file shifts
everything after it only until FastCDC resynchronises, but names, padding and small files interleave with
contents so that most chunks straddle a file boundary and change with either neighbour. Here every regular
file is chunked on its own (FastCDC restarts at each file), so a file that did not change between versions
keeps exactly its chunks, wherever it sits in the tree.

Blocks:

    root  {"type": "p2pcache/nar", "version": 1, "narHash": <32-byte sha256 of the NAR>, "narSize": int,
           "chunker": <ChunkerParams>, "inline": <largest file size stored inline>, "root": node}
    page  {"type": "p2pcache/nar-dir-page", "version": 1, "entries": [[name, node], ...]}
    chunk-index nodes and raw chunks exactly as in manifest.py (`ChunkIndex`, codec raw)

    node = ["file", executable, size, contents]           size <= inline: the bytes themselves
         | ["chunked", executable, size, depth, links]    links [[CID, size], ...]: raw chunks at depth 0,
                                                          `ChunkIndex` nodes of depth - 1 above
         | ["symlink", target]
         | ["dir", [[name, node], ...]]                   entries in strictly increasing byte order
         | ["pages", count, [[CID, entries], ...]]        a directory too big (or too deep) to inline:
                                                          its entries, in order, spread over page blocks

Names and targets are byte strings, as in the NAR. No block comes near the 1 MiB block ceiling: a directory
is inlined into its parent only while small (`dir_inline_bytes`) and shallow (dag-cbor nesting is limited),
pages close at about `page_bytes`, a file node inlines at most `inline_links` links before its chunk list
moves into a chunk-index tree of fan-out `FANOUT`. These thresholds shape the blocks but are not needed to read
them; the chunker parameters and the inline limit are recorded because they decide which bytes are shared.

Everything here is pure. Building is a sans-IO consumer of NAR events (`NarManifestBuilder.add(event)` returns
the blocks to store; `NarIngest` wraps it with the NAR parser and hashing). Reading takes a `load(cid) -> bytes`
callable that returns bytes already checked against the CID. Reassembly checks the tree's shape and sizes as it
goes; the NAR hash is checked by `VerifiedStream`, which withholds the last piece until the whole NAR hashed
correctly — so a server that forwards pieces as they come never completes a response whose NAR is wrong.
"""

from __future__ import annotations

import collections

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterable, Iterator, cast

from ..errors import CorruptData, InvalidInput, MalformedBlock
from . import dagcbor
from .chunking import DEFAULT_PARAMS, MAX_BLOCK_SIZE, Chunker, ChunkerParams
from .cid import CID, DAG_CBOR, RAW
from .manifest import FANOUT, ChunkIndex, Link
from .nar import (
    MAX_DEPTH,
    Contents,
    DirectoryEnd,
    DirectoryStart,
    Entry,
    Event,
    NarReader,
    NarWriter,
    RegularFile,
    Symlink,
    name_problem,
    target_problem,
    write_nar,
)

__all__ = [
    "ChunkRef",
    "ChunkTree",
    "NarAssembly",
    "NarIngest",
    "NarManifest",
    "NarManifestBuilder",
    "VerifiedStream",
    "check_links",
    "chunk_blocks",
    "iter_blocks",
    "iter_events",
    "iter_plan",
    "plan_steps",
    "nar_stream",
    "verified_nar_stream",
    "walk_links",
]

NAR_TYPE = "p2pcache/nar"
PAGE_TYPE = "p2pcache/nar-dir-page"
SCHEMA_VERSION = 1

DEFAULT_INLINE = 1024  # files up to this size live in their directory entry: no block of their own
INLINE_LINKS = 32  # a file with more chunks than this gets a chunk-index tree
PAGE_BYTES = 256 << 10  # a directory page closes once its entries are estimated past this
DIR_INLINE_BYTES = 64 << 10  # a bigger directory becomes pages instead of being inlined in its parent
# Inline directories nest three dag-cbor levels each; dagcbor refuses values nested deeper than 64.
MAX_INLINE_HEIGHT = 12

Block = tuple[CID, "bytes | memoryview"]
# Hands a batch of chunks to be sha256-hashed elsewhere (threads: the store's `ChunkHasher`); the function it
# returns waits for their digests, in order.
HashChunks = Callable[[list[memoryview]], Callable[[], list[bytes]]]
HASH_BATCH = 32  # chunks handed to `hash_chunks` at a time


class PendingCID:
    """A raw chunk's CID while its sha256 is being computed (a builder with `hash_chunks`); `cid` once
    `NarManifestBuilder.resolve` ran. Never encoded: every encode resolves first."""

    __slots__ = ("cid",)

    def __init__(self) -> None:
        self.cid: CID | None = None


def _real(c: Any) -> CID:
    cid = c.cid if type(c) is PendingCID else c
    assert isinstance(cid, CID), "internal: a PendingCID used before its builder's resolve()"
    return cid


def _fix_node(node: list[Any]) -> None:
    """Replace the resolved PendingCIDs in a node (and the inline directories under it) by their CIDs."""
    kind = node[0]
    if kind == "chunked":
        for link in node[4]:
            if type(link[0]) is PendingCID:
                link[0] = link[0].cid
    elif kind == "dir":
        for _name, child in node[1]:
            _fix_node(child)


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where a piece of a regular file's contents is: a raw chunk of `size` bytes."""

    cid: CID
    size: int


# -- building -------------------------------------------------------------------------------------------


class ChunkTree:
    """A file's chunk links, sealed into `ChunkIndex` nodes of at most `fanout` children as they come."""

    def __init__(self, fanout: int, resolve: Callable[[], None] | None = None):
        self.fanout = fanout
        self.levels: list[list[Link]] = [[]]
        self._resolve = resolve  # links may be PendingCIDs: resolved before a node is sealed

    def _seal(self, depth: int, links: list[Link], out: list[Block]) -> Link:
        if self._resolve is not None:
            self._resolve()
            links = [(_real(c), n) for c, n in links]
        data = ChunkIndex(depth, tuple(links)).encode()
        cid = CID.for_block(DAG_CBOR, data)
        out.append((cid, data))
        return cid, sum(s for _, s in links)

    def add(self, cid: CID, size: int, out: list[Block]) -> None:
        levels = self.levels
        levels[0].append((cid, size))
        level = 0
        while len(levels[level]) > self.fanout:
            full, levels[level] = levels[level][: self.fanout], levels[level][self.fanout :]
            if len(levels) == level + 1:
                levels.append([])
            levels[level + 1].append(self._seal(level, full, out))
            level += 1

    def finish(self, max_top: int, out: list[Block]) -> tuple[int, list[Link]]:
        levels = self.levels
        level = 0
        while level < len(levels) - 1 or len(levels[level]) > max_top:
            links = levels[level]
            for i in range(0, len(links), self.fanout):
                if len(levels) == level + 1:
                    levels.append([])
                levels[level + 1].append(self._seal(level, links[i : i + self.fanout], out))
            levels[level] = []
            level += 1
        return level, levels[level]


@dataclass
class _OpenDir:
    entries: list[Any] = field(default_factory=list)  # [name, node] of the page being filled
    size: int = 8  # estimated dag-cbor size of `entries`
    height: int = 0  # inline directory levels below this one
    pages: list[Any] = field(default_factory=list)  # [CID, entry count] of closed pages
    count: int = 0  # entries in closed pages
    name: bytes = b""  # the entry whose node comes next


def _link_estimate(n: int) -> int:
    return 52 * n  # tag 42 + 38-byte CID + a size of up to 9 bytes + headers


class NarManifestBuilder:
    """Consumes NAR events, returns the blocks to store (children before the blocks that link to them).

    Memory is bounded by the open directories' current pages (about `page_bytes` each, plus one pending chunk
    of the chunker), whatever the sizes of files and directories. The caller hashes the NAR bytes and passes
    the digest and size to `finish`.
    """

    def __init__(
        self,
        params: ChunkerParams = DEFAULT_PARAMS,
        *,
        inline: int = DEFAULT_INLINE,
        inline_links: int = INLINE_LINKS,
        page_bytes: int = PAGE_BYTES,
        dir_inline_bytes: int = DIR_INLINE_BYTES,
        fanout: int = FANOUT,
        hash_chunks: HashChunks | None = None,
    ):
        self.params = params.validate()
        # With `hash_chunks`, raw chunks' CIDs are computed elsewhere while this thread goes on: blocks and links
        # carry PendingCIDs until `resolve` (which every encode here runs first; the caller runs it before it
        # stores the blocks `add` returned, see `resolved`).
        self._hash_chunks = hash_chunks
        self._unhashed: list[tuple[PendingCID, memoryview]] = []
        self._hashing: collections.deque[tuple[list[PendingCID], Callable[[], list[bytes]]]] = collections.deque()
        self._submitted = self._resolved = 0  # batches handed to `hash_chunks`, and of them resolved (in order)
        if not 0 <= inline <= 64 << 10:
            raise InvalidInput(f"inline file limit must be 0..65536 bytes, got {inline}")
        if not 1 <= inline_links <= FANOUT or not 2 <= fanout <= FANOUT:
            raise InvalidInput("inline_links must be 1..4096 and fanout 2..4096")
        if not 1024 <= dir_inline_bytes <= page_bytes <= 512 << 10:
            raise InvalidInput("need 1024 <= dir_inline_bytes <= page_bytes <= 512 KiB")
        self.inline = inline
        self.inline_links = inline_links
        self.page_bytes = page_bytes
        self.dir_inline_bytes = dir_inline_bytes
        self.fanout = fanout
        self._chunker = Chunker(params)
        self._small = params.min_size  # a file this small is one chunk: FastCDC never cuts below min_size
        self._dirs: list[_OpenDir] = []
        self._root: list[Any] | None = None
        self._root_height = 0
        # The regular file being read: its header, bytes left, and inline buffer or chunk tree.
        self._file: RegularFile | None = None
        self._left = 0
        self._data = bytearray()
        self._tree: ChunkTree | None = None
        self.files = self.chunks = 0

    # The node just finished goes into its parent directory (or becomes the root).
    def _place(self, node: list[Any], size: int, height: int, out: list[Block]) -> None:
        if self._root is not None:
            raise InvalidInput("NAR manifest: event after the end of the root node")
        if not self._dirs:
            self._root, self._root_height = node, height
            return
        parent = self._dirs[-1]
        parent.entries.append([parent.name, node])
        parent.size += 8 + len(parent.name) + size
        parent.height = max(parent.height, height)
        if parent.size > self.page_bytes:
            self._close_page(parent, out)

    def _close_page(self, d: _OpenDir, out: list[Block]) -> None:
        if self._hash_chunks is not None:
            self.resolve()
            for _name, node in d.entries:
                _fix_node(node)
        data = dagcbor.encode_built({"type": PAGE_TYPE, "version": SCHEMA_VERSION, "entries": d.entries})
        if len(data) > MAX_BLOCK_SIZE:
            raise InvalidInput(f"NAR manifest: a directory page of {len(data)} bytes exceeds the block limit")
        cid = CID.for_block(DAG_CBOR, data)
        out.append((cid, data))
        if len(d.pages) >= FANOUT:
            raise InvalidInput(f"NAR manifest: a directory needs more than {FANOUT} pages of entries")
        d.pages.append([cid, len(d.entries)])
        d.count += len(d.entries)
        d.entries, d.size = [], 8

    def _file_done(self, out: list[Block], whole: bytes | memoryview | None = None) -> None:
        """The file being read is complete; `whole`: its contents came in one piece, as these bytes."""
        f = self._file
        assert f is not None
        if self._tree is None:
            if whole is not None:
                node = ["file", f.executable, f.size, whole if type(whole) is bytes else bytes(whole)]
            else:
                node = ["file", f.executable, f.size, bytes(self._data)]
                self._data.clear()
            size = 24 + f.size
        else:
            if whole is not None:
                self._chunk(whole if type(whole) is memoryview else memoryview(whole), out)
            for piece in self._chunker.finish():
                self._chunk(piece, out)
            depth, links = self._tree.finish(self.inline_links, out)
            node = ["chunked", f.executable, f.size, depth, [[c, s] for c, s in links]]
            size = 32 + _link_estimate(len(links))
            self._tree = None
        self._file = None
        self.files += 1
        self._place(node, size, 0, out)

    def _chunk(self, piece: memoryview, out: list[Block]) -> None:
        cid: Any
        if self._hash_chunks is None:
            cid = CID.for_block(RAW, piece)
        else:
            cid = PendingCID()
            self._unhashed.append((cid, piece))
            if len(self._unhashed) >= HASH_BATCH:
                self._submit()
        out.append((cid, piece))
        self.chunks += 1
        assert self._tree is not None
        self._tree.add(cid, len(piece), out)

    def _submit(self) -> None:
        assert self._hash_chunks is not None
        batch, self._unhashed = self._unhashed, []
        self._hashing.append(([p for p, _ in batch], self._hash_chunks([c for _, c in batch])))
        self._submitted += 1

    def mark(self) -> int:
        """Hand every chunk so far to `hash_chunks` and return a mark for `resolve_until`: the caller may go on
        adding (the next read's events) while they are hashed, and resolve this read's blocks later."""
        if self._unhashed:
            self._submit()
        return self._submitted

    def resolve_until(self, mark: int) -> None:
        """Wait for the CIDs of the chunks up to `mark` (from `mark`)."""
        hashing = self._hashing
        while self._resolved < mark:
            pending, wait = hashing.popleft()
            for p, digest in zip(pending, wait()):
                p.cid = CID.from_digest(RAW, digest)
            self._resolved += 1

    def resolve(self) -> None:
        """Wait for the CIDs of every chunk so far (with `hash_chunks`; nothing to do without)."""
        self.resolve_until(self.mark())

    @staticmethod
    def resolved(blocks: list[Block]) -> list[Block]:
        """`blocks` from `add` with their PendingCIDs replaced (after `resolve`)."""
        return [(_real(c), d) for c, d in blocks]

    def add(self, event: Event) -> list[Block]:
        out: list[Block] = []
        cls = type(event)
        if cls is Contents:
            if TYPE_CHECKING:  # the dispatch above is on type(event); no cast on this hot path
                assert isinstance(event, Contents)
            data = event.data
            if self._file is None or len(data) > self._left:
                raise InvalidInput("NAR manifest: file contents without a file, or beyond its size")
            file = self._file
            self._left -= len(data)
            if len(data) == file.size and (self._tree is None or file.size <= self._small):
                # A whole file in one piece: its bytes as they are (inline), or its one chunk (FastCDC cuts
                # nothing at or below min_size), with no copy and no chunker call.
                self._file_done(out, data)
                return out
            if self._tree is None:
                self._data += data
            elif len(data) == file.size:
                # A whole chunked file in one piece: cut where feed + finish would, as views of these bytes
                # (feed copies a piece under its scan threshold, and finish joins what it holds).
                for piece in self._chunker.whole(data):
                    self._chunk(piece, out)
            else:
                for piece in self._chunker.feed(data):
                    self._chunk(piece, out)
            if not self._left:
                self._file_done(out)
        elif self._file is not None:
            raise InvalidInput(f"NAR manifest: {cls.__name__} before the end of a file's contents")
        elif cls is RegularFile:
            if TYPE_CHECKING:  # the dispatch above is on type(event); no cast on this hot path
                assert isinstance(event, RegularFile)
            file = event
            self._file, self._left = file, file.size
            if file.size > self.inline:
                self._tree = ChunkTree(self.fanout, self.resolve if self._hash_chunks is not None else None)
            if not file.size:
                self._file_done(out)
        elif cls is Entry:
            if not self._dirs:
                raise InvalidInput("NAR manifest: entry outside a directory")
            if TYPE_CHECKING:  # the dispatch above is on type(event); no cast on this hot path
                assert isinstance(event, Entry)
            self._dirs[-1].name = event.name
        elif cls is DirectoryStart:
            self._dirs.append(_OpenDir())
        elif cls is DirectoryEnd:
            if not self._dirs:
                raise InvalidInput("NAR manifest: end of a directory that was not started")
            d = self._dirs.pop()
            height = d.height + 1
            if not d.pages and d.size <= self.dir_inline_bytes and height <= MAX_INLINE_HEIGHT:
                self._place(["dir", d.entries], d.size + 8, height, out)
            else:
                if d.entries or not d.pages:
                    self._close_page(d, out)
                self._place(["pages", d.count, d.pages], 16 + _link_estimate(len(d.pages)), 0, out)
        elif cls is Symlink:
            if TYPE_CHECKING:  # the dispatch above is on type(event); no cast on this hot path
                assert isinstance(event, Symlink)
            target = event.target
            self._place(["symlink", target], 16 + len(target), 0, out)
        else:
            raise InvalidInput(f"NAR manifest: unexpected event {event!r}")
        return out

    def finish(self, nar_hash: bytes, nar_size: int) -> tuple[CID, bytes]:
        """The root block, given the sha256 and size of the NAR the events came from."""
        if self._root is None:
            raise InvalidInput("NAR manifest: the NAR ended before its root node was complete")
        if self._hash_chunks is not None:
            self.resolve()
            _fix_node(self._root)
        manifest = NarManifest(nar_hash, nar_size, self.params, self.inline, self._root)
        data = manifest.encode()
        if len(data) > MAX_BLOCK_SIZE:
            raise InvalidInput(f"NAR manifest: root block of {len(data)} bytes exceeds the block limit")
        return CID.for_block(DAG_CBOR, data), data


class NarIngest:
    """NAR bytes in, manifest blocks out: parses, builds and hashes. `feed(bytes) -> blocks`, then `finish()`.

    With `expected_hash`/`expected_size` (from a narinfo), `finish` raises CorruptData on a mismatch, and
    `feed` does as soon as the NAR runs past the expected size.
    """

    def __init__(self, params: ChunkerParams = DEFAULT_PARAMS, *, expected_hash: bytes | None = None,
                 expected_size: int | None = None, **options: int):
        self.reader = NarReader()
        self.builder = NarManifestBuilder(params, **cast("dict[str, Any]", options))  # sizes only: hashes inline
        self.hash = hashlib.sha256()
        self.size = 0
        self.expected_hash = expected_hash
        self.expected_size = expected_size

    def feed(self, data: bytes) -> list[Block]:
        self.size += len(data)
        if self.expected_size is not None and self.size > self.expected_size:
            raise CorruptData(f"NAR is longer than the {self.expected_size} bytes its narinfo says")
        self.hash.update(data)
        out: list[Block] = []
        for event in self.reader.feed(data):
            out += self.builder.add(event)
        return out

    def finish(self) -> tuple[CID, bytes, bytes]:
        """(root CID, root block, NAR sha256)."""
        self.reader.end()
        digest = self.hash.digest()
        check_nar(digest, self.size, self.expected_hash, self.expected_size)
        cid, data = self.builder.finish(digest, self.size)
        return cid, data, digest


def check_nar(digest: bytes, size: int, expected_hash: bytes | None, expected_size: int | None) -> None:
    if expected_size is not None and size != expected_size:
        raise CorruptData(f"NAR has {size} bytes, its narinfo says {expected_size}")
    if expected_hash is not None and digest != expected_hash:
        raise CorruptData(f"NAR hash sha256:{digest.hex()} does not match the narinfo's sha256:{expected_hash.hex()}")


# -- the root block ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NarManifest:
    nar_hash: bytes  # sha256
    nar_size: int
    chunker: ChunkerParams
    inline: int
    root: list[Any]  # the root node, checked lazily while walking

    def to_ipld(self) -> dict[str, Any]:
        return {
            "type": NAR_TYPE,
            "version": SCHEMA_VERSION,
            "narHash": self.nar_hash,
            "narSize": self.nar_size,
            "chunker": self.chunker.to_ipld(),
            "inline": self.inline,
            "root": self.root,
        }

    def encode(self) -> bytes:
        return dagcbor.encode(self.to_ipld())

    @classmethod
    def decode(cls, data: bytes | memoryview) -> "NarManifest":
        node = dagcbor.decode(data)
        if not isinstance(node, dict) or node.get("type") != NAR_TYPE:
            raise MalformedBlock("block is not a p2pcache NAR manifest")
        if node.get("version") != SCHEMA_VERSION:
            raise MalformedBlock(f"unsupported NAR manifest version {node.get('version')!r}")
        fields = {"type", "version", "narHash", "narSize", "chunker", "inline", "root"}
        if set(node) != fields:
            raise MalformedBlock(f"NAR manifest fields differ from {sorted(fields)}: {sorted(node)}")
        nar_hash, size, inline = node["narHash"], node["narSize"], node["inline"]
        if not isinstance(nar_hash, bytes) or len(nar_hash) != 32:
            raise MalformedBlock("NAR manifest narHash must be a 32-byte sha256 digest")
        if not _is_count(size) or size < 48:  # the smallest NAR (an empty file) has 104 bytes
            raise MalformedBlock("NAR manifest narSize must be a plausible byte count")
        if not _is_count(inline) or inline > 64 << 10:
            raise MalformedBlock("NAR manifest inline limit must be 0..65536")
        try:
            chunker = ChunkerParams.from_ipld(node["chunker"])
        except InvalidInput as e:
            raise MalformedBlock(f"NAR manifest: {e}") from None
        root = node["root"]
        if not isinstance(root, list):
            raise MalformedBlock("NAR manifest root must be a node")
        return cls(nar_hash, size, chunker, inline, root)


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64


def check_links(value: object, depth: int, what: str) -> list[Link]:
    if not isinstance(value, list) or not value or len(value) > FANOUT:
        raise MalformedBlock(f"{what}: chunk links must be a list of 1..{FANOUT}")
    want = RAW if depth == 0 else DAG_CBOR
    out = []
    for link in value:
        if not (isinstance(link, list) and len(link) == 2 and isinstance(link[0], CID) and _is_count(link[1])):
            raise MalformedBlock(f"{what}: each chunk link must be [CID, size]")
        if link[0].codec != want or (depth == 0 and not 0 < link[1] <= MAX_BLOCK_SIZE):
            raise MalformedBlock(f"{what}: bad chunk link at depth {depth}")
        out.append((link[0], link[1]))
    return out


def _entries(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise MalformedBlock(f"{what}: directory entries must be a list")
    prev = b""
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], bytes)):
            raise MalformedBlock(f"{what}: each directory entry must be [name, node]")
        name = entry[0]
        problem = name_problem(name)
        if problem:
            raise MalformedBlock(f"{what}: {problem}")
        if prev and name <= prev:
            raise MalformedBlock(f"{what}: directory entries are not in strictly increasing order")
        prev = name
    return value


# A sans-IO step generator: yields `Need`s (answered by `send()`ing the block's bytes) among its items.
Steps = Generator[Any, Any, None]


@dataclass(frozen=True, slots=True)
class Need:
    """A step of a sans-IO walk needs this block's bytes: `send()` them (verified against the CID)."""

    cid: CID


def _run(steps: Steps, load: Callable[[CID], bytes]) -> Iterator[Any]:
    """Drive a sans-IO step generator with a blocking `load`: answers every `Need`, yields the rest."""
    value = None
    while True:
        try:
            item = steps.send(value)
        except StopIteration:
            return
        if type(item) is Need:
            value = load(item.cid)
        else:
            value = None
            yield item


def _page_steps(pages: list[Any], count: int, what: str) -> Steps:
    seen = 0
    prev = b""
    for cid, n in pages:
        page = dagcbor.decode((yield Need(cid)))
        if not isinstance(page, dict) or page.get("type") != PAGE_TYPE or set(page) != {"type", "version", "entries"}:
            raise MalformedBlock(f"{what}: block {cid} is not a NAR directory page")
        if page["version"] != SCHEMA_VERSION:
            raise MalformedBlock(f"{what}: unsupported directory page version {page['version']!r}")
        entries = _entries(page["entries"], what)
        if len(entries) != n or not entries:
            raise MalformedBlock(f"{what}: page {cid} holds {len(entries)} entries, its parent says {n}")
        if prev and entries[0][0] <= prev:
            raise MalformedBlock(f"{what}: directory pages are not in order")
        prev = entries[-1][0]
        seen += n
        yield from entries
    if seen != count:
        raise MalformedBlock(f"{what}: directory pages hold {seen} entries, the directory says {count}")


def _page_entries(pages: list[Any], count: int, load: Callable[[CID], bytes], what: str) -> Iterator[list[Any]]:
    return _run(_page_steps(pages, count, what), load)


def chunk_blocks(depth: int, links: list[Link], load: Callable[[CID], bytes]) -> Iterator[tuple[CID, int]]:
    """Every block of one file's chunk tree (chunk-index nodes and chunks) with its size, checked as it goes."""
    todo = [(depth, links)]
    while todo:
        depth, links = todo.pop()
        for cid, size in links:
            if depth == 0:
                yield cid, size
                continue
            data = load(cid)
            yield cid, len(data)
            index = ChunkIndex.decode(data)
            if index.depth != depth - 1 or index.size != size:
                raise MalformedBlock(f"chunk index {cid} does not match its parent's depth or size")
            todo.append((index.depth, list(index.children)))


def _link_steps(depth: int, links: list[Link]) -> Steps:
    if depth == 0:
        for cid, size in links:
            yield ChunkRef(cid, size)
        return
    for cid, size in links:
        index = ChunkIndex.decode((yield Need(cid)))
        if index.depth != depth - 1 or index.size != size:
            raise MalformedBlock(f"chunk index {cid} does not match its parent's depth or size")
        yield from _link_steps(index.depth, list(index.children))


def walk_links(depth: int, links: list[Link], load: Callable[[CID], bytes]) -> Iterator[ChunkRef]:
    """One file's chunk refs in order, loading its chunk-index nodes with `load` (checked as it goes)."""
    return _run(_link_steps(depth, links), load)


def _list_steps(entries: list[Any]) -> Steps:
    yield from entries


def _node_steps(node: object, what: str) -> tuple[list[Any], Steps | None]:
    """A node's leading events (a chunked file's chunk refs as a step generator), and for a directory a
    step generator over its entries."""
    if not isinstance(node, list) or not node or not isinstance(node[0], str):
        raise MalformedBlock(f"{what}: a node must be a list starting with its kind")
    kind = node[0]
    if kind == "file" and len(node) == 4:
        _, executable, size, data = node
        if not isinstance(executable, bool) or not isinstance(data, bytes) or not _is_count(size) or size != len(data):
            raise MalformedBlock(f"{what}: malformed inline file node")
        return [RegularFile(size, executable)] + ([Contents(data)] if data else []), None
    if kind == "chunked" and len(node) == 5:
        _, executable, size, depth, links = node
        if not isinstance(executable, bool) or not _is_count(size) or not _is_count(depth) or depth > 8:
            raise MalformedBlock(f"{what}: malformed chunked file node")
        links = check_links(links, depth, what)
        if sum(s for _, s in links) != size:
            raise MalformedBlock(f"{what}: chunk sizes do not add up to the file size")
        return [RegularFile(size, executable), _link_steps(depth, links)], None
    if kind == "symlink" and len(node) == 2:
        target = node[1]
        if not isinstance(target, bytes) or target_problem(target):
            raise MalformedBlock(f"{what}: malformed symlink node")
        return [Symlink(target)], None
    if kind == "dir" and len(node) == 2:
        return [DirectoryStart()], _list_steps(_entries(node[1], what))
    if kind == "pages" and len(node) == 3:
        _, count, pages = node
        if not _is_count(count) or not isinstance(pages, list) or not pages or len(pages) > FANOUT:
            raise MalformedBlock(f"{what}: malformed paged directory node")
        for page in pages:
            if not (isinstance(page, list) and len(page) == 2 and isinstance(page[0], CID)
                    and page[0].codec == DAG_CBOR and _is_count(page[1])):
                raise MalformedBlock(f"{what}: each directory page link must be [CID, entries]")
        return [DirectoryStart()], _page_steps(pages, count, what)
    raise MalformedBlock(f"{what}: unknown or malformed node kind {kind[:20]!r}")


def _node_events(node: object, load: Callable[[CID], bytes], what: str) -> tuple[list[Any], Iterator[list[Any]] | None]:
    """A node's leading events, and for a directory an iterator over its entries (blocks from `load`)."""
    head, entries = _node_steps(node, what)
    head = [_run(cast(Steps, h), load) if isinstance(h, Iterator) else h for h in head]
    return head, None if entries is None else _run(entries, load)


# -- reading ----------------------------------------------------------------------------------------------


def plan_steps(manifest: NarManifest) -> Steps:
    """The NAR's events in order, with `ChunkRef`s where file contents come from chunks, as a sans-IO
    step generator: where it needs a page or chunk-index block it yields `Need(cid)` and expects the
    block's bytes through `send()`. Its Needs and ChunkRefs come in the depth-first order of the
    manifest's links (the order a DAG stream sends them). The tree's shape, names and sizes are checked
    here."""
    what = "NAR manifest"
    stack: list[Any] = []
    node: object = manifest.root
    while True:
        head, entries = _node_steps(node, what)
        for item in head:
            if isinstance(item, Iterator):
                yield from item
            else:
                yield item
        if entries is not None:
            if len(stack) >= MAX_DEPTH:
                raise MalformedBlock(f"{what}: directories nested deeper than {MAX_DEPTH}")
            stack.append(entries)
        while stack:
            value = None
            while True:
                try:
                    entry = stack[-1].send(value)
                except StopIteration:
                    entry = None
                    break
                if type(entry) is Need:
                    value = yield entry
                else:
                    break
            if entry is None:
                stack.pop()
                yield DirectoryEnd()
                continue
            yield Entry(entry[0])
            node = entry[1]
            break
        else:
            return


def iter_plan(manifest: NarManifest, load: Callable[[CID], bytes]) -> Iterator[Event | ChunkRef]:
    """The NAR's events in order, with `ChunkRef`s where file contents come from chunks.

    Loads pages and chunk-index nodes with `load` as it goes, never chunks: a caller resolves `ChunkRef`s
    itself, e.g. with read-ahead on several threads. The tree's shape, names and sizes are checked here.
    """
    return _run(plan_steps(manifest), load)


class NarAssembly:
    """A NAR's bytes from its manifest as the blocks it needs are handed in, in NAR order (sans-IO).

    `start()` gives the bytes before the first block is needed; `need()` names the next block (a page, a
    chunk-index node or a chunk; None once done); `give(data)` hands in its verified bytes and returns
    the NAR bytes that may go out now. The last bytes come only once the whole NAR matched narHash and
    narSize; on a mismatch `give` raises CorruptData instead, so a server forwarding these bytes never
    completes a wrong NAR."""

    def __init__(self, manifest: NarManifest, coalesce: int = 1 << 16):
        self._steps = plan_steps(manifest)
        self._writer = NarWriter()
        self._check = VerifiedStream.sha256(manifest.nar_hash, manifest.nar_size, "NAR")
        self._coalesce = coalesce
        self._need: Need | ChunkRef | None = None
        self._done = False
        self._out: list[bytes] = []

    def need(self) -> CID | None:
        return None if self._need is None else self._need.cid

    def start(self) -> list[bytes]:
        return self._advance(None)

    def give(self, data: bytes) -> list[bytes]:
        need = self._need
        if need is None:
            raise ValueError("NarAssembly.give: no block is needed")
        self._need = None
        if type(need) is ChunkRef:
            if len(data) != need.size:
                raise CorruptData(f"chunk {need.cid} has {len(data)} bytes, its manifest says {need.size}")
            self._emit(self._writer.send(Contents(data)))
            return self._advance(None)
        return self._advance(data)

    def _emit(self, piece: bytes) -> None:
        if piece:
            out = self._check.push(piece)
            if out:
                self._out.append(out)

    def _advance(self, value: bytes | None) -> list[bytes]:
        if self._done:
            return []
        small = bytearray()
        while True:
            try:
                item = self._steps.send(value)
            except StopIteration:
                break
            value = None
            if type(item) is Need or type(item) is ChunkRef:
                self._need = item
                break
            piece = self._writer.send(item)
            if len(piece) >= self._coalesce:
                if small:
                    self._emit(bytes(small))
                    small.clear()
                self._emit(piece)
            elif piece:
                small += piece
                if len(small) >= self._coalesce:
                    self._emit(bytes(small))
                    small.clear()
        if small:
            self._emit(bytes(small))
        if self._need is None:
            self._done = True
            self._writer.finish()
            last = self._check.finish()
            if last:
                self._out.append(last)
        out, self._out = self._out, []
        return out


def resolve_chunks(plan: Iterable[Event | ChunkRef], load: Callable[[CID], bytes]) -> Iterator[Event]:
    """Replace each `ChunkRef` by a `Contents` event with the chunk's bytes (size-checked)."""
    for item in plan:
        if type(item) is ChunkRef:
            data = load(item.cid)
            if len(data) != item.size:
                raise CorruptData(f"chunk {item.cid} has {len(data)} bytes, its manifest says {item.size}")
            yield Contents(data)
        else:
            yield cast(Event, item)


def iter_events(manifest: NarManifest, load: Callable[[CID], bytes]) -> Iterator[Event]:
    return resolve_chunks(iter_plan(manifest, load), load)


def nar_stream(manifest: NarManifest, load: Callable[[CID], bytes]) -> Iterator[bytes]:
    """The NAR's bytes, unverified as a whole (every block is as verified as `load` makes it)."""
    return write_nar(iter_events(manifest, load))


def verified_nar_stream(manifest: NarManifest, load: Callable[[CID], bytes]) -> Iterator[bytes]:
    """The NAR's bytes; the last piece comes only once the whole NAR matched narHash and narSize.

    On a mismatch CorruptData is raised instead of the last piece. An HTTP server must then abort the
    response (close the connection without finishing the body): with Content-Length set to the NAR size, the
    client sees a short body and fails, never a complete wrong NAR.
    """
    return VerifiedStream.sha256(manifest.nar_hash, manifest.nar_size, "NAR").wrap(nar_stream(manifest, load))


def iter_blocks(manifest: NarManifest, load: Callable[[CID], bytes]) -> Iterator[tuple[CID, int]]:
    """Every block below the root (pages, chunk-index nodes, chunks) with its size, parents first.

    A block reached twice (the same file twice in the tree) is listed each time."""
    stack: list[object] = [manifest.root]
    what = "NAR manifest"
    while stack:
        node = stack.pop()
        if not isinstance(node, list) or not node:
            raise MalformedBlock(f"{what}: a node must be a list starting with its kind")
        kind = node[0]
        if kind == "chunked":
            _node_events(node, load, what)  # shape checks
            yield from chunk_blocks(node[3], check_links(node[4], node[3], what), load)
        elif kind == "dir":
            _node_events(node, load, what)
            stack.extend(e[1] for e in node[1])
        elif kind == "pages":
            _node_events(node, load, what)
            for cid, _ in node[2]:
                data = load(cid)
                yield cid, len(data)
            # Walk the entries through the checking iterator (loads each page a second time; cheap).
            stack.extend(e[1] for e in _page_entries(node[2], node[1], load, what))
        else:
            _node_events(node, load, what)


# -- whole-stream verification ------------------------------------------------------------------------------


class VerifiedStream:
    """Hashes pieces as they pass and withholds the last one until the total matched.

    Sans-IO: `push(piece)` returns what may be released now (the previous piece), `finish()` checks the
    hash and size and returns the withheld piece, or raises CorruptData. A stream that runs past `size` fails
    at once. `wrap(iterable)` applies it to a synchronous iterator.
    """

    def __init__(self, algo: str, digest: bytes, size: int | None, what: str = "stream",
                 hasher: "hashlib._Hash | None" = None):
        self.algo = algo
        self.digest = digest
        self.size = size
        self.what = what
        self._hash = hasher if hasher is not None else hashlib.new(algo)
        self._held: bytes = b""
        self.total = 0

    @classmethod
    def sha256(cls, digest: bytes, size: int | None, what: str = "stream") -> "VerifiedStream":
        return cls("sha256", digest, size, what)

    def push(self, piece: bytes) -> bytes:
        if not piece:
            return b""
        self.total += len(piece)
        if self.size is not None and self.total > self.size:
            raise CorruptData(f"{self.what} is longer than the {self.size} bytes expected")
        self._hash.update(piece)
        out, self._held = self._held, piece
        return out

    def finish(self) -> bytes:
        if self.size is not None and self.total != self.size:
            raise CorruptData(f"{self.what} has {self.total} bytes, expected {self.size}")
        got = self._hash.digest()
        if got != self.digest:
            raise CorruptData(f"{self.what} hash {self.algo}:{got.hex()} does not match the expected "
                              f"{self.algo}:{self.digest.hex()}")
        out, self._held = self._held, b""
        return out

    def wrap(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        for piece in pieces:
            out = self.push(piece)
            if out:
                yield out
        last = self.finish()
        if last:
            yield last
