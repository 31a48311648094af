"""What a NAR *store* can do, split by power: reading and writing are separate interfaces (building is neither).

These are the stores' own blocking (or, for HTTP, async) APIs, for offline commands and copying between
stores (`copy_nar`). A serving node reads every source — these stores and the swarm alike — through one
protocol on top of them, `p2pcache.nixcache.NarSource` (narinfo lookup, then the NAR into a sink), and the
lookup chain is an ordered list of those.

- `NarReader` — has a store path (by its 32-character hash part), its narinfo, its NAR as a stream of bytes.
  Implemented by the repo (`narstore.RepoNarStore`), the machine's Nix store (`localnix.LocalNixStore`).
- `NarWriter` — accepts a NAR with its narinfo. Implemented by the repo only.
- `AsyncNarReader` — the same reading power for sources whose I/O is the network, usable from trio (and
  asyncio) through anyio: `httpcache.HttpBinaryCache`. `AsyncFromSync` adapts any `NarReader` by running its
  blocking calls on worker threads, so HTTP serving code can treat every source alike.

Readers must verify what they return: a NAR stream either matches the narinfo's NarHash and NarSize or raises
(`CorruptData`) instead of yielding its last piece. A missing path is `has() == False`, `narinfo() is None`, and
`stream_nar` raising NotFound before the first piece. Note the name clash with the NAR parser
`p2pcache.content.nar.NarReader`: import this module's names qualified (`interfaces.NarReader`) where both appear.
"""

from __future__ import annotations

from typing import AsyncIterator, BinaryIO, Iterable, Iterator, Protocol, cast, runtime_checkable

import anyio.to_thread

from ..content.narinfo import NarInfo

__all__ = ["AsyncFromSync", "AsyncNarReader", "NarReader", "NarWriter", "copy_nar"]


@runtime_checkable
class NarReader(Protocol):
    def has(self, store_hash: str) -> bool: ...

    def narinfo(self, store_hash: str) -> NarInfo | None: ...

    def stream_nar(self, store_hash: str) -> Iterator[bytes]: ...


@runtime_checkable
class NarWriter(Protocol):
    def add_nar(self, narinfo: NarInfo | None, stream: BinaryIO | Iterable[bytes]) -> object: ...


@runtime_checkable
class AsyncNarReader(Protocol):
    async def has(self, store_hash: str) -> bool: ...

    async def narinfo(self, store_hash: str) -> NarInfo | None: ...

    def stream_nar(self, store_hash: str) -> AsyncIterator[bytes]: ...


def copy_nar(source: NarReader, dest: NarWriter, store_hash: str) -> object:
    """Copy one store path's NAR and narinfo; the writer re-checks NarHash/NarSize as it ingests."""
    info = source.narinfo(store_hash)
    if info is None:
        from ..errors import NotFound

        raise NotFound(f"store path hash {store_hash} is not in {type(source).__name__}")
    return dest.add_nar(info, source.stream_nar(store_hash))


class AsyncFromSync:
    """An `AsyncNarReader` over a blocking `NarReader`: each call, and each piece of a NAR, on a worker thread."""

    def __init__(self, reader: NarReader):
        self.reader = reader

    async def has(self, store_hash: str) -> bool:
        return await anyio.to_thread.run_sync(self.reader.has, store_hash)

    async def narinfo(self, store_hash: str) -> NarInfo | None:
        return await anyio.to_thread.run_sync(self.reader.narinfo, store_hash)

    async def stream_nar(self, store_hash: str) -> AsyncIterator[bytes]:
        pieces = await anyio.to_thread.run_sync(self.reader.stream_nar, store_hash)
        done = object()
        try:
            while True:
                piece = await anyio.to_thread.run_sync(next, pieces, done)
                if piece is done:
                    return
                yield cast(bytes, piece)  # not `done`: a piece of the NAR
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                await anyio.to_thread.run_sync(close)
