"""A simulated Kademlia DHT satisfying `p2pcache.routing.interfaces.ProviderRouting` (as `DHT` does), for real
`Node`s on `SimHost`s. The Kademlia wire reading is production's (`parse_peer_entry`, `provider_answer`,
`closest_known`, `read_frame`).

Owns, per node: a k-bucket routing table (`dhtsim.RoutingTable`: XOR distance over sha256 of the peer id
bytes, the metric `ProviderQuery` uses), a provider store with record expiry, and the server side of
three Kademlia requests — FIND_NODE, GET_PROVIDERS, ADD_PROVIDER — encoded as py-libp2p's real
`kademlia.proto` messages, varint-framed, on `/p2pcache/kad/1.0.0` streams of the simulated host. So
every RPC costs what a stream costs there (dial, one round trip to negotiate, the request and the
answer through the links) and fails the way a stream fails.

What the node's real code does on top is unchanged: `ProviderFinder` drives its lookups through
`closest_known_peers` / `ask_providers` (one GET_PROVIDERS round trip each), `ProviderAnnouncer` calls
`provide_key` / `withdraw_key`. `provide_key` does what py-libp2p's `ProviderStore.provide` does: a
network walk for the k closest peers (FIND_NODE, driven by the real `ProviderQuery`), then a
fire-and-forget ADD_PROVIDER to each; True if at least one took it.

Not run: py-libp2p's `KadDHT` (its routing table, refresh service, signed peer records, identify push)
and its value store; records are not republished by the DHT itself (the announcer owns that).
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import trio
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from p2pcache.exchange import FrameDecoder
from p2pcache.routing.dht import (
    KAD_PROTOCOL,
    DHTStats,
    ProviderAnswer,
    closest_known,
    parse_peer_entry,
    provider_answer,
    write_framed,
)
from p2pcache.routing.finder import drive_query
from p2pcache.routing.query import ProviderQuery
from p2pcache.routing.resolve import read_frame
from p2pcache.routing.resolve_wire import FrameReader, frame

from .dhtsim import RoutingTable
from .hostsim import SimHost

if TYPE_CHECKING:
    # `trio.TaskStatus` at run time; libp2p pulls in trio-typing, whose stubs shadow trio's for mypy.
    from trio_typing import TaskStatus

__all__ = ["SimDHT", "SimDHTConfig"]

log = logging.getLogger(__name__)

MAX_KAD_MESSAGE = 1 << 20
_T = KadMessage.MessageType


def _pos(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


@dataclass(frozen=True)
class SimDHTConfig:
    k: int = 20  # bucket size, closest-set size, peers an ADD_PROVIDER goes to
    alpha: int = 3  # walk concurrency
    rpc_timeout: float = 5.0  # one request of a walk / an ADD_PROVIDER gives up after this
    request_timeout: float = 10.0  # the server side waits this long for a request
    record_ttl: float = 48 * 3600.0  # py-libp2p's provider record lifetime
    bootstrap_interval: float = 60.0
    bootstrap_timeout: float = 10.0


class SimDHT:
    """`DHT`'s interface over a `SimHost`. `await nursery.start(dht.run)` admits connected peers, does a
    self-walk to fill the table (bounded by `bootstrap_timeout`) and returns; it then admits every newly
    connected peer and re-bootstraps every `bootstrap_interval` s until cancelled."""

    def __init__(self, host: SimHost, config: SimDHTConfig = SimDHTConfig()) -> None:
        self.host = host
        self.config = config
        self.peer_id: ID = host.peer_id
        self.table: RoutingTable[ID] = RoutingTable(_pos(self.peer_id.to_bytes()), config.k)
        self.providers: dict[bytes, dict[ID, tuple[float, list[Multiaddr]]]] = {}
        self.stats = DHTStats()
        self.served = {"FIND_NODE": 0, "GET_PROVIDERS": 0, "ADD_PROVIDER": 0}
        host.set_stream_handler(KAD_PROTOCOL, self._handle)

    # -- lifecycle ----------------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_peers, self.host.subscribe())
            await self.bootstrap()
            task_status.started()
            while True:
                await trio.sleep(self.config.bootstrap_interval)
                await self.bootstrap()

    async def _follow_peers(self, events: Any) -> None:
        async for event in events:
            if event.connected:
                self._admit(event.peer)

    def _admit(self, peer: ID) -> None:
        if peer != self.peer_id:
            self.table.add(peer, _pos(peer.to_bytes()))

    async def bootstrap(self) -> int:
        for peer in self.host.connected_peers():
            self._admit(peer)
        with trio.move_on_after(self.config.bootstrap_timeout):
            await self._walk(self.peer_id.to_bytes())
        self.stats.bootstraps += 1
        return len(self.table)

    # -- DHT's provider-record primitives -----------------------------------------------------------
    async def provide_key(self, key: bytes) -> bool:
        self._record(key, self.peer_id, self.host.listen_addrs())
        peers = await self._walk(key)
        ok = 0
        limiter = trio.Semaphore(self.config.alpha)

        async def one(peer: ID) -> None:
            nonlocal ok
            async with limiter:
                with trio.move_on_after(self.config.rpc_timeout):
                    try:
                        await self._add_provider(peer, key)
                        ok += 1
                    except Exception as e:
                        log.debug("ADD_PROVIDER to %s failed: %r", peer, e)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(one, peer)
        if ok:
            self.stats.provides += 1
        else:
            self.stats.provide_failures += 1
        return ok > 0

    # -- batched announcing, as `DHT` offers it --------------------------------------------------
    @property
    def k(self) -> int:
        return self.config.k

    async def closest_peers(self, key: bytes, count: int = 20) -> list[ID]:
        return await self._walk(key, count)

    def record_providing(self, keys: Iterable[bytes]) -> None:
        addrs = self.host.listen_addrs()
        for key in keys:
            self._record(key, self.peer_id, addrs)

    async def add_providers(self, peer: ID, keys: Sequence[bytes]) -> None:
        """Every key's ADD_PROVIDER on one stream, fire and forget (the server reads until the end)."""
        stream = await self.host.new_stream(peer, [KAD_PROTOCOL])
        addrs = [a.to_bytes() for a in self.host.listen_addrs()]

        def message(key: bytes) -> bytes:
            msg = self._request(_T.ADD_PROVIDER, key)
            entry = msg.providerPeers.add()
            entry.id = self.peer_id.to_bytes()
            entry.addrs.extend(addrs)
            return msg.SerializeToString()

        try:
            await write_framed(stream, map(message, keys))
        finally:
            with trio.CancelScope(shield=True):
                await stream.close()

    def withdraw_key(self, key: bytes) -> None:
        records = self.providers.get(key)
        if records is not None:
            records.pop(self.peer_id, None)
            if not records:
                del self.providers[key]

    def local_providers(self, key: bytes) -> list[PeerInfo]:
        now = trio.current_time()
        return [PeerInfo(p, list(addrs)) for p, (exp, addrs) in self.providers.get(key, {}).items() if exp > now]

    def closest_known_peers(self, key: bytes, count: int = 20) -> list[ID]:
        return closest_known(self.table.closest(_pos(key), count), self.host.connected_peers(), self.peer_id, count)

    async def ask_providers(self, peer: ID, key: bytes) -> ProviderAnswer:
        self.stats.rpcs += 1
        try:
            reply = await self._rpc(peer, self._request(_T.GET_PROVIDERS, key))
            return provider_answer(peer, reply, self._peer_entry, self.peer_id)
        except Exception:
            self.stats.rpc_failures += 1
            raise

    # -- client side --------------------------------------------------------------------------------
    def _request(self, kind: KadMessage.MessageType, key: bytes) -> KadMessage:
        msg = KadMessage()
        msg.type = kind
        msg.key = key
        return msg

    async def _rpc(self, peer: ID, request: KadMessage, answer: bool = True) -> KadMessage | None:
        try:
            stream = await self.host.new_stream(peer, [KAD_PROTOCOL])
        except Exception:
            self.table.remove(peer)  # unreachable: Kademlia drops it
            raise
        try:
            await stream.write(frame(request.SerializeToString()))
            if not answer:
                return None
            payload = await read_frame(stream, FrameReader(MAX_KAD_MESSAGE, "kad answer"))
        finally:
            with trio.CancelScope(shield=True):
                await stream.close()
        reply = KadMessage()
        reply.ParseFromString(payload)
        self._admit(peer)  # it answered: a live DHT server
        return reply

    async def _add_provider(self, peer: ID, key: bytes) -> None:
        msg = self._request(_T.ADD_PROVIDER, key)
        entry = msg.providerPeers.add()
        entry.id = self.peer_id.to_bytes()
        entry.addrs.extend(a.to_bytes() for a in self.host.listen_addrs())
        await self._rpc(peer, msg, answer=False)  # fire and forget, as py-libp2p and kubo send it

    def _peer_entry(self, entry: Any) -> PeerInfo | None:
        info = parse_peer_entry(entry)
        if info is not None and info.addrs and info.peer_id != self.peer_id:
            self.host.add_addrs(info.peer_id, info.addrs)
        return info

    async def _walk(self, key: bytes, count: int | None = None) -> list[ID]:
        """The `count` (default k) closest peers to `key` that answered a FIND_NODE walk (the real
        ProviderQuery decides whom to ask next and when to stop)."""
        count = count or self.config.k
        query: ProviderQuery[ID, None] = ProviderQuery(key, peer_bytes=ID.to_bytes, self_peer=self.peer_id,
                                                       alpha=self.config.alpha, k=count, want=10**9)
        query.add_seeds(self.closest_known_peers(key, self.config.k))
        answered: list[ID] = []

        async def ask(peer: ID) -> None:
            try:
                with trio.fail_after(self.config.rpc_timeout):
                    reply = await self._rpc(peer, self._request(_T.FIND_NODE, key))
                assert reply is not None  # asked with answer=True
            except Exception:
                query.on_failure(peer)
            else:
                answered.append(peer)
                closer = [i.peer_id for e in reply.closerPeers if (i := self._peer_entry(e)) is not None
                          and i.peer_id != self.peer_id]
                query.on_answer(peer, (), closer)

        # py-libp2p's walk: `alpha` questions at once, every answer waited for
        await drive_query(query, ask, stagger=None, cancel_pending=False)
        target = _pos(key)
        return sorted(set(answered), key=lambda p: _pos(p.to_bytes()) ^ target)[:count]

    # -- server side --------------------------------------------------------------------------------
    def _record(self, key: bytes, provider: ID, addrs: list[Multiaddr]) -> None:
        self.providers.setdefault(key, {})[provider] = (trio.current_time() + self.config.record_ttl, addrs)

    def _peer_msg(self, out: Any, peer: ID, addrs: list[Multiaddr]) -> None:
        entry = out.add()
        entry.id = peer.to_bytes()
        entry.addrs.extend(a.to_bytes() for a in addrs)

    def _addrs_of(self, peer: ID) -> list[Multiaddr]:
        host = self.host.swarm.hosts.get(peer)  # a peer's listen address, as identify would have told us
        return host.listen_addrs() if host is not None else []

    async def _handle(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        decoder, queued = FrameDecoder(MAX_KAD_MESSAGE), deque[bytes]()

        async def next_request() -> KadMessage | None:
            """The stream's next request; None at its end. A Kademlia server reads requests from a
            stream until it ends (a batched sweep sends many ADD_PROVIDERs on one)."""
            while not queued:
                try:
                    chunk = await stream.read(64 * 1024)
                except EOFError:
                    chunk = b""
                if not chunk:
                    return None
                queued.extend(decoder.feed(chunk))
            msg = KadMessage()
            msg.ParseFromString(queued.popleft())
            return msg

        try:
            with trio.fail_after(self.config.request_timeout):
                request = await next_request()
            if request is None:
                raise EOFError("stream ended before a request")
        except Exception as e:
            log.debug("kad: bad request from %s: %r", peer, e)
            await stream.reset()
            return
        self._admit(peer)  # learn who talks to us
        key = bytes(request.key)
        reply = KadMessage()
        reply.type = request.type
        reply.key = key
        if request.type == _T.ADD_PROVIDER:
            while request is not None and request.type == _T.ADD_PROVIDER:
                self.served["ADD_PROVIDER"] += 1
                for entry in request.providerPeers:
                    info = self._peer_entry(entry)
                    if info is not None and info.peer_id == peer:  # a peer may announce only itself
                        self._record(bytes(request.key), peer, list(info.addrs))
                try:
                    request = await next_request()
                except Exception as e:
                    log.debug("kad: bad request from %s: %r", peer, e)
                    await stream.reset()
                    return
            await stream.close()
            return
        if request.type not in (_T.FIND_NODE, _T.GET_PROVIDERS):
            await stream.reset()
            return
        for p in self.table.closest(_pos(key), self.config.k):
            if p != peer:
                self._peer_msg(reply.closerPeers, p, self._addrs_of(p))
        if request.type == _T.GET_PROVIDERS:
            self.served["GET_PROVIDERS"] += 1
            now = trio.current_time()
            for p, (exp, addrs) in self.providers.get(key, {}).items():
                if exp > now:
                    self._peer_msg(reply.providerPeers, p, addrs)
        else:
            self.served["FIND_NODE"] += 1
        try:
            await stream.write(frame(reply.SerializeToString()))
        except Exception:
            return
        await stream.close()



if TYPE_CHECKING:
    from p2pcache.routing.interfaces import ProviderRouting

    def _sim_dht_is_provider_routing(dht: SimDHT) -> ProviderRouting:
        return dht  # `make typecheck` proves SimDHT satisfies the Protocol DHT does
