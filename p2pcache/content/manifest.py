"""Archive manifests: dag-cbor blocks that map an original archive onto its content-defined chunks.

An archive is a tree. The root (`ArchiveManifest`) names the archive — its size, its original hashes,
a media-type hint, an optional name, the chunker parameters that cut it — and lists its children.
Children are `[CID, byte-size]` pairs; at depth 0 they are raw chunks, at depth d > 0 they are
`ChunkIndex` nodes of depth d - 1. With at most `FANOUT` children per node (about 190 KiB of dag-cbor),
no manifest block comes near the 1 MiB block ceiling, whatever the archive's size.

Everything here is pure: building emits the blocks to store, reading takes a `load(cid) -> bytes`
callable that the caller backs with a repo, a network session or a dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import InvalidInput, MalformedBlock
from . import dagcbor
from .chunking import MAX_BLOCK_SIZE, ChunkerParams
from .cid import CID, DAG_CBOR, RAW

SCHEMA_VERSION = 1
FANOUT = 4096
HASH_SIZES = {"sha256": 32, "sha512": 64}
REQUIRED_HASHES = ("sha256",)  # sha512 is optional: repos compute it lazily (format-1 manifests carry it)

Link = tuple[CID, int]


def _check_links(children: object, depth: int, what: str) -> list[Link]:
    if not isinstance(children, list):
        raise MalformedBlock(f"{what}: children must be a list")
    if len(children) > FANOUT:
        raise MalformedBlock(f"{what}: {len(children)} children exceed the fan-out limit {FANOUT}")
    want_codec = RAW if depth == 0 else DAG_CBOR
    out: list[Link] = []
    for entry in children:
        if not (isinstance(entry, list) and len(entry) == 2):
            raise MalformedBlock(f"{what}: each child must be a [CID, size] pair")
        cid, size = entry
        if not isinstance(cid, CID) or cid.codec != want_codec:
            raise MalformedBlock(f"{what}: child at depth {depth} must be a {'raw' if depth == 0 else 'dag-cbor'} CID")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise MalformedBlock(f"{what}: child size must be a non-negative integer")
        if depth == 0 and not 0 < size <= MAX_BLOCK_SIZE:
            raise MalformedBlock(f"{what}: chunk size {size} outside 1..{MAX_BLOCK_SIZE}")
        out.append((cid, size))
    return out


@dataclass(frozen=True)
class ChunkIndex:
    depth: int
    children: tuple[Link, ...]

    @property
    def size(self) -> int:
        return sum(s for _, s in self.children)

    def to_ipld(self) -> dict[str, Any]:
        return {
            "type": "p2pcache/chunk-index",
            "version": SCHEMA_VERSION,
            "depth": self.depth,
            "children": [[c, s] for c, s in self.children],
        }

    def encode(self) -> bytes:
        return dagcbor.encode(self.to_ipld())

    @classmethod
    def decode(cls, data: bytes | memoryview) -> "ChunkIndex":
        node = dagcbor.decode(data)
        if not isinstance(node, dict) or node.get("type") != "p2pcache/chunk-index":
            raise MalformedBlock("block is not a p2pcache chunk index")
        if node.get("version") != SCHEMA_VERSION:
            raise MalformedBlock(f"unsupported chunk-index version {node.get('version')!r}")
        depth = node.get("depth")
        if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= 8:
            raise MalformedBlock("chunk index depth must be an integer 0..8")
        if set(node) != {"type", "version", "depth", "children"}:
            raise MalformedBlock(f"chunk index has unexpected fields {sorted(set(node) - {'type', 'version', 'depth', 'children'})}")
        return cls(depth, tuple(_check_links(node.get("children"), depth, "chunk index")))


@dataclass(frozen=True)
class ArchiveManifest:
    """The root of an archive: what it is, how it was cut, and where its bytes are."""

    size: int
    hashes: dict[str, bytes]
    chunker: ChunkerParams
    depth: int
    children: tuple[Link, ...]
    media_type: str = "application/octet-stream"
    name: str | None = None

    def to_ipld(self) -> dict[str, Any]:
        node = {
            "type": "p2pcache/archive",
            "version": SCHEMA_VERSION,
            "size": self.size,
            "hashes": dict(self.hashes),
            "format": self.media_type,
            "chunker": self.chunker.to_ipld(),
            "depth": self.depth,
            "children": [[c, s] for c, s in self.children],
        }
        if self.name is not None:
            node["name"] = self.name
        return node

    def encode(self) -> bytes:
        return dagcbor.encode(self.to_ipld())

    @classmethod
    def decode(cls, data: bytes | memoryview) -> "ArchiveManifest":
        node = dagcbor.decode(data)
        if not isinstance(node, dict) or node.get("type") != "p2pcache/archive":
            raise MalformedBlock("block is not a p2pcache archive manifest")
        if node.get("version") != SCHEMA_VERSION:
            raise MalformedBlock(f"unsupported archive manifest version {node.get('version')!r}")
        known = {"type", "version", "size", "hashes", "format", "chunker", "depth", "children", "name"}
        if set(node) - known:
            raise MalformedBlock(f"archive manifest has unexpected fields {sorted(set(node) - known)}")
        size, depth = node.get("size"), node.get("depth")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise MalformedBlock("archive size must be a non-negative integer")
        if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= 8:
            raise MalformedBlock("archive depth must be an integer 0..8")
        hashes = node.get("hashes")
        if not isinstance(hashes, dict):
            raise MalformedBlock("archive hashes must be a map")
        for algo in REQUIRED_HASHES:
            if algo not in hashes:
                raise MalformedBlock(f"archive manifest lacks its {algo} hash")
        for algo, digest in hashes.items():
            if algo in HASH_SIZES and (not isinstance(digest, bytes) or len(digest) != HASH_SIZES[algo]):
                raise MalformedBlock(f"archive {algo} hash must be {HASH_SIZES[algo]} bytes")
            if not isinstance(digest, bytes):
                raise MalformedBlock(f"archive hash {algo} must be bytes")
        media_type, name = node.get("format"), node.get("name")
        if not isinstance(media_type, str) or not isinstance(name, (str, type(None))):
            raise MalformedBlock("archive format and name must be strings")
        try:
            chunker = ChunkerParams.from_ipld(node.get("chunker"))
        except InvalidInput as e:
            raise MalformedBlock(f"archive manifest: {e}") from None
        children = tuple(_check_links(node.get("children"), depth, "archive manifest"))
        if sum(s for _, s in children) != size:
            raise MalformedBlock("archive manifest: children sizes do not add up to the archive size")
        return cls(size, hashes, chunker, depth, children, media_type, name)


@dataclass
class ManifestBuilder:
    """Builds the chunk tree bottom-up while chunks stream in; memory stays O(FANOUT × depth).

    `add_chunk` and `finish` return the index blocks ready to be stored, children before parents.
    """

    chunker: ChunkerParams
    fanout: int = FANOUT
    _levels: list[list[Link]] = field(default_factory=lambda: [[]])

    def add_chunk(self, cid: CID, size: int) -> list[tuple[CID, bytes]]:
        out: list[tuple[CID, bytes]] = []
        self._levels[0].append((cid, size))
        level = 0
        while len(self._levels[level]) > self.fanout:
            # Seal the first `fanout` links of this level into one index node; keep the overflow.
            full, rest = self._levels[level][: self.fanout], self._levels[level][self.fanout :]
            self._levels[level] = rest
            out.append(self._seal(level, full))
            level += 1
            if len(self._levels) == level:
                self._levels.append([])
            self._levels[level].append((out[-1][0], sum(s for _, s in full)))
        return out

    def _seal(self, depth: int, links: list[Link]) -> tuple[CID, bytes]:
        data = ChunkIndex(depth, tuple(links)).encode()
        return CID.for_block(DAG_CBOR, data), data

    def finish(
        self,
        size: int,
        hashes: dict[str, bytes],
        media_type: str = "application/octet-stream",
        name: str | None = None,
    ) -> tuple[CID, bytes, list[tuple[CID, bytes]]]:
        out: list[tuple[CID, bytes]] = []
        levels = self._levels
        top = len(levels) - 1
        level = 0
        # Seal partial levels bottom-up until one level alone fits in the root.
        while level < top or len(levels[level]) > self.fanout:
            links = levels[level]
            if links:
                for i in range(0, len(links), self.fanout):
                    group = links[i : i + self.fanout]
                    out.append(self._seal(level, group))
                    if len(levels) == level + 1:
                        levels.append([])
                        top += 1
                    levels[level + 1].append((out[-1][0], sum(s for _, s in group)))
            levels[level] = []
            level += 1
        manifest = ArchiveManifest(size, hashes, self.chunker, level, tuple(levels[level]), media_type, name)
        if manifest.size != sum(s for _, s in manifest.children):
            raise InvalidInput(f"archive size {size} does not match its chunks")
        data = manifest.encode()
        return CID.for_block(DAG_CBOR, data), data, out


def iter_chunks(root: ArchiveManifest, load: Callable[[CID], bytes]) -> Iterator[Link]:
    """Yield the archive's chunks in order, loading (and checking) index nodes with `load`.

    `load` must return bytes already verified against the CID; sizes are checked here.
    """

    def walk(depth: int, children: tuple[Link, ...]) -> Iterator[Link]:
        if depth == 0:
            yield from children
            return
        for cid, size in children:
            index = ChunkIndex.decode(load(cid))
            if index.depth != depth - 1 or index.size != size:
                raise MalformedBlock(f"chunk index {cid} does not match its parent's depth or size")
            yield from walk(index.depth, index.children)

    yield from walk(root.depth, root.children)


def iter_blocks(root: ArchiveManifest, load: Callable[[CID], bytes]) -> Iterator[tuple[CID, int]]:
    """Every block below the root (index nodes and chunks), parents before children."""

    def walk(depth: int, children: tuple[Link, ...]) -> Iterator[tuple[CID, int]]:
        for cid, size in children:
            if depth == 0:
                yield cid, size
            else:
                data = load(cid)
                yield cid, len(data)
                index = ChunkIndex.decode(data)
                if index.depth != depth - 1 or index.size != size:
                    raise MalformedBlock(f"chunk index {cid} does not match its parent's depth or size")
                yield from walk(index.depth, index.children)

    yield from walk(root.depth, root.children)


_MAGIC = [
    (0, b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1", "application/x-nix-archive"),
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"\xfd7zXZ\x00", "application/x-xz"),
    (0, b"\x28\xb5\x2f\xfd", "application/zstd"),
    (0, b"BZh", "application/x-bzip2"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (257, b"ustar", "application/x-tar"),
]


def sniff_media_type(head: bytes) -> str:
    """A media-type hint from an archive's first bytes (at least 262 of them when available)."""
    for offset, magic, media_type in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return media_type
    return "application/octet-stream"
