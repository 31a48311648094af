"""Tree manifests: dag-cbor blocks describing a saved build directory (or several), file by file.

Owns the block format of the build cache's contents and its pure builder and reader. A build directory is
not a NAR: it needs modes, mtimes and several top-level paths, and it is saved again and again with a few
files changed. So it is described as one flat, sorted list of entries, cut into pages at content-defined
boundaries (a page ends after an entry whose path hashes to a boundary value), the way a prolly tree is:
changing, adding or removing one file changes only the page that holds it, so two saves of mostly the same
directory share all other pages, and an unchanged re-save produces exactly the same blocks. File contents
are chunked one file at a time with the same FastCDC parameters and the same chunk-index trees as NAR
manifests (`narmanifest.ChunkTree`, `walk_links`), so an unchanged file keeps its chunks wherever it moves;
files up to `inline` bytes live in their entry.

Blocks:

    root  {"type": "p2pcache/tree", "version": 1, "chunker": <ChunkerParams>, "inline": int,
           "paths": [str, ...],              the top-level paths as saved (informative; restore maps by position)
           "entries": int, "size": int,      entry count, total bytes of regular files
           "pages": [[CID, count], ...],     the entries, in order, spread over page blocks
           "sources": null | {"path": str, "entries": int, "pages": [[CID, count], ...]}}
    page  {"type": "p2pcache/tree-page", "version": 1, "entries": [entry, ...]}
    index {"type": "p2pcache/tree-index", "version": 1, "pages": [[CID, count], ...]}   when a list of page
          links would pass ROOT_PAGES, it is itself cut into index blocks the same way (links to pages or,
          for huge trees, to further index blocks; count is always the entries below the link)
    chunk-index nodes and raw chunks exactly as in manifest.py

    entry        = [top, path, mode, mtime_ns, body]     top: index into "paths"; path: relative bytes,
                                                        "/"-separated, b"" for the top-level path itself
    regular file : body = bytes (size <= inline) | [size, depth, links]
    directory    : body = null
    symlink      : body = target bytes
    source entry = [path, sha256 digest, mtime_ns]       a source file at save time

Entries are in strictly increasing (top, path) order. Only the shape is checked here; whether a path or
a symlink is safe to write is the restorer's decision (`path_problem`), so a manifest from a hostile peer
decodes, and every entry it should not have is refused and reported one by one.

Everything here is pure: no files are opened. `chunk_contents` turns a file's bytes (any iterable of
buffers) into its entry body and blocks; `TreeManifestBuilder` takes entries in order and returns the page
blocks as they close; `iter_entries`, `iter_sources`, `file_chunks` and `iter_blocks` read a tree back
through a `load(cid) -> bytes` that returns verified bytes.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from ..errors import InvalidInput, MalformedBlock
from . import dagcbor
from .chunking import DEFAULT_PARAMS, MAX_BLOCK_SIZE, Chunker, ChunkerParams
from .cid import CID, DAG_CBOR, RAW
from .manifest import FANOUT
from .narmanifest import INLINE_LINKS, ChunkRef, ChunkTree, check_links, chunk_blocks, walk_links

__all__ = [
    "TreeEntry", "TreeManifest", "TreeManifestBuilder", "chunk_contents", "file_chunks", "iter_blocks",
    "iter_entries", "iter_sources", "path_problem", "previous_tree",
]

TREE_TYPE = "p2pcache/tree"
PAGE_TYPE = "p2pcache/tree-page"
INDEX_TYPE = "p2pcache/tree-index"
ROOT_PAGES = 1024  # more page links than this go into index blocks (content-defined, ~32 links each)
SCHEMA_VERSION = 1
DEFAULT_INLINE = 1024
PAGE_MASK = 0x1F  # a page closes after an entry whose path hash has these bits zero: ~32 entries a page
PAGE_BYTES = 256 << 10  # ... or once it is estimated past this
MAX_PATH = 4096

Block = tuple[CID, "bytes | memoryview"]
Load = Callable[[CID], bytes]


@dataclass(frozen=True, slots=True)
class TreeEntry:
    top: int
    path: bytes
    mode: int  # st_mode: file type and permission bits
    mtime_ns: int
    body: object  # see the module docstring

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def size(self) -> int:
        if not self.is_file:
            return 0
        return len(self.body) if isinstance(self.body, bytes) else self.body[0]  # type: ignore[index]

    def to_ipld(self) -> list[Any]:
        return [self.top, self.path, self.mode, self.mtime_ns, self.body]


def path_problem(path: bytes) -> str | None:
    """Why a relative path must not be written under a target directory, or None if it is fine."""
    if path == b"":
        return None
    if path.startswith(b"/"):
        return "absolute path"
    if b"\0" in path:
        return "NUL in path"
    if len(path) > MAX_PATH:
        return "path too long"
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            return f"path component {part.decode(errors='replace')!r}"
    return None


# -- building ---------------------------------------------------------------------------------------------


def chunk_contents(pieces: Iterable[bytes], size: int, params: ChunkerParams = DEFAULT_PARAMS,
                   inline: int = DEFAULT_INLINE, chunker: Chunker | None = None) -> tuple[object, list[Block]]:
    """A regular file's entry body and the blocks it needs (chunks, then chunk-index nodes), from its bytes.

    `size` is what the caller stat()ed; if the bytes read differ (the file changed while being read),
    InvalidInput is raised, so a torn file is never saved."""
    if size <= inline:
        data = b"".join(pieces)
        if len(data) != size:
            raise InvalidInput(f"file changed while it was read ({len(data)} bytes, stat said {size})")
        return data, []
    chunker = chunker or Chunker(params)
    tree = ChunkTree(FANOUT)
    out: list[Block] = []
    total = 0

    def take(piece: memoryview) -> None:
        data = bytes(piece)
        cid = CID.for_block(RAW, data)
        out.append((cid, data))
        tree.add(cid, len(data), out)

    for buf in pieces:
        total += len(buf)
        for piece in chunker.feed(buf):
            take(piece)
    for piece in chunker.finish():
        take(piece)
    if total != size:
        raise InvalidInput(f"file changed while it was read ({total} bytes, stat said {size})")
    depth, links = tree.finish(INLINE_LINKS, out)
    return [size, depth, [[c, s] for c, s in links]], out


class _Pager:
    """Items in order in, page blocks out: a page closes at a content-defined boundary or when full.

    `previous` maps a page's first item to (items, CID) of a page of an earlier tree: a page that comes out
    with exactly those items is that block again, so it is neither encoded nor emitted (an unchanged re-save
    of a big tree re-encodes nothing)."""

    def __init__(self, previous: dict[Any, Any] | None = None) -> None:
        self.previous = previous or {}
        self.items: list[Any] = []
        self.size = 0
        self.pages: list[list[Any]] = []
        self.count = 0

    def add(self, item: list[Any], boundary: bytes, estimate: int) -> list[Block]:
        self.items.append(item)
        self.size += estimate
        self.count += 1
        if hashlib.sha256(boundary).digest()[0] & PAGE_MASK == 0 or self.size > PAGE_BYTES:
            return self.close()
        return []

    def close(self) -> list[Block]:
        if not self.items:
            return []
        old = self.previous.get(_first_key(self.items[0]))
        if old is not None and old[0] == self.items:
            self.pages.append([old[1], len(self.items)])
            self.items, self.size = [], 0
            return []
        data = dagcbor.encode({"type": PAGE_TYPE, "version": SCHEMA_VERSION, "entries": self.items})
        if len(data) > MAX_BLOCK_SIZE:
            raise InvalidInput(f"tree manifest: a page of {len(data)} bytes exceeds the block limit")
        cid = CID.for_block(DAG_CBOR, data)
        self.pages.append([cid, len(self.items)])
        self.items, self.size = [], 0
        return [(cid, data)]


def _first_key(item: list[Any]) -> tuple[Any, ...]:
    return (item[0], item[1]) if len(item) == 5 else (item[0],)


def _indexed(links: list[list[Any]], out: list[Block]) -> list[list[Any]]:
    """Page links as the root holds them: at most ROOT_PAGES, else grouped into index blocks (content-defined
    boundaries on the link's CID, so an unchanged run of pages keeps its index block), level by level."""
    while len(links) > ROOT_PAGES:
        grouped: list[list[Any]] = []
        group: list[list[Any]] = []

        def close() -> None:
            data = dagcbor.encode({"type": INDEX_TYPE, "version": SCHEMA_VERSION, "pages": group})
            cid = CID.for_block(DAG_CBOR, data)
            out.append((cid, data))
            grouped.append([cid, sum(n for _, n in group)])

        for link in links:
            group.append(link)
            if link[0].buffer[-1] & PAGE_MASK == 0 or len(group) >= 4 * (PAGE_MASK + 1):
                close()
                group = []
        if group:
            close()
        links = grouped
    return links


def _estimate(body: object) -> int:
    if isinstance(body, bytes):
        return len(body)
    if isinstance(body, list):
        return 16 + 52 * len(body[2])
    return 0


class TreeManifestBuilder:
    """Entries (strictly increasing by (top, path)) and sources (increasing by path) in, blocks out."""

    def __init__(self, paths: list[str], params: ChunkerParams = DEFAULT_PARAMS, inline: int = DEFAULT_INLINE,
                 sources_path: str | None = None, previous_pages: dict[Any, Any] | None = None):
        self.paths = list(paths)
        self.params = params.validate()
        self.inline = inline
        self.sources_path = sources_path
        self._entries = _Pager(previous_pages)  # see `previous_pages`
        self._sources = _Pager()
        self._last: tuple[int, bytes] | None = None
        self._last_source: bytes | None = None
        self.size = 0

    def add(self, entry: TreeEntry) -> list[Block]:
        key = (entry.top, entry.path)
        if self._last is not None and key <= self._last:
            raise InvalidInput(f"tree manifest: entry {entry.path!r} out of order")
        if not 0 <= entry.top < len(self.paths):
            raise InvalidInput(f"tree manifest: entry of top-level path {entry.top} of {len(self.paths)}")
        self._last = key
        self.size += entry.size
        est = 32 + len(entry.path) + _estimate(entry.body)
        return self._entries.add(entry.to_ipld(), entry.top.to_bytes(4, "big") + entry.path, est)

    def add_source(self, path: bytes, digest: bytes, mtime_ns: int) -> list[Block]:
        if self._last_source is not None and path <= self._last_source:
            raise InvalidInput(f"tree manifest: source {path!r} out of order")
        self._last_source = path
        return self._sources.add([path, digest, mtime_ns], path, 50 + len(path))

    def finish(self) -> tuple[CID, bytes, list[Block]]:
        out = self._entries.close() + self._sources.close()
        pages = _indexed(self._entries.pages, out)
        sources = None
        if self.sources_path is not None:
            sources = {"path": self.sources_path, "entries": self._sources.count,
                       "pages": _indexed(self._sources.pages, out)}
        manifest = TreeManifest(self.params, self.inline, tuple(self.paths), self._entries.count, self.size,
                                tuple(map(tuple, pages)), sources)
        data = manifest.encode()
        if len(data) > MAX_BLOCK_SIZE:
            raise InvalidInput(f"tree manifest: root block of {len(data)} bytes exceeds the block limit")
        return CID.for_block(DAG_CBOR, data), data, out


# -- the root block -----------------------------------------------------------------------------------------


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64


def _page_links(value: object, what: str) -> tuple[tuple[CID, int], ...]:
    if not isinstance(value, list) or len(value) > FANOUT:
        raise MalformedBlock(f"{what}: pages must be a list of at most {FANOUT}")
    out = []
    for p in value:
        if not (isinstance(p, list) and len(p) == 2 and isinstance(p[0], CID) and p[0].codec == DAG_CBOR
                and _is_count(p[1]) and p[1] > 0):
            raise MalformedBlock(f"{what}: each page link must be [dag-cbor CID, entry count]")
        out.append((p[0], p[1]))
    return tuple(out)


@dataclass(frozen=True)
class TreeManifest:
    chunker: ChunkerParams
    inline: int
    paths: tuple[str, ...]
    entries: int
    size: int
    pages: tuple[tuple[CID, int], ...]
    sources: dict[Any, Any] | None  # {"path", "entries", "pages"}

    def to_ipld(self) -> dict[str, Any]:
        return {
            "type": TREE_TYPE, "version": SCHEMA_VERSION, "chunker": self.chunker.to_ipld(), "inline": self.inline,
            "paths": list(self.paths), "entries": self.entries, "size": self.size,
            "pages": [[c, n] for c, n in self.pages],
            "sources": None if self.sources is None else {
                "path": self.sources["path"], "entries": self.sources["entries"],
                "pages": [[c, n] for c, n in self.sources["pages"]]},
        }

    def encode(self) -> bytes:
        return dagcbor.encode(self.to_ipld())

    @classmethod
    def decode(cls, data: bytes | memoryview) -> "TreeManifest":
        node = dagcbor.decode(data)
        if not isinstance(node, dict) or node.get("type") != TREE_TYPE:
            raise MalformedBlock("block is not a p2pcache tree manifest")
        if node.get("version") != SCHEMA_VERSION:
            raise MalformedBlock(f"unsupported tree manifest version {node.get('version')!r}")
        fields = {"type", "version", "chunker", "inline", "paths", "entries", "size", "pages", "sources"}
        if set(node) != fields:
            raise MalformedBlock(f"tree manifest fields differ from {sorted(fields)}: {sorted(node)}")
        try:
            chunker = ChunkerParams.from_ipld(node["chunker"])
        except InvalidInput as e:
            raise MalformedBlock(f"tree manifest: {e}") from None
        paths = node["paths"]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise MalformedBlock("tree manifest paths must be a non-empty list of strings")
        if not _is_count(node["inline"]) or node["inline"] > 64 << 10:
            raise MalformedBlock("tree manifest inline limit must be 0..65536")
        if not _is_count(node["entries"]) or not _is_count(node["size"]):
            raise MalformedBlock("tree manifest entries and size must be counts")
        pages = _page_links(node["pages"], "tree manifest")
        sources = node["sources"]
        if sources is not None:
            if not (isinstance(sources, dict) and set(sources) == {"path", "entries", "pages"}
                    and isinstance(sources["path"], str) and _is_count(sources["entries"])):
                raise MalformedBlock("tree manifest sources must be {path, entries, pages}")
            sources = {"path": sources["path"], "entries": sources["entries"],
                       "pages": _page_links(sources["pages"], "tree manifest sources")}
        return cls(chunker, node["inline"], tuple(paths), node["entries"], node["size"], pages, sources)


# -- reading ------------------------------------------------------------------------------------------------


def _page_items(pages: Iterable[tuple[CID, int]], count: int, load: Load, what: str,
                depth: int = 0, recheck: bool = True) -> Iterator[list[Any]]:
    seen = 0
    for cid, n in pages:
        page = dagcbor.decode(load(cid), recheck=recheck)
        if isinstance(page, dict) and page.get("type") == INDEX_TYPE:
            if depth >= 4 or set(page) != {"type", "version", "pages"} or page["version"] != SCHEMA_VERSION:
                raise MalformedBlock(f"{what}: malformed or too deep tree index {cid}")
            seen += n
            yield from _page_items(_page_links(page["pages"], what), n, load, what, depth + 1, recheck)
            continue
        if not isinstance(page, dict) or page.get("type") != PAGE_TYPE or set(page) != {"type", "version", "entries"}:
            raise MalformedBlock(f"{what}: block {cid} is not a tree page")
        if page["version"] != SCHEMA_VERSION:
            raise MalformedBlock(f"{what}: unsupported tree page version {page['version']!r}")
        items = page["entries"]
        if not isinstance(items, list) or len(items) != n:
            raise MalformedBlock(f"{what}: page {cid} holds a different number of entries than its link says")
        seen += n
        yield from items
    if seen != count:
        raise MalformedBlock(f"{what}: pages hold {seen} entries, the manifest says {count}")


def _check_body(mode: int, body: object, what: str) -> None:
    if stat.S_ISREG(mode):
        if isinstance(body, bytes):
            return
        if not (isinstance(body, list) and len(body) == 3 and _is_count(body[0]) and _is_count(body[1])
                and body[1] <= 8):
            raise MalformedBlock(f"{what}: malformed file body")
        links = check_links(body[2], body[1], what)
        if sum(s for _, s in links) != body[0]:
            raise MalformedBlock(f"{what}: chunk sizes do not add up to the file size")
    elif stat.S_ISLNK(mode):
        if not isinstance(body, bytes) or not body or len(body) > MAX_PATH:
            raise MalformedBlock(f"{what}: malformed symlink target")
    elif body is not None:
        raise MalformedBlock(f"{what}: only files and symlinks carry a body")


def iter_entries(manifest: TreeManifest, load: Load, *, recheck: bool = True) -> Iterator[TreeEntry]:
    """The tree's entries in order, their shape checked (not their safety: see `path_problem`).

    `recheck=False` skips re-encoding each page to check its canonical form (`dagcbor.decode`), for a reader
    of pages some daemon already decoded strictly when it stored them (a repo's own tree); every shape check
    here stays, and canonical form is about one value having one CID, not about what an entry may do."""
    what = "tree manifest"
    last: tuple[int, bytes] | None = None
    for item in _page_items(manifest.pages, manifest.entries, load, what, recheck=recheck):
        if not (isinstance(item, list) and len(item) == 5 and _is_count(item[0]) and isinstance(item[1], bytes)
                and _is_count(item[2]) and item[2] < 1 << 32 and isinstance(item[3], int)
                and not isinstance(item[3], bool) and abs(item[3]) < 1 << 63):
            raise MalformedBlock(f"{what}: each entry must be [top, path, mode, mtime_ns, body]")
        top, path, mode, mtime, body = item
        if top >= len(manifest.paths):
            raise MalformedBlock(f"{what}: entry of top-level path {top}, the manifest has {len(manifest.paths)}")
        key = (top, path)
        if last is not None and key <= last:
            raise MalformedBlock(f"{what}: entries are not in strictly increasing order")
        last = key
        _check_body(mode, body, what)
        yield TreeEntry(top, path, mode, mtime, body)


def previous_tree(manifest: TreeManifest, load: Load) -> tuple[dict[tuple[int, bytes], TreeEntry], dict[Any, Any]]:
    """An earlier tree of our own repo, for the next save: its regular-file entries by (top, path) (the stat
    cache) and its entry pages by first entry (`TreeManifestBuilder(previous_pages=…)`). Each page is decoded
    once; the shapes were checked when the tree was registered. Pages reused this way are not emitted again,
    so the caller must know the tree is still complete in the repo. That also means every page was decoded
    strictly when the tree was registered (`register_tree` walks them all), so they are not re-encoded
    to check their canonical form again here."""
    files: dict[tuple[int, bytes], TreeEntry] = {}
    pages: dict[Any, Any] = {}

    def walk(links: Iterable[tuple[CID, int]], depth: int = 0) -> None:
        for cid, _ in links:
            node = dagcbor.decode(load(cid), recheck=False)
            if not isinstance(node, dict):
                raise MalformedBlock(f"tree block {cid} is not a map")
            if node.get("type") == INDEX_TYPE and depth < 4:
                walk(_page_links(node.get("pages"), "tree index"), depth + 1)
            elif node.get("type") == PAGE_TYPE and node.get("entries"):
                items = node["entries"]
                pages[_first_key(items[0])] = (items, cid)
                for top, path, mode, mtime, body in items:
                    if stat.S_ISREG(mode):
                        files[(top, path)] = TreeEntry(top, path, mode, mtime, body)

    walk(manifest.pages)
    return files, pages


def iter_sources(manifest: TreeManifest, load: Load) -> Iterator[tuple[bytes, bytes, int]]:
    """(path, sha256, mtime_ns) of the sources recorded at save time, in path order."""
    if manifest.sources is None:
        return
    what = "tree manifest sources"
    last: bytes | None = None
    for item in _page_items(manifest.sources["pages"], manifest.sources["entries"], load, what):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], bytes)
                and isinstance(item[1], bytes) and len(item[1]) == 32 and isinstance(item[2], int)
                and not isinstance(item[2], bool) and abs(item[2]) < 1 << 63):
            raise MalformedBlock(f"{what}: each source must be [path, sha256, mtime_ns]")
        if last is not None and item[0] <= last:
            raise MalformedBlock(f"{what}: sources are not in strictly increasing order")
        last = item[0]
        yield item[0], item[1], item[2]


def file_chunks(entry: TreeEntry, load: Load) -> Iterator[ChunkRef]:
    """Where a chunked file's bytes are, in order (loads chunk-index nodes, never chunks)."""
    body = entry.body
    assert isinstance(body, list)
    links = check_links(body[2], body[1], "tree manifest")
    if body[1] == 0:  # the chunks themselves (most files): no index node to load, no walk to drive
        return iter([ChunkRef(cid, size) for cid, size in links])
    return walk_links(body[1], links, load)


def iter_blocks(manifest: TreeManifest, load: Load) -> Iterator[tuple[CID, int]]:
    """Every block below the root (index blocks and pages, chunk-index nodes, chunks) with its size, each
    page loaded and decoded once, strictly: a page (and the index blocks on the way to it), then the
    blocks of its files; the sources' pages last. Repeats possible."""
    loaded: list[tuple[CID, int]] = []

    def recording(cid: CID) -> bytes:
        data = load(cid)
        loaded.append((cid, len(data)))
        return data

    for entry in iter_entries(manifest, recording):
        if loaded:
            yield from loaded
            loaded.clear()
        if entry.is_file and isinstance(entry.body, list):
            depth, links = entry.body[1], entry.body[2]
            if depth == 0:  # the chunks themselves, their links checked by `iter_entries` (`_check_body`)
                for cid, size in links:
                    yield cid, size
            else:
                yield from chunk_blocks(depth, check_links(links, depth, "tree manifest"), load)
    yield from loaded
    loaded.clear()
    if manifest.sources is not None:
        for _ in iter_sources(manifest, recording):
            pass
        yield from loaded
