"""The node's Kademlia DHT: py-libp2p's `KadDHT` in server mode, spoken under our own protocol id.

Owns: the `KadDHT` instance, its protocol id, bootstrapping its routing table from the peers the host is
connected to, and the three provider-record operations the rest of routing needs (`provide_key`,
`withdraw_key`, `ask_providers`). It does not decide what to announce or when (that is `ProviderAnnouncer`),
nor how to look things up (that is `ProviderFinder`).

Protocol id. Team records must stay in the team swarm, so by default the DHT speaks `/p2pcache/kad/1.0.0`
(go-libp2p's convention `<prefix>/kad/1.0.0`), never `/ipfs/kad/1.0.0`. py-libp2p 0.8.1 cannot be told so:
its `protocol_prefix` argument is stored but unused, and every module (`kad_dht`, `peer_routing`,
`provider_store`, `value_store`, `routing_table`) uses the module constant `common.PROTOCOL_ID` directly.
Rather than rewrite those constants for the whole process, `KadDHT` is handed a thin view of the host
(`_KadProtocolHost`) that maps `/ipfs/kad/1.0.0` to our id in `new_stream` / `set_stream_handler` /
`remove_stream_handler`, and maps it back in the peerstore's protocol lists (the routing table admits only
peers that identify as DHT servers). Everything else is delegated unchanged. The effect is per instance:
another KadDHT in the same process keeps its own id.

Keys. Provider records are keyed by `dht_key(alias)` (see `p2pcache.routing.keys` for the exact scheme):
the multihash of a root CID, the sha2-256 / sha2-512 multihash of an archive's or NAR's hash, and a
namespaced sha256 for `nix:<store path hash>`.

Other py-libp2p settings changed here, and why:
- ADD_PROVIDER is rate-limited per sending peer (10 per 10 s by default). One root has three or four aliases
  and a re-announce sweep sends all of a node's keys to the same few closest peers of a small team swarm, so
  the limit would silently drop most of a sweep; it is raised to `add_provider_rate` per 10 s.
- `KadDHT.provide` records the key in `providing_keys`, which py-libp2p re-publishes every 22 h by itself.
  The announcer owns re-announcing, so the key is taken out of that set again (one owner for "what we
  announce"); withdrawing is then a purely local act (remote records expire by their TTL, 48 h in
  py-libp2p, so a withdrawn key is no longer refreshed and ages out).
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import trio
from multiaddr import Multiaddr

from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import PROTOCOL_ID as _LIBP2P_KAD_PROTOCOL
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.kad_dht.utils import maybe_consume_signed_record, sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from ..net.host import HostError
from .interfaces import DHTStats, ProviderAnswer
from .keys import dht_key
from .resolve_wire import frame

if TYPE_CHECKING:
    # `trio.TaskStatus` at run time; libp2p and multiaddr pull in trio-typing, whose trio-stubs shadow trio's own
    # types for mypy and export TaskStatus only from trio_typing.
    from trio_typing import TaskStatus

__all__ = [
    "DHT", "DHTConfig", "DHTStats", "KAD_PROTOCOL", "ProviderAnswer", "closest_known", "dht_key", "parse_peer_entry",
    "provider_answer", "write_framed",
]

log = logging.getLogger(__name__)

KAD_PROTOCOL = TProtocol("/p2pcache/kad/1.0.0")
MAX_KAD_MESSAGE = 1 << 20  # one GET_PROVIDERS answer: 20 providers + 20 closer peers, far below this
ADDR_TTL = 3600  # seconds to keep addresses learned from DHT answers in the peerstore


async def write_framed(stream: Any, payloads: Iterable[bytes], batch_bytes: int = 64 * 1024) -> None:
    """Write varint-framed `payloads` to `stream`, joined into writes of about `batch_bytes`."""
    batch = bytearray()
    for payload in payloads:
        batch += frame(payload)
        if len(batch) >= batch_bytes:
            await stream.write(bytes(batch))
            batch.clear()
    if batch:
        await stream.write(bytes(batch))


class _PeerstoreView:
    """The host's peerstore as KadDHT must see it: our kad protocol id shown as py-libp2p's constant."""

    def __init__(self, peerstore: Any, protocol_id: str):
        self._peerstore = peerstore
        self._protocol_id = protocol_id

    def get_protocols(self, peer_id: ID) -> list[str]:
        protocols = self._peerstore.get_protocols(peer_id)
        out = [p for p in protocols if p != _LIBP2P_KAD_PROTOCOL]  # an IPFS DHT server is not ours
        if self._protocol_id in protocols:
            out.append(str(_LIBP2P_KAD_PROTOCOL))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._peerstore, name)


class _KadProtocolHost:
    """A view of the node's host for KadDHT that swaps `/ipfs/kad/1.0.0` for our protocol id.

    Streams are opened and handlers registered through `streams` (the node's `NodeHost` when there is
    one, so its peer allowlist applies to DHT traffic too); everything else is the py-libp2p host."""

    def __init__(self, libp2p: IHost, streams: Any, protocol_id: TProtocol):
        self._host = libp2p
        self._streams = streams
        self._protocol_id = protocol_id
        self._peerstore = _PeerstoreView(libp2p.get_peerstore(), protocol_id)

    def _map(self, protocol: TProtocol) -> TProtocol:
        return self._protocol_id if protocol == _LIBP2P_KAD_PROTOCOL else protocol

    async def new_stream(self, peer_id: ID, protocol_ids: Sequence[TProtocol]) -> Any:
        return await self._streams.new_stream(peer_id, [self._map(p) for p in protocol_ids])

    def set_stream_handler(self, protocol_id: TProtocol, handler: Any) -> None:
        self._streams.set_stream_handler(self._map(protocol_id), handler)

    def remove_stream_handler(self, protocol_id: TProtocol) -> None:
        self._host.remove_stream_handler(self._map(protocol_id))

    def get_peerstore(self) -> Any:
        return self._peerstore

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)


@dataclass(frozen=True)
class DHTConfig:
    protocol_id: TProtocol = KAD_PROTOCOL
    server: bool = True
    add_provider_rate: int = 10_000  # ADD_PROVIDER messages accepted per peer per 10 s
    bootstrap_interval: float = 60.0  # seconds between re-bootstraps from connected peers
    bootstrap_timeout: float = 10.0  # a bootstrap lookup gives up after this long
    # `provide_key`: its walk, and each ADD_PROVIDER (a dial included), give up after these; together less
    # than the announcer's 30 s for a whole provide, so the peers that took a record are counted
    provide_walk_timeout: float = 15.0
    send_timeout: float = 10.0
    # False: no py-libp2p maintenance loop (table refresh, record expiry) and no self-lookup when
    # bootstrapping, so the routing table holds only connected peers and peers that queried us.
    # Tests and simulations use it to keep a sparse topology where lookups take several hops.
    refresh: bool = True


# -- Kademlia wire helpers, shared with simnet's SimDHT -------------------------------------------


def parse_peer_entry(entry: Any) -> PeerInfo | None:
    """A kademlia `Message.Peer` as a `PeerInfo`: None if its id is not a peer id; addresses that are
    not multiaddrs are skipped. Trusts nothing else about it (signed records are the caller's)."""
    try:
        peer_id = ID(entry.id)
    except Exception:
        return None
    addrs = []
    for raw in entry.addrs:
        try:
            addrs.append(Multiaddr(raw))
        except Exception:
            continue
    return PeerInfo(peer_id, addrs)


def provider_answer(peer: ID, reply: Any, peer_entry: Callable[[Any], PeerInfo | None], self_id: ID) -> ProviderAnswer:
    """What a GET_PROVIDERS `reply` from `peer` says, each entry read by `peer_entry` (None: dropped);
    we are never one of the closer peers. Raises ValueError if the reply is another message type."""
    if reply.type != KadMessage.MessageType.GET_PROVIDERS:
        raise ValueError(f"peer {peer} answered GET_PROVIDERS with message type {reply.type}")
    providers = []
    for entry in reply.providerPeers:
        info = peer_entry(entry)
        if info is not None:
            providers.append(info)
    closer = []
    for entry in reply.closerPeers:
        info = peer_entry(entry)
        if info is not None and info.peer_id != self_id:
            closer.append(info.peer_id)
    return ProviderAnswer(tuple(providers), tuple(closer))


def closest_known(table_closest: list[ID], connected: Iterable[ID], self_id: ID, count: int) -> list[ID]:
    """Starting points for a lookup: the routing table's closest peers (`table_closest`, closest first),
    topped up with connected peers while the table holds fewer than `count`."""
    peers = table_closest
    if len(peers) < count:
        for p in connected:
            if p not in peers and p != self_id:
                peers.append(p)
    return peers


class DHT:
    """py-libp2p's KadDHT under our protocol id, plus the provider-record primitives routing uses.

    Constructing it registers the kad stream handler, so build it before the host dials anyone: peers
    learn our protocols from identify when they connect. (`run` also sends an identify push to peers
    connected earlier, so the other order works too, a little later.)

    `await nursery.start(dht.run)` starts py-libp2p's maintenance service (if `config.refresh`), puts
    the host's connected DHT peers into the routing table and returns; the first bootstrap walk runs
    after that (a dead peer can hold a walk for its timeouts). Until cancelled it then admits every
    newly connected DHT-server peer to the routing table (with a `NodeHost`, from its peer events) and
    re-bootstraps every `config.bootstrap_interval` s."""

    def __init__(self, host: Any, config: DHTConfig = DHTConfig()):
        """`host` is the node's `p2pcache.net.host.NodeHost` (its `.libp2p` is the py-libp2p host) or
        a bare py-libp2p host."""
        self.host = host  # streams go through it (allowlist)
        self.libp2p: IHost = getattr(host, "libp2p", host)
        self.config = config
        self.peer_id: ID = self.libp2p.get_id()
        self.kad = KadDHT(
            _KadProtocolHost(self.libp2p, host, config.protocol_id),  # type: ignore[arg-type]
            DHTMode.SERVER if config.server else DHTMode.CLIENT,
        )
        self.kad._provider_rate_max = config.add_provider_rate
        self.stats = DHTStats()

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with AsyncExitStack() as stack:
            if self.config.refresh:
                await stack.enter_async_context(background_trio_service(self.kad))
            nursery = await stack.enter_async_context(trio.open_nursery())
            subscribe = getattr(self.host, "subscribe", None)  # NodeHost: peer up/down events
            if subscribe is not None:
                nursery.start_soon(self._follow_peers, subscribe())
            for peer in self.libp2p.get_connected_peers():
                await self.kad.add_peer(peer)
            task_status.started()
            # The identify push and the walk below can each wait out a dead peer's timeouts (10 s a question in
            # py-libp2p; a blackholed bootstrap address held a fresh node's start for that long): the node
            # serves, and announces to the peers it is connected to, meanwhile. Peers connected before our kad
            # handler existed identified us without it and would keep us out of their routing tables: the
            # push tells them that our protocols changed.
            if self.config.server:
                with trio.move_on_after(self.config.bootstrap_timeout):
                    try:
                        await push_identify_to_peers(self.libp2p)
                    except Exception as e:  # best effort: the periodic bootstrap covers what this misses
                        log.debug("identify push failed: %s", e)
            await self.bootstrap()
            while True:
                await trio.sleep(self.config.bootstrap_interval)
                await self.bootstrap()

    async def _follow_peers(self, events: Any) -> None:
        # Every newly connected peer that is a DHT server joins the routing table at once, so a chain of
        # bootstraps (each node dialling one known peer) yields a connected DHT without waiting for the
        # next periodic bootstrap.
        async with trio.open_nursery() as nursery:
            async for event in events:
                if event.connected:
                    nursery.start_soon(self._admit, event.peer)

    async def _admit(self, peer: ID) -> None:
        # The routing table needs the peer's listen addresses and protocols, which identify delivers a
        # moment after the connection is up (at once for peers we dialled, later for peers that dialled
        # us): retry with backoff for a few seconds, then leave it to the periodic bootstrap.
        delay = 0.05
        for _ in range(8):
            if await self.kad.add_peer(peer) or self.kad.routing_table.peer_in_table(peer):
                return
            if peer not in self.libp2p.get_connected_peers():
                return
            await trio.sleep(delay)
            delay *= 2

    async def bootstrap(self) -> int:
        """Put every connected DHT-server peer into the routing table, then look ourselves up so the
        table also learns the peers those know. Returns the routing table size afterwards."""
        for peer in self.libp2p.get_connected_peers():
            await self.kad.add_peer(peer)
        if self.config.refresh:
            with trio.move_on_after(self.config.bootstrap_timeout):
                await self.kad.peer_routing.find_closest_peers_network(self.peer_id.to_bytes())
        self.stats.bootstraps += 1
        return self.kad.get_routing_table_size()

    # -- provider records ---------------------------------------------------------------------
    async def provide_key(self, key: bytes) -> bool:
        """Record ourselves as a provider of `key` locally and send ADD_PROVIDER to the closest peers
        found by a network lookup. True if at least one peer took it.

        The DHT peers we are connected to get it first, at once: they are live, and in a team swarm of
        fewer than `k` nodes they are among the key's closest anyway. py-libp2p's own provide sent nothing
        before its walk ended, and a walk's round waits for its slowest question, so one dead peer that
        drops packets (its dial times out, 10 s) held a fresh node's first ADD_PROVIDER for 20 s. The walk
        then finds the key's closest peers, which get it too; each send is its own task, so a dead one
        costs only its own timeout."""
        self.record_providing([key])
        reached = 0
        told: set[ID] = set()

        async def tell(peer: ID) -> None:
            nonlocal reached
            with trio.move_on_after(self.config.send_timeout):
                try:
                    await self.add_providers(peer, [key])
                    reached += 1
                except Exception as e:  # that peer does not count; the walk's others still may
                    log.debug("ADD_PROVIDER to %s failed: %s", peer, e)

        async with trio.open_nursery() as nursery:
            table = self.kad.routing_table
            live = [p for p in self.libp2p.get_connected_peers() if table.peer_in_table(p)]
            for peer in sort_peer_ids_by_distance(key, live)[: self.k]:
                told.add(peer)
                nursery.start_soon(tell, peer)
            closest: list[ID] = []
            with trio.move_on_after(self.config.provide_walk_timeout):
                try:
                    closest = await self.closest_peers(key, self.k)
                except Exception as e:  # the connected peers above still count
                    log.debug("the walk for a provider record failed: %s", e)
            for peer in closest:
                if peer not in told and peer != self.peer_id:
                    told.add(peer)
                    nursery.start_soon(tell, peer)
        if reached:
            self.stats.provides += 1
        else:
            self.stats.provide_failures += 1
        return reached > 0

    # -- batched announcing (see `sweep`): one walk per key-space region, many keys per stream ----
    k = 20  # py-libp2p's bucket size: the closest peers a record goes to

    async def closest_peers(self, key: bytes, count: int = 20) -> list[ID]:
        """The `count` closest peers to `key` found by a network walk (FIND_NODE), closest first."""
        return list(await self.kad.peer_routing.find_closest_peers_network(key, count))

    def record_providing(self, keys: Sequence[bytes]) -> None:
        """Record ourselves as a provider of `keys` in the local provider store (what `provide_key`
        does before its walk), so we answer GET_PROVIDERS for them at once."""
        store = self.kad.provider_store
        me = PeerInfo(self.peer_id, list(self.libp2p.get_addrs()))
        for key in keys:
            store.add_provider(key, me)

    async def add_providers(self, peer: ID, keys: Sequence[bytes]) -> None:
        """ADD_PROVIDER for every key of `keys` to `peer`, one message after another on one stream (a
        Kademlia server reads messages from a stream until it ends; py-libp2p's and go-libp2p's do).
        Fire and forget, as kubo sends them: py-libp2p echoes each one, and the echoes are read and
        dropped meanwhile, so a long batch never stalls on a full receive window. Raises if the stream
        cannot be opened or written."""
        envelope, _ = env_to_send_in_RPC(self.libp2p)
        addrs = [a.to_bytes() for a in self.libp2p.get_addrs()]
        stream = await self.host.new_stream(peer, [self.config.protocol_id])
        drained = trio.Event()
        refused: list[HostError] = []

        async def drain() -> None:
            try:
                while await stream.read(64 * 1024):
                    pass
            except HostError as e:  # the peer refused the protocol proposed in the first write: nothing was read
                refused.append(e)
            except Exception:  # EOF or reset: nothing more to drop
                pass
            drained.set()

        write_error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)

                def message(key: bytes) -> bytes:
                    msg = KadMessage()
                    msg.type = KadMessage.MessageType.ADD_PROVIDER
                    msg.key = key
                    msg.senderRecord = envelope
                    entry = msg.providerPeers.add()
                    entry.id = self.peer_id.to_bytes()
                    entry.addrs.extend(addrs)
                    entry.signedRecord = envelope
                    return msg.SerializeToString()

                try:
                    await write_framed(stream, map(message, keys))
                    await stream.close()
                except Exception as e:  # a refusal read meanwhile, or the stream reset under the write
                    write_error = e
                with trio.move_on_after(5):  # the last echoes, then the peer's end (or its refusal)
                    await drained.wait()
                nursery.cancel_scope.cancel()
            # Raised out here, not in the nursery, so a refusal in the middle of a batch is one HostError
            # (as at its start), not an exception group.
            if refused:
                raise refused[0]
            if write_error is not None:
                raise write_error
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.reset()
            raise
        self.stats.add_providers += len(keys)

    def withdraw_key(self, key: bytes) -> None:
        """Forget that we provide `key`: drop our own record from the local provider store, so we stop
        answering GET_PROVIDERS with ourselves. Records at other peers expire by their TTL."""
        store = self.kad.provider_store
        store.providing_keys.discard(key)
        store._last_republish.pop(key, None)
        records = store.providers.get(key)
        if records is not None:
            records.pop(str(self.peer_id), None)
            if not records:
                del store.providers[key]

    def local_providers(self, key: bytes) -> list[PeerInfo]:
        """Providers of `key` this node's provider store holds (others' ADD_PROVIDERs and our own)."""
        return self.kad.provider_store.get_providers(key)

    def closest_known_peers(self, key: bytes, count: int = 20) -> list[ID]:
        """Starting points for a lookup: the routing table's closest peers, topped up with connected
        peers while the table is still small."""
        return closest_known(list(self.kad.routing_table.find_local_closest_peers(key, count)),
                             self.libp2p.get_connected_peers(), self.peer_id, count)

    async def ask_providers(self, peer: ID, key: bytes) -> ProviderAnswer:
        """One GET_PROVIDERS round trip to `peer`. Addresses of the providers and closer peers in the
        answer go into the peerstore so they can be dialled. Raises on any failure (no answer,
        a broken stream, a malformed or oversized message); the caller bounds the time."""
        self.stats.rpcs += 1
        try:
            return await self._ask_providers(peer, key)
        except Exception:  # not a cancellation: a lookup that found its answer elsewhere is no failure
            self.stats.rpc_failures += 1
            raise

    async def _ask_providers(self, peer: ID, key: bytes) -> ProviderAnswer:
        request = KadMessage()
        request.type = KadMessage.MessageType.GET_PROVIDERS
        request.key = key
        request.senderRecord = env_to_send_in_RPC(self.libp2p)[0]
        data = request.SerializeToString()
        stream = await self.host.new_stream(peer, [self.config.protocol_id])
        try:
            await stream.write(frame(data))
            reply = await read_varint_prefixed_bytes_limited(stream, MAX_KAD_MESSAGE)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.close()
        response = KadMessage()
        response.ParseFromString(reply)
        if response.type == KadMessage.MessageType.GET_PROVIDERS:
            maybe_consume_signed_record(response, self.libp2p, peer)
        return provider_answer(peer, response, self._peer_entry, self.peer_id)

    def _peer_entry(self, entry: Any) -> PeerInfo | None:
        info = parse_peer_entry(entry)
        if info is None:
            return None
        known = self._record_seq(info.peer_id)
        if not maybe_consume_signed_record(entry, self.libp2p):
            return None
        if known is not None and (self._record_seq(info.peer_id) or 0) > known:
            # The peer signed a newer address record than the one we held: it started (or moved) since, so
            # a dial that failed before says nothing now (a provider that restarted is dialled at once).
            seen = getattr(self.host, "peer_seen", None)  # NodeHost; a bare py-libp2p host has no dial backoff
            if seen is not None:
                seen(info.peer_id)
        if info.addrs and info.peer_id != self.peer_id:
            self.libp2p.get_peerstore().add_addrs(info.peer_id, info.addrs, ADDR_TTL)
        return info

    def _record_seq(self, peer: ID) -> int | None:
        """The sequence number of the signed peer record we hold for `peer` (a timestamp its owner set when
        it signed it), None if we hold none."""
        envelope = self.libp2p.get_peerstore().get_peer_record(peer)
        return None if envelope is None else envelope.record().seq


if TYPE_CHECKING:
    from .interfaces import ProviderRouting

    def _dht_is_provider_routing(dht: DHT) -> ProviderRouting:
        return dht  # `make typecheck` proves DHT satisfies the Protocol (so does simnet's SimDHT)
