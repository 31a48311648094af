"""The Nix-facing binary cache a node serves on its HTTP port.

    GET  /nix-cache-info                      StoreDir, WantMassQuery, Priority
    GET  /<hash>.narinfo  (and HEAD)          repo → local Nix store → swarm (providers, then gateways, one
                                              race under lookup_timeout) → upstream caches → 404
    GET  /nar/<hash>-<narhash>.nar  (HEAD)    the NAR, reassembled from chunks, NarHash-checked
    PUT  /nar/<file>.nar[.xz|.zst|.bz2]       what `nix copy --to http://…` uploads first
    PUT  /<hash>.narinfo                      … and then: ties the upload to its store path, announces it
    GET  /sha256/<hash>, /sha512/<hash>       hashed mirror for fixed-output fetches (hex, nix-base32, SRI)
    GET  /metrics                             Prometheus

Every narinfo we serve points at an uncompressed NAR this node streams itself (`Compression: none`,
FileHash = NarHash); the `Sig:` lines travel unchanged (Nix's fingerprint does not cover URL or
compression). With a signing key configured, the node signs only what an authenticated pusher gave it
(at `_put_narinfo`) and this machine's own Nix store (see `_signed_for`); PUTs reach this module only
with the API token (http/guard.py). A NAR stream is checked against
its NarHash as it goes: on a mismatch the response is aborted before its last bytes, so Nix sees a
truncated transfer, never a complete wrong one. Uploads are decompressed, parsed as NARs and hashed as
they stream in; nothing is recorded until the narinfo's NarHash, NarSize, FileHash and FileSize agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..content import nixbase32
from ..content.cid import CID, DAG_CBOR
from ..content.keys import HashKey, parse_key
from ..content.narinfo import NarInfo
from ..content.narmanifest import NarAssembly, NarManifest
from ..content.nixhash import NixHash
from ..content.nixsig import SecretKey
from ..errors import CorruptData, DiskFull, InvalidInput, NotFound, P2PCacheError
from ..routing import AskState, NotHeld, RaceOutcome, resolve
from ..store.httpcache import HttpBinaryCache, UpstreamError, _Decompressor
from ..store.narstore import RepoNarStore, nix_alias, stream_nar_root
from ..aio import drain_thread as _drain_thread, feed_thread as _feed_thread, thread_pool
from .asgi import HTTPError, Receive, Scope, Send, send_bytes, send_error

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger(__name__)

_STORE_HASH = re.compile(r"^[0-9a-df-np-sv-z]{32}$")
_NARINFO_PATH = re.compile(r"^/([0-9a-df-np-sv-z]{32})\.narinfo$")
_OUR_NAR = re.compile(r"^/nar/([0-9a-df-np-sv-z]{32})-([0-9a-df-np-sv-z]{52})\.nar$")
_BARE_NAR = re.compile(r"^/nar/([0-9a-df-np-sv-z]{52})\.nar$")
_UPLOAD_NAR = re.compile(r"^/nar/([A-Za-z0-9._+-]{1,200})$")
_HASHED = re.compile(r"^/(sha1|sha256|sha512)/([A-Za-z0-9+/=_-]{20,200})$")
_COMPRESSION_BY_SUFFIX = {".nar": "none", ".nar.xz": "xz", ".nar.zst": "zstd", ".nar.bz2": "bzip2",
                          ".nar.gz": "gzip"}
PUT_LIMIT_NARINFO = 1 << 20
# Nodes with upstream caches announce this key: a peer whose DHT lookup missed asks them to pull through.
GATEWAY_MARKER = CID.for_block(0x55, b"/p2pcache/gateway/nix-upstream/1")
BLOCK_WAIT = 120.0
# BLOCK_WAIT: a NAR stream waits this long for any one block to arrive from peers
ARRIVING_BYTES = 16 << 20  # verified blocks a NAR stream from peers keeps in memory ahead of its reader
SEND_BYTES = 256 << 10  # NAR pieces streamed from peers are joined into writes of about this size
# Slow clients: NAR streams and uploads take worker threads from pools of their own (never trio's default
# pool, which `add`, lookups and the repo use), and beyond these many at once a request gets 503.
# A stream holds a thread only while it makes its next piece, so clients that stop reading hold none.
STREAM_THREADS = 32  # a NAR streamed from the repo holds one while it makes its next piece
MAX_STREAMS = 256
MAX_UPLOADS = 16  # an upload holds a thread for its whole body (bounded by asgi.bounded_bodies)
PULL_THREADS = 8  # NAR downloads from upstream caches, for us or for a peer
LOOKAHEAD_QUEUE = 1024  # references waiting for a look-ahead lookup; more are left to Nix's own asks


@dataclass
class NixConfig:
    store_dir: str = "/nix/store"
    priority: int = 30
    want_mass_query: bool = True
    serve_local_store: bool = False  # share what this machine's Nix store holds (read-only)
    local_store_root: str = ""  # a chroot store (`--store DIR`) instead of the system store
    upstreams: list[str] = field(default_factory=list)
    secret_key_file: str = ""  # nix-store --generate-binary-cache-key output
    negative_ttl: float = 30.0
    upload_ttl: float = 600.0  # an uploaded NAR waits this long for its narinfo, then it is dropped
    # Room for two of the largest uploads in flight at once (`nix copy` pushes a few paths in parallel).
    upload_quota: int = 16 << 30  # NAR bytes that uploads waiting for their narinfo may hold at once
    max_upload_size: int = 8 << 30  # largest upload (compressed file or the NAR inside it)
    # A narinfo answered from the swarm starts lookups of its references, and theirs in turn (Nix asks for
    # them next, one closure level at a time), at most this many at once; 0 turns it off.
    lookahead_lookups: int = 8


class UploadRefused(InvalidInput):
    """An upload over a limit: answered with `status` (413 too large, 507 quota full)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Pending:
    """Where a narinfo we served without holding the NAR will get its NAR from."""

    narinfo: NarInfo
    source: str  # "peer" or "upstream"
    root: CID | None = None
    root_block: bytes | None = None  # the NAR manifest root, verified when the narinfo was checked against it
    providers: list = field(default_factory=list)
    upstream: HttpBinaryCache | None = None
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Upload:
    root: CID
    nar_hash: bytes
    nar_size: int
    file_sha256: bytes
    file_size: int
    at: float = field(default_factory=time.monotonic)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.narinfo = Counter("p2pcache_narinfo_requests", "narinfo requests by outcome and source",
                               ["result", "source"], registry=r)
        self.served = Counter("p2pcache_bytes_served", "bytes served over HTTP by where they came from",
                              ["source"], registry=r)
        self.fetched = Counter("p2pcache_bytes_fetched", "bytes brought into the repo by where they came from",
                               ["source"], registry=r)
        self.uploads = Counter("p2pcache_uploads", "PUT requests by kind and result", ["kind", "result"], registry=r)
        self.lookup = Histogram("p2pcache_lookup_seconds", "narinfo lookup latency by outcome", ["result"],
                                registry=r, buckets=(.001, .005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.mirror = Counter("p2pcache_hashed_mirror_requests", "hashed-mirror requests by outcome", ["result"],
                              registry=r)
        self.negative_hits = Counter("p2pcache_narinfo_negative_cache_hits",
                                     "narinfo misses answered from the negative cache", registry=r)
        self.disk_full = Counter("p2pcache_disk_full", "operations that failed because the disk was full",
                                 ["operation"], registry=r)
        self.busy = Counter("p2pcache_http_busy", "requests answered 503 because streams or uploads were at "
                            "their cap", ["kind"], registry=r)
        self.lookahead = Counter("p2pcache_narinfo_lookahead", "references of a served narinfo looked up "
                                 "before Nix asked, by outcome", ["result"], registry=r)
        self.lookup_failures = Counter("p2pcache_narinfo_lookup_failures",
                                       "swarm lookups where providers existed but none answered validly in "
                                       "time (answered 404, not remembered as a miss)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class NixCache:
    def __init__(self, node: "Node", config: NixConfig):
        self.node = node
        self.config = config
        self.metrics = Metrics()
        from .node_metrics import register_node_metrics

        register_node_metrics(self.metrics.registry, node)
        self.narstore = RepoNarStore(node.repo, store_dir=config.store_dir)  # type: ignore[arg-type]
        self.local = None
        if config.serve_local_store:
            from ..store.localnix import LocalNixStore

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
        self._pending: dict[str, _Pending] = {}
        self._uploads: dict[str, _Upload] = {}  # pending: NARs waiting for their narinfo (not announced)
        self._inflight = 0  # NAR bytes of uploads still streaming in, counted against the quota
        self._inflight_lock = threading.Lock()  # ingest threads add to it
        self._negative: dict[str, float] = {}
        self._locks: dict[str, trio.Lock] = {}
        self.stream_threads = trio.CapacityLimiter(STREAM_THREADS)
        self.upload_threads = trio.CapacityLimiter(MAX_UPLOADS)
        self.pull_threads = trio.CapacityLimiter(PULL_THREADS)
        self._active = {"stream": 0, "upload": 0}
        self._lookahead_send, self._lookahead_recv = trio.open_memory_channel[str](LOOKAHEAD_QUEUE)

    async def run_lookahead(self) -> None:
        """Background task (the node's nursery): look up the narinfos `_look_ahead` queued, up to
        `lookahead_lookups` at once, so the answers wait in `_pending` when Nix asks (a lookup Nix makes
        meanwhile waits for the same one under its lock instead of starting another)."""
        limit = trio.CapacityLimiter(max(1, self.config.lookahead_lookups))

        async def one(store_hash: str) -> None:
            try:
                async with limit:
                    found = await self.find_narinfo(store_hash, remember_miss=False)
            except P2PCacheError as e:
                log.debug("look-ahead lookup of %s: %s", store_hash, e)
                self.metrics.lookahead.labels("error").inc()
                return
            self.metrics.lookahead.labels("found" if found else "miss").inc()
            if found is not None and found[1] in ("peer", "upstream"):
                self._look_ahead(found[0])  # the closure's next level, before Nix gets there

        async with trio.open_nursery() as nursery:
            async for store_hash in self._lookahead_recv:
                await limit.acquire_on_behalf_of(store_hash)  # at most that many queued tasks too
                limit.release_on_behalf_of(store_hash)
                nursery.start_soon(one, store_hash)

    def _look_ahead(self, info: NarInfo) -> None:
        """Queue lookups of the references of a path found in the swarm that are not known here."""
        if not self.config.lookahead_lookups:
            return
        own = info.store_path.hash_part
        for ref in info.references:
            store_hash = ref.split("-", 1)[0]
            lock = self._locks.get(store_hash)
            if (store_hash == own or not _STORE_HASH.match(store_hash) or store_hash in self._pending
                    or (lock is not None and lock.locked()) or self.narstore.has(store_hash)):
                continue
            expiry = self._negative.get(store_hash)
            if expiry is not None and expiry > time.monotonic():
                continue
            try:
                self._lookahead_send.send_nowait(store_hash)
            except trio.WouldBlock:
                return  # a huge closure: Nix's own lookups do the rest

    async def aclose(self) -> None:
        for u in self.upstreams:
            await u.aclose()

    # -- routing --------------------------------------------------------------------------------------
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        head = method == "HEAD"
        started = False
        plain_send = send

        async def send(message: dict) -> None:  # noqa: F811 - the same send, remembering a started response
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await plain_send(message)

        try:
            if path == "/nix-cache-info" and method in ("GET", "HEAD"):
                body = (f"StoreDir: {self.config.store_dir}\nWantMassQuery: {int(self.config.want_mass_query)}\n"
                        f"Priority: {self.config.priority}\n").encode()
                await send_bytes(send, 200, body, "text/x-nix-cache-info", head=head)
            elif (m := _NARINFO_PATH.match(path)) and method in ("GET", "HEAD"):
                await self._get_narinfo(m.group(1), send, head)
            elif (m := _NARINFO_PATH.match(path)) and method == "PUT":
                await self._put_narinfo(m.group(1), receive, send)
            elif path.startswith("/nar/") and method in ("GET", "HEAD"):
                await self._get_nar(path, send, head)
            elif (m := _UPLOAD_NAR.match(path)) and method == "PUT":
                with self._upload_slot():
                    await self._put_nar(path[1:], m.group(1), receive, send, _content_length(scope))
            elif (m := _HASHED.match(path)) and method in ("GET", "HEAD"):
                await self._get_hashed(m.group(1), m.group(2), send, head)
            elif path == "/metrics" and method == "GET":
                await send_bytes(send, 200, self.metrics.render(), CONTENT_TYPE_LATEST)
            else:
                await send_error(send, 404, f"no such endpoint: {method} {path}")
        except HTTPError as e:
            await send_error(send, e.status, e.message)
        except P2PCacheError as e:
            if not started:
                raise  # the API maps it to a status code
            # Mid-body: returning without the rest makes the server close the connection, so the client
            # sees a transfer cut short (never a complete wrong one); one line in the log, no traceback.
            log.warning("%s %s: cut short: %s", method, path, e)

    # -- slots for slow clients -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _upload_slot(self) -> Iterator[None]:
        with self._slot("upload", "uploads", MAX_UPLOADS), thread_pool(self.upload_threads):
            yield

    @contextlib.contextmanager
    def _stream_slot(self) -> Iterator[None]:
        with self._slot("stream", "downloads", MAX_STREAMS):
            yield

    @contextlib.contextmanager
    def _slot(self, kind: str, what: str, limit: int) -> Iterator[None]:
        """One of `limit` places for requests of `kind`; 503 (before any response) when all are taken."""
        if self._active[kind] >= limit:
            self.metrics.busy.labels(kind).inc()
            raise HTTPError(503, f"{limit} {what} are in progress; retry in a few seconds")
        self._active[kind] += 1
        try:
            yield
        finally:
            self._active[kind] -= 1

    # -- narinfo lookups ------------------------------------------------------------------------------
    def _lock(self, key: str) -> trio.Lock:
        return self._locks.setdefault(key, trio.Lock())

    async def find_narinfo(self, store_hash: str, remember_miss: bool = True) -> tuple[NarInfo, str] | None:
        """(narinfo, source) from the first place that has it, or None (remembered for negative_ttl,
        unless `remember_miss` is false: a look-ahead's miss must not become Nix's 404)."""
        info = self.narstore.narinfo(store_hash)
        if info is not None:
            return info, "local"
        if self.local is not None:
            info = await trio.to_thread.run_sync(self.local.narinfo, store_hash)
            if info is not None:
                return info, "nixstore"
        expiry = self._negative.get(store_hash)
        if expiry is not None and expiry > time.monotonic():
            self.metrics.negative_hits.inc()
            return None
        pending = self._pending.get(store_hash)
        if pending is not None:
            return pending.narinfo, pending.source
        async with self._lock(store_hash):
            pending = self._pending.get(store_hash)  # another request looked it up while we waited
            if pending is not None:
                return pending.narinfo, pending.source
            found, conclusive = await self._from_swarm(store_hash)
            if found is None:
                upstream_errors: list[str] = []
                found = await self._from_upstreams(store_hash, upstream_errors)
                conclusive = conclusive and not upstream_errors
        if found is None:
            if not conclusive or not remember_miss:  # someone had it but failed, lied or was too slow
                return None
            self._negative[store_hash] = time.monotonic() + self.config.negative_ttl
            if len(self._negative) > 65536:
                now = time.monotonic()
                self._negative = {k: t for k, t in self._negative.items() if t > now}
            return None
        self._pending[store_hash] = found
        return found.narinfo, found.source

    async def _from_swarm(self, store_hash: str) -> tuple[_Pending | None, bool]:
        """(where to get it, or None; whether a None is a true miss). One race (`Node.race_at_providers`)
        over the path's providers and then, unless we are a gateway ourselves, the gateways': all
        asked in parallel, staggered, under one deadline of `lookup_timeout`. An answer counts once its
        NAR manifest root, fetched from that peer, carries the NarHash and NarSize the peer claims."""
        node = self.node
        if node.finder is None or node.exchange is None:
            return None, True
        alias = nix_alias(store_hash)
        me = node.host.peer_id

        async def ask(peer: Any) -> tuple[NarInfo, CID, bytes]:
            answer = await resolve(node.host, peer.peer_id, alias, timeout=node.config.lookup_timeout)
            if answer is None:
                raise NotHeld()
            if answer.kind != "nar" or answer.narinfo is None or answer.root.codec != DAG_CBOR:
                raise InvalidInput(f"answered {answer.root} ({answer.kind}), not a NAR manifest with its narinfo")
            info = _narinfo_from_fields(answer.narinfo, self.config.store_dir)
            if info.store_path.hash_part != store_hash:
                raise InvalidInput(f"answered a narinfo for another path, {info.store_path}")
            # The manifest root is small: check it carries the NarHash the peer claims before we
            # hand that claim to Nix.
            blocks = await node.exchange.fetch_blocks([answer.root], [peer])
            try:
                manifest = NarManifest.decode(blocks[answer.root])
            except KeyError:
                raise InvalidInput(f"did not send the manifest root {answer.root}") from None
            if manifest.nar_hash != info.nar_hash.digest or manifest.nar_size != info.nar_size:
                log.warning("peer %s: NAR manifest %s does not match its narinfo for %s", peer.peer_id,
                            answer.root, alias)
                raise CorruptData(f"its NAR manifest {answer.root} does not match its narinfo")
            return info, answer.root, blocks[answer.root]

        async def gateways(timeout: float) -> list:
            return [p for p in await node.finder.find_providers(str(GATEWAY_MARKER), timeout=timeout)
                    if p.peer_id != me]

        # A gateway pulls the path through from its upstreams before it answers, so gateways are
        # asked after the providers themselves (the race's second tier).
        race = await node.race_at_providers(alias, ask, () if self.upstreams else (gateways,))
        if race.winner is None:
            if race.outcome is not RaceOutcome.MISS:
                log.info("lookup of %s: %d provider(s), none answered validly in time (%s)", alias,
                         race.peers_known, race.stats)
                self.metrics.lookup_failures.inc()
            return None, race.outcome is RaceOutcome.MISS
        peer, (info, root, root_block) = race.winner
        rest = race.peers_in(AskState.QUEUED, AskState.CANCELLED)
        return _Pending(info, "peer", root=root, root_block=root_block, providers=[peer, *rest]), True

    async def pull_through_for_peer(self, store_hash: str) -> bool:
        """A peer's lookup missed and it asks us, a gateway: pull the path from our upstreams into the
        repo (so we can answer its resolve and serve its blocks). True if we now hold it."""
        if not self.upstreams or not _STORE_HASH.match(store_hash):
            return False
        if self.narstore.has(store_hash):
            return True
        expiry = self._negative.get(store_hash)
        if expiry is not None and expiry > time.monotonic():
            return False
        async with self._lock("nar:" + store_hash):
            if self.narstore.has(store_hash):
                return True
            pending = await self._from_upstreams(store_hash)
            if pending is None:
                self._negative[store_hash] = time.monotonic() + self.config.negative_ttl
                return False
            await self._pull_from_upstream(pending)
        self.node.announce(self.narstore.root_of(store_hash))
        return True

    async def _from_upstreams(self, store_hash: str, errors: list[str] | None = None) -> _Pending | None:
        for upstream in self.upstreams:
            try:
                info = await upstream.narinfo(store_hash)
            except P2PCacheError as e:
                log.warning("upstream %s: %s", upstream.base, e)
                if errors is not None:
                    errors.append(str(e))
                continue
            if info is not None:
                return _Pending(info, "upstream", upstream=upstream)
        return None

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
        it (signed once, at `_put_narinfo`, and stored) and this machine's own Nix store, whose
        path → NarHash records only Nix itself (or its trusted users) can write. Narinfos from peers and
        upstreams keep the signatures they came with: a peer's or upstream's claim about a store path's
        contents is not something this node can check, so its key must not launder it."""
        if self.key is not None and source == "nixstore":
            return info.signed(self.key)
        return info

    async def _get_narinfo(self, store_hash: str, send: Send, head: bool) -> None:
        start = time.monotonic()
        try:
            found = await self.find_narinfo(store_hash)
        except P2PCacheError as e:
            self.metrics.narinfo.labels("error", "none").inc()
            raise HTTPError(502, f"looking up {store_hash}: {e}") from None
        self.metrics.lookup.labels("hit" if found else "miss").observe(time.monotonic() - start)
        if found is None:
            self.metrics.narinfo.labels("miss", "none").inc()
            await send_error(send, 404, f"{store_hash}.narinfo: nobody has this store path")
            return
        info, source = found
        self.metrics.narinfo.labels("hit", source).inc()
        if source in ("peer", "upstream"):
            self._look_ahead(info)
        body = self._signed_for(self._served_narinfo(info), source).render().encode()
        await send_bytes(send, 200, body, "text/x-nix-narinfo", head=head)

    # -- NARs ----------------------------------------------------------------------------------------
    async def _get_nar(self, path: str, send: Send, head: bool) -> None:
        if m := _OUR_NAR.match(path):
            store_hash, nar_digest = m.group(1), nixbase32.decode(m.group(2), 32)
        elif m := _BARE_NAR.match(path):
            store_hash, nar_digest = None, nixbase32.decode(m.group(1), 32)
        else:
            raise HTTPError(404, f"{path}: not a NAR this node serves")
        root = self._local_nar_root(store_hash, nar_digest)
        if root is not None:
            await self._stream_repo_nar(root, nar_digest, send, head, "local")
            return
        if store_hash is None:
            raise HTTPError(404, f"{path}: no NAR with that hash here")
        found = await self.find_narinfo(store_hash)
        if found is None:
            raise HTTPError(404, f"nobody has store path {store_hash} any more")
        info, source = found
        if info.nar_hash.digest != nar_digest:
            raise HTTPError(404, f"store path {store_hash} now has a different NarHash")
        if source == "nixstore":
            assert self.local is not None
            await self._stream(send, info.nar_size, lambda: self.local.stream_nar(store_hash), "nixstore", head)
            return
        if head:
            await self._stream(send, info.nar_size, lambda: iter(()), source, head=True)
            return
        async with self._lock("nar:" + store_hash):
            root = self._local_nar_root(store_hash, nar_digest)
            if root is not None:  # another request fetched it while we waited
                await self._stream_repo_nar(root, nar_digest, send, head, "local")
                return
            pending = self._pending.get(store_hash)
            if pending is None:
                raise HTTPError(404, f"store path {store_hash}: lost track of where to fetch it")
            operation = "nar-from-peers" if pending.source == "peer" else "nar-from-upstream"
            try:  # before the first block: a NAR that cannot fit in the quota or on the disk is refused whole
                async with self.node.taking_back_on_disk_full(operation):  # counted as any disk-full is
                    await self.node.quota.make_room(pending.narinfo.nar_size, f"the NAR of {info.store_path}",
                                                 in_operation=False)
            except DiskFull as e:
                raise HTTPError(507, str(e)) from None
            if pending.source == "peer":
                async with self.node.taking_back_on_disk_full("nar-from-peers"):
                    await self._stream_from_peers(store_hash, pending, send)
            else:
                try:
                    async with self.node.taking_back_on_disk_full("nar-from-upstream"):
                        await self._pull_from_upstream(pending)
                except P2PCacheError as e:
                    self._pending.pop(store_hash, None)
                    raise HTTPError(507 if isinstance(e, DiskFull) else 502,
                                    f"fetching the NAR of {info.store_path}: {e}") from None
                self._pending.pop(store_hash, None)
                root = self.narstore.root_of(store_hash)
                self.node.announce(root)
                await self._stream_repo_nar(root, nar_digest, send, head, "upstream")

    def _local_nar_root(self, store_hash: str | None, nar_digest: bytes) -> CID | None:
        if store_hash is not None and self.narstore.has(store_hash):
            return self.narstore.root_of(store_hash)
        return self._root_by_nar_hash(nar_digest)

    async def _stream_repo_nar(self, root: CID, nar_digest: bytes, send: Send, head: bool, source: str) -> None:
        manifest = NarManifest.decode(await trio.to_thread.run_sync(self.node.repo.load_block, root))
        if manifest.nar_hash != nar_digest:
            raise HTTPError(404, "the NAR held here has another hash")
        await self._stream(send, manifest.nar_size, lambda: stream_nar_root(self.node.repo, root), source, head)

    async def _stream_from_peers(self, store_hash: str, pending: _Pending, send: Send) -> None:
        """Stream the NAR to Nix while its blocks arrive from peers: the fetch stores verified blocks in
        depth-first order (NAR order) and says which; a `NarAssembly` on this task turns each block into
        NAR bytes the moment it is there, with no thread waiting for arrivals. The NarHash is checked as
        it streams (a mismatch, or a failed fetch, aborts the response before its last byte); the root
        is registered only after both finished."""
        repo = self.node.repo
        root = pending.root
        assert root is not None
        arriving = _ArrivingBlocks(repo)

        counted = [0]

        def verified(cid: CID, data: bytes) -> None:  # counted as they arrive: Nix may finish first
            counted[0] += len(data)
            self.metrics.fetched.labels("peer").inc(len(data))
            arriving.verified(cid, data)

        async def fetcher() -> None:
            try:
                fetched = await self.node.fetch_dag(root, pending.providers, arriving.stored, verified,
                                                    root_block=pending.root_block)
                self.metrics.fetched.labels("peer").inc(max(0, fetched - counted[0]))
            except P2PCacheError as e:
                arriving.fail(e)
                return
            arriving.finish()

        with self._stream_slot():  # 503 (before the response starts) when too many are in progress
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetcher)
                manifest = NarManifest.decode(await arriving.get(root))
                headers = [(b"content-type", b"application/x-nix-nar"), (b"content-length", str(manifest.nar_size).encode())]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                assembly = NarAssembly(manifest)
                pieces = assembly.start()
                sent = 0
                out: list[bytes] = []  # pieces joined into larger writes: a tree of small files is
                size = 0  # thousands of tiny pieces, and each write is a trip through h11 and a syscall
                while True:
                    out += pieces
                    size += sum(len(p) for p in pieces)
                    cid = assembly.need()
                    if out and (cid is None or size >= SEND_BYTES or not arriving.ready(cid)):
                        body = out[0] if len(out) == 1 else b"".join(out)  # never wait holding bytes
                        out, size = [], 0
                        sent += len(body)
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                    if cid is None:
                        break
                    # A CorruptData or FetchError raised here, after the response started, makes the server
                    # drop the connection with the body incomplete.
                    pieces = assembly.give(await arriving.get(cid))
                await send({"type": "http.response.body", "body": b""})
                self.metrics.served.labels("peer").inc(sent)
        if arriving.failure is not None:  # the stream completed from blocks we had, yet the fetch failed
            raise arriving.failure
        await trio.to_thread.run_sync(lambda: self.narstore.register_nar(root, pending.narinfo, verify=False))
        self._pending.pop(store_hash, None)
        self.node.announce(root)

    def _root_by_nar_hash(self, digest: bytes) -> CID | None:
        try:
            root = self.node.repo.resolve(HashKey("sha256", digest))
        except NotFound:
            return None
        info = self.node.repo.root_info(root)
        return root if info.kind == "nar" and info.complete else None

    async def _pull_from_upstream(self, pending: _Pending) -> None:
        """Download, decompress and verify the NAR from the upstream straight into the repo."""
        assert pending.upstream is not None
        upstream, info = pending.upstream, pending.narinfo
        counted = [0]

        async def pieces() -> AsyncIterator[bytes]:
            async for piece in upstream.stream_nar_of(info):
                counted[0] += len(piece)
                yield piece

        async with self.node.quota.working():  # no quota gc while its blocks are unclaimed
            await _feed_thread(pieces(), lambda it: self.narstore.add_nar(info, it), limiter=self.pull_threads)
        self.metrics.fetched.labels("upstream").inc(counted[0])

    async def _stream(self, send: Send, size: int, make_iter: Callable[[], Iterator[bytes]], source: str,
                      head: bool, content_type: bytes = b"application/x-nix-nar") -> None:
        headers = [(b"content-type", content_type), (b"content-length", str(size).encode())]
        if head:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        with self._stream_slot():  # 503 (before the response starts) when too many are in progress
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await self._stream_body(send, make_iter, source)

    async def _stream_body(self, send: Send, make_iter: Callable[[], Iterator[bytes]], source: str) -> None:
        sent = 0

        async def deliver(piece: bytes) -> None:
            nonlocal sent
            sent += len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": True})

        # A CorruptData from the iterator arrives before its last piece: raising here, after the
        # response started, makes the server drop the connection with the body incomplete.
        await _drain_thread(make_iter, deliver, limiter=self.stream_threads)
        await send({"type": "http.response.body", "body": b""})
        self.metrics.served.labels(source).inc(sent)

    # -- uploads -------------------------------------------------------------------------------------
    # Only an authenticated pusher reaches these (http/guard.py: every PUT needs the API token).
    def pending_upload_bytes(self) -> int:
        return sum(u.nar_size for u in self._uploads.values()) + self._inflight

    async def _put_nar(self, url: str, name: str, receive: Receive, send: Send, length: int | None = None) -> None:
        compression = next((c for suffix, c in sorted(_COMPRESSION_BY_SUFFIX.items(), key=lambda kv: -len(kv[0]))
                            if name.endswith(suffix)), None)
        if compression is None:
            raise HTTPError(400, f"{url}: expected a .nar, .nar.xz, .nar.zst, .nar.bz2 or .nar.gz file name")
        limit, quota = self.config.max_upload_size, self.config.upload_quota
        if length is not None and length > limit:
            self.metrics.uploads.labels("nar", "too_large").inc()
            raise HTTPError(413, f"{url}: {length} bytes is over the upload limit of {limit} (nix.max_upload_size)")
        await self.expire_uploads()
        file_hash = hashlib.sha256()
        file_size = [0]
        reserved = [0]

        async def raw_body() -> AsyncIterator[bytes]:
            while True:
                event = await receive()
                if event["type"] == "http.disconnect":
                    raise InvalidInput(f"{url}: the client went away mid-upload")
                body = event.get("body", b"")
                if body:
                    file_hash.update(body)
                    file_size[0] += len(body)
                    if file_size[0] > limit:
                        raise UploadRefused(413, f"{url}: over the upload limit of {limit} bytes (nix.max_upload_size)")
                    yield body
                if not event.get("more_body"):
                    return

        def count(n: int) -> None:  # on the ingest thread, for every piece of decompressed NAR
            with self._inflight_lock:
                reserved[0] += n
                self._inflight += n
                over = sum(u.nar_size for u in self._uploads.values()) + self._inflight > quota
            if reserved[0] > limit:
                raise UploadRefused(413, f"{url}: the NAR inside is over the upload limit of {limit} bytes "
                                         "(nix.max_upload_size)")
            if over:
                raise UploadRefused(507, f"{url}: uploads waiting for their narinfo would hold more than "
                                         f"{quota} bytes (nix.upload_quota); PUT their narinfos, or wait "
                                         f"{self.config.upload_ttl:.0f} s for them to expire")

        def ingest(raw: Iterator[bytes]) -> Any:
            try:
                decoder = _Decompressor(compression)
            except UpstreamError as e:
                raise InvalidInput(str(e)) from None

            def decompressed() -> Iterator[bytes]:
                for chunk in raw:
                    for piece in decoder.feed(chunk):
                        count(len(piece))
                        yield piece
                decoder.finish()

            return self.narstore.add_nar(None, decompressed())

        try:
            async with self.node.quota.working():  # no quota gc while its blocks are unclaimed
                result = await _feed_thread(raw_body(), ingest)
        except UploadRefused as e:
            self.metrics.uploads.labels("nar", "too_large" if e.status == 413 else "quota").inc()
            raise HTTPError(e.status, str(e)) from None
        except P2PCacheError as e:
            self.metrics.uploads.labels("nar", "rejected").inc()
            raise HTTPError(400, f"{url}: {e}") from None
        finally:
            with self._inflight_lock:
                self._inflight -= reserved[0]
        old = self._uploads.pop(url, None)
        self._uploads[url] = _Upload(result.root, result.nar_hash, result.nar_size, file_hash.digest(), file_size[0])
        if old is not None and old.root != result.root:
            await self._discard_upload(old)
        self.metrics.uploads.labels("nar", "ok").inc()
        await send_bytes(send, 200, b"", "text/plain")

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
        repo = self.node.repo

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
        repo = self.node.repo
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

    async def _put_narinfo(self, store_hash: str, receive: Receive, send: Send) -> None:
        from .asgi import read_body

        raw = await read_body(receive, PUT_LIMIT_NARINFO)
        try:
            info = NarInfo.parse(raw, store_dir=self.config.store_dir, source=f"{store_hash}.narinfo")
        except P2PCacheError as e:
            self.metrics.uploads.labels("narinfo", "rejected").inc()
            raise HTTPError(400, str(e)) from None
        if info.store_path.hash_part != store_hash:
            raise HTTPError(400, f"{store_hash}.narinfo describes another path, {info.store_path}")
        held = await trio.to_thread.run_sync(self._held_nar_hash, store_hash)
        if held is not None and held != info.nar_hash.digest:
            # First writer wins: a store path's contents are never replaced (a non-reproducible rebuild, or
            # someone trying to swap what others will install).
            self.metrics.uploads.labels("narinfo", "conflict").inc()
            upload = self._uploads.pop(info.url, None)
            if upload is not None:
                await self._discard_upload(upload)
            raise HTTPError(409, f"{info.store_path} is already held here with NarHash "
                                 f"sha256:{nixbase32.encode(held)}; a path's contents are not replaced")
        upload = self._uploads.get(info.url)
        root: CID | None = None
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
                raise HTTPError(400, f"{store_hash}.narinfo: {'; '.join(problems)}")
            root = upload.root
        else:  # the NAR may be here already, e.g. uploaded under another file name or fetched earlier
            root = self._root_by_nar_hash(info.nar_hash.digest) if info.nar_hash.algo == "sha256" else None
            if root is None:
                self.metrics.uploads.labels("narinfo", "rejected").inc()
                raise HTTPError(400, f"{store_hash}.narinfo: its NAR ({info.url}) was not uploaded first")
        if self.key is not None:  # vouch for what an authenticated pusher gave us: stored with the narinfo
            info = info.signed(self.key)
        try:
            await trio.to_thread.run_sync(lambda: self.narstore.register_nar(root, info, verify=False))
        except P2PCacheError as e:
            raise HTTPError(400, f"{store_hash}.narinfo: {e}") from None
        self._uploads.pop(info.url, None)
        self._negative.pop(store_hash, None)
        self.node.announce(root)
        self.metrics.uploads.labels("narinfo", "ok").inc()
        await send_bytes(send, 200, b"", "text/plain")

    # -- hashed mirror -------------------------------------------------------------------------------
    async def _get_hashed(self, algo: str, text: str, send: Send, head: bool) -> None:
        if algo == "sha1":
            await self._get_sha1(text, send, head)
            return
        try:
            key = parse_key(f"{algo}:{text}") if not text.startswith(algo + "-") else parse_key(text)
        except P2PCacheError:
            try:
                key = parse_key(f"{algo}-{text}")
            except P2PCacheError:
                raise HTTPError(400, f"/{algo}/{text}: not a {algo} hash in hex, nix-base32 or base64") from None
        if not isinstance(key, HashKey) or key.algo != algo:
            raise HTTPError(400, f"/{algo}/{text}: not a {algo} hash")
        repo = self.node.repo
        try:
            root = repo.resolve(key)
            local = repo.root_info(root).complete
        except NotFound:
            local = False
        if not local:
            if head:
                found = await self.node.finder.find_providers(key.alias, timeout=self.node.config.lookup_timeout)
                self.metrics.mirror.labels("hit" if found else "miss").inc()
                if not found:
                    raise HTTPError(404, f"nobody has {key.alias}")
                # The length a GET would send is what a provider's resolve answer says; if none
                # answers in time, no Content-Length at all rather than a wrong one.
                size = await self.node.size_at_peers(key.alias, found)
                headers = [(b"content-type", b"application/octet-stream")]
                if size is not None:
                    headers.append((b"content-length", str(size).encode()))
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
            try:
                await self.node.fetch(key.alias, lambda done, total: None)
            except NotFound as e:
                self.metrics.mirror.labels("miss").inc()
                raise HTTPError(404, str(e)) from None
            except P2PCacheError as e:
                self.metrics.mirror.labels("error").inc()
                raise HTTPError(502, str(e)) from None
            root = repo.resolve(key)
        self.metrics.mirror.labels("hit").inc()
        info = repo.root_info(root)
        if info.kind != "archive":
            # a NarHash names a NAR: serve its NAR bytes (what hashes to it)
            await self._stream(send, info.size, lambda: stream_nar_root(repo, root), "local", head)
            return
        await self._stream(send, info.size, lambda: repo.stream(root), "local", head, b"application/octet-stream")

    async def _get_sha1(self, text: str, send: Send, head: bool) -> None:
        root = await _sha1_root(self.node, text, head)
        self.metrics.mirror.labels("hit" if root is not None else "miss").inc()
        if root is None:
            raise HTTPError(404, f"nobody has sha1 {text}")
        if root is True:  # HEAD: a provider announces it
            await send_bytes(send, 200, b"", "application/octet-stream", head=True)
            return
        repo = self.node.repo
        await self._stream(send, repo.root_info(root).size, lambda: repo.stream(root), "local", head,
                           b"application/octet-stream")


async def _sha1_root(node: Any, text: str, head: bool) -> Any:
    """The root of the archive whose sha1 is `text` (hex, nix-base32 or base64), as Nix asks a hashed
    mirror for `sha1 =` fetches (npm's and yarn's old integrity hashes): the repo, else the swarm, every
    byte verified against the sha1 (and the manifest's own hashes) before it is recorded; None if nobody has it."""
    import base64
    import binascii

    from ..content import nixbase32
    from ..content.lockfiles import Dependency, DepHash
    from ..prefetch import Prefetcher

    digest = None
    if len(text) == 40:
        try:
            digest = bytes.fromhex(text)
        except ValueError:
            pass
    elif len(text) == nixbase32.encoded_length(20):
        try:
            digest = nixbase32.decode(text, 20)
        except nixbase32.InvalidNixBase32:
            pass
    elif len(text) == 28:
        try:
            digest = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            pass
    if digest is None or len(digest) != 20:
        raise HTTPError(400, f"/sha1/{text}: not a sha1 hash in hex, nix-base32 or base64")
    alias = f"sha1:{digest.hex()}"
    root = node.repo.index.resolve_alias(alias)
    if root is not None and node.repo.root_info(root).complete:
        return root
    if head:
        return bool(await node.finder.find_providers(alias, timeout=node.config.lookup_timeout)) or None
    dep = Dependency(alias, "", None, DepHash("sha1", digest), "mirror")
    outcome = await Prefetcher(node.repo, origin=None, swarm=node, announce=node.announce).fetch(dep)  # type: ignore[arg-type]
    return node.repo.index.resolve_alias(alias) if outcome.source else None


class _ArrivingBlocks:
    """Blocks of one fetch as they arrive: `get(cid)` returns a block's verified bytes — from memory if
    the fetch handed them over verified (`verified`, at most `ARRIVING_BYTES` held), else from the repo
    once it holds the block (read on a worker thread, never waiting there) — waiting on this task until
    then."""

    def __init__(self, repo: Any) -> None:
        self.repo = repo
        self._held: dict[CID, bytes] = {}
        self._held_bytes = 0
        self._stored: set[CID] = set()
        self._waiting: dict[CID, trio.Event] = {}
        self.failure: BaseException | None = None
        self._finished = False

    def verified(self, cid: CID, data: bytes) -> None:
        if self._held_bytes + len(data) <= ARRIVING_BYTES and cid not in self._held:
            self._held[cid] = data
            self._held_bytes += len(data)
            ev = self._waiting.pop(cid, None)
            if ev is not None:
                ev.set()

    def stored(self, cids: list[CID]) -> None:
        for c in cids:
            self._stored.add(c)
            ev = self._waiting.pop(c, None)
            if ev is not None:
                ev.set()

    def _wake_all(self) -> None:
        for ev in self._waiting.values():
            ev.set()
        self._waiting.clear()

    def fail(self, e: BaseException) -> None:
        self.failure = e
        self._wake_all()

    def finish(self) -> None:
        self._finished = True
        self._wake_all()

    def ready(self, cid: CID) -> bool:
        """`get(cid)` would not wait for the fetch."""
        return cid in self._held or cid in self._stored

    async def get(self, cid: CID) -> bytes:
        data = self._held.pop(cid, None)
        if data is not None:
            self._held_bytes -= len(data)
            return data
        while cid not in self._stored and not self.repo.has_block(cid):
            data = self._held.pop(cid, None)
            if data is not None:
                self._held_bytes -= len(data)
                return data
            if self.failure is not None:
                raise self.failure
            if self._finished:
                raise CorruptData(f"the fetch finished without block {cid}")
            ev = self._waiting.setdefault(cid, trio.Event())
            with trio.move_on_after(BLOCK_WAIT) as waited:
                await ev.wait()
            if waited.cancelled_caught:
                raise NotFound(f"block {cid} did not arrive from peers within {BLOCK_WAIT:g} s")
        return await trio.to_thread.run_sync(self.repo.load_block, cid)


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                raise HTTPError(400, "Content-Length is not a number") from None
    return None


def _narinfo_from_fields(fields: Any, store_dir: str) -> NarInfo:
    from ..content.storepath import StorePath

    path = StorePath.parse(fields.store_path)
    if path.store_dir != store_dir:
        raise InvalidInput(f"{fields.store_path} is not in {store_dir}")
    nar_hash = NixHash.parse(fields.nar_hash)
    return NarInfo(
        store_path=path, url="nar/unused.nar", nar_hash=nar_hash, nar_size=fields.nar_size,
        references=tuple(fields.references), deriver=fields.deriver or None, system=fields.system or None,
        sigs=tuple(fields.sigs), ca=fields.ca or None,
    )
