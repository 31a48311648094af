"""NARs in the repo: ingest a NAR stream as a NAR manifest, keep its narinfo, stream it back verified.

Owns the repo side of `p2pcache.content.narmanifest`: `RepoNarStore.add_nar` parses, chunks and hashes a NAR
stream with bounded memory on the repo's ingest pipeline (ingest.py, as `Repo.add_stream` does: the NAR
hashed and new blocks appended on its worker thread), checks NarHash/NarSize against the narinfo when one is given, and commits in one
index transaction a root of kind 'nar' (aliases `nix:<store hash>` and `sha256:<NAR sha256 hex>`) and the
narinfo fields that are the store path's own (store path, references, deriver, system, CA, signatures).
`stream_nar` reads blocks ahead on a few threads and withholds the last piece until the whole NAR matched its
hash (see `VerifiedStream`). Serving (URL, compression) and fetching from peers are not this module's business.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator

from ..content import nar as _nar
from ..content.chunking import DEFAULT_PARAMS, ChunkerParams
from ..content.cid import CID
from ..content.narinfo import NarInfo
from ..content.narmanifest import (
    ChunkRef,
    NarManifest,
    NarManifestBuilder,
    VerifiedStream,
    check_nar,
    iter_blocks,
    iter_plan,
)
from ..content.nixhash import NixHash
from ..content.storepath import StorePath
from ..errors import CorruptData, InvalidInput, NotFound, RepoError
from .index import NarInfoRow
from .ingest import READ_SIZE, BufferPool, Ingest, read_pieces, shared_chunk_hasher

if TYPE_CHECKING:
    from .index import Index
    from .repo import Repo

INGEST_BUFFERS = 8  # read buffers an ingest reuses
NAR_MEDIA_TYPE = "application/x-nix-archive"


def nix_alias(store_hash: str) -> str:
    return f"nix:{store_hash}"


@dataclass(frozen=True)
class NarAddResult:
    root: CID
    nar_hash: bytes
    nar_size: int
    store_path: str | None
    files: int
    chunks: int
    new_blocks: int
    new_bytes: int
    already_present: bool

    def to_json(self) -> dict:
        return {
            "root": str(self.root),
            "store_path": self.store_path,
            "nar_hash": NixHash("sha256", self.nar_hash).nix32(),
            "nar_size": self.nar_size,
            "files": self.files,
            "chunks": self.chunks,
            "new_blocks": self.new_blocks,
            "new_bytes": self.new_bytes,
            "already_present": self.already_present,
        }


def _narinfo_row(root: CID, info: NarInfo, nar_hash: bytes, nar_size: int, old: NarInfoRow | None) -> NarInfoRow:
    sigs = tuple(info.sigs)
    if old is not None and old.nar_hash == nar_hash:  # the same NAR again: keep signatures we already had
        sigs = tuple(dict.fromkeys(old.sigs + sigs))
    return NarInfoRow(
        store_hash=info.store_path.hash_part,
        store_path=str(info.store_path),
        root=root,
        nar_hash=nar_hash,
        nar_size=nar_size,
        references=tuple(info.references),
        deriver=info.deriver,
        system=info.system,
        ca=info.ca,
        sigs=sigs,
        added=time.time(),
    )


def _expected(narinfo: NarInfo | None) -> tuple[bytes | None, int | None]:
    if narinfo is None:
        return None, None
    if narinfo.nar_hash.algo != "sha256":
        raise InvalidInput(f"narinfo for {narinfo.store_path}: NarHash must be sha256, got {narinfo.nar_hash.algo}")
    return narinfo.nar_hash.digest, narinfo.nar_size


class RepoNarStore:
    """The local repo as a `NarReader` and `NarWriter` (see interfaces.py); the Nix cache reads and writes it
    as `nixcache.RepoSource`."""

    def __init__(self, repo: "Repo", store_dir: str = "/nix/store"):
        self.repo = repo
        self.store_dir = store_dir

    # -- writing ------------------------------------------------------------------------------------
    def add_nar(self, narinfo: NarInfo | None, stream: BinaryIO | Iterable[bytes], *,
                store_path: StorePath | str | None = None, params: ChunkerParams = DEFAULT_PARAMS) -> NarAddResult:
        """Ingest a NAR. With `narinfo`, its NarHash/NarSize are checked (CorruptData, nothing recorded, on a
        mismatch) and its fields kept; `store_path` alone records the path with no references."""
        repo = self.repo
        repo.require_writable()
        if narinfo is None and store_path is not None:
            store_path = StorePath.parse(str(store_path))
        elif narinfo is not None:
            store_path = narinfo.store_path
        assert store_path is None or isinstance(store_path, StorePath)  # parsed just above
        expected_hash, expected_size = _expected(narinfo)
        reader = _nar.NarReader()
        # the chunks' CIDs on the hashing threads while this one parses and builds
        builder = NarManifestBuilder(params, hash_chunks=shared_chunk_hasher().digests)
        pool = BufferPool(INGEST_BUFFERS, READ_SIZE) if hasattr(stream, "readinto") else None
        size = 0
        # A read's blocks are stored once the next read is parsed: its chunks are hashed meanwhile, so this
        # thread does not wait for them (one read's blocks and buffer in hand).
        last: tuple[list, int, bytearray | None] | None = None

        def store(ingest: Ingest, blocks: list, mark: int, buf: bytearray | None) -> None:
            builder.resolve_until(mark)  # every chunk of that read hashed: its blocks get their CIDs
            ingest.put(builder.resolved(blocks))  # one index query per read
            if buf is not None and pool is not None:
                ingest.release(pool, buf)  # reused once hashed and every block in it written

        # Its pack pages are recycled as it goes: a NAR upload's CPU was a third fresh page-cache pages.
        with repo.ingest(recycle=True) as ingest:
            for buf, view in read_pieces(stream, pool, "the NAR stream"):
                size += len(view)
                if expected_size is not None and size > expected_size:
                    raise CorruptData(f"NAR of {store_path} is longer than the {expected_size} bytes its narinfo says")
                ingest.hash(view)
                blocks: list = []
                add = builder.add
                for event in reader.feed(view):
                    out = add(event)
                    if out:
                        blocks += out
                mark = builder.mark()
                if last is not None:
                    store(ingest, *last)
                last = (blocks, mark, buf)
            reader.end()
            if last is not None:
                store(ingest, *last)
            digest = ingest.digests()["sha256"]
            check_nar(digest, size, expected_hash, expected_size)
            root, root_data = builder.finish(digest, size)
            ingest.put([(root, root_data)])
            aliases = [f"sha256:{digest.hex()}"]
            name = None
            if store_path is not None:
                aliases.append(nix_alias(store_path.hash_part))
                name = store_path.base_name

            def record(index: "Index") -> bool:
                new_root = index.put_root(root, "nar", size, name, NAR_MEDIA_TYPE, aliases, ingest.seen.keys(),
                                          verified=True)
                if store_path is not None:
                    info = narinfo or _bare_narinfo(store_path, digest, size)
                    index.put_narinfo(_narinfo_row(root, info, digest, size, index.get_narinfo(store_path.hash_part)))
                return new_root

            # A NAR of no store path (an upload waiting for its narinfo) is a root a daemon drops at start
            # (`drop_unclaimed_nars`): nothing relies on it across a restart, so its commit does not wait for
            # an fsync of its own. The narinfo's commit (durable) syncs it too.
            new_root = ingest.commit(record, durable=store_path is not None)
        return NarAddResult(root, digest, size, str(store_path) if store_path else None, builder.files,
                            builder.chunks, ingest.new_blocks, ingest.new_bytes, not new_root)

    def register_nar(self, root: CID, narinfo: NarInfo | None = None, verify: bool = True) -> None:
        """Claim a NAR manifest whose blocks are all stored (fetched from peers): check its tree, and with
        `verify` reassemble it once against its narHash, then record root and narinfo in one transaction."""
        repo = self.repo
        repo.require_writable()
        expected_hash, expected_size = _expected(narinfo)
        index = repo.index
        held = index.get_root(root)
        whole = held is not None and held.kind == "nar" and held.complete
        if whole:
            verify = verify and not index.is_verified(root)
        cids: dict[CID, None] | None = None
        if whole and not verify:
            # Recorded whole already (an upload's add_nar, a narinfo PUT again): its block references stand,
            # so only the narinfo is new. No walk of the tree, one query per block, for nothing; and with a
            # narinfo, no decode of the manifest either: the root's NarHash alias and size were recorded by
            # the ingest (or fetch) that computed or checked them.
            assert held is not None
            nar_size = held.size
            if expected_hash is not None and f"sha256:{expected_hash.hex()}" in held.aliases:
                nar_hash = expected_hash
            else:
                nar_hash = self.manifest(root).nar_hash
            check_nar(nar_hash, nar_size, expected_hash, expected_size)
        else:
            manifest = self.manifest(root)
            nar_hash, nar_size = manifest.nar_hash, manifest.nar_size
            check_nar(nar_hash, nar_size, expected_hash, expected_size)
            cids = {root: None} if whole else repo.stored_links(root, iter_blocks(manifest, repo.load_block),
                                                                "the NAR manifest")
            if verify:
                for _ in _stream_local(repo, manifest, verified=False):
                    pass
        aliases = [f"sha256:{nar_hash.hex()}"]
        name = None
        if narinfo is not None:
            aliases.append(nix_alias(narinfo.store_path.hash_part))
            name = narinfo.store_path.base_name
        with index.transaction():
            if cids is None:
                index.name_root(root, name, aliases)
            else:
                index.put_root(root, "nar", nar_size, name, NAR_MEDIA_TYPE, aliases, cids, verified=verify)
            if narinfo is not None:
                old = index.get_narinfo(narinfo.store_path.hash_part)
                index.put_narinfo(_narinfo_row(root, narinfo, nar_hash, nar_size, old))

    # -- reading ------------------------------------------------------------------------------------
    def manifest(self, root: CID) -> NarManifest:
        return NarManifest.decode(self.repo.load_block(root))

    def _row(self, store_hash: str) -> NarInfoRow | None:
        row = self.repo.index.get_narinfo(store_hash)
        if row is None:
            return None
        info = self.repo.index.get_root(row.root)
        if info is None or not info.complete:
            return None
        return row

    def has(self, store_hash: str) -> bool:
        return self._row(store_hash) is not None

    def narinfo(self, store_hash: str) -> NarInfo | None:
        """The narinfo as this repo would serve it: uncompressed NAR at `nar/<NarHash nix32>.nar`."""
        row = self._row(store_hash)
        if row is None:
            return None
        nar_hash = NixHash("sha256", row.nar_hash)
        return NarInfo(
            store_path=StorePath.parse(row.store_path),
            url=f"nar/{nar_hash.nix32(prefixed=False)}.nar",
            nar_hash=nar_hash,
            nar_size=row.nar_size,
            compression="none",
            file_hash=nar_hash,
            file_size=row.nar_size,
            references=row.references,
            deriver=row.deriver,
            system=row.system,
            sigs=row.sigs,
            ca=row.ca,
        )

    def root_of(self, store_hash: str) -> CID:
        row = self._row(store_hash)
        if row is None:
            raise NotFound(f"no NAR for store path hash {store_hash} in the repo")
        return row.root

    def stream_nar(self, store_hash: str) -> Iterator[bytes]:
        """The NAR's bytes; raises NotFound before the first piece, CorruptData instead of the last."""
        return stream_nar_root(self.repo, self.root_of(store_hash))


def _bare_narinfo(store_path: StorePath, digest: bytes, size: int) -> NarInfo:
    h = NixHash("sha256", digest)
    return NarInfo(store_path=store_path, url=f"nar/{h.nix32(prefixed=False)}.nar", nar_hash=h, nar_size=size)


class _PlanPrefetcher:
    """Resolves a plan's `ChunkRef`s to `Contents` events, loading up to `window` chunks ahead on threads."""

    def __init__(self, load: Callable[[CID], bytes], threads: int = 4, window: int = 16):
        self.load = load
        self.window = window
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nar-prefetch")

    def _load(self, ref: ChunkRef) -> _nar.Contents:
        data = self.load(ref.cid)
        if len(data) != ref.size:
            raise CorruptData(f"chunk {ref.cid} has {len(data)} bytes, its NAR manifest says {ref.size}")
        return _nar.Contents(data)

    def run(self, plan: Iterable) -> Iterator[_nar.Event]:
        pending: deque = deque()
        in_flight = 0
        try:
            for item in plan:
                if type(item) is ChunkRef:
                    pending.append(self.pool.submit(self._load, item))
                    in_flight += 1
                else:
                    pending.append(item)
                while pending and (in_flight >= self.window or len(pending) > 1024
                                   or not isinstance(pending[0], Future)):
                    head = pending.popleft()
                    if isinstance(head, Future):
                        in_flight -= 1
                        yield head.result()
                    else:
                        yield head
            while pending:
                head = pending.popleft()
                yield head.result() if isinstance(head, Future) else head
        finally:
            for f in pending:
                if isinstance(f, Future):
                    f.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)


def _resolve_batched(repo: "Repo", plan: Iterable, batch: int = 512, first: int = 8) -> Iterator[_nar.Event]:
    """A plan's `ChunkRef`s resolved to `Contents` from this repo's packs in batches (`Repo.load_blocks`:
    one index query and a few preads per batch, on the caller's thread), events kept in order. Batches start
    at `first` chunks and double up to `batch`: the first bytes go out after a few blocks were read, not after
    the first `batch` (up to 512 × 256 KiB), which a client fetching path after path waits for every time."""
    held: list = []
    refs: list[tuple[CID, int]] = []
    size = first

    def drain() -> Iterator[_nar.Event]:
        datas = iter(repo.load_blocks(refs))
        for item in held:
            yield _nar.Contents(next(datas)) if type(item) is ChunkRef else item
        held.clear()
        refs.clear()

    for item in plan:
        held.append(item)
        if type(item) is ChunkRef:
            refs.append((item.cid, item.size))
            if len(refs) >= size:
                yield from drain()
                size = min(2 * size, batch)
        elif len(held) >= 4 * size:
            yield from drain()
            size = min(2 * size, batch)
    yield from drain()


def _stream_local(repo: "Repo", manifest: NarManifest, verified: bool) -> Iterator[bytes]:
    """A NAR from this repo's blocks. A root whose narHash was checked here already (`verified`) is served
    with the per-block crc32 checks alone; otherwise the last piece is held until the narHash matched."""
    from .repo import coalesce

    nar = coalesce(_nar.write_nar(_resolve_batched(repo, iter_plan(manifest, repo.load_block))))
    if verified:
        return nar
    return VerifiedStream.sha256(manifest.nar_hash, manifest.nar_size, "reassembled NAR").wrap(nar)


def stream_manifest(manifest: NarManifest, load: Callable[[CID], bytes]) -> Iterator[bytes]:
    """The NAR a manifest describes, with blocks from `load` (which must return verified bytes and may
    block, e.g. until a fetch delivers them); the last piece is held until the NarHash matched."""
    events = _PlanPrefetcher(load).run(iter_plan(manifest, load))
    check = VerifiedStream.sha256(manifest.nar_hash, manifest.nar_size, "reassembled NAR")
    return check.wrap(_nar.write_nar(events))


def stream_nar_root(repo: "Repo", root: CID, progress: Callable[[int], None] | None = None,
                    manifest: NarManifest | None = None) -> Iterator[bytes]:
    """The NAR of a 'nar' root, every block verified by its CID and the whole by narHash (last piece held).
    `manifest`: the root's manifest, if the caller decoded it already (from this repo's verified block)."""
    with repo.readers.reading(root):  # gc evicts it only once this read is over
        yield from _stream_nar_root(repo, root, progress, manifest)


def _stream_nar_root(repo: "Repo", root: CID, progress: Callable[[int], None] | None,
                     manifest: NarManifest | None) -> Iterator[bytes]:
    info = repo.root_info(root)
    if info.kind != "nar":
        raise InvalidInput(f"{root} is a {info.kind} root, not a NAR")
    if not info.complete:
        raise CorruptData(f"{root} is incomplete in this repo (blocks missing or corrupt); add or fetch it again")
    if manifest is None:
        manifest = NarManifest.decode(repo.load_block(root))
    verified = repo.index.is_verified(root)
    for piece in _stream_local(repo, manifest, verified):
        yield piece
        if progress:
            progress(len(piece))
    if not verified:
        repo.mark_verified(root)
    repo.touch(root)
