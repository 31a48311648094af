"""The Nix binary cache a node offers, with no HTTP in it: narinfo lookups, NAR delivery, uploads, and the
hashed mirror for fixed-output fetches. `http/nix.py` turns requests into these calls and refusals
(`nixcache.errors`) into status codes; node.py builds it and hands it what it needs.

Every narinfo we serve points at an uncompressed NAR this node streams itself (`Compression: none`,
FileHash = NarHash); the `Sig:` lines travel unchanged (Nix's fingerprint does not cover URL or
compression). With a signing key configured, the node signs only what an authenticated pusher gave it
(at `put_narinfo`) and this machine's own Nix store (see `_signed_for`); uploads reach this module only
with the API token (http/guard.py). A NAR stream is checked against its NarHash as it goes: on a mismatch
the stream raises before its last bytes, so Nix sees a truncated transfer, never a complete wrong one.
Uploads are decompressed, parsed as NARs and hashed as they stream in; nothing is recorded until the
narinfo's NarHash, NarSize, FileHash and FileSize agree.

Owns: the lookup chain (`LookupChain` over the sources `nix.lookup_order` names), pending NARs, the
negative cache, uploads waiting for their narinfo and their quota, the quota/disk-full decisions around
fetching a NAR. Must not import node.py or http/: the swarm comes in as `sources.Swarm`, the quota as
`sources.Room`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

import trio

from ..aio import feed_thread
from ..config import NixConfig
from ..content import nixbase32
from ..content.cid import CID
from ..content.keys import HashKey
from ..content.narinfo import NarInfo
from ..content.nixsig import SecretKey
from ..errors import CorruptData, DiskFull, InvalidInput, NotFound, P2PCacheError
from ..store.httpcache import HttpBinaryCache, UpstreamError, Decompressor
from ..store.localnix import LocalNixStore
from ..store.narstore import RepoNarStore, stream_nar_root
from .chain import WAIT_FOREVER, LookupChain
from .errors import Conflict, Missing, NoRoom, Rejected, SourceFailed, StillLooking, TooLarge
from .metrics import Metrics
from .sources import (Found, Intake, NarPrefetches, NarSink, NarSource, NarStreams, NarWriter, NixStoreSource,
                      RepoSource, Room, Swarm, SwarmSource, TakingBack, UpstreamSource)

if TYPE_CHECKING:
    from ..store.repo import Repo

__all__ = ["NixBinaryCache", "build_sources", "default_patience"]

log = logging.getLogger("p2pcache.nixcache")
LOOKAHEAD_QUEUE = 1024  # references waiting for a look-ahead lookup; more are left to Nix's own asks

_COMPRESSION_BY_SUFFIX = {".nar": "none", ".nar.xz": "xz", ".nar.zst": "zstd", ".nar.bz2": "bzip2",
                          ".nar.gz": "gzip"}


@dataclass
class _Upload:
    root: CID
    nar_hash: bytes
    nar_size: int
    file_sha256: bytes
    file_size: int
    at: float = field(default_factory=time.monotonic)


def default_patience(wait: float) -> float:
    """How long a remote lookup goes on after a request stopped waiting for it, by default: 4 waits + 3 s.
    Nix 2.8 makes 5 attempts at a 5xx narinfo, backing off 250 ms × 2^(n-1) (and up to 41 % more) between
    them, so its fifth attempt is still waiting at 5 waits + 3.75 s: the lookup has ended by then, and that
    attempt gets a final answer (200 or 404), not a 503 that fails the copy."""
    return 4 * wait + 3.0


def build_sources(config: NixConfig, repo: NarSource, local: NarSource | None, swarm: NarSource,
                  upstream: NarSource | None) -> list[NarSource]:
    """The lookup chain `nix.lookup_order` names, leaving out sources this node does not have."""
    by_name: dict[str, NarSource | None] = {"repo": repo, "nixstore": local, "swarm": swarm, "upstreams": upstream}
    return [s for s in (by_name[n] for n in config.lookup_order) if s is not None]


class NixBinaryCache:
    def __init__(self, repo: "Repo", config: NixConfig, *, swarm: Swarm, room: Room, taking_back: TakingBack,
                 announce: Callable[[CID], None]) -> None:
        self.repo = repo
        self.config = config
        self.swarm = swarm
        self.room = room
        self.taking_back = taking_back
        self.announce = announce
        self.metrics = Metrics()
        self.narstore = RepoNarStore(repo, store_dir=config.store_dir)
        self.streams = NarStreams(self.metrics)
        self.local: LocalNixStore | None = None
        if config.serve_local_store:
            self.local = (LocalNixStore.chroot(config.local_store_root, config.store_dir) if config.local_store_root
                          else LocalNixStore(config.store_dir))
        self.upstreams = [HttpBinaryCache(u, store_dir=config.store_dir) for u in config.upstreams]
        self.key: SecretKey | None = None
        if config.secret_key_file:
            try:
                with open(config.secret_key_file) as f:
                    self.key = SecretKey.parse(f.read().strip())
            except OSError as e:
                raise InvalidInput(f"cannot read the signing key {config.secret_key_file}: {e.strerror}") from None
        self.repo_source = RepoSource(self.narstore, self.streams)
        self.writer: NarWriter = self.repo_source  # uploads go in through the write protocol
        self.local_source = NixStoreSource(self.local, self.streams) if self.local is not None else None
        intake = Intake(self.repo_source, room, taking_back, announce, self.metrics)
        self.upstream_source = UpstreamSource(self.upstreams, intake) if self.upstreams else None
        # A gateway pulls through itself: it does not ask other gateways.
        wait = config.lookup_wait if config.lookup_wait is not None else swarm.lookup_timeout
        patience = config.lookup_patience if config.lookup_patience is not None else default_patience(wait)
        swarm_source = SwarmSource(swarm, intake, config.store_dir, ask_gateways=not self.upstreams,
                                   patience=patience)
        self.prefetches = NarPrefetches(swarm_source, config.prefetch_nars) if config.prefetch_nars > 0 else None
        swarm_source.prefetches = self.prefetches
        self.chain = LookupChain(build_sources(config, self.repo_source, self.local_source, swarm_source,
                                               self.upstream_source), config.negative_ttl, self.metrics,
                                 wait=wait, patience=patience, pending_ttl=config.pending_ttl)
        self.metrics.pending.set_function(self.chain.pending_count)
        self._uploads: dict[str, _Upload] = {}  # pending: NARs waiting for their narinfo (not announced)
        self._inflight = 0  # NAR bytes of uploads still streaming in, counted against the quota
        self._inflight_lock = threading.Lock()  # ingest threads add to it
        self._lookahead_send, self._lookahead_recv = trio.open_memory_channel[str](LOOKAHEAD_QUEUE)

    async def aclose(self) -> None:
        for u in self.upstreams:
            await u.aclose()

    def cache_info(self) -> str:
        """The nix-cache-info text."""
        return (f"StoreDir: {self.config.store_dir}\nWantMassQuery: {int(self.config.want_mass_query)}\n"
                f"Priority: {self.config.priority}\n")

    # -- narinfo lookups ------------------------------------------------------------------------------
    async def find_narinfo(self, store_hash: str) -> Found | None:
        """The first source's answer (`nix.lookup_order`), or None (remembered for negative_ttl)."""
        return await self.chain.find(store_hash)

    async def narinfo_text(self, store_hash: str) -> str | None:
        """The narinfo to serve Nix for a store path (pointing at a NAR this node streams), or None."""
        start = time.monotonic()
        try:
            found = await self.find_narinfo(store_hash)
        except StillLooking:
            self.metrics.narinfo.labels("still_looking", "none").inc()
            raise
        except P2PCacheError as e:
            self.metrics.narinfo.labels("error", "none").inc()
            raise SourceFailed(f"looking up {store_hash}: {e}") from None
        self.metrics.lookup.labels("hit" if found else "miss").observe(time.monotonic() - start)
        if found is None:
            self.metrics.narinfo.labels("miss", "none").inc()
            return None
        self.metrics.narinfo.labels("hit", found.label).inc()
        if found.source.remote:
            if self.prefetches is not None and found.root is not None:
                self.prefetches.start(found)  # Nix asks for the NAR later, once it has every narinfo
            self._look_ahead(found.narinfo)
        return self._signed_for(self._served_narinfo(found.narinfo), found.label).render()

    async def run_lookups(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Background task (the node's nursery, started before the first request): remote lookups run
        here, so one outlives the request that started it (`LookupChain.run`), and so do NAR prefetches."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.chain.run)
            if self.prefetches is not None:
                await nursery.start(self.prefetches.run)
            task_status.started()

    async def run_lookahead(self) -> None:
        """Background task (the node's nursery): look up the narinfos `_look_ahead` queued, up to
        `lookahead_lookups` at once, so the answers wait in the chain when Nix asks (a lookup Nix makes
        meanwhile waits for the same one under its lock instead of starting another)."""
        limit = trio.CapacityLimiter(max(1, self.config.lookahead_lookups))

        async def one(store_hash: str) -> None:
            try:
                async with limit:
                    found = await self.chain.find(store_hash, remember_miss=False, wait=WAIT_FOREVER)
            except P2PCacheError as e:
                log.debug("look-ahead lookup of %s: %s", store_hash, e)
                self.metrics.lookahead.labels("error").inc()
                return
            self.metrics.lookahead.labels("found" if found else "miss").inc()
            if found is not None and found.source.remote:
                self._look_ahead(found.narinfo)  # the closure's next level, before Nix gets there

        async with trio.open_nursery() as nursery:
            async for store_hash in self._lookahead_recv:
                await limit.acquire_on_behalf_of(store_hash)  # no more tasks waiting than lookups running
                limit.release_on_behalf_of(store_hash)
                nursery.start_soon(one, store_hash)

    def _look_ahead(self, info: NarInfo) -> None:
        """Queue lookups of a remotely found path's references that are not known here yet."""
        if not self.config.lookahead_lookups:
            return
        own = info.store_path.hash_part
        chain = self.chain
        for ref in info.references:
            store_hash = ref.split("-", 1)[0]
            if (store_hash == own or not _is_store_hash(store_hash) or chain.pending(store_hash) is not None
                    or chain.looking_up(store_hash) or chain.known_miss(store_hash) or self.narstore.has(store_hash)):
                continue
            try:
                self._lookahead_send.send_nowait(store_hash)
            except trio.WouldBlock:
                return  # a huge closure: Nix's own lookups do the rest

    async def pull_through_for_peer(self, store_hash: str) -> bool:
        """A peer's lookup missed and it asks us, a gateway: pull the path from our upstreams into the
        repo (so we can answer its resolve and serve its blocks). True if we now hold it."""
        upstream = self.upstream_source
        if upstream is None or not _is_store_hash(store_hash):
            return False
        if self.narstore.has(store_hash):
            return True
        if self.chain.known_miss(store_hash):
            return False
        async with self.chain.locked("nar:" + store_hash):
            if self.narstore.has(store_hash):
                return True
            found = await upstream.find(store_hash)
            if found is None:
                self.chain.remember_miss(store_hash)
                return False
            await upstream.pull(found)
        self.announce(self.narstore.root_of(store_hash))
        return True

    def _served_narinfo(self, info: NarInfo) -> NarInfo:
        nar32 = nixbase32.encode(info.nar_hash.digest) if info.nar_hash.algo == "sha256" else None
        if nar32 is None:
            raise CorruptData(f"{info.store_path}: NarHash is not sha256")
        served = dataclasses.replace(
            info, url=f"nar/{info.store_path.hash_part}-{nar32}.nar", compression="none",
            file_hash=info.nar_hash if info.nar_hash.algo == "sha256" else None, file_size=info.nar_size,
        )
        return served

    def _signed_for(self, info: NarInfo, source: str) -> NarInfo:
        """Signing policy. The node's key vouches for two things only: what an authenticated pusher gave
        it (signed once, at `put_narinfo`, and stored) and this machine's own Nix store, whose
        path → NarHash records only Nix itself (or its trusted users) can write. Narinfos from peers and
        upstreams keep the signatures they came with: a peer's or upstream's claim about a store path's
        contents is not something this node can check, so its key must not launder it."""
        if self.key is not None and source == "nixstore":
            return info.signed(self.key)
        return info

    # -- NARs ----------------------------------------------------------------------------------------
    async def serve_held_nar(self, store_hash: str | None, nar_digest: bytes, sink: NarSink, head: bool) -> bool:
        """Stream the NAR if the repo holds it (by store path, else by NarHash); False if it does not."""
        root = self.repo_source.held_root(store_hash, nar_digest)
        if root is None:
            return False
        await self.repo_source.stream_root(root, nar_digest, sink, head, "local")
        return True

    async def serve_nar(self, store_hash: str, nar_digest: bytes, sink: NarSink, head: bool) -> None:
        """Stream the NAR of `store_hash` (NarHash `nar_digest`) from wherever the lookup chain finds it; a
        NAR from a remote source is fetched into the repo as it streams, if it fits (else NoRoom)."""
        if await self.serve_held_nar(store_hash, nar_digest, sink, head):
            return
        found = await self.find_narinfo(store_hash)
        if found is None:
            raise Missing(f"nobody has store path {store_hash} any more")
        info = found.narinfo
        if info.nar_hash.digest != nar_digest:
            raise Missing(f"store path {store_hash} now has a different NarHash")
        if not found.source.remote:
            await found.source.stream_nar(found, sink, head)
            return
        if head:
            await sink.start(info.nar_size, "nar")
            await sink.end()
            return
        async with self.chain.locked("nar:" + store_hash):
            root = self.repo_source.held_root(store_hash, nar_digest)
            if root is not None:  # another request fetched it while we waited
                await self.repo_source.stream_root(root, nar_digest, sink, head, "local")
                return
            pending = self.chain.pending(store_hash)
            if pending is None:
                raise Missing(f"store path {store_hash}: lost track of where to fetch it")
            operation = "nar-from-peers" if pending.label == "peer" else "nar-from-upstream"
            try:  # before the first block: a NAR that cannot fit in the quota or on the disk is refused whole
                async with self.taking_back(operation):  # counted as any disk-full is
                    await self.room.make_room(pending.narinfo.nar_size, f"the NAR of {info.store_path}",
                                              in_operation=False)
            except DiskFull as e:
                raise NoRoom(str(e)) from None
            try:
                await pending.source.stream_nar(pending, sink)
            except (SourceFailed, NoRoom):  # the source could not deliver: look it up afresh next time
                self.chain.forget_pending(store_hash)
                raise
            self.chain.forget_pending(store_hash)

    # -- uploads -------------------------------------------------------------------------------------
    # Only an authenticated pusher reaches these (http/guard.py: every PUT needs the API token).
    def pending_upload_bytes(self) -> int:
        return sum(u.nar_size for u in self._uploads.values()) + self._inflight

    async def put_nar(self, url: str, name: str, body: AsyncIterator[bytes], length: int | None = None) -> None:
        """An uploaded NAR file (`nix copy --to`), held until its narinfo claims it (`put_narinfo`)."""
        with self.streams.upload_slot():
            await self._put_nar(url, name, body, length)

    async def _put_nar(self, url: str, name: str, body: AsyncIterator[bytes], length: int | None) -> None:
        compression = next((c for suffix, c in sorted(_COMPRESSION_BY_SUFFIX.items(), key=lambda kv: -len(kv[0]))
                            if name.endswith(suffix)), None)
        if compression is None:
            raise Rejected(f"{url}: expected a .nar, .nar.xz, .nar.zst, .nar.bz2 or .nar.gz file name")
        limit, quota = self.config.max_upload_size, self.config.upload_quota
        if length is not None and length > limit:
            self.metrics.uploads.labels("nar", "too_large").inc()
            raise TooLarge(f"{url}: {length} bytes is over the upload limit of {limit} (nix.max_upload_size)")
        await self.expire_uploads()
        # An uncompressed upload is the NAR itself: its FileHash is the NarHash the ingest computes anyway, so the
        # body is not hashed a second time here (on the event loop's thread).
        file_hash = hashlib.sha256() if compression != "none" else None
        file_size = [0]
        reserved = [0]

        async def raw_body() -> AsyncIterator[bytes]:
            async for piece in body:
                if file_hash is not None:
                    file_hash.update(piece)
                file_size[0] += len(piece)
                if file_size[0] > limit:
                    raise TooLarge(f"{url}: over the upload limit of {limit} bytes (nix.max_upload_size)")
                yield piece

        def count(n: int) -> None:  # on the ingest thread, for every piece of decompressed NAR
            with self._inflight_lock:
                reserved[0] += n
                self._inflight += n
                over = sum(u.nar_size for u in self._uploads.values()) + self._inflight > quota
            if reserved[0] > limit:
                raise TooLarge(f"{url}: the NAR inside is over the upload limit of {limit} bytes "
                               "(nix.max_upload_size)")
            if over:
                raise NoRoom(f"{url}: uploads waiting for their narinfo would hold more than "
                             f"{quota} bytes (nix.upload_quota); PUT their narinfos, or wait "
                             f"{self.config.upload_ttl:.0f} s for them to expire")

        def ingest(raw: Iterator[bytes]) -> object:
            try:
                decoder = Decompressor(compression)
            except UpstreamError as e:
                raise InvalidInput(str(e)) from None

            def decompressed() -> Iterator[bytes]:
                for chunk in raw:
                    for piece in decoder.feed(chunk):
                        count(len(piece))
                        yield piece
                decoder.finish()

            return self.writer.add_nar(None, decompressed())

        try:
            async with self.room.working():  # no quota gc while its blocks are unclaimed
                result = await feed_thread(raw_body(), ingest)
        except TooLarge:
            self.metrics.uploads.labels("nar", "too_large").inc()
            raise
        except NoRoom:
            self.metrics.uploads.labels("nar", "quota").inc()
            raise
        except P2PCacheError as e:
            self.metrics.uploads.labels("nar", "rejected").inc()
            raise Rejected(f"{url}: {e}") from None
        finally:
            with self._inflight_lock:
                self._inflight -= reserved[0]
        old = self._uploads.pop(url, None)
        self._uploads[url] = _Upload(result.root, result.nar_hash, result.nar_size,
                                     file_hash.digest() if file_hash is not None else result.nar_hash, file_size[0])
        if old is not None and old.root != result.root:
            await self._discard_upload(old)
        self.metrics.uploads.labels("nar", "ok").inc()

    def _expire_uploads_now(self) -> list[_Upload]:
        cutoff = time.monotonic() - self.config.upload_ttl
        return [self._uploads.pop(k) for k in [k for k, u in self._uploads.items() if u.at < cutoff]]

    async def expire_uploads(self) -> int:
        """Drop the uploaded NARs whose narinfo did not come within `upload_ttl`."""
        doomed = self._expire_uploads_now()
        for upload in doomed:
            await self._discard_upload(upload)
        return len(doomed)

    async def run_upload_expiry(self) -> None:
        """Background task (the node's nursery): expire pending uploads a few times per TTL."""
        while True:
            await trio.sleep(max(1.0, min(60.0, self.config.upload_ttl / 4)))
            await self.expire_uploads()

    async def _discard_upload(self, upload: _Upload) -> None:
        """Forget an uploaded NAR no narinfo claimed (its blocks become garbage for gc): a rejected
        upload leaves nothing behind in the repo."""
        repo = self.repo

        def drop() -> None:
            info = repo.index.get_root(upload.root)
            if info is None or any(a.startswith("nix:") for a in info.aliases):
                return  # gone already, or a store path claimed the same NAR meanwhile
            if any(u.root == upload.root for u in self._uploads.values()):
                return  # the same NAR is waiting under another upload
            with repo.index.transaction():
                repo.index.remove_root(upload.root)

        await trio.to_thread.run_sync(drop)

    def drop_unclaimed_nars(self) -> int:
        """At start: NAR roots from uploads whose narinfo never came (the daemon stopped between the two
        PUTs) are removed from the index; gc collects their blocks. Pending uploads do not outlive the
        daemon — Nix's copy that made them failed with it."""
        repo = self.repo
        doomed = [r.root for r in repo.index.list_roots()
                  if r.kind == "nar" and not any(a.startswith("nix:") for a in r.aliases)]
        for root in doomed:
            with repo.index.transaction():
                repo.index.remove_root(root)
        return len(doomed)

    def _held_nar_hash(self, store_hash: str) -> bytes | None:
        """The NarHash this node already holds (or this machine's Nix store has) for a store path."""
        held = self.narstore.narinfo(store_hash)
        if held is None and self.local is not None:
            held = self.local.narinfo(store_hash)
        return held.nar_hash.digest if held is not None else None

    async def put_narinfo(self, store_hash: str, raw: bytes) -> None:
        """The narinfo that claims an uploaded NAR: checked against it, signed if we have a key, recorded
        and announced."""
        try:
            info = NarInfo.parse(raw, store_dir=self.config.store_dir, source=f"{store_hash}.narinfo")
        except P2PCacheError as e:
            self.metrics.uploads.labels("narinfo", "rejected").inc()
            raise Rejected(str(e)) from None
        if info.store_path.hash_part != store_hash:
            raise Rejected(f"{store_hash}.narinfo describes another path, {info.store_path}")
        held = await trio.to_thread.run_sync(self._held_nar_hash, store_hash)
        if held is not None and held != info.nar_hash.digest:
            # First writer wins: a store path's contents are never replaced (a non-reproducible rebuild, or
            # someone trying to swap what others will install).
            self.metrics.uploads.labels("narinfo", "conflict").inc()
            upload = self._uploads.pop(info.url, None)
            if upload is not None:
                await self._discard_upload(upload)
            raise Conflict(f"{info.store_path} is already held here with NarHash "
                           f"sha256:{nixbase32.encode(held)}; a path's contents are not replaced")
        upload = self._uploads.get(info.url)
        root: CID | None
        if upload is not None:
            problems = []
            if upload.nar_hash != info.nar_hash.digest or upload.nar_size != info.nar_size:
                problems.append("NarHash/NarSize do not match the uploaded NAR")
            if info.file_size is not None and info.file_size != upload.file_size:
                problems.append(f"FileSize {info.file_size} but {upload.file_size} bytes were uploaded")
            if info.file_hash is not None and info.file_hash.algo == "sha256" and info.file_hash.digest != upload.file_sha256:
                problems.append("FileHash does not match the uploaded file")
            if problems:
                self.metrics.uploads.labels("narinfo", "rejected").inc()
                await self._discard_upload(self._uploads.pop(info.url))
                raise Rejected(f"{store_hash}.narinfo: {'; '.join(problems)}")
            root = upload.root
        else:  # the NAR may be here already, e.g. uploaded under another file name or fetched earlier
            root = self.repo_source.root_by_nar_hash(info.nar_hash.digest) if info.nar_hash.algo == "sha256" else None
            if root is None:
                self.metrics.uploads.labels("narinfo", "rejected").inc()
                raise Rejected(f"{store_hash}.narinfo: its NAR ({info.url}) was not uploaded first")
        if self.key is not None:  # vouch for what an authenticated pusher gave us: stored with the narinfo
            info = info.signed(self.key)
        try:
            await trio.to_thread.run_sync(self.writer.register_nar, root, info)
        except P2PCacheError as e:
            raise Rejected(f"{store_hash}.narinfo: {e}") from None
        self._uploads.pop(info.url, None)
        self.chain.forget_miss(store_hash)
        self.announce(root)
        self.metrics.uploads.labels("narinfo", "ok").inc()

    # -- hashed mirror -------------------------------------------------------------------------------
    async def serve_hashed(self, key: HashKey, sink: NarSink, head: bool) -> None:
        """`/<algo>/<hash>` for Nix's fixed-output fetches: the archive (or NAR) with that hash, from the
        repo or else the swarm; HEAD asks the swarm who has it without moving the bytes."""
        repo = self.repo
        try:
            root = repo.resolve(key)
            local = repo.root_info(root).complete
        except NotFound:
            local = False
        if not local:
            if head:
                found = await self.swarm.find_providers(key.alias, timeout=self.swarm.lookup_timeout)
                self.metrics.mirror.labels("hit" if found else "miss").inc()
                if not found:
                    raise Missing(f"nobody has {key.alias}")
                # The length a GET would send is what a provider's resolve answer says; if none
                # answers in time, no Content-Length at all rather than a wrong one.
                size = await self.swarm.size_at_peers(key.alias, found)
                await sink.start(size, "archive")
                await sink.end()
                return
            try:
                await self.swarm.fetch(key.alias, lambda done, total: None)
            except NotFound as e:
                self.metrics.mirror.labels("miss").inc()
                raise Missing(str(e)) from None
            except P2PCacheError as e:
                self.metrics.mirror.labels("error").inc()
                raise SourceFailed(str(e)) from None
            root = repo.resolve(key)
        self.metrics.mirror.labels("hit").inc()
        info = repo.root_info(root)
        if info.kind != "archive":
            # a NarHash names a NAR: serve its NAR bytes (what hashes to it)
            await self.streams.send(sink, info.size, lambda: stream_nar_root(repo, root), "local", head)
            return
        await self.streams.send(sink, info.size, lambda: repo.stream(root), "local", head, "archive")

    async def serve_sha1(self, digest: bytes, text: str, sink: NarSink, head: bool) -> None:
        """`/sha1/<hash>` (npm's and yarn's old integrity hashes): the repo, else the swarm, every byte
        verified against the sha1 (and the manifest's own hashes) before it is recorded."""
        root = await self._sha1_root(digest, head)
        self.metrics.mirror.labels("hit" if root is not None else "miss").inc()
        if root is None:
            raise Missing(f"nobody has sha1 {text}")
        if root is True:  # HEAD: a provider announces it
            await sink.start(0, "archive")
            await sink.end()
            return
        repo = self.repo
        assert isinstance(root, CID)
        held = root
        await self.streams.send(sink, repo.root_info(held).size, lambda: repo.stream(held), "local", head, "archive")

    async def _sha1_root(self, digest: bytes, head: bool) -> CID | bool | None:
        """The root of the archive whose sha1 is `digest`; with `head`, True if a provider announces it;
        None if nobody has it."""
        from ..content.lockfiles import Dependency, DepHash
        from ..prefetch import Prefetcher

        alias = f"sha1:{digest.hex()}"
        root = self.repo.index.resolve_alias(alias)
        if root is not None and self.repo.root_info(root).complete:
            return root
        if head:
            return bool(await self.swarm.find_providers(alias, timeout=self.swarm.lookup_timeout)) or None
        dep = Dependency(alias, "", None, DepHash("sha1", digest), "mirror")
        outcome = await Prefetcher(self.repo, origin=_NO_ORIGIN, swarm=self.swarm.archives,
                                   announce=self.announce).fetch(dep)
        return self.repo.index.resolve_alias(alias) if outcome.source else None


class _NoOrigin:
    """The hashed mirror knows a hash, never a URL: its sha1 fetches have no origin to fall back on."""

    def stream(self, url: str) -> AsyncIterator[bytes]:
        raise NotFound(f"{url}: the hashed mirror has no origin to download from")

    async def find_in_index(self, index_url: str, project: str, filename: str) -> str:
        raise NotFound(f"{project}/{filename}: the hashed mirror has no package index to look in")


_NO_ORIGIN = _NoOrigin()


def _is_store_hash(text: str) -> bool:
    return len(text) == 32 and all(c in nixbase32.ALPHABET for c in text)

