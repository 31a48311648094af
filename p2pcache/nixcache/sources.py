"""Where a node reads narinfos and NARs from, behind one read protocol, and the repo's write protocol on top.

    NarSource   `narinfo(store_hash) -> Found | None`, `stream_nar(found, sink, head)`
                implemented by: RepoSource (this node's repo), NixStoreSource (this machine's Nix store,
                store/localnix.py), SwarmSource (peers and gateways), UpstreamSource (HTTP binary caches,
                store/httpcache.py)
    NarWriter   a NarSource that also takes NARs: `add_nar`, `register_nar` (RepoSource)
    NarSink     where a NAR's bytes go: `start(size, kind)`, `write(piece)`, `end()` (http/nix.py makes one
                over an ASGI response; a source calls `start` only once it knows the first byte is coming)

A `Found` is a source's answer: the narinfo, the source, and what that source needs to deliver the NAR later
(the manifest root and providers a swarm lookup settled on, the upstream that had it). A source that raises
`LookupFailed` had someone who claimed the path but failed, lied or was too slow: the lookup chain goes on
and does not remember the miss.

Owns: each source's lookup and NAR delivery, the slots and threads NAR streams take (`NarStreams`), the
verification every byte goes through before Nix sees its last piece. Must not: import node.py or
anything HTTP (the node hands the swarm in as the `Swarm` protocol), decide status codes (it raises
`nixcache.errors` refusals), or change how lookups are ordered (that is `LookupChain`'s list).
"""

from __future__ import annotations

import contextlib
import logging
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Protocol, Sequence

import trio

from ..aio import drain_thread, feed_thread
from ..content.cid import CID, DAG_CBOR
from ..content.keys import HashKey
from ..content.narinfo import NarInfo
from ..content.narmanifest import NarAssembly, NarManifest
from ..content.nixhash import NixHash
from ..errors import CorruptData, DiskFull, InvalidInput, NotFound, P2PCacheError
from ..routing import AskState, NotHeld, RaceOutcome
from ..routing.race import ResolveRace
from ..routing.resolve_wire import NarInfoFields, ResolveAnswer
from ..store.httpcache import HttpBinaryCache
from ..store import interfaces
from ..store.narstore import NarAddResult, RepoNarStore, nix_alias, stream_nar_root
from .background import Background
from .errors import Busy, Missing, NoRoom, SourceFailed
from .metrics import Metrics

if TYPE_CHECKING:
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    from ..prefetch import Swarm as ArchiveSwarm
    from ..store.repo import Repo

__all__ = ["Found", "Intake", "LookupFailed", "NarPrefetches", "NarSink", "NarSource", "NarStreams", "NarWriter",
           "NixStoreSource", "Room",
           "RepoSource", "Swarm", "SwarmSource", "UpstreamSource"]

log = logging.getLogger("p2pcache.nixcache")
# Debug lines a cold copy's timeline is made of (bench/nixcopy.py --timeline merges them with Nix's --debug).
timeline = logging.getLogger("p2pcache.timeline")

# Nodes with upstream caches announce this key: a peer whose DHT lookup missed asks them to pull through.
GATEWAY_MARKER = CID.for_block(0x55, b"/p2pcache/gateway/nix-upstream/1")
BLOCK_WAIT = 120.0  # a NAR stream waits this long for any one block to arrive from peers
# A NAR whose response has begun is not cut because one fetch failed (a provider died or stalled, a stream
# broke): the fetch is tried again, resuming from the blocks stored (with the providers a fresh DHT lookup
# names, and those it had), backing off, until it has gone this long without a new block: longer than the
# 60 s py-libp2p 0.8.1 refuses to dial a peer after a failed dial (a provider that restarted is unreachable
# that long), shorter than the 300 s Nix waits for a stalled download (stalled-download-timeout) and than
# BLOCK_WAIT. Only a hash mismatch cuts a response at once.
FETCH_PATIENCE = 90.0
FETCH_STALL = 15.0  # an attempt with no block for this long is cancelled and tried again
PREFETCH_BYTES = 1 << 30  # NAR bytes being prefetched at once, at most (`NarPrefetches`)
PREFETCH_TTL = 60.0  # a prefetched NAR not asked for this long after its fetch ended is let go
PREFETCH_HOLD = 4 << 20  # verified blocks a prefetch keeps in memory for its stream (the rest: from the repo)
PREFETCH_WAITING = 256  # prefetches not taken yet (running, waiting their turn, or done), at most
FETCH_RETRY_FIRST, FETCH_RETRY_MAX = 0.5, 8.0
ARRIVING_BYTES = 16 << 20  # verified blocks a NAR stream from peers keeps in memory ahead of its reader
READBACK_BYTES = 4 << 20  # a NAR stream from peers reads spilled blocks back from the repo this much at a time
READBACK_BLOCKS = 1024  # ... and at most this many blocks at a time
SEND_BYTES = 256 << 10  # NAR pieces streamed from peers are joined into writes of about this size
# Slow clients: NAR streams and uploads take worker threads from pools of their own (never trio's default
# pool, which `add`, lookups and the repo use), and beyond these many at once a request gets Busy (503).
# A stream holds a thread only while it makes its next piece, so clients that stop reading hold none.
STREAM_THREADS = 32  # a NAR streamed from the repo holds one while it makes its next piece
MAX_STREAMS = 256
MAX_UPLOADS = 16  # an upload holds a thread for its whole body (bounded by asgi.bounded_bodies)
PULL_THREADS = 8  # NAR downloads from upstream caches, for us or for a peer
RECENT_PROVIDERS = 3  # peers that answered the last swarm lookups, asked first by the next (`SwarmSource`)
# A narinfo lookup looks up the gateways once no provider is being asked, or this many seconds after the
# providers' lookup at the latest; GATEWAY_SETTLE: the moment the race takes to ask what the walk named.
GATEWAY_DELAY, GATEWAY_SETTLE = 1.0, 0.01


class LookupFailed(P2PCacheError):
    """Someone had the path but failed, lied or was too slow: not a miss to remember."""


class NarSink(Protocol):
    """Where a NAR (or, for the hashed mirror, an archive) goes. `kind` is "nar" or "archive"; `size` None
    means the length is not known (no Content-Length rather than a wrong one)."""

    async def start(self, size: int | None, kind: str = "nar") -> None: ...

    async def write(self, piece: bytes) -> None: ...

    async def end(self) -> None: ...


@dataclass
class Found:
    """A source's answer for a store path, and what the source needs to deliver its NAR."""

    narinfo: NarInfo
    source: "NarSource"
    root: CID | None = None  # swarm: the NAR manifest root the winning peer proved
    root_block: bytes | None = None  # swarm: that root's bytes (the fetch starts from its links)
    providers: list["PeerInfo"] = field(default_factory=list)  # swarm: the winner first, then the rest
    upstream: HttpBinaryCache | None = None  # upstream: the cache that had it
    at: float = field(default_factory=time.monotonic)

    @property
    def label(self) -> str:
        return self.source.label


class NarSource(Protocol):
    """One place narinfos and NARs are read from.

    `name` is the source's name in `nix.lookup_order`; `label` its name in metrics and signing policy
    ("local", "nixstore", "peer", "upstream"). A `remote` source's lookups cross the network: the chain
    remembers its answers (pending until the NAR is fetched), negative-caches its misses and runs one lookup
    per path at a time; its NARs are fetched into the repo, so the caller checks they fit first.

    `stream_nar` sends the NAR `found` describes into `sink`, verified: a mismatch raises before its last
    byte. With `head`, only `sink.start` and `sink.end` (local sources; for remote ones the caller answers
    HEAD from the narinfo and never calls this)."""

    name: str
    label: str
    remote: bool

    async def narinfo(self, store_hash: str) -> Found | None: ...

    async def stream_nar(self, found: Found, sink: NarSink, head: bool = False) -> None: ...


class NarWriter(NarSource, Protocol):
    """A source that also takes NARs (the repo). Blocking: call these on worker threads."""

    def add_nar(self, narinfo: NarInfo | None, pieces: Iterable[bytes]) -> NarAddResult: ...

    def register_nar(self, root: CID, narinfo: NarInfo) -> None: ...


class Room(Protocol):
    """The node's quota keeper as the Nix cache uses it (node.QuotaKeeper)."""

    def working(self, clean_up_on_error: bool = False) -> AbstractAsyncContextManager[None]: ...

    async def make_room(self, size: int, what: str, in_operation: bool = True) -> None: ...


TakingBack = Callable[[str], AbstractAsyncContextManager[None]]  # node.taking_back_on_disk_full


class Swarm(Protocol):
    """The node's swarm as the Nix cache needs it (node.py's `NixSwarm` implements it over the host, the
    finder, the exchange and the node's one race policy)."""

    lookup_timeout: float

    @property
    def archives(self) -> "ArchiveSwarm":
        """Archives by alias, for the hashed mirror's sha1 fetches (prefetch.Prefetcher)."""

    @property
    def me(self) -> "ID | None": ...

    def ready(self) -> bool: ...

    async def race(self, alias: str, ask: Callable[["PeerInfo"], Awaitable[object]],
                   more: Sequence[Callable[[float], Awaitable[Iterable["PeerInfo"]]]] = (),
                   timeout: float | None = None, first: Sequence["PeerInfo"] = ()) -> ResolveRace["PeerInfo"]:
        """`first`: peers asked at once, beside the DHT lookup of `alias`'s providers."""

    async def resolve(self, peer: "PeerInfo", alias: str) -> ResolveAnswer | None: ...

    async def fetch_blocks(self, cids: list[CID], peers: list["PeerInfo"]) -> dict[CID, bytes]: ...

    async def find_providers(self, alias: str, timeout: float | None = None) -> list["PeerInfo"]: ...

    async def providers(self, alias: str, timeout: float | None = None) -> list["PeerInfo"]:
        """As `find_providers`, but a DHT walk that did not settle raises (`routing.LookupCut`)."""

    async def size_at_peers(self, alias: str, providers: list["PeerInfo"]) -> int | None: ...

    async def fetch(self, alias: str, progress: Callable[[int, int | None], None]) -> dict[str, object]: ...

    async def fetch_dag(self, root: CID, providers: list["PeerInfo"],
                        on_stored: Callable[[list[CID]], None] | None = None,
                        on_verified: Callable[[CID, bytes], None] | None = None,
                        root_block: bytes | None = None) -> int: ...


class NarStreams:
    """NAR bytes leaving the node: slots for slow clients, the worker threads they take, bytes counted."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.stream_threads = trio.CapacityLimiter(STREAM_THREADS)
        self.upload_threads = trio.CapacityLimiter(MAX_UPLOADS)
        self.pull_threads = trio.CapacityLimiter(PULL_THREADS)
        self._active = {"stream": 0, "upload": 0}

    @contextlib.contextmanager
    def upload_slot(self) -> Iterator[None]:
        from ..aio import thread_pool

        with self._slot("upload", "uploads", MAX_UPLOADS), thread_pool(self.upload_threads):
            yield

    @contextlib.contextmanager
    def stream_slot(self) -> Iterator[None]:
        with self._slot("stream", "downloads", MAX_STREAMS):
            yield

    @contextlib.contextmanager
    def _slot(self, kind: str, what: str, limit: int) -> Iterator[None]:
        """One of `limit` places for requests of `kind`; Busy (before any response) when all are taken."""
        if self._active[kind] >= limit:
            self.metrics.busy.labels(kind).inc()
            raise Busy(f"{limit} {what} are in progress; retry in a few seconds")
        self._active[kind] += 1
        try:
            yield
        finally:
            self._active[kind] -= 1

    async def send(self, sink: NarSink, size: int, make_iter: Callable[[], Iterator[bytes]], source: str,
                   head: bool, kind: str = "nar") -> None:
        if head:
            await sink.start(size, kind)
            await sink.end()
            return
        with self.stream_slot():  # Busy (before the response starts) when too many are in progress
            await sink.start(size, kind)
            await self.send_body(sink, make_iter, source)

    async def send_body(self, sink: NarSink, make_iter: Callable[[], Iterator[bytes]], source: str) -> None:
        sent = 0

        async def deliver(piece: bytes) -> None:
            nonlocal sent
            sent += len(piece)
            await sink.write(piece)

        # A CorruptData from the iterator arrives before its last piece: raising here, after the
        # response started, makes the server drop the connection with the body incomplete.
        await drain_thread(make_iter, deliver, limiter=self.stream_threads)
        await sink.end()
        self.metrics.served.labels(source).inc(sent)


class RepoSource:
    """This node's repo: narinfos and NARs it holds (store/narstore.py), and the one writer uploads and
    fetches go into."""

    name = "repo"
    label = "local"
    remote = False

    def __init__(self, narstore: RepoNarStore, streams: NarStreams) -> None:
        self.narstore = narstore
        self.repo: "Repo" = narstore.repo
        self.streams = streams

    async def narinfo(self, store_hash: str) -> Found | None:
        info = self.narstore.narinfo(store_hash)  # one indexed SQLite read: on this task, as it always was
        return Found(info, self) if info is not None else None

    async def stream_nar(self, found: Found, sink: NarSink, head: bool = False) -> None:
        root = self.narstore.root_of(found.narinfo.store_path.hash_part)
        await self.stream_root(root, found.narinfo.nar_hash.digest, sink, head, self.label)

    async def stream_root(self, root: CID, nar_digest: bytes, sink: NarSink, head: bool, label: str) -> None:
        """The NAR under manifest `root`, if it has NarHash `nar_digest` (else Missing)."""
        manifest = NarManifest.decode(await trio.to_thread.run_sync(self.repo.load_block, root))
        if manifest.nar_hash != nar_digest:
            raise Missing("the NAR held here has another hash")
        await self.streams.send(sink, manifest.nar_size, lambda: stream_nar_root(self.repo, root, manifest=manifest),
                                label, head)

    def add_nar(self, narinfo: NarInfo | None, pieces: Iterable[bytes]) -> NarAddResult:
        return self.narstore.add_nar(narinfo, pieces)

    def register_nar(self, root: CID, narinfo: NarInfo) -> None:
        """Claim a NAR whose blocks were verified as they came in (its NarHash checked on the way)."""
        self.narstore.register_nar(root, narinfo, verify=False)

    def has(self, store_hash: str) -> bool:
        return self.narstore.has(store_hash)

    def root_of(self, store_hash: str) -> CID:
        return self.narstore.root_of(store_hash)

    def root_by_nar_hash(self, digest: bytes) -> CID | None:
        """A complete NAR held under this NarHash (uploaded under another file name, fetched earlier)."""
        try:
            root = self.repo.resolve(HashKey("sha256", digest))
        except NotFound:
            return None
        info = self.repo.root_info(root)
        return root if info.kind == "nar" and info.complete else None

    def held_root(self, store_hash: str | None, nar_digest: bytes) -> CID | None:
        if store_hash is not None and self.narstore.has(store_hash):
            return self.narstore.root_of(store_hash)
        return self.root_by_nar_hash(nar_digest)


class NixStoreSource:
    """This machine's Nix store, read-only (store/localnix.py): narinfo from Nix's database, NARs dumped
    from disk and checked against it."""

    name = "nixstore"
    label = "nixstore"
    remote = False

    def __init__(self, store: interfaces.NarReader, streams: NarStreams) -> None:
        self.store = store
        self.streams = streams

    async def narinfo(self, store_hash: str) -> Found | None:
        info = await trio.to_thread.run_sync(self.store.narinfo, store_hash)
        return Found(info, self) if info is not None else None

    async def stream_nar(self, found: Found, sink: NarSink, head: bool = False) -> None:
        store_hash = found.narinfo.store_path.hash_part
        await self.streams.send(sink, found.narinfo.nar_size, lambda: self.store.stream_nar(store_hash),
                                self.label, head)


@dataclass(frozen=True)
class Intake:
    """What a remote source needs to bring a NAR into this node: the repo it is written to, the quota it
    must fit (and stop gc while its blocks are unclaimed), the disk-full take-back around it, the
    announcement once it is held, and the counters."""

    repo: RepoSource
    room: Room
    taking_back: TakingBack
    announce: Callable[[CID], None]
    metrics: Metrics


class UpstreamSource:
    """Upstream binary caches (store/httpcache.py), asked in their configured order: a NAR is pulled
    through into the repo (decompressed and verified on the way), announced, then streamed from there."""

    name = "upstreams"
    label = "upstream"
    remote = True

    def __init__(self, caches: list[HttpBinaryCache], intake: Intake) -> None:
        self.caches = caches
        self.intake = intake

    async def find(self, store_hash: str, errors: list[str] | None = None) -> Found | None:
        for upstream in self.caches:
            try:
                info = await upstream.narinfo(store_hash)
            except P2PCacheError as e:
                log.warning("upstream %s: %s", upstream.base, e)
                if errors is not None:
                    errors.append(str(e))
                continue
            if info is not None:
                return Found(info, self, upstream=upstream)
        return None

    async def narinfo(self, store_hash: str) -> Found | None:
        errors: list[str] = []
        found = await self.find(store_hash, errors)
        if found is None and errors:
            raise LookupFailed(f"{len(errors)} upstream cache(s) failed: {errors[0]}")
        return found

    async def stream_nar(self, found: Found, sink: NarSink, head: bool = False) -> None:
        info, repo = found.narinfo, self.intake.repo
        try:
            async with self.intake.taking_back("nar-from-upstream"):
                await self.pull(found)
        except P2PCacheError as e:
            raise (NoRoom if isinstance(e, DiskFull) else SourceFailed)(
                f"fetching the NAR of {info.store_path}: {e}") from None
        root = repo.root_of(info.store_path.hash_part)
        self.intake.announce(root)
        await repo.stream_root(root, info.nar_hash.digest, sink, head, self.label)

    async def pull(self, found: Found) -> None:
        """Download, decompress and verify the NAR from the upstream straight into the repo."""
        assert found.upstream is not None
        upstream, info = found.upstream, found.narinfo
        counted = [0]

        async def pieces() -> AsyncIterator[bytes]:
            async for piece in upstream.stream_nar_of(info):
                counted[0] += len(piece)
                yield piece

        repo = self.intake.repo
        async with self.intake.room.working():  # no quota gc while its blocks are unclaimed
            await feed_thread(pieces(), lambda it: repo.add_nar(info, it), limiter=repo.streams.pull_threads)
        self.intake.metrics.fetched.labels("upstream").inc(counted[0])


def narinfo_from_fields(fields: NarInfoFields, store_dir: str) -> NarInfo:
    """A narinfo from a peer's resolve answer (what it claims; checked against the manifest it sends)."""
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


class _InFlight:
    """How many asks are under way (`with in_flight:` around each), whether one answered, and `none()` to wait
    until none is under way."""

    def __init__(self) -> None:
        self.count = 0
        self.answered = False
        self._idle = trio.Event()

    def __enter__(self) -> None:
        self.count += 1

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.answered = self.answered or exc_type is None
        self.count -= 1
        if not self.count:
            self._idle.set()
            self._idle = trio.Event()

    async def none(self) -> None:
        while self.count:
            await self._idle.wait()


class SwarmSource:
    """Peers that announce the store path, then (unless this node is a gateway itself) the gateways, in one
    race (`Swarm.race`, the node's one policy); the NAR streams to Nix while its blocks arrive."""

    name = "swarm"
    label = "peer"
    remote = True

    def __init__(self, swarm: Swarm, intake: Intake, store_dir: str, ask_gateways: bool,
                 patience: float | None = None) -> None:
        self.swarm = swarm
        self.patience = patience  # the race's deadline (None: the swarm's lookup_timeout)
        self.intake = intake
        self.metrics = intake.metrics
        self.store_dir = store_dir
        self.ask_gateways = ask_gateways
        self.prefetches: NarPrefetches | None = None  # set by the cache when `nix.prefetch_nars` is on
        # The peers that answered the last lookups, most recent last: a closure's paths mostly come from
        # the same few peers, so the next lookup asks them at once beside its DHT walk (`Swarm.race`'s
        # `first`) instead of only after it; one that fails or times out is forgotten.
        self._recent: dict[object, "PeerInfo"] = {}

    async def narinfo(self, store_hash: str) -> Found | None:
        """One race over the path's providers and then, unless we are a gateway ourselves, the gateways':
        all asked in parallel, staggered, under one deadline of `lookup_timeout`. An answer counts once its
        NAR manifest root, fetched from that peer, carries the NarHash and NarSize the peer claims."""
        swarm = self.swarm
        if not swarm.ready():  # not "nobody has it": nobody was asked
            raise LookupFailed("the swarm is not up yet")
        alias = nix_alias(store_hash)
        me = swarm.me
        asking = _InFlight()

        async def ask(peer: "PeerInfo") -> tuple[NarInfo, CID, bytes]:
            with asking:
                return await check(peer)

        async def check(peer: "PeerInfo") -> tuple[NarInfo, CID, bytes]:
            timeline.debug("narinfo %s: resolve asked of %s", store_hash, peer.peer_id)
            answer = await swarm.resolve(peer, alias)
            timeline.debug("narinfo %s: resolve answered by %s", store_hash, peer.peer_id)
            if answer is None:
                raise NotHeld()
            if answer.kind != "nar" or answer.narinfo is None or answer.root.codec != DAG_CBOR:
                raise InvalidInput(f"answered {answer.root} ({answer.kind}), not a NAR manifest with its narinfo")
            info = narinfo_from_fields(answer.narinfo, self.store_dir)
            if info.store_path.hash_part != store_hash:
                raise InvalidInput(f"answered a narinfo for another path, {info.store_path}")
            # The manifest root is small: check it carries the NarHash the peer claims before we
            # hand that claim to Nix. It comes with the answer (else it is fetched): bytes that do not hash
            # to the root the peer named are a lie like any other block's.
            root_block = answer.root_block
            if root_block is None:
                blocks = await swarm.fetch_blocks([answer.root], [peer])
                timeline.debug("narinfo %s: manifest root fetched from %s", store_hash, peer.peer_id)
                root_block = blocks.get(answer.root)
                if root_block is None:
                    raise InvalidInput(f"did not send the manifest root {answer.root}")
            elif not answer.root.verify(root_block):
                log.warning("peer %s: the root block in its answer for %s does not hash to %s", peer.peer_id, alias,
                            answer.root)
                raise CorruptData(f"the root block in its answer does not hash to {answer.root}")
            manifest = NarManifest.decode(root_block)
            if manifest.nar_hash != info.nar_hash.digest or manifest.nar_size != info.nar_size:
                log.warning("peer %s: NAR manifest %s does not match its narinfo for %s", peer.peer_id,
                            answer.root, alias)
                raise CorruptData(f"its NAR manifest {answer.root} does not match its narinfo")
            return info, answer.root, root_block

        async def gateways(timeout: float) -> list["PeerInfo"]:
            # Only once no provider is being asked any more (the race ends when one answers, and this with it),
            # or GATEWAY_DELAY after the providers' lookup: the lookup of the gateways' marker is a DHT walk
            # beside the asks on this node's one event loop, and a miss in a swarm without gateways.
            with trio.move_on_after(GATEWAY_DELAY):
                await trio.sleep(GATEWAY_SETTLE)  # the race asks the providers the walk has just named
                await asking.none()
            if asking.answered:
                return []  # the race has its answer (and ends this lookup at once)
            timeline.debug("narinfo %s: gateway lookup begins", store_hash)
            try:
                return [p for p in await swarm.providers(str(GATEWAY_MARKER), timeout=timeout) if p.peer_id != me]
            finally:
                timeline.debug("narinfo %s: gateway lookup ends", store_hash)

        # A gateway pulls the path through from its upstreams before it answers, so gateways are
        # asked after the providers themselves (the race's second tier).
        first = list(reversed(self._recent.values()))
        timeline.debug("narinfo %s: race begins (%d recent)", store_hash, len(first))
        race = await swarm.race(alias, ask, (gateways,) if self.ask_gateways else (), timeout=self.patience,
                                first=first)
        self._remember_winner(race, first)
        timeline.debug("narinfo %s: race ends (%s)", store_hash, race.outcome.value)
        if race.winner is None:
            if race.outcome is not RaceOutcome.MISS:
                cut = f", {race.sources_failed} DHT lookup(s) did not finish" if race.sources_failed else ""
                log.info("lookup of %s: %d provider(s), none answered validly in time%s (%s)", alias,
                         race.peers_known, cut, race.stats)
                self.metrics.lookup_failures.inc()
                raise LookupFailed(f"{alias}: {race.peers_known} provider(s), none answered validly in time{cut}")
            return None
        peer, (info, root, root_block) = race.winner
        asked_only = {p.peer_id for p in first}  # not among the DHT's providers unless they answered
        rest = [p for p in race.peers_in(AskState.QUEUED, AskState.CANCELLED) if p.peer_id not in asked_only]
        return Found(info, self, root=root, root_block=root_block, providers=[peer, *rest])

    def _remember_winner(self, race: ResolveRace["PeerInfo"], asked_first: list["PeerInfo"]) -> None:
        for p in asked_first:
            if race.state_of(p) in (AskState.FAILED, AskState.TIMED_OUT):
                self._recent.pop(p.peer_id, None)
        if race.winner is not None:
            peer = race.winner[0]
            self._recent.pop(peer.peer_id, None)
            self._recent[peer.peer_id] = peer
            while len(self._recent) > RECENT_PROVIDERS:
                del self._recent[next(iter(self._recent))]

    async def stream_nar(self, found: Found, sink: NarSink, head: bool = False) -> None:
        async with self.intake.taking_back("nar-from-peers"):
            await self._stream_from_peers(found, sink)

    async def _stream_from_peers(self, found: Found, sink: NarSink) -> None:
        """Stream the NAR to Nix while its blocks arrive from peers: the fetch stores verified blocks in
        depth-first order (NAR order) and says which; a `NarAssembly` on this task turns each block into
        NAR bytes the moment it is there, with no thread waiting for arrivals. The NarHash is checked as
        it streams (a mismatch, or a failed fetch, aborts the response before its last byte); the root
        is registered only after both finished."""
        source = self.intake.repo
        repo = source.repo
        root = found.root
        assert root is not None
        name = found.narinfo.store_path.hash_part
        timeline.debug("nar %s: stream begins", name)
        prefetch = self.prefetches.take(found) if self.prefetches is not None else None
        if prefetch is not None:  # the fetch began when Nix got the narinfo: stream what it brings
            arriving, counted = prefetch.arriving, prefetch.counted
            arriving.hold = ARRIVING_BYTES
        else:
            arriving, counted = ArrivingBlocks(repo), [0]

        def verified(cid: CID, data: bytes) -> None:  # counted as they arrive: Nix may finish first
            counted[0] += len(data)
            self.metrics.fetched.labels("peer").inc(len(data))
            arriving.verified(cid, data)

        fetch_ended = trio.Event()

        async def fetcher() -> None:
            try:
                await self._fetch_patiently(found, arriving, verified, counted)
            except P2PCacheError as e:
                arriving.fail(e)
                return
            finally:
                fetch_ended.set()
            arriving.finish()

        # No quota gc between fetch attempts either: the stream reads blocks no root claims yet.
        with source.streams.stream_slot():  # Busy (before the response starts) when too many are in progress
            async with self.intake.room.working(), trio.open_nursery() as nursery:
                if prefetch is None:
                    nursery.start_soon(fetcher)
                manifest = NarManifest.decode(await arriving.get(root))
                timeline.debug("nar %s: manifest at hand", name)
                await sink.start(manifest.nar_size, "nar")
                assembly = NarAssembly(manifest)
                pieces = assembly.start()
                sent = 0
                out: list[bytes] = []  # pieces joined into larger writes: a tree of small files is
                size = 0  # thousands of small pieces, and each write is a trip through h11 and a syscall
                while True:
                    out += pieces
                    size += sum(len(p) for p in pieces)
                    cid = assembly.need()
                    if out and (cid is None or size >= SEND_BYTES or not arriving.ready(cid)):
                        body = out[0] if len(out) == 1 else b"".join(out)  # never wait holding bytes
                        out, size = [], 0
                        if not sent:
                            timeline.debug("nar %s: first bytes to Nix", name)
                        sent += len(body)
                        await sink.write(body)
                    if cid is None:
                        break
                    # A CorruptData or FetchError raised here, after the response started, makes the server
                    # drop the connection with the body incomplete.
                    pieces = assembly.give(await arriving.get(cid))
                await sink.end()
                timeline.debug("nar %s: last byte to Nix", name)
                self.metrics.served.labels("peer").inc(sent)
                # Its last blocks committed (or it failed) before the root is claimed, and claimed inside the
                # quota guard: no gc between the last block and the root that claims them.
                await (prefetch.done if prefetch is not None else fetch_ended).wait()
                if arriving.failure is not None:  # the stream completed from blocks we had, yet the fetch failed
                    raise arriving.failure
                await trio.to_thread.run_sync(source.register_nar, root, found.narinfo)
        self.intake.announce(root)

    async def _fetch_patiently(self, found: Found, arriving: "ArrivingBlocks",
                               verified: Callable[[CID, bytes], None], counted: list[int]) -> None:
        """Fetch the NAR's DAG, trying again after an attempt failed or went `FETCH_STALL` seconds without a
        block (a fallback waiting on a peer that is gone), for as long as `FETCH_PATIENCE` allows: each
        attempt resumes from the blocks stored, with the providers a fresh lookup names first, then those
        known before."""
        root = found.root
        assert root is not None
        providers = list(found.providers)
        alias = nix_alias(found.narinfo.store_path.hash_part)
        backoff = FETCH_RETRY_FIRST
        progress_at = [trio.current_time()]

        def on_verified(cid: CID, data: bytes) -> None:
            progress_at[0] = trio.current_time()
            verified(cid, data)

        def on_stored(cids: list[CID]) -> None:
            progress_at[0] = trio.current_time()
            arriving.stored(cids)

        while True:
            error: P2PCacheError | None = None
            began = trio.current_time()
            with trio.CancelScope() as attempt:
                async with trio.open_nursery() as nursery:
                    async def watch() -> None:
                        while (stall_at := max(began, progress_at[0]) + FETCH_STALL) > trio.current_time():
                            await trio.sleep_until(stall_at)
                        attempt.cancel()

                    nursery.start_soon(watch)
                    try:
                        fetched = await self.swarm.fetch_dag(root, providers, on_stored, on_verified,
                                                             root_block=found.root_block)
                    except (CorruptData, DiskFull):
                        raise  # never papered over; a full disk stays full
                    except P2PCacheError as e:
                        error = e
                    nursery.cancel_scope.cancel()
            if attempt.cancelled_caught:
                error = FetchStalled(f"no block for {FETCH_STALL:g} s")
            if error is None:
                self.metrics.fetched.labels("peer").inc(max(0, fetched - counted[0]))
                return
            now = trio.current_time()
            if now - progress_at[0] + backoff > FETCH_PATIENCE:
                raise error
            self.metrics.fetch_retries.inc()
            log.info("fetching the NAR of %s from %d provider(s): %s; trying again in %g s", alias, len(providers),
                     error, backoff)
            await trio.sleep(backoff)
            backoff = min(2 * backoff, FETCH_RETRY_MAX)
            try:
                fresh = await self.swarm.find_providers(alias, timeout=self.swarm.lookup_timeout)
            except P2PCacheError as e:
                log.info("looking up providers of %s again: %s", alias, e)
                fresh = []
            me = self.swarm.me
            merged: dict[object, "PeerInfo"] = {}
            for p in [*fresh, *providers]:
                if p.peer_id != me:
                    merged.setdefault(p.peer_id, p)
            providers = list(merged.values())


@dataclass
class _Prefetch:
    found: Found
    arriving: "ArrivingBlocks"
    counted: list[int] = field(default_factory=lambda: [0])
    done: trio.Event = field(default_factory=trio.Event)  # the fetch ended (finished or failed)
    taken: trio.Event = field(default_factory=trio.Event)  # a NAR request streams it
    began: bool = False  # its turn came (`NarPrefetches.limit`)
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)  # a request came before its turn


class NarPrefetches:
    """NAR fetches begun when Nix got a narinfo from the swarm, before it asks for the NAR: Nix 2.8 asks for
    every narinfo of a closure first and then for the NARs one after another, so without this each NAR's
    fetch starts only when Nix asks for it. A NAR request for a path whose prefetch is under way (or done)
    streams what it brings (`take`): the blocks are the same verified blocks, the NarHash is checked as the
    stream goes and the root claimed only after that, exactly as for a fetch the request starts itself.

    Owns the prefetches not taken yet. Bounded: at most `limit` fetch at once (the others wait their turn, in
    the order Nix asked), at most `PREFETCH_WAITING` and `PREFETCH_BYTES` of NAR are not taken yet (more
    narinfos fetch nothing ahead); each holds off quota gc (`Room.working`) until its NAR is asked for or
    `PREFETCH_TTL` after its fetch ended — then its blocks are unclaimed garbage for gc, and a later request
    fetches what is missing. Memory: a running prefetch keeps `PREFETCH_HOLD` of verified blocks for the
    stream, a finished one none (the stream reads them back from the repo)."""

    def __init__(self, source: "SwarmSource", limit: int) -> None:
        self.source = source
        self.limit = limit
        self._by_path: dict[str, _Prefetch] = {}
        self._bytes = 0
        self._running = trio.CapacityLimiter(max(1, limit))
        self._background = Background("NarPrefetches")

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Background task (the node's): the nursery prefetches run in."""
        await self._background.run(task_status=task_status)

    def __len__(self) -> int:
        return len(self._by_path)

    def start(self, found: Found) -> bool:
        """Begin fetching the NAR of a narinfo the swarm answered (no-op if one is under way, or over the
        bounds). True if it began."""
        store_hash = found.narinfo.store_path.hash_part
        if not self._background.running or found.root is None or store_hash in self._by_path:
            return False
        size = found.narinfo.nar_size
        if len(self._by_path) >= PREFETCH_WAITING or self._bytes + size > PREFETCH_BYTES:
            self.source.metrics.prefetches.labels("skipped").inc()
            return False
        prefetch = _Prefetch(found, ArrivingBlocks(self.source.intake.repo.repo, hold=PREFETCH_HOLD))
        self._by_path[store_hash] = prefetch
        self._bytes += size
        self.source.metrics.prefetches.labels("started").inc()
        self._background.start_soon(self._fetch, store_hash, prefetch)
        return True

    def take(self, found: Found) -> _Prefetch | None:
        """The prefetch of `found`'s NAR (same manifest root), for the request that streams it now; None if
        there is none (or it failed: the request fetches afresh, resuming from what it stored)."""
        store_hash = found.narinfo.store_path.hash_part
        prefetch = self._by_path.get(store_hash)
        if prefetch is None or prefetch.found.root != found.root or prefetch.arriving.failure is not None:
            return None
        del self._by_path[store_hash]
        self._bytes -= prefetch.found.narinfo.nar_size
        if not prefetch.began:  # still waiting its turn: the request fetches it itself, now
            prefetch.cancel.cancel()
            return None
        prefetch.taken.set()
        self.source.metrics.prefetches.labels("taken").inc()
        return prefetch

    async def _fetch(self, store_hash: str, prefetch: _Prefetch) -> None:
        metrics = self.source.metrics

        def verified(cid: CID, data: bytes) -> None:  # counted as they arrive, as a request's own fetch does
            prefetch.counted[0] += len(data)
            metrics.fetched.labels("peer").inc(len(data))
            prefetch.arriving.verified(cid, data)

        with prefetch.cancel:
            await self._fetch_for(store_hash, prefetch, verified)
        if prefetch.cancel.cancelled_caught:
            metrics.prefetches.labels("superseded").inc()

    async def _fetch_for(self, store_hash: str, prefetch: _Prefetch, verified: Callable[[CID, bytes], None]) -> None:
        source, info = self.source, prefetch.found.narinfo
        metrics = source.metrics
        repo = source.intake.repo.repo
        try:
            async with self._running:
                prefetch.began = True
                await source.intake.room.make_room(info.nar_size, f"the NAR of {info.store_path}",
                                                   in_operation=False)
                async with source.intake.room.working():  # no quota gc while its blocks wait unclaimed
                    # A full disk is not counted here: the NAR request meets it (taking this prefetch's failure,
                    # or fetching afresh) and counts it once; what this fetch stored is taken back here.
                    with repo.recording_blocks() as written:
                        try:
                            await source._fetch_patiently(prefetch.found, prefetch.arriving, verified,
                                                          prefetch.counted)
                        except DiskFull as e:
                            with trio.CancelScope(shield=True):
                                await trio.to_thread.run_sync(repo.drop_unclaimed_blocks, written)
                            prefetch.arriving.fail(e)
                        except P2PCacheError as e:
                            prefetch.arriving.fail(e)
                        else:
                            prefetch.arriving.finish()
                    prefetch.done.set()
                    if not prefetch.taken.is_set():
                        prefetch.arriving.drop_held()  # in the repo; a stream reads them from there
                    with trio.move_on_after(PREFETCH_TTL):
                        await prefetch.taken.wait()
        except P2PCacheError as e:  # no room for it: the request will say so
            prefetch.arriving.fail(e)
        finally:
            prefetch.done.set()
            if self._by_path.get(store_hash) is prefetch:  # not taken (a request removes what it takes)
                del self._by_path[store_hash]
                self._bytes -= info.nar_size
            if prefetch.began and prefetch.arriving.failure is not None:
                metrics.prefetches.labels("failed").inc()
                log.info("prefetch of the NAR of %s: %s", info.store_path, prefetch.arriving.failure)
            elif prefetch.began and not prefetch.taken.is_set():
                metrics.prefetches.labels("expired").inc()


class FetchStalled(P2PCacheError):
    """A fetch attempt that went `FETCH_STALL` seconds without a block: it is cancelled and tried again."""


class ArrivingBlocks:
    """Blocks of one fetch as they arrive: `get(cid)` returns a block's verified bytes — from memory if
    the fetch handed them over verified (`verified`, at most `ARRIVING_BYTES` held), else from the repo
    once it holds the block (read on a worker thread, never waiting there) — waiting on this task until
    then. A stream slower than the fetch (Nix unpacking a tree of small files) finds most blocks spilled to
    the repo: those are read back a run at a time in arrival order (`_run_from`), one thread hop per run."""

    def __init__(self, repo: "Repo", hold: int = ARRIVING_BYTES) -> None:
        self.repo = repo
        self.hold = hold  # verified bytes kept in memory at most
        self._held: dict[CID, bytes] = {}
        self._held_bytes = 0
        # Verified blocks not held (over `hold`), in arrival order (NAR order, as the fetch walks depth
        # first): `get` reads the next run of them back from the repo in one thread call, not one each.
        self._spilled: list[tuple[CID, int]] = []
        self._spilled_at: dict[CID, int] = {}
        self._read: dict[CID, bytes] = {}  # read back ahead of the stream (`READBACK_BYTES` at most)
        self._stored: set[CID] = set()
        self._waiting: dict[CID, trio.Event] = {}
        self.failure: BaseException | None = None
        self._finished = False

    def verified(self, cid: CID, data: bytes) -> None:
        if self._held_bytes + len(data) <= self.hold and cid not in self._held:
            self._held[cid] = data
            self._held_bytes += len(data)
            ev = self._waiting.pop(cid, None)
            if ev is not None:
                ev.set()
        elif cid not in self._held:
            self._spill(cid, len(data))

    def _spill(self, cid: CID, size: int) -> None:
        if cid not in self._spilled_at:
            self._spilled_at[cid] = len(self._spilled)
            self._spilled.append((cid, size))

    def stored(self, cids: list[CID]) -> None:
        for c in cids:
            self._stored.add(c)
            ev = self._waiting.pop(c, None)
            if ev is not None:
                ev.set()

    def drop_held(self) -> None:
        """Forget the blocks held in memory (they are in the repo; `get` reads them from there)."""
        spilled, self._spilled, self._spilled_at = self._spilled, [], {}
        for cid, data in self._held.items():  # they arrived before those spilled: the hold filled first
            self._spill(cid, len(data))
        for cid, size in spilled:
            self._spill(cid, size)
        self._held.clear()
        self._held_bytes = 0
        self._read.clear()

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
        data = self._read.pop(cid, None)
        if data is not None:
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
        run = self._run_from(cid)
        if len(run) <= 1:
            return await trio.to_thread.run_sync(self.repo.load_block, cid)
        loaded = await trio.to_thread.run_sync(lambda: list(self.repo.load_blocks(run)))
        self._read = {c: d for (c, _), d in zip(run[1:], loaded[1:])}  # what the last run left is dropped
        return loaded[0]

    def _run_from(self, cid: CID) -> list[tuple[CID, int]]:
        """`cid` and the spilled blocks stored after it, in arrival order, up to `READBACK_BYTES`: what the
        stream will most likely ask for next (a block it asks for out of that order is read alone)."""
        at = self._spilled_at.get(cid)
        if at is None:
            return [(cid, 0)]
        spilled, stored, held = self._spilled, self._stored, self._held
        run = [spilled[at]]
        size = run[0][1]
        for other, n in spilled[at + 1:at + READBACK_BLOCKS]:
            if other not in stored or size + n > READBACK_BYTES:
                break
            if other not in held:
                run.append((other, n))
                size += n
        return run
