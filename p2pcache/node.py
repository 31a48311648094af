"""A p2pcache node: one repo, one libp2p host, the bitswap exchange, the DHT and the resolve protocol,
and the local HTTP API — composed and run in one trio nursery.

Getting an archive by any key goes: the local repo → the DHT (providers of the key's alias, bounded by
`lookup_timeout`, misses cached) → the resolve protocol (ask the providers which root they hold for
the key: happy eyeballs over all of them, staggered, under one deadline, `routing.race`) → the
manifest root block from the same peer, checked to carry the hash that was asked for (a liar loses
the race and is demoted) → the rest of the archive over bitswap, every block verified → registered in the repo
and announced. Nothing a peer says is trusted before the bytes prove it.

Concurrency: the repo has one owner, this node. Repo calls that write or hash run in worker threads;
the index serialises its transactions, so an add, a fetch and the bitswap server can run at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable, Sequence, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.trio import tcp_server as hypercorn_tcp
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from . import __version__
from .config import NodeConfig
from .content.cid import CID, DAG_CBOR
from .content.keys import HashKey, RootKey, parse_key
from .content.manifest import ArchiveManifest, ChunkIndex
from .errors import CorruptData, DiskFull, InvalidInput, MalformedBlock, NotFound, P2PCacheError, leaf_error
from .apitoken import new_token, write_netrc
from .exchange import ClientConfig, ServerConfig
from .http.api import make_app
from .http.asgi import Receive, Scope, Send, bounded_bodies
from .http.guard import AccessPolicy
from .nixcache import GATEWAY_MARKER, NixBinaryCache
from .net.bitswap import BitswapExchange, FetchError, RepoBlockSource
from .net.dagxfer import DagConfig, DagTransfer
from .net.host import HostConfig, NodeHost
from .net.peers import Host
from .routing import (DHT, AnnouncerConfig, AskState, DHTConfig, FinderConfig, NotHeld, ProviderAnnouncer,
                      ProviderFinder, ProviderStanding, NarInfoFields, RaceOutcome, ResolveAnswer, ResolveRace,
                      ResolveServer, race_providers, resolve)
from .routing.interfaces import ProviderRouting
from .store.repo import Repo

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

    from .buildcache import BuildCache
    from .content.lockfiles import Dependency

from .routing.resolve_wire import MAX_ROOT_BLOCK

log = logging.getLogger(__name__)
timeline = logging.getLogger("p2pcache.timeline")  # debug lines of a cold copy's timeline (bench/nixcopy.py)

ProgressFn = Callable[[int, int | None], None]
RACE_STAGGER = 0.2  # seconds between asking one provider and the next (happy eyeballs)
API_RECV_BYTES = 1 << 20  # the API server reads a connection this much at a time (see serve_api)


class _CountingSource(RepoBlockSource):
    """The repo as the bitswap server sees it, counting what it hands out."""

    def __init__(self, repo: Repo) -> None:
        super().__init__(repo)
        self.blocks_served = 0
        self.bytes_served = 0

    def get(self, cid: CID) -> bytes | None:
        data = super().get(cid)
        self._count(data)
        return data

    def get_many(self, cids: Sequence[CID]) -> list[bytes | None]:
        # The batched read (one index query, one pread per run of records), counted here: through `get`,
        # a DAG stream's every block was an index query and a pread of its own.
        out = self._read_many(cids)
        for data in out:
            self._count(data)
        return out

    def _count(self, data: bytes | None) -> None:
        if data is not None:
            self.blocks_served += 1
            self.bytes_served += len(data)


def exchange_configs(cfg: NodeConfig) -> tuple[ClientConfig, ServerConfig]:
    """The bitswap engines' settings for `[exchange]`: swarm mode in the client, super-seeding in the
    server. Twice bitswap's message size may be outstanding per peer (the next batch is ready while the
    previous one is written). A CID every asked peer refused waits for a HAVE: in swarm mode up to 30 s,
    otherwise, when super-seeding is on, up to 5 s or four windows (the peers this node fetches from run
    the same [exchange] settings as it does, as a team's fleet does, and a seed that refused a block
    says HAVE when its window ends; the slack covers a slow link's delay of that HAVE)."""
    if cfg.swarm_fetch:
        # As simnet's fleet-fanout: want-have to every connected peer (each keeps it and says HAVE
        # when the block reaches it), for every CID wanted at once, and the cancels of those watches
        # riding along with the next message. With the engine's 2-entry fan-out and 64-want window,
        # discovery stalled and fetches waited out timeouts (node-fetch 20 x 16 MiB, LAN mesh: p50
        # 10 s). fleet-fanout's two want-blocks per peer measured 1.7x there, but cut a lone fetch
        # from one WAN provider over bitswap to 0.4x its speed: the window stays the engine's.
        client = ClientConfig(want_block_unproven=False, dont_have_wait=max(30.0, 2 * cfg.superseed_window),
                              have_fanout=64, peer_have_window=4096, cancel_delay=2.0)
    else:
        # A super-seeding seed refuses a block for up to its window: wait that long for its HAVE
        # rather than fail the block (and the fetch) at the first DONT_HAVE.
        client = ClientConfig(dont_have_wait=max(5.0, 4 * cfg.superseed_window) if cfg.superseed_window else 0.0)
    return client, ServerConfig(max_outstanding_bytes=8 << 20, superseed_window=cfg.superseed_window,
                                have_batch_delay=cfg.have_batch_delay, superseed_share=cfg.superseed_share,
                                superseed_relay_window=cfg.superseed_relay_window)


@dataclass
class NodeStats:
    fetches: int = 0
    fetch_failures: int = 0
    bytes_fetched: int = 0
    bytes_fetched_origin: int = 0
    local_hits: int = 0
    disk_full: int = 0


def root_aliases(repo: Repo, root: CID) -> list[str]:
    info = repo.root_info(root)
    return [str(root), *info.aliases]


class Node:
    """The daemon's composition of repo, host, exchange, routing and HTTP API.

    By default `run` builds everything itself: a `NodeHost` from `config` and the repo's identity key,
    the `DHT` on it, and the HTTP API. Two injection points let another network layer carry the same
    node (simnet runs real Nodes over simulated hosts this way; p2pcache never imports it):

    - `host`: a `net.peers.Host` (the Protocol `NodeHost` satisfies: `run`, `peer_id`, `addrs`, `new_stream`,
      `set_stream_handler`, `connected_peers`, `disconnect`, `subscribe`, `add_addrs`); used instead of
      building a `NodeHost`, so `config.listen`, `bootstrap`, `swarm_key` and `allow_peers` are the
      injected host's business and the repo's identity key is not read.
    - `dht`: a `routing.interfaces.ProviderRouting` (the Protocol `DHT` satisfies, as `ProviderAnnouncer` /
      `ProviderFinder` use it); used instead of building `DHT(host)`.
    - `serve_api=False`: no HTTP API and no `api.json` (`api_url` stays None).
    """

    def __init__(self, repo_path: Path, config: NodeConfig, *, host: Host | None = None,
                 dht: ProviderRouting | None = None, serve_api: bool = True):
        self.repo_path = Path(repo_path)
        self.config = config
        self.stats = NodeStats()
        self.repo: Repo | None = None
        self.host: Host | None = None
        self.exchange: BitswapExchange | None = None
        self.dag: DagTransfer | None = None
        self.dht: ProviderRouting | None = None
        self._given_host = host
        self._given_dht = dht
        self.serve_api = serve_api
        self.announcer: ProviderAnnouncer | None = None
        self._lazy_hashes: trio.MemorySendChannel | None = None  # roots whose sha512 is still to compute
        self.finder: ProviderFinder | None = None
        self.source: _CountingSource | None = None
        self.api_url: str | None = None
        self.nix: NixBinaryCache | None = None
        self.buildcache: BuildCache | None = None
        self.api_token: str | None = None
        self.files_socket: Path | None = None  # REPO/files.sock, once it listens (`_serve_file_socket`)
        self.started_at = time.time()
        # Providers that failed, lied or timed out lately: asked last by the next lookups.
        self.standing: ProviderStanding = ProviderStanding()
        self.quota = QuotaKeeper(self)

    # -- running ------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Open everything, serve until cancelled. `task_status.started(self)` once listening."""
        repo = Repo.open(self.repo_path, writable=True) if Repo.exists(self.repo_path) else Repo.init(self.repo_path)
        self.repo = repo
        try:
            cfg = self.config
            if self._given_host is not None:
                self.host = self._given_host
            else:
                host_cfg = HostConfig.from_files(
                    identity=self.repo_path / "identity.key",
                    swarm_key_file=cfg.swarm_key_path(self.repo_path),
                    listen=tuple(cfg.listen),
                    bootstrap=tuple(cfg.bootstrap),
                    allow_peers=cfg.allow_peers or None,
                    alone_warning=cfg.alone_warning,
                    handshake_timeout=cfg.handshake_timeout,
                    mdns=cfg.lan_discovery(),
                )
                self.host = NodeHost(host_cfg)
            self.source = _CountingSource(repo)
            self.nix = self._build_nix_cache()
            self.nix.drop_unclaimed_nars()
            # The DHT is built before the host dials anyone, so peers see our DHT protocol from the start.
            self.dht = self._given_dht if self._given_dht is not None else DHT(self.host, DHTConfig())
            async with trio.open_nursery() as nursery:
                await nursery.start(self.host.run)
                client_config, server_config = exchange_configs(cfg)
                self.exchange = BitswapExchange(self.host, self.source, client_config, server_config)
                await nursery.start(self.exchange.run)
                self.dag = DagTransfer(self.host, self.exchange, DagConfig(stall_seconds=cfg.transfer_stall_timeout))
                self.dag.server(self.source).register(self.host)
                await nursery.start(self.dht.run)
                self.announcer = ProviderAnnouncer(self.dht, AnnouncerConfig(interval=cfg.reannounce_interval))
                for info in repo.index.list_roots():
                    if info.complete:
                        self.announcer.add(info.root, info.aliases)
                if self.nix.upstreams:
                    self.announcer.add(GATEWAY_MARKER, ())
                nursery.start_soon(self.announcer.run)
                nursery.start_soon(self.nix.run_upload_expiry)
                nursery.start_soon(self.nix.run_lookahead)
                await nursery.start(self.nix.run_lookups)
                nursery.start_soon(self._reannounce_on_new_peers)
                nursery.start_soon(self.quota.run)  # the quota, and the blocks a failed fetch left
                self._lazy_hashes, lazy = trio.open_memory_channel(float("inf"))
                nursery.start_soon(self._hash_lazily, lazy)
                for root in repo.index.archives_without("sha512"):
                    self._lazy_hashes.send_nowait(root)
                backoff = getattr(self.host, "dial_backoff", None)  # NodeHost's (simnet's hosts have none)
                self.finder = ProviderFinder(self.dht, FinderConfig(negative_ttl=cfg.negative_ttl,
                                                                    default_timeout=cfg.lookup_timeout),
                                             dialable=None if backoff is None else
                                             lambda peer: not backoff.is_blocked(str(peer)))
                ResolveServer(lookup=self._answer_resolve).register(self.host)
                self._start_build_cache(nursery)
                if self.serve_api:
                    self.api_token = new_token(self.repo_path)
                    binds = await nursery.start(self._serve_api)
                    self.api_url = binds[0] if binds else None
                    self.files_socket = await nursery.start(self._serve_file_socket)
                    self._write_api_file()
                task_status.started(self)
                try:
                    await trio.sleep_forever()
                finally:
                    if self.serve_api:
                        self._remove_api_file()
                    with trio.CancelScope(shield=True):
                        await self.nix.aclose()
        finally:
            repo.close()

    def _build_nix_cache(self) -> NixBinaryCache:
        """The Nix binary cache service over this node's repo, swarm and quota; `/metrics` renders its
        registry, which also carries the node's own collectors."""
        from .http.node_metrics import register_node_metrics

        assert self.repo is not None
        cache = NixBinaryCache(self.repo, self.config.nix, swarm=NixSwarm(self), room=self.quota,
                               taking_back=self.taking_back_on_disk_full, announce=self.announce)
        register_node_metrics(cache.metrics.registry, self)
        return cache

    def _start_build_cache(self, nursery: trio.Nursery) -> None:
        """The build cache service over this node's repo, identity and swarm; it answers the cache-records
        protocol and evicts idle trees hourly."""
        from .buildcache import BuildCache, RecordStore
        from .net.host import load_identity
        from .routing.cacherecords import CacheRecordsServer

        assert self.repo is not None and self.host is not None
        pair = getattr(self.host, "key_pair", None) or load_identity(self.repo_path / "identity.key")
        self.buildcache = BuildCache(self.repo, RecordStore(self.repo_path / "buildcache.sqlite"), pair.private_key,
                                     pair.public_key.serialize(), self.config.buildcache, swarm=_BuildCacheSwarm(self),
                                     guard=self.quota)
        cache = self.buildcache
        CacheRecordsServer(lookup=cache.records_for_peer).register(self.host)
        cache.announce_held()

        async def expire_hourly() -> None:
            while True:
                try:
                    report = await cache.expire_async()
                    if report["expired"]:
                        log.info("build cache: evicted %d idle trees", len(report["expired"]))
                except P2PCacheError as e:
                    log.warning("build cache: eviction failed: %s", e)
                await trio.sleep(3600)

        nursery.start_soon(expire_hourly)
        assert self.buildcache.leases is not None
        nursery.start_soon(self.buildcache.leases.run)

    async def _reannounce_on_new_peers(self) -> None:
        """A sweep that reached nobody (we started before our peers) is redone when a peer turns up,
        instead of waiting for the next scheduled sweep."""
        assert self.host is not None and self.announcer is not None
        settled_failures = 0
        events = self.host.subscribe()
        async for event in events:
            if not event.connected or self.announcer.stats.failed <= settled_failures:
                continue
            await trio.sleep(1.0)  # let the DHT learn the new peer (and any others arriving together)
            while True:  # drain events that came in meanwhile
                try:
                    events.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            settled_failures = self.announcer.stats.failed
            await self.announcer.sweep()

    async def _serve_file_socket(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """`REPO/files.sock` (`p2pcache.filesocket`): a local saver's files as open descriptors."""
        from .filesocket import serve_file_socket

        assert self.api_token is not None and self.buildcache is not None
        await serve_file_socket(self.repo_path, self.api_token, self.buildcache.file_session, task_status=task_status)

    async def _serve_api(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        hc = HypercornConfig()
        hc.bind = [self.config.api_listen]
        hc.accesslog = None
        hc.errorlog = logging.getLogger("p2pcache.http")
        hc.graceful_timeout = 1.0
        assert self.api_token is not None
        policy = AccessPolicy(token=self.api_token, listen_host=self.config.api_listen.rsplit(":", 1)[0],
                              allowed_hosts=tuple(self.config.api_allowed_hosts),
                              allowed_origins=tuple(self.config.api_allowed_origins), repo=str(self.repo_path))
        # started(["http://host:port", ...]); request bodies that trickle are cut off before anything else.
        # Our ASGI types are plain dicts (http/asgi.py); hypercorn's are TypedDicts of the same messages.
        app = cast("ASGIFramework", bounded_bodies(make_app(self, policy)))
        # hypercorn reads a connection 64 KiB at a time (its module's MAX_RECV; no setting for it), and every read
        # is an h11 event, an ASGI message and a task switch: 1 MiB reads cut the daemon's CPU for a 108 MiB NAR
        # upload by about a fifth (0.5 -> 0.4 s). What it buffers ahead stays bounded (max_app_queue_size messages).
        hypercorn_tcp.MAX_RECV = max(hypercorn_tcp.MAX_RECV, API_RECV_BYTES)
        await serve(app, hc, task_status=task_status)

    def _write_api_file(self) -> None:
        assert self.host is not None
        info = {
            "api": self.api_url,
            "pid": os.getpid(),
            "peer_id": self.host.peer_id.to_base58(),
            "addrs": [str(a) for a in self.host.addrs()],
            "version": __version__,
        }
        if self.files_socket is not None:
            info["files_socket"] = str(self.files_socket)
        assert self.api_token is not None
        from urllib.parse import urlsplit

        # the netrc first: a client that sees api.json may use it at once
        host = urlsplit(self.api_url).hostname if self.api_url else None
        write_netrc(self.repo_path, self.api_token, [h for h in (host, "127.0.0.1", "localhost") if h])
        tmp = self.repo_path / f"api.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(self.repo_path / "api.json")

    def _remove_api_file(self) -> None:
        try:
            info = json.loads((self.repo_path / "api.json").read_text())
            if info.get("pid") == os.getpid():
                (self.repo_path / "api.json").unlink()
        except (OSError, ValueError):
            pass

    # -- what the API offers ------------------------------------------------------------------
    def status(self) -> dict:
        assert self.repo is not None and self.host is not None
        roots = self.repo.index.list_roots()
        client = self.exchange.client.stats() if self.exchange else None
        dag = self.dag.stats if self.dag else None
        return {
            "version": __version__,
            "peer_id": self.host.peer_id.to_base58(),
            "addrs": [str(a) for a in self.host.addrs()],
            "api": self.api_url,
            "repo": str(self.repo_path),
            "roots": len(roots),
            "roots_incomplete": sum(1 for r in roots if not r.complete),
            "stored_bytes": self.repo.stored_bytes(),
            "quota_bytes": self.config.max_size,
            "gc": self.quota.status(),
            "peers": len(self.host.connected_peers()),
            "bytes_served": self.source.bytes_served if self.source else 0,  # both protocols read through it
            "blocks_served": self.source.blocks_served if self.source else 0,
            "bytes_fetched": self.stats.bytes_fetched,
            "bytes_fetched_origin": self.stats.bytes_fetched_origin,
            "blocks_fetched": (client.blocks_received if client else 0) + (dag.blocks if dag else 0),
            "duplicate_blocks": (client.duplicate_blocks if client else 0) + (dag.duplicate_blocks if dag else 0),
            "peers_penalised": sorted({p.to_base58() for p, _ in self.exchange.penalised}) if self.exchange else [],
            "fetches": self.stats.fetches,
            "transfer": dataclasses.asdict(self.dag.stats) if self.dag else {},
            "fetch_failures": self.stats.fetch_failures,
            "disk_full": self.stats.disk_full,
            "uptime": round(time.time() - self.started_at, 1),
            "lookups": {
                "total": self.finder.stats.lookups if self.finder else 0,
                "found_dht": self.finder.stats.found_dht if self.finder else 0,
                "misses": self.finder.stats.misses if self.finder else 0,
                "negative_hits": self.finder.stats.negative_hits if self.finder else 0,
                "rpcs": self.finder.stats.rpcs if self.finder else 0,
                "providers_demoted": len(self.standing),  # failed, lied or timed out lately: asked last
            },
            "announce": {
                "keys": len(self.announcer.announcements.keys()) if self.announcer else 0,
                "pending": self.announcer.pending if self.announcer else 0,
                "provided": self.announcer.stats.provided if self.announcer else 0,
                "failed": self.announcer.stats.failed if self.announcer else 0,
                "sweeps": self.announcer.stats.sweeps if self.announcer else 0,
                "withdrawn": self.announcer.stats.withdrawn if self.announcer else 0,
                "add_providers_sent": getattr(getattr(self.dht, "stats", None), "add_providers", 0),
                "sweep": self._sweep_status(),
            },
        }

    @property
    def bytes_served(self) -> int:
        """Block bytes this node handed to peers, over bitswap and the DAG protocol (both read through
        `source`)."""
        return self.source.bytes_served if self.source else 0

    def _sweep_status(self) -> dict:
        """The batched re-announce under way (or the last one): keys sent of the sweep's keys, walks."""
        st = self.announcer.stats if self.announcer else None
        if st is None:
            return {"running": False, "keys_done": 0, "keys_total": 0, "walks": 0}
        return {"running": st.sweep_running, "keys_done": st.sweep_keys_done, "keys_total": st.sweep_keys_total,
                "walks": st.sweep_walks, "last_seconds": round(st.last_sweep_seconds, 3)}

    def peers(self) -> list[dict]:
        assert self.host is not None
        return [{"peer_id": p.to_base58()} for p in self.host.connected_peers()]

    async def add_file(self, path: str, name: str | None, progress: ProgressFn) -> dict:
        """Add a file the node's own code names (simnet, in-process callers); the HTTP API never calls
        this — it takes the caller's bytes (`add_stream`)."""
        assert self.repo is not None
        try:
            total = os.path.getsize(path)
        except OSError as e:
            raise InvalidInput(f"cannot add {path}: {e.strerror}") from None
        done = [0]

        def cb(n: int) -> None:
            done[0] += n
            progress(done[0], total)

        async with self.taking_back_on_disk_full("add"), self.quota.working():
            result = await trio.to_thread.run_sync(lambda: self.repo.add_file(path, name=name, progress=cb))
        self.announce(result.root)
        return {**result.to_json(), "file": path, "announced": True}

    async def add_stream(self, body: AsyncIterator[bytes], name: str | None) -> dict:
        """Add the bytes a caller streams to us (the API's `add`: the caller opened its file with its
        own rights; the daemon never opens a path on a caller's behalf), then announce it."""
        assert self.repo is not None
        repo = self.repo
        from .aio import feed_thread

        async with self.taking_back_on_disk_full("add"), self.quota.working():
            result = await feed_thread(body, lambda it: repo.add_stream(it, name=name))
        self.announce(result.root)
        return {**result.to_json(), "announced": True}

    @contextlib.asynccontextmanager
    async def taking_back_on_disk_full(self, operation: str) -> AsyncIterator[None]:
        """Around an operation that stores blocks: errors come out as themselves, not wrapped in trio's
        exception groups; a DiskFull is counted (status `disk_full`, metric `p2pcache_disk_full_total`)
        and the blocks the operation stored but no root claims are removed again."""
        assert self.repo is not None
        with self.repo.recording_blocks() as written:
            try:
                yield
            except BaseException as e:
                leaf = leaf_error(e)
                if isinstance(leaf, DiskFull):
                    self.stats.disk_full += 1
                    if self.nix is not None:
                        self.nix.metrics.disk_full.labels(operation).inc()
                    with trio.CancelScope(shield=True):
                        dropped = await trio.to_thread.run_sync(self.repo.drop_unclaimed_blocks, written)
                    log.warning("%s: %s (took back %d stored blocks)", operation, leaf, dropped)
                    raise leaf from None
                if isinstance(e, BaseExceptionGroup) and isinstance(leaf, P2PCacheError):
                    raise leaf from None
                raise

    def announce(self, root: CID) -> None:
        if self.announcer is not None and self.repo is not None:
            self.announcer.add(root, root_aliases(self.repo, root))
            if self._lazy_hashes is not None:
                self._lazy_hashes.send_nowait(root)
        self.quota.poke()  # something new is stored: check the quota

    async def _hash_lazily(self, roots: trio.MemoryReceiveChannel) -> None:
        """Compute the sha512 an add left out (ingest computes sha256 only), one archive at a time, after the
        add returned; then announce the archive under its sha512 too (npm integrity lookups by peers)."""
        assert self.repo is not None
        async for root in roots:
            try:
                done = await trio.to_thread.run_sync(self.repo.fill_hashes, [root])
            except P2PCacheError as e:
                log.warning("cannot hash %s: %s", root, e)
                continue
            if done and self.announcer is not None:
                try:
                    self.announcer.add(root, root_aliases(self.repo, root))
                except NotFound:  # evicted by the quota meanwhile: nothing to announce
                    continue

    async def gc(self, max_size: int | None) -> dict:
        """Garbage-collect in the daemon (which owns the repo) and stop announcing what was evicted.
        Waits until no add or fetch holds unclaimed blocks (gc would take them), and holds off new ones."""
        async with self.quota.exclusive():
            return await self.gc_now(max_size)

    async def gc_now(self, max_size: int | None) -> dict:
        """`gc` for a caller that already excludes operations (the quota keeper)."""
        assert self.repo is not None
        report = await trio.to_thread.run_sync(self.repo.gc, max_size)
        if self.announcer is not None:
            for root in report.roots_removed:
                self.announcer.withdraw(root)
        return report.to_json()

    async def set_pinned(self, key: str, pinned: bool) -> dict:
        assert self.repo is not None
        root = await trio.to_thread.run_sync(self.repo.set_pinned, key, pinned)
        return {"root": str(root), "pinned": pinned}

    async def fetch(self, key: str, progress: ProgressFn) -> dict:
        """Make `key` local (repo, else swarm) and return its root's summary."""
        assert self.repo is not None
        parsed = parse_key(key)
        try:
            root = self.repo.resolve(parsed)
            if self.repo.root_info(root).complete:
                self.stats.local_hits += 1
                return {"root": str(root), "source": "local", "size": self.repo.root_info(root).size}
        except NotFound:
            pass
        self.stats.fetches += 1
        try:
            async with self.taking_back_on_disk_full("fetch"), self.quota.working(clean_up_on_error=True):
                root, size = await self._fetch_from_swarm(parsed, progress)
        except P2PCacheError as e:
            self.stats.fetch_failures += 1
            log.warning("fetch of %s failed: %s", key, e)  # the caller may not keep its error: the log does
            raise
        self.announce(root)
        return {"root": str(root), "source": "swarm", "size": size}

    async def fetch_url(self, url: str, hash_text: str, progress: ProgressFn) -> dict:
        """An archive by its hash: from the repo or the swarm if anyone has it, else from `url`;
        verified against the hash before it is recorded, then announced."""
        assert self.repo is not None
        key = parse_key(hash_text)
        if not isinstance(key, HashKey):
            raise InvalidInput(f"--hash must be a sha256/sha512 hash (SRI, hex or nix-base32), not {hash_text!r}")
        try:
            result = await self.fetch(key.alias, progress)
            return {**result, "url": url}
        except NotFound:
            pass
        import httpx

        from .aio import feed_thread

        done = [0]

        async def download() -> Any:
            try:
                async with httpx.AsyncClient(follow_redirects=True, timeout=httpx.Timeout(60, read=300)) as client:
                    async with client.stream("GET", url) as resp:
                        if resp.status_code != 200:
                            raise NotFound(f"{url} answered HTTP {resp.status_code}")
                        total = int(resp.headers.get("content-length", 0)) or None
                        if total is not None:
                            await self.quota.make_room(total, url)
                        async for piece in resp.aiter_bytes():
                            done[0] += len(piece)
                            progress(done[0], total)
                            yield piece
            except httpx.HTTPError as e:
                raise NotFound(f"cannot download {url}: {e}") from None

        name = url.rstrip("/").rsplit("/", 1)[-1] or None
        repo = self.repo
        async with self.taking_back_on_disk_full("fetch-url"), self.quota.working():
            result = await feed_thread(download(), lambda it: repo.add_stream(it, name=name, expect=key))
        self.stats.bytes_fetched_origin += done[0]
        self.announce(result.root)
        return {"root": str(result.root), "source": "origin", "size": result.size, "url": url}

    # -- lock-file prefetch (the service is prefetch.Prefetcher; the node hands it the swarm) -----------
    async def fetch_blocks(self, alias: str, claim: Callable[[CID], Awaitable[object]]) -> CID:
        """Store the blocks of the archive a provider of `alias` holds, each verified against its CID,
        without registering the root: `claim(root)`, still inside the fetch's quota guard, checks the
        whole against the caller's own hash and registers it."""
        assert self.host is not None
        host = self.host

        async def ask(peer: Any) -> CID:
            answer = await resolve(host, peer.peer_id, alias, timeout=self.config.lookup_timeout)
            if answer is None:
                raise NotHeld()
            if answer.root.codec != DAG_CBOR:
                raise FetchError(f"peer {peer.peer_id} answered {answer.root} for {alias}: not a manifest")
            return answer.root

        race = await self.race_at_providers(alias, ask)  # the node's one policy for asking peers
        if race.winner is None:
            raise NotFound(f"{alias}: {_race_summary(race)}")
        peer, root = race.winner
        await self.fetch_dag(root, [peer, *race.peers_in(AskState.QUEUED, AskState.CANCELLED)],
                             claim=lambda: claim(root))
        return root

    async def prefetch(self, deps: list[Dependency], jobs: int, on_event: Callable[[dict], None]) -> dict:
        """Prefetch lock-file dependencies (see prefetch.py): repo → swarm → origin, each verified."""
        from .prefetch import Prefetcher
        from .store.origin import HttpOrigin

        assert self.repo is not None
        origin = HttpOrigin(connections=max(8, jobs))
        try:
            outcomes, summary = await Prefetcher(self.repo, origin, swarm=self, announce=self.announce).run(
                deps, jobs, on_event)
        finally:
            await origin.aclose()
        return summary.to_json()

    async def _fetch_from_swarm(self, key: HashKey | RootKey, progress: ProgressFn) -> tuple[CID, int]:
        assert self.finder is not None and self.exchange is not None and self.repo is not None
        assert self.host is not None
        me = self.host.peer_id
        alias = str(key.cid) if isinstance(key, RootKey) else key.alias
        if isinstance(key, RootKey):
            providers = await self.finder.find_providers(alias, timeout=self.config.lookup_timeout)
            providers = [p for p in providers if p.peer_id != me]
            if not providers:
                raise NotFound(f"{alias}: not in the local repo and no peer in the swarm announces it")
            root = key.cid
            # Fetch the root first and check it is what was asked for before fetching the rest.
            blocks = await self.exchange.fetch_blocks([root], providers)
            tree = _tree_root(blocks[root])
            if tree is not None:  # a build cache's tree: no archive bytes to check, its blocks prove themselves
                return await self._fetch_tree_root(root, tree.size, providers, progress)
            root_block = blocks[root]
            manifest = _decode_root(root, root_block)
        else:  # the race checked the winner's manifest root against the hash (if it names that hash)
            root, manifest, providers, root_block = await self._resolve_root(key)
        # Whatever whole-archive hash the manifest claims (and the one asked for, which a manifest made since
        # sha512 became lazy may not name) is checked over the fetched bytes before any alias is recorded.
        algos = sorted({a for a in manifest.hashes if a in ("sha256", "sha512")}
                       | ({key.algo} if isinstance(key, HashKey) else set()))
        await self.quota.make_room(manifest.size, alias)  # nothing of it is stored yet: fail before, not during
        progress(0, manifest.size)
        before = self.repo.stored_bytes()
        fetched = trio.Event()
        repo = self.repo

        async def report() -> None:
            while not fetched.is_set():
                with trio.move_on_after(0.25):
                    await fetched.wait()
                progress(min(manifest.size, max(0, repo.stored_bytes() - before)), manifest.size)

        failure: P2PCacheError | None = None
        answered = providers[:1] if isinstance(key, HashKey) else []  # the peer that named this root for the hash
        digesting = ArchiveDigests(repo, manifest, algos)
        digested: dict[str, Any] = {}
        hashed = trio.Event()

        async def digest() -> None:  # hashes the archive in order as its blocks arrive
            try:
                digested["digests"] = await digesting.run()
            except P2PCacheError as e:
                digested["error"] = e
            finally:
                hashed.set()

        async def claim() -> None:
            # Inside the fetch's quota guard (`fetch_dag(claim=)`): registered before a gc can take the
            # blocks as unclaimed, and only once the whole-archive hashes hold.
            digesting.finish(ok=True)
            await hashed.wait()
            if "error" in digested:
                raise digested["error"]
            await self._claim_fetched(root, manifest, algos, key, answered, digested["digests"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(report)
            nursery.start_soon(digest)
            try:
                for attempt in range(3):
                    try:
                        await self.fetch_dag(root, providers, digesting.stored, digesting.verified,
                                             root_block=root_block, claim=claim)
                        break
                    except FetchError as e:
                        if hashed.is_set():  # the claim's own check failed: fetching again changes nothing
                            raise
                        # Providers went away mid-transfer: look again (others may have it, and blocks
                        # already stored are not fetched twice) before giving up.
                        log.info("fetch of %s failed (%s); looking for other providers", root, e)
                        again = await self.finder.find_providers(alias, timeout=self.config.lookup_timeout)
                        alive = [p for p in again if p.peer_id != me]
                        if attempt == 2 or not alive:
                            raise
                        providers = alive
            except P2PCacheError as e:  # raised here, not from the nursery (which would wrap it in a group)
                failure = e
            finally:
                digesting.finish(ok=False)  # after the claim's ok it changes nothing; else the hasher stops
                fetched.set()
        if failure is not None:
            raise failure
        progress(manifest.size, manifest.size)
        return root, manifest.size

    async def _claim_fetched(self, root: CID, manifest: ArchiveManifest, algos: list[str], key: HashKey | RootKey,
                             answered: list, digests: dict[str, bytes]) -> None:
        """Register a fetched archive only once its bytes prove the whole-archive
        hashes its manifest claims and the one asked for: each block was checked against its CID as it
        arrived, but a manifest's `sha256`/`sha512` is a peer's word until the reassembled bytes hash to
        it. A mismatch records nothing (the blocks stay unclaimed, for gc), bans the peer that answered
        the hash with this root (`answered`), and fails with one line."""
        assert self.repo is not None and self.exchange is not None
        repo = self.repo
        name = key.alias if isinstance(key, HashKey) else str(root)
        asked = key.digest if isinstance(key, HashKey) else None
        wrong = []
        for a in algos:
            claims = {manifest.hashes[a]} if a in manifest.hashes else set()
            if isinstance(key, HashKey) and a == key.algo:
                claims.add(key.digest)
            if any(c != digests[a] for c in claims):
                wrong.append(a)
        if wrong:
            why = (f"archive {root}: its bytes do not hash to the {'/'.join(wrong)} "
                   f"{'its manifest claims' if asked is None else 'asked for'}")
            for peer in answered:
                log.warning("peer %s answered %s with %s: %s", peer.peer_id, name, root, why)
                self.exchange.penalise(peer.peer_id, why)
            raise CorruptData(f"{name}: {why}; nothing was recorded "
                              "(ask again: other peers may hold the real one)")
        extra = [HashKey(a, d).alias for a, d in digests.items() if a not in manifest.hashes]

        def claim() -> None:
            repo.register_root(root)
            repo.mark_verified(root)  # hashed just now: its first read need not hash it again
            if extra:  # e.g. a lazily hashed sha512, computed here over the verified bytes
                repo.add_aliases(root, extra)
        await trio.to_thread.run_sync(claim)

    async def _fetch_tree_root(self, root: CID, size: int, providers: list, progress: ProgressFn) -> tuple[CID, int]:
        """`p2pcache get <tree root>`: a build cache's tree by its CID, fetched whole and registered as
        the build cache registers it (kind "tree"), so `get`/`cat` can write it out as a tar stream."""
        from .buildcache import register_tree

        assert self.repo is not None
        await self.quota.make_room(size, str(root))
        progress(0, size)
        repo = self.repo
        await self.fetch_dag(root, providers, claim=lambda: trio.to_thread.run_sync(register_tree, repo, root, None),
                             request_blocks=TREE_REQUEST_BLOCKS)
        progress(size, size)
        return root, size

    async def _resolve_root(self, key: HashKey) -> tuple[CID, ArchiveManifest, list, bytes]:
        """Ask the providers of `key` which root they hold for it (one race, `race_at_providers`); an
        answer counts once its manifest root, fetched from that peer, carries the asked hash (a manifest naming
        no such hash, e.g. no sha512 since that became lazy, is checked over the fetched bytes afterwards)."""
        assert self.host is not None and self.exchange is not None
        alias = key.alias
        exchange, host = self.exchange, self.host

        async def ask(peer: Any) -> tuple[CID, ArchiveManifest, bytes]:
            answer = await resolve(host, peer.peer_id, alias, timeout=self.config.lookup_timeout)
            if answer is None:
                raise NotHeld()
            if answer.root.codec != DAG_CBOR:
                raise FetchError(f"peer {peer.peer_id} answered {answer.root} for {alias}: not a manifest")
            blocks = await exchange.fetch_blocks([answer.root], [peer])
            manifest = _decode_root(answer.root, blocks[answer.root])
            if key.algo in manifest.hashes and manifest.hashes[key.algo] != key.digest:
                raise FetchError(f"peer {peer.peer_id} answered {answer.root} for {alias}, "
                                 f"an archive with a different {key.algo}")
            return answer.root, manifest, blocks[answer.root]

        race = await self.race_at_providers(alias, ask)
        if race.winner is None:
            raise NotFound(f"{alias}: not in the local repo and {_race_summary(race)}")
        peer, (root, manifest, data) = race.winner
        return root, manifest, [peer, *race.peers_in(AskState.QUEUED, AskState.CANCELLED)], data

    async def race_at_providers(self, alias: str, ask: Callable[[Any], Awaitable[Any]],
                                more: Sequence[Callable[[float], Awaitable[Iterable[Any]]]] = (), *,
                                known: Sequence[PeerInfo] | None = None,
                                timeout: float | None = None, first: Sequence[PeerInfo] = ()) -> ResolveRace:
        """The node's one policy for asking peers about `alias` (archives and Nix paths alike): the
        DHT lookup of its providers (or the `known` providers a caller found already), then `more`
        sources (e.g. gateways) one after another, all feeding one happy-eyeballs race (`routing.race`)
        under one deadline, `timeout` (default `lookup_timeout`) from now. Providers that fail or time out
        are demoted in `self.standing` for later races. A DHT walk cut short makes the race `FAILED`, never
        a `MISS` (`ProviderFinder.providers`). `first`: peers likely to hold it (e.g. the providers of the
        paths just looked up): asked at once, while the DHT lookup runs, ahead of whoever it names."""
        assert self.finder is not None and self.host is not None
        me = self.host.peer_id
        finder = self.finder
        first_ids = {p.peer_id for p in first}

        async def providers_of(key: str, timeout: float) -> list:
            timeline.debug("providers of %s: lookup begins", key)
            found = [p for p in await finder.providers(key, timeout=timeout)
                     if p.peer_id != me and p.peer_id not in first_ids]
            timeline.debug("providers of %s: lookup ends (%d)", key, len(found))
            return found

        async def ask_logged(peer: Any) -> Any:
            try:
                return await ask(peer)
            except P2PCacheError as e:
                log.info("asking %s about %s: %s", peer.peer_id, alias, e)
                raise

        race: ResolveRace = ResolveRace(deadline=trio.current_time() + (timeout or self.config.lookup_timeout),
                                        stagger=RACE_STAGGER, standing=self.standing)
        race.add_peers([p for p in first if p.peer_id != me], trio.current_time())

        async def given(timeout: float) -> list[PeerInfo]:
            return [p for p in known or () if p.peer_id != me]

        sources = [given if known is not None else (lambda left: providers_of(alias, left)), *more]
        return await race_providers(race, ask_logged, sources)

    async def size_at_peers(self, alias: str, providers: list[PeerInfo]) -> int | None:
        """The size the first provider to answer a resolve says `alias` has (for HEAD requests, which
        move no bytes to prove it); None if none answers within the lookup timeout. The providers are
        asked in the node's one race (`race_at_providers`), not looked up again."""
        assert self.host is not None
        host = self.host

        async def ask(peer: PeerInfo) -> int:
            answer = await resolve(host, peer.peer_id, alias, timeout=self.config.lookup_timeout)
            if answer is None:
                raise NotHeld()
            return answer.size

        race = await self.race_at_providers(alias, ask, known=providers)
        return race.winner[1] if race.winner is not None else None

    async def http_fallback(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Everything the local API does not route: the Nix binary cache and hashed mirror."""
        from .http.nix import NixRoutes

        assert self.nix is not None
        await NixRoutes(self.nix).handle(scope, receive, send)

    async def fetch_dag(self, root: CID, providers: list,
                        on_stored: Callable[[list[CID]], None] | None = None,
                        on_verified: Callable[[CID, bytes], None] | None = None,
                        root_block: bytes | None = None,
                        claim: Callable[[], Awaitable[object]] | None = None,
                        request_blocks: int | None = None, keep_cached: bool = False) -> int:
        """Fetch every block under `root` the repo lacks (any manifest shape), storing verified blocks
        as they arrive: over the DAG transfer protocol (`DagTransfer.fetch`, bitswap for peers that do
        not speak it), or block by block over bitswap when `transfer_protocol` is "bitswap". `claim()`
        runs once every block is stored, still inside the quota's `working()` scope: a root it registers
        claims the blocks before a gc can take them as unclaimed. `request_blocks`: CIDs per DAG request
        (`DagTransfer.fetch`); `keep_cached`: its blocks stay in the page cache (`DagTransfer.fetch`)."""
        assert self.exchange is not None and self.repo is not None and self.dag is not None
        async with self.quota.working():
            if self.config.transfer_protocol == "bitswap":
                fetched = await self.exchange.fetch_dag(root, providers, self.repo, on_stored)
            else:
                with self.exchange.serving_fresh() as serve:  # others may fetch each block from us at once
                    def verified(cid: CID, data: bytes) -> None:
                        serve(cid, data)
                        if on_verified is not None:
                            on_verified(cid, data)

                    fetched = await self.dag.fetch(root, providers, self.repo, on_stored, verified, root_block,
                                                   request_blocks, keep_cached)
            if claim is not None:
                await claim()
        self.stats.bytes_fetched += fetched
        return fetched

    async def _answer_resolve(self, alias: str) -> ResolveAnswer | None:
        """What we hold under `alias`, for other peers' resolve requests. A gateway (a node with
        upstream caches) pulls a missing Nix path through first."""
        if self.repo is None:
            return None
        if alias.startswith("nix:") and self.nix is not None:
            if not self.nix.narstore.has(alias[4:]):
                try:
                    await self.nix.pull_through_for_peer(alias[4:])
                except P2PCacheError as e:
                    log.warning("pull-through of %s for a peer failed: %s", alias, e)
            nar = self.nix.narstore.narinfo(alias[4:])
            if nar is None:
                return None
            root = self.nix.narstore.root_of(alias[4:])
            # The manifest root goes with the answer: the asker checks the narinfo against it before it tells
            # Nix, and would otherwise fetch it over bitswap, a round trip per lookup (one indexed read here)
            try:
                block: bytes | None = self.repo.load_block(root)
            except P2PCacheError:
                block = None  # the asker fetches it (and meets the same trouble there)
            if block is not None and len(block) > MAX_ROOT_BLOCK:
                block = None
            return ResolveAnswer(root=root, kind="nar", size=nar.nar_size, root_block=block, narinfo=NarInfoFields(
                store_path=str(nar.store_path), nar_hash=f"sha256:{nar.nar_hash.digest.hex()}",
                nar_size=nar.nar_size, references=tuple(nar.references), deriver=nar.deriver or "",
                system=nar.system or "", ca=nar.ca or "", sigs=tuple(nar.sigs)))
        try:
            try:
                root = self.repo.resolve(alias)
            except InvalidInput:  # lock-file aliases (sha1:, sha384:, h1:) the key parser does not read
                found = self.repo.index.resolve_alias(alias)
                if found is None:
                    return None
                root = found
            info = self.repo.root_info(root)
        except P2PCacheError:
            return None
        if not info.complete:
            return None
        return ResolveAnswer(root=root, kind=info.kind, size=info.size)


def _race_summary(race: ResolveRace) -> str:
    """Why a race found nothing, for the one-line error."""
    st = race.stats
    if race.peers_known == 0:
        return ("the DHT lookup did not finish within the lookup timeout; try again" if race.sources_failed
                else "no peer in the swarm announces it")
    if race.outcome is RaceOutcome.MISS:
        return f"the {race.peers_known} peer(s) that announced it no longer hold it"
    return (f"{race.peers_known} peer(s) announce it but none answered validly within the lookup timeout "
            f"({st.failed} failed, {st.timed_out} timed out, {st.empty} hold nothing, "
            f"{race.peers_known - st.asked} not asked); try again")


class NixSwarm:
    """The swarm as the Nix binary cache needs it (`nixcache.Swarm`), over this node's parts; the parts
    are read when called (the cache is built before the DHT and exchange exist)."""

    def __init__(self, node: Node):
        self.node = node
        self.lookup_timeout = node.config.lookup_timeout

    @property
    def archives(self) -> Node:
        return self.node  # prefetch.Swarm: `fetch_blocks(alias)` for the hashed mirror's sha1 fetches

    @property
    def me(self) -> ID | None:
        return self.node.host.peer_id if self.node.host is not None else None

    def ready(self) -> bool:
        return self.node.finder is not None and self.node.exchange is not None

    async def race(self, alias: str, ask: Callable[[PeerInfo], Awaitable[object]],
                   more: Sequence[Callable[[float], Awaitable[Iterable[PeerInfo]]]] = (),
                   timeout: float | None = None, first: Sequence[PeerInfo] = ()) -> ResolveRace[PeerInfo]:
        return await self.node.race_at_providers(alias, ask, more, timeout=timeout, first=first)

    async def resolve(self, peer: PeerInfo, alias: str) -> ResolveAnswer | None:
        assert self.node.host is not None
        return await resolve(self.node.host, peer.peer_id, alias, timeout=self.lookup_timeout)

    async def fetch_blocks(self, cids: list[CID], peers: list[PeerInfo]) -> dict[CID, bytes]:
        assert self.node.exchange is not None
        return await self.node.exchange.fetch_blocks(cids, peers)

    async def find_providers(self, alias: str, timeout: float | None = None) -> list[PeerInfo]:
        assert self.node.finder is not None
        return await self.node.finder.find_providers(alias, timeout=timeout)

    async def providers(self, alias: str, timeout: float | None = None) -> list[PeerInfo]:
        assert self.node.finder is not None
        return await self.node.finder.providers(alias, timeout=timeout)

    async def size_at_peers(self, alias: str, providers: list[PeerInfo]) -> int | None:
        return await self.node.size_at_peers(alias, providers)

    async def fetch(self, alias: str, progress: ProgressFn) -> dict:
        return await self.node.fetch(alias, progress)

    async def fetch_dag(self, root: CID, providers: list[PeerInfo],
                        on_stored: Callable[[list[CID]], None] | None = None,
                        on_verified: Callable[[CID, bytes], None] | None = None,
                        root_block: bytes | None = None) -> int:
        return await self.node.fetch_dag(root, providers, on_stored, on_verified, root_block)


# A build tree's leaves are small files' chunks (half of them a few KiB): 1024 of them to a DAG request, not
# the default 128, cut a 20,000-file tree's fetch from 179 streams to about 25 and the CPU of both ends by
# 5-13 % (200 MiB, 20,000 files, loaded, two rounds; see README "What bounds the build cache").
TREE_REQUEST_BLOCKS = 1024


class _BuildCacheSwarm:
    """The swarm as the build cache service needs it (`buildcache.Swarm`), over this node's parts."""

    def __init__(self, node: Node):
        self.node = node

    async def record_peers(self, namespace: str) -> list:
        """Providers of the namespace's DHT key, then connected peers (a small team swarm asks them all)."""
        from .routing.keys import cache_ns_alias

        node = self.node
        assert node.finder is not None and node.host is not None
        found = await node.finder.find_providers(cache_ns_alias(namespace), timeout=node.config.lookup_timeout)
        peers = [p.peer_id for p in found]
        peers += [p for p in node.host.connected_peers() if p not in peers]
        return [p for p in peers if p != node.host.peer_id][:16]

    async def ask_records(self, peer: Any, key: str, prefix: bool) -> list:
        from .routing.cacherecords import ask_records

        assert self.node.host is not None
        return (await ask_records(self.node.host, peer, key, prefix, timeout=self.node.config.lookup_timeout)).records

    async def fetch_tree(self, root: CID, peers: list, claim: Callable[[], Awaitable[object]],
                         started: Callable[[], None] | None = None) -> int:
        node = self.node
        assert node.finder is not None and node.host is not None
        # The peers that sent the record hold its tree (they serve records only of complete trees): ask
        # them straight away; the DHT is asked when none did, or when fetching from them fails.
        providers: list = list(peers)
        if not providers:
            providers = [p for p in await node.finder.find_providers(str(root), timeout=node.config.lookup_timeout)
                         if p.peer_id != node.host.peer_id]
        if not providers:
            raise NotFound(f"tree {root}: no peer in the swarm announces it")
        root_block = await self._root_block(root, providers)
        if started is not None:
            started()
        for attempt in range(3):
            try:
                # keep_cached: the restore that asked reads every block back right away (as they arrive)
                return await node.fetch_dag(root, providers, root_block=root_block, claim=claim,
                                            request_blocks=TREE_REQUEST_BLOCKS, keep_cached=True)
            except FetchError as e:
                log.info("fetch of tree %s failed (%s); looking for other providers", root, e)
                again = [p for p in await node.finder.find_providers(str(root), timeout=node.config.lookup_timeout)
                         if p.peer_id != node.host.peer_id]
                if attempt == 2 or not again:
                    raise NotFound(f"tree {root}: fetching it failed ({e})") from None
                providers = again
        raise AssertionError("unreachable")

    async def _root_block(self, root: CID, providers: list) -> bytes | None:
        """The tree's root block (from the repo, else from a provider), after checking that the tree's size,
        which it states, fits the quota before any of its blocks is stored (as an archive fetch does):
        DiskFull (exit 6) if it cannot. Returned to start the fetch with (None if the repo had it)."""
        node = self.node
        assert node.repo is not None and node.exchange is not None
        repo = node.repo
        held = await trio.to_thread.run_sync(lambda: repo.load_block(root) if repo.has_block(root) else None)
        try:
            data = held if held is not None else (await node.exchange.fetch_blocks([root], providers))[root]
        except FetchError as e:
            raise NotFound(f"tree {root}: fetching its root block failed ({e})") from None
        tree = _tree_root(data)
        if tree is None:
            raise NotFound(f"tree {root}: the block its record names is not a build cache tree")
        await node.quota.make_room(tree.size, f"the tree {root}", in_operation=False)
        return None if held is not None else data

    def announce(self, root: CID, aliases: list[str]) -> None:
        if self.node.announcer is not None:
            self.node.announcer.add(root, aliases)

    def withdraw(self, root: CID) -> None:
        if self.node.announcer is not None:
            self.node.announcer.withdraw(root)


class ArchiveDigests:
    """The whole-archive digests (`algos`: hashlib names) of an archive while it is fetched, fed in
    archive order so the check costs no pass of its own after the last block. The fetch hands over each
    block's verified bytes (`verified(cid, data)`, the DAG fetch's `on_verified`: it delivers leaves in
    depth-first order, which is archive order) and says which blocks are stored (`stored(cids)`, its
    `on_stored`). `run()` hashes, on a worker thread (hashlib releases the GIL), every chunk whose turn
    has come from the bytes handed over — no copy, no read-back — and reads back from the repo only what
    was not handed over: blocks the repo held before (a resumed fetch), blocks fetched over bitswap, the
    second place of a chunk the archive holds twice, and blocks past the `HOLD` bytes kept (leaves from
    several providers come out of order). Each step hashes what is there and returns; the task then
    waits, on the trio side, for more blocks — so it also runs where `to_thread` work runs inline
    (simnet), never blocking the event loop on blocks that loop has yet to store. `finish(ok)` says the
    fetch ended: with ok every block is in the repo (a missing one is a FetchError naming it); without,
    `run` stops with FetchError. `read_back`: bytes of chunks read back from the repo."""

    BATCH = 64  # chunks read back per `load_blocks` call while they are there already
    HOLD = 32 << 20  # verified bytes kept for the hasher at most; past it a block is read back in its turn

    def __init__(self, repo: Repo, manifest: ArchiveManifest, algos: Iterable[str]) -> None:
        self.repo, self.manifest, self.algos = repo, manifest, list(algos)
        self._hashers = {a: hashlib.new(a) for a in self.algos}
        self._size = 0
        self.read_back = 0
        # The walk's place: (depth, children, next child), the archive's chunk-index path down to it.
        self._stack: list[tuple[int, tuple[tuple[CID, int], ...], int]] = [(manifest.depth, manifest.children, 0)]
        self._lock = threading.Lock()
        self._held: dict[CID, bytes] = {}  # verified bytes not hashed yet (references, not copies)
        self._held_bytes = 0
        self._stored: set[CID] = set()
        self._more = trio.Event()
        self._done = False
        self._ok = True

    def verified(self, cid: CID, data: bytes) -> None:
        """A block's bytes, verified against its CID (the fetch's `on_verified`; before `stored` says it
        is stored, which wakes the hasher)."""
        with self._lock:
            if self._done or self._held_bytes + len(data) > self.HOLD or cid in self._held:
                return  # read back in its turn
            self._held[cid] = data
            self._held_bytes += len(data)

    def stored(self, cids: list[CID]) -> None:
        with self._lock:
            self._stored.update(cids)
        self._more.set()

    def finish(self, ok: bool) -> None:
        """The fetch ended (only the first call counts)."""
        with self._lock:
            if not self._done:
                self._done, self._ok = True, ok
        self._more.set()

    async def run(self) -> dict[str, bytes]:
        try:
            while True:
                self._more = trio.Event()  # set by any `stored`/`finish` during the step: the wait returns at once
                if await trio.to_thread.run_sync(self._step):
                    return {a: h.digest() for a, h in self._hashers.items()}
                await self._more.wait()
        finally:
            with self._lock:
                self._held.clear()  # e.g. the manifest root, handed over too
                self._held_bytes = 0

    def _take(self, cid: CID) -> tuple[bytes | None, bool]:
        """(its verified bytes if handed over, whether it is there at all)."""
        with self._lock:
            data = self._held.pop(cid, None)
            if data is not None:
                self._held_bytes -= len(data)
                return data, True
            if cid in self._stored:
                return None, True
        return None, self.repo.has_block(cid)

    def _step(self) -> bool:
        """Hash every chunk that is there, in order; True when the archive is whole and hashed."""
        with self._lock:
            done, ok = self._done, self._ok  # read first: if done, every `stored` call came before
        batch: list[tuple[CID, int]] = []  # chunks to read back, in order
        stack = self._stack
        while stack:
            depth, children, i = stack[-1]
            if i == len(children):
                stack.pop()
                continue
            cid, size = children[i]
            data, there = self._take(cid)
            if not there:
                self._hash(batch)
                if not done:
                    return False
                if not ok:
                    raise FetchError("the fetch ended before the archive was whole")
                raise FetchError(f"block {cid} of the archive is not in the repo after its fetch")
            stack[-1] = (depth, children, i + 1)
            if depth == 0:
                if data is None:
                    batch.append((cid, size))
                    if len(batch) >= self.BATCH:
                        self._hash(batch)
                else:
                    self._hash(batch)  # those before it, in order
                    self._update(data)
                continue
            index = ChunkIndex.decode(data if data is not None else self.repo.load_block(cid))
            if index.depth != depth - 1 or index.size != size:
                raise MalformedBlock(f"chunk index {cid} does not match its parent's depth or size")
            stack.append((index.depth, index.children, 0))
        self._hash(batch)
        if self._size != self.manifest.size:
            raise FetchError(f"the archive's chunks add up to {self._size} bytes, its manifest says {self.manifest.size}")
        return True

    def _update(self, data: bytes) -> None:
        self._size += len(data)
        for h in self._hashers.values():
            h.update(data)

    def _hash(self, batch: list[tuple[CID, int]]) -> None:
        if batch:
            for data in self.repo.load_blocks(batch):
                self.read_back += len(data)
                self._update(data)
            batch.clear()


def _tree_root(data: bytes) -> Any:
    """The block as a build cache tree manifest, or None if it is not one."""
    from .content.treemanifest import TreeManifest

    try:
        return TreeManifest.decode(data)
    except MalformedBlock:
        return None


def _decode_root(root: CID, data: bytes) -> ArchiveManifest:
    try:
        return ArchiveManifest.decode(data)
    except MalformedBlock as e:
        raise FetchError(f"{root} is not an archive manifest: {e}") from None


@dataclass
class QuotaStats:
    runs: int = 0
    roots_evicted: int = 0
    bytes_freed: int = 0
    refused: int = 0  # fetches refused because they would not fit
    over_quota: bool = False  # the last run could not get under the low watermark (pinned roots)


class QuotaKeeper:
    """Keeps the repo's stored blocks under `config.max_size` (`daemon --max-size`, `[gc]`): when they
    pass the high watermark, least-recently-used unpinned archives are evicted, and withdrawn from
    the DHT, until they are under the low watermark. A fetch whose archive would not fit even after
    eviction fails before its first block is stored.

    gc also removes blocks no root claims yet — which is what an add or fetch in progress holds — so
    it runs only while no such operation does (`working()`), and is redone when the last one ends.
    """

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.stats = QuotaStats()
        self._busy = 0
        self._wake = trio.Event()
        self._lock = trio.Lock()
        self._idle = trio.Event()  # set (and replaced) whenever the last operation ends
        self._cleanup = False

    @property
    def max_size(self) -> int | None:
        return self.node.config.max_size

    def poke(self) -> None:
        self._wake.set()

    def working(self, clean_up_on_error: bool = False) -> Any:
        """An async context manager around an operation that stores blocks before a root claims them:
        it waits for a quota gc in progress, and none starts until it ends. With `clean_up_on_error`,
        what it stored is dropped if it fails (once nothing else is running)."""
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def scope() -> Any:
            async with self._lock:  # a gc running now would take the files this operation writes
                self._busy += 1
            try:
                yield
            except Exception:  # P2PCacheError, or a group of them from a nursery
                if clean_up_on_error:
                    self._cleanup = True
                raise
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()
                    self._idle = trio.Event()
                self.poke()

        return scope()

    def exclusive(self) -> Any:
        """An async context manager in which no operation holds unclaimed blocks: it waits for those
        running to end, and new ones wait for it."""
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def scope() -> Any:
            async with self._lock:
                while self._busy:
                    await self._idle.wait()
                yield

        return scope()

    async def run(self) -> None:
        interval = self.node.config.gc_interval
        while True:
            with trio.move_on_after(interval):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._busy:
                continue  # the operation's end pokes us again
            try:
                await self.enforce()
            except P2PCacheError as e:
                log.warning("quota gc failed: %s", e)

    async def enforce(self, target: int | None = None) -> None:
        """Evict down to the low watermark (or `target` bytes) if over the high one (or `target`)."""
        node = self.node
        assert node.repo is not None
        async with self._lock:
            if self._busy:
                return
            limit = target
            if limit is None and self.max_size is not None:
                if node.repo.stored_bytes() <= self.max_size * node.config.gc_high_watermark:
                    if self._cleanup:  # a failed fetch left unclaimed blocks: drop them
                        self._cleanup = False
                        await trio.to_thread.run_sync(node.repo.gc, None)
                    return
                limit = int(self.max_size * node.config.gc_low_watermark)
            if limit is None:
                if self._cleanup:
                    self._cleanup = False
                    await trio.to_thread.run_sync(node.repo.gc, None)
                return
            self._cleanup = False
            report = await node.gc_now(limit)
        self.stats.runs += 1
        self.stats.roots_evicted += len(report["roots_removed"])
        self.stats.bytes_freed += report["bytes_freed"]
        self.stats.over_quota = report["over_quota"]
        if report["roots_removed"] or report["bytes_freed"]:
            log.info("quota: evicted %d archives (%d bytes) to get under %d bytes; %d stored",
                     len(report["roots_removed"]), report["bytes_freed"], limit, report["bytes_after"])
        if report["over_quota"]:
            log.warning("quota: %d bytes stored, over the %d-byte low watermark of --max-size %d: pinned "
                        "archives hold the rest; unpin some or raise --max-size", report["bytes_after"], limit,
                        self.max_size or 0)

    async def make_room(self, size: int, what: str, in_operation: bool = True) -> None:
        """Before storing an archive of `size` bytes: fail (DiskFull, exit 6) if it cannot fit in the
        quota even after eviction, or on the disk at all. `in_operation`: called inside the caller's
        own `working()` scope (which must not stop its own eviction)."""
        import shutil

        node = self.node
        assert node.repo is not None
        free = shutil.disk_usage(node.repo_path).free
        if size > free:
            self.stats.refused += 1
            raise DiskFull(f"{what} is {size} bytes but the disk of {node.repo_path} has {free} bytes free; "
                           "free space or shrink the repo with `p2pcache gc --max-size`")
        if self.max_size is None:
            return
        if node.repo.stored_bytes() + size <= self.max_size:
            return
        if size > self.max_size:
            self.stats.refused += 1
            raise DiskFull(f"{what} is {size} bytes, more than this node's quota (--max-size {self.max_size} "
                           "bytes); raise --max-size")
        # Evict now if no other operation holds unclaimed blocks; otherwise the quota run after it will.
        own = 1 if in_operation else 0
        if self._busy - own == 0 and not self._lock.locked():  # (a gc waiting for us holds the lock)
            self._busy -= own  # our own caller is not in the way of its own eviction
            try:
                await self.enforce(self.max_size - size)
            finally:
                self._busy += own
        if node.repo.stored_bytes() + size > self.max_size:
            self.stats.refused += 1
            raise DiskFull(f"{what} is {size} bytes and does not fit in the quota: {node.repo.stored_bytes()} "
                           f"of --max-size {self.max_size} bytes are held by pinned or in-use archives; unpin "
                           "some (`p2pcache unpin KEY`) or raise --max-size")

    def status(self) -> dict:
        return {"runs": self.stats.runs, "roots_evicted": self.stats.roots_evicted,
                "bytes_freed": self.stats.bytes_freed, "refused": self.stats.refused,
                "over_quota": self.stats.over_quota}
