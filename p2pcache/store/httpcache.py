"""An upstream Nix binary cache over HTTP (cache.nixos.org, `nix copy --to file://` served by any web server) as
a read-only `AsyncNarReader` (store/interfaces.py). The Nix cache's lookup chain reads upstreams as
`nixcache.UpstreamSource`.

Owns the client side of the binary-cache layout: `nix-cache-info` (StoreDir, WantMassQuery, Priority),
`<hash>.narinfo`, and the NAR at the narinfo's URL compressed with xz, zstd, bzip2, gzip or not at all.
NARs stream: the body is hashed against FileHash/FileSize as it arrives, decompressed incrementally with bounded
output per step (a small compressed body cannot make a huge allocation), and the result hashed against
NarHash/NarSize, its last piece withheld until every check passed (`VerifiedStream`). A caller that forwards
pieces therefore never completes a wrong NAR; it sees CorruptData instead of the last piece.

Async, on httpx.AsyncClient: it runs under trio or asyncio (httpx uses anyio), which fits the trio-based node
and ASGI server; blocking code can call it with `trio.run`/`anyio.run`. Nothing here writes or builds.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import zlib
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import httpx
import zstandard

from ..content.narinfo import InvalidNarInfo, NarInfo
from ..content.narmanifest import VerifiedStream
from ..content.storepath import DEFAULT_STORE_DIR
from ..errors import CorruptData, NotFound, P2PCacheError

__all__ = ["CacheInfo", "Decompressor", "HttpBinaryCache", "UpstreamError"]

STEP = 1 << 20  # most decompressed bytes produced per step
_ZSTD_SLICE = 1024  # zstd input fed per step: at most ~32 MiB out (RLE blocks), usually far less


class UpstreamError(P2PCacheError):
    """An upstream cache answered wrongly or not at all."""


@dataclass(frozen=True)
class CacheInfo:
    store_dir: str
    want_mass_query: bool = False
    priority: int | None = None

    @classmethod
    def parse(cls, text: str) -> "CacheInfo":
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        priority = fields.get("Priority")
        return cls(
            store_dir=fields.get("StoreDir", DEFAULT_STORE_DIR),
            want_mass_query=fields.get("WantMassQuery") == "1",
            priority=int(priority) if priority and priority.isdigit() else None,
        )


class Decompressor:
    """Incremental decompression yielding pieces of at most about STEP bytes."""

    def __init__(self, compression: str):
        self.compression = compression
        # One decompressor object per codec; `feed` dispatches on `compression` for the calls each one has.
        self._d: Any
        if compression == "none":
            self._d = None
        elif compression == "xz":
            self._d = lzma.LZMADecompressor()
        elif compression == "bzip2":
            self._d = bz2.BZ2Decompressor()
        elif compression == "gzip":
            self._d = zlib.decompressobj(wbits=31)
        elif compression == "zstd":
            self._d = zstandard.ZstdDecompressor().decompressobj()
        else:
            raise UpstreamError(f"NAR compression {compression!r} is not supported (use xz, zstd, bzip2, gzip, none)")

    def feed(self, data: bytes) -> Iterator[bytes]:
        d = self._d
        try:
            if d is None:
                yield data
            elif self.compression == "zstd":
                for i in range(0, len(data), _ZSTD_SLICE):
                    if d.eof:
                        raise CorruptData("compressed NAR has data after its end")
                    out = d.decompress(data[i : i + _ZSTD_SLICE])
                    if out:
                        yield out
            elif self.compression == "gzip":
                while data:
                    if d.eof:
                        raise CorruptData("compressed NAR has data after its end")
                    out = d.decompress(data, STEP)
                    data = d.unconsumed_tail
                    if out:
                        yield out
            else:  # lzma, bz2: max_length, then drain with empty input while output is pending
                if d.eof:
                    raise CorruptData("compressed NAR has data after its end")
                out = d.decompress(data, STEP)
                while True:
                    if out:
                        yield out
                    if d.eof or d.needs_input:
                        break
                    out = d.decompress(b"", STEP)
                if d.eof and d.unused_data:
                    raise CorruptData("compressed NAR has data after its end")
        except (lzma.LZMAError, OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
            raise CorruptData(f"compressed NAR ({self.compression}) does not decompress: {e}") from None

    def finish(self) -> None:
        if self._d is not None and not self._d.eof:
            raise CorruptData(f"compressed NAR ({self.compression}) is truncated")


class HttpBinaryCache:
    """`url` is the cache's base URL (the directory holding nix-cache-info)."""

    def __init__(self, url: str, *, client: httpx.AsyncClient | None = None, store_dir: str = DEFAULT_STORE_DIR,
                 timeout: float = 30.0):
        self.base = httpx.URL(url if url.endswith("/") else url + "/")
        self.store_dir = store_dir
        self._own_client = client is None
        self.client = client if client is not None else httpx.AsyncClient(timeout=timeout, follow_redirects=True)
        self._info: CacheInfo | None = None

    async def aclose(self) -> None:
        if self._own_client:
            await self.client.aclose()

    async def __aenter__(self) -> "HttpBinaryCache":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _url(self, path: str) -> httpx.URL:
        return self.base.join(path)

    async def _get(self, path: str) -> httpx.Response | None:
        url = self._url(path)
        try:
            resp = await self.client.get(url)
        except httpx.HTTPError as e:
            raise UpstreamError(f"cannot fetch {url}: {e}") from None
        if resp.status_code in (404, 403, 410):
            return None
        if resp.status_code != 200:
            raise UpstreamError(f"{url} answered HTTP {resp.status_code}")
        return resp

    async def cache_info(self) -> CacheInfo:
        """nix-cache-info (cached); UpstreamError if it is missing or names another store directory."""
        if self._info is None:
            resp = await self._get("nix-cache-info")
            if resp is None:
                raise UpstreamError(f"{self.base} has no nix-cache-info; is it a Nix binary cache?")
            info = CacheInfo.parse(resp.text)
            if info.store_dir != self.store_dir:
                raise UpstreamError(f"binary cache {self.base} is for store {info.store_dir!r}, not {self.store_dir!r}")
            self._info = info
        return self._info

    async def has(self, store_hash: str) -> bool:
        await self.cache_info()
        url = self._url(f"{store_hash}.narinfo")
        try:
            resp = await self.client.head(url)
        except httpx.HTTPError as e:
            raise UpstreamError(f"cannot reach {url}: {e}") from None
        if resp.status_code == 200:
            return True
        if resp.status_code in (404, 403, 410):
            return False
        raise UpstreamError(f"{url} answered HTTP {resp.status_code}")

    async def narinfo(self, store_hash: str) -> NarInfo | None:
        await self.cache_info()
        resp = await self._get(f"{store_hash}.narinfo")
        if resp is None:
            return None
        try:
            info = NarInfo.parse(resp.content, store_dir=self.store_dir, source=str(self._url(f"{store_hash}.narinfo")))
        except InvalidNarInfo as e:
            raise UpstreamError(str(e)) from None
        if info.store_path.hash_part != store_hash:
            raise UpstreamError(f"{store_hash}.narinfo from {self.base} describes another path, {info.store_path}")
        return info

    async def stream_nar(self, store_hash: str) -> AsyncIterator[bytes]:
        info = await self.narinfo(store_hash)
        if info is None:
            raise NotFound(f"store path hash {store_hash} is not in the binary cache {self.base}")
        async for piece in self.stream_nar_of(info):
            yield piece

    async def stream_nar_of(self, info: NarInfo) -> AsyncIterator[bytes]:
        """The decompressed NAR that `info` describes, verified (see module docstring)."""
        decoder = Decompressor(info.effective_compression)
        nar = VerifiedStream(info.nar_hash.algo, info.nar_hash.digest, info.nar_size, f"NAR of {info.store_path}")
        file_hash = hashlib.new(info.file_hash.algo) if info.file_hash is not None else None
        file_size = 0
        url = self._url(info.url)
        try:
            async with self.client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise UpstreamError(f"{url} answered HTTP {resp.status_code}")
                async for raw in resp.aiter_bytes():
                    file_size += len(raw)
                    if info.file_size is not None and file_size > info.file_size:
                        raise CorruptData(f"{url} is longer than the FileSize {info.file_size} of its narinfo")
                    if file_hash is not None:
                        file_hash.update(raw)
                    for piece in decoder.feed(raw):
                        out = nar.push(piece)
                        if out:
                            yield out
        except httpx.HTTPError as e:
            raise UpstreamError(f"cannot fetch {url}: {e}") from None
        if info.file_size is not None and file_size != info.file_size:
            raise CorruptData(f"{url} has {file_size} bytes, its narinfo says FileSize {info.file_size}")
        if file_hash is not None and info.file_hash is not None and file_hash.digest() != info.file_hash.digest:
            raise CorruptData(f"{url} does not match the FileHash of its narinfo")
        decoder.finish()
        last = nar.finish()
        if last:
            yield last
