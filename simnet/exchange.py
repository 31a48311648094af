"""A simulated node's block exchange: the real `BitswapClient` / `BitswapServer` engines pumped over simnet links.

Owns the simnet twin of `p2pcache.net.bitswap.BitswapExchange` (sharing its ban bookkeeping, `BanList`, and
its dispatch of engine actions, `apply_actions`): peer up/down events into both engines,
dialling a provider when the client first sends to it, the engine timer, `MessageSent` acknowledgements
when the sender's uplink has written a message (the server's flow control), banning a peer that
`PenalisePeer` names (disconnect, refuse it afterwards), and `ArchiveFetch`, the walk of an archive's
manifest tree that `fetch_archive` does (root, index nodes, chunks; at most `window` blocks wanted).

Two wire modes:
- `bytes`: every message is `message.encode`d and framed, the link charges those bytes, and the receiver
  runs the real `message.decode` (which rebuilds each block's CID from its bytes, so corrupt data is
  caught exactly as on a libp2p stream). Only for real payloads.
- `objects`: the `Message` object crosses the link, charged its exact encoded size (the wire-size
  functions of `p2pcache.exchange.message`); the receiver rebuilds each block's CID from its data with
  `payload.cid_of` as `decode` would. Used for synthetic payloads and big runs.
Noise, Yamux, multistream and the libp2p host do not run in either mode; their handshake is charged as
`Network.handshake_rtts` round trips per connection.

A node's `behaviour` makes it a bad peer for the `bad-peer` scenario: `corrupt` serves altered bytes
for every block, `silent` accepts wants and never answers.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Hashable

from p2pcache.content.cid import CID
from p2pcache.errors import MalformedBlock
from p2pcache.exchange import (
    AddProviders,
    BitswapClient,
    BitswapServer,
    Block,
    BlocksAdded,
    ClientConfig,
    CloseSession,
    Deliver,
    FetchFailed,
    Message,
    MessageReceived,
    MessageSent,
    PeerConnected,
    PeerDisconnected,
    PeerMisbehaved,
    ProtocolViolation,
    Send,
    ServerConfig,
    Tick,
    Want,
    decode,
    encode,
)
from p2pcache.exchange.bans import BanList
from p2pcache.exchange.dispatch import apply_actions
from p2pcache.exchange.events import Action
from p2pcache.exchange.message import block_wire_size, presence_wire_size, uvarint_size, wants_wire_size
from p2pcache.transfer import DagWalk

from .core import Sim
from .links import Network
from .payload import SimBlockStore, SyntheticData, cid_of

__all__ = ["ArchiveFetch", "BitswapNode", "message_size"]

log = logging.getLogger(__name__)

PeerId = Hashable


def message_size(msg: Message) -> int:
    """Bytes `encode(msg)` takes, framed, computed without encoding."""
    wants, blocks, presences, pending, full = msg.wants, msg.blocks, msg.presences, msg.pending_bytes, msg.full
    if not (blocks or presences or pending or full):
        # a client's message: a wantlist only (with nothing at all, the wantlist field is absent)
        if not wants:
            return uvarint_size(0)
        inner = wants_wire_size(wants)
        n = 1 + uvarint_size(inner) + inner
        return n + uvarint_size(n)
    if not (wants or full or blocks or pending) and len(presences) == 1:
        n = presence_wire_size(presences[0].cid, presences[0].have)  # most messages of a fleet: one HAVE
        return n + uvarint_size(n)
    n = 0
    if wants or full:
        inner = wants_wire_size(wants) + (2 if full else 0)
        n += 1 + uvarint_size(inner) + inner
    for b in blocks:
        n += block_wire_size(b.cid, len(b.data))
    for p in presences:
        n += presence_wire_size(p.cid, p.have)
    if pending:
        n += 1 + uvarint_size(pending)
    return n + uvarint_size(n)


def _shared(table: dict[bytes, CID], cid: CID) -> CID:
    """The run's one object for `cid` (an equal CID: nothing but object identity changes)."""
    return table.setdefault(cid.buffer, cid)


class _CorruptingSource:
    """What a corrupting peer serves: every block altered, so its hash no longer matches."""

    def __init__(self, inner: SimBlockStore) -> None:
        self.inner = inner

    def has(self, cid: CID) -> bool:
        return self.inner.has(cid)

    def size(self, cid: CID) -> int | None:
        return self.inner.size(cid)

    def get(self, cid: CID) -> Any:
        d = self.inner.get(cid)
        if d is None:
            return None
        if isinstance(d, SyntheticData):
            return d.corrupted()
        return bytes([d[0] ^ 0xFF]) + d[1:]


@dataclass
class ExchangeCounters:
    blocks_stored: int = 0
    bytes_stored: int = 0
    penalised: int = 0
    fetch_failures: int = 0  # FetchFailed seen (re-wanted after a delay)


class BitswapNode:
    """The simnet driver of one node's bitswap engines."""

    def __init__(self, sim: Sim, net: Network, name: PeerId, store: SimBlockStore, wire: str = "objects",
                 client_config: ClientConfig | None = None, server_config: ServerConfig | None = None,
                 behaviour: str = "honest", ban_seconds: float = 600.0,
                 cids: dict[bytes, CID] | None = None) -> None:
        if wire not in ("bytes", "objects"):
            raise ValueError(f"wire must be 'bytes' or 'objects', not {wire!r}")
        self.sim, self.net, self.name, self.store, self.wire = sim, net, name, store, wire
        # One CID object per block, shared by every node of a run (`objects` wire): the CIDs a node
        # rebuilds from received data and the ones it wants are swapped for the fleet's copy of the
        # same CID, so the engines' maps, keyed by `CID.buffer`, find their keys by identity and a
        # million-block run does not hold a million copies of the same 36 bytes.
        self._cids = cids if cids is not None else {}
        self.behaviour = behaviour
        source = _CorruptingSource(store) if behaviour == "corrupt" else store
        self.client = BitswapClient(client_config)
        # As BitswapExchange: twice bitswap's message size outstanding per peer.
        self.server = BitswapServer(source, server_config or ServerConfig(max_outstanding_bytes=8 << 20))
        self.ban_seconds = ban_seconds
        self._bans: BanList[PeerId] = BanList(ban_seconds)
        self._banned_any = False  # no ban ever: the per-message ban check is skipped
        self._waiting: dict[PeerId, deque[Send]] = {}  # sends waiting for a dial
        self._timer_at: float | None = None
        self._sessions: dict[object, "ArchiveFetch"] = {}
        self._next_session = 0
        self.counters = ExchangeCounters()
        self.penalised: list[tuple[PeerId, str]] = []
        self.alive = True

    # -- engines --------------------------------------------------------------------------------
    def _client(self, event: object) -> None:
        actions = self.client.handle(event, self.sim.now())
        if actions:
            apply_actions(actions, self)

    def _server(self, event: object) -> None:
        actions = self.server.handle(event, self.sim.now())
        if actions:  # most steps of a busy node: nothing to do
            apply_actions(actions, self)

    def _both(self, event: object) -> None:
        self._client(event)
        self._server(event)

    def _apply(self, actions: list[Action]) -> None:
        apply_actions(actions, self)

    # `ActionHandler`: what each engine action means on simnet links (called by `apply_actions` only;
    # `on_send` is `_send`, below)
    def on_deliver(self, action: Deliver) -> None:
        f = self._sessions.get(action.session)
        if f is not None:
            f.on_block(action.cid, action.data)

    def on_fetch_failed(self, action: FetchFailed) -> None:
        self.counters.fetch_failures += 1
        f = self._sessions.get(action.session)
        if f is not None:
            f.on_failed(action.cid, action.why)

    def on_timer(self, at: float) -> None:
        if self._timer_at is None or at < self._timer_at:
            self._timer_at = at
            self.sim.at(at, self._on_timer, at)

    def on_penalise(self, peer: PeerId, why: str) -> None:
        self._penalise(peer, why)

    def _on_timer(self, at: float) -> None:
        if not self.alive or self._timer_at != at:
            return
        self._timer_at = None
        self._both(Tick())  # one timer for both engines: each asks again for what it still needs

    # -- links ----------------------------------------------------------------------------------
    def _is_banned(self, peer: PeerId) -> bool:
        return self._bans.is_banned(peer, self.sim.now())

    def on_connected(self, peer: PeerId) -> None:
        if not self.alive:
            return
        if self._is_banned(peer):
            self.net.disconnect(self.name, peer)
            return
        self._both(PeerConnected(peer))
        for send in self._waiting.pop(peer, ()):
            self._send(send)

    def on_disconnected(self, peer: PeerId) -> None:
        if not self.alive:
            return
        self._waiting.pop(peer, None)
        self._both(PeerDisconnected(peer))

    def on_message(self, peer: PeerId, payload: Any) -> None:
        if not self.alive or self._banned_any and self._is_banned(peer):
            return
        if self.wire == "bytes":
            try:
                msg = decode(payload)
            except ProtocolViolation as e:
                self._penalise(peer, str(e), tell_client=True)
                return
        else:
            msg = payload
            if msg.blocks:  # what decode does: the CID is rebuilt from the data, never trusted
                cids = self._cids
                msg = Message(msg.wants, msg.full, tuple(Block(_shared(cids, cid_of(b.data, b.cid.codec)), b.data)
                                                         for b in msg.blocks), msg.presences, msg.pending_bytes)
        event = MessageReceived(peer, msg)
        # `_server` and `_client`, inlined (every message): the clock stands still within a callback,
        # so both engines are handed the same time.
        now = self.sim.now()
        # The server first: what the message proves the peer holds must be known before the client's
        # blocks are stored and the server announces them (see `BitswapServer`'s holdings).
        if self.behaviour != "silent":
            actions = self.server.handle(event, now)
            if actions:
                apply_actions(actions, self)
        if msg.blocks or msg.presences:
            actions = self.client.handle(event, now)
            if actions:
                apply_actions(actions, self)

    def on_send(self, action: Send) -> None:
        send = action
        peer = send.peer
        if not self.alive or self._banned_any and self._is_banned(peer):
            return
        if self.wire == "bytes":
            data = encode(send.message)
            size, payload = len(data) + uvarint_size(len(data)), data
        else:
            size, payload = message_size(send.message), send.message
        on_written = partial(self._written, peer, send.size) if send.size else None
        if not self.net.send(self.name, peer, size, payload, on_written):  # not connected: dial first
            q = self._waiting.get(peer)
            if q is None:
                q = self._waiting[peer] = deque()
                self.net.connect(self.name, peer, lambda ok, peer=peer: self._dialled(peer, ok))
            q.append(send)

    _send = on_send

    def _written(self, peer: PeerId, n: int) -> None:
        if self.alive:  # `_server`, inlined (every block message)
            actions = self.server.handle(MessageSent(peer, n), self.sim.now())
            if actions:
                apply_actions(actions, self)

    def _dialled(self, peer: PeerId, ok: bool) -> None:
        if not ok and self._waiting.pop(peer, None) is not None and self.alive:
            self._both(PeerDisconnected(peer))  # unreachable: the client re-asks elsewhere

    def _penalise(self, peer: PeerId, why: str, tell_client: bool = False) -> None:
        log.info("%s drops peer %s: %s", self.name, peer, why)
        self.counters.penalised += 1
        self.penalised.append((peer, why))
        self._bans.ban(peer, self.sim.now())
        self._banned_any = True
        self._waiting.pop(peer, None)
        if tell_client:
            self._both(PeerMisbehaved(peer, why))
        else:
            self._server(PeerMisbehaved(peer, why))
        self.net.disconnect(self.name, peer)

    # -- store ----------------------------------------------------------------------------------
    def store_block(self, cid: CID, data: Any) -> None:
        blocks = self.store.blocks
        if cid not in blocks:
            blocks[cid] = data
            self.counters.blocks_stored += 1
            self.counters.bytes_stored += len(data)
            actions = self.server.handle(BlocksAdded((cid,)), self.sim.now())  # `_server`, inlined
            if actions:
                apply_actions(actions, self)

    def leave(self) -> None:
        """The node stops: nothing of it runs any more (the network cuts its links)."""
        self.alive = False
        self._sessions.clear()

    # -- fetching -------------------------------------------------------------------------------
    def open_session(self, fetch: "ArchiveFetch", providers: tuple) -> object:
        self._next_session += 1
        sid = (self.name, self._next_session)
        self._sessions[sid] = fetch
        if providers:
            self._client(AddProviders(sid, providers))
        return sid

    def want(self, sid: object, cids: tuple) -> None:
        table = self._cids
        self._client(Want(sid, tuple([_shared(table, cid) for cid in cids])))

    def close_session(self, sid: object) -> None:
        self._sessions.pop(sid, None)
        self._client(CloseSession(sid))


class ArchiveFetch:
    """Fetch a whole archive as the node's bitswap fetch does, through the production walk (`DagWalk`,
    transfer/walk.py): the manifest root, its index nodes, then the chunks, with at most `window` blocks
    wanted and not yet stored. `order="random"` ranks each node's children by a permutation drawn from
    `rng` (the rarest-first stand-in of swarming downloaders); `"sequential"` keeps manifest order, as
    production does. A block that fails is handed back to the walk after `retry_after` seconds (the
    caller's retry policy; the engine gives up on it), at its place in the walk's order; while it waits
    it does not hold a place in the window."""

    def __init__(self, node: BitswapNode, root: CID, providers: tuple = (), window: int = 256,
                 order: str = "sequential", rng: Any = None, retry_after: float = 5.0,
                 on_done: Callable[["ArchiveFetch"], None] | None = None) -> None:
        self.node, self.root, self.window, self.order = node, root, window, order
        self.rng, self.retry_after, self.on_done = rng, retry_after, on_done
        self.started_at = node.sim.now()
        self.done_at: float | None = None
        self.blocks = 0
        self.bytes = 0
        self.failures = 0
        self.error: str | None = None
        store = node.store.blocks
        self.walk = DagWalk(root, lambda cid: cid in store,
                            link_order=self._shuffled if order == "random" else None)
        self._wanted = 0  # in the window: wanted, not arrived, not waiting for a retry
        self._retrying = 0
        self.sid = node.open_session(self, tuple(providers))
        self._pump()

    def _shuffled(self, cid: CID, n: int) -> list[int]:
        ranks = list(range(n))
        self.rng.shuffle(ranks)
        return ranks

    def _pump(self) -> None:
        walk, store = self.walk, self.node.store.blocks
        while self.done_at is None:
            wants = walk.next_wants(self.window - self._wanted) if self._wanted < self.window else []
            loads = walk.take_loads()
            try:
                for cid in loads:  # held here already: its links are read locally
                    walk.on_block(cid, store[cid], local=True)
            except MalformedBlock as e:
                self._finish(f"a held block is not a manifest node: {e}")
                return
            if wants:
                self._wanted += len(wants)
                self.node.want(self.sid, tuple(wants))
            if not loads:
                break
        if walk.finished and not self._retrying and self.done_at is None:
            self._finish()

    def _finish(self, error: str | None = None) -> None:
        self.done_at = self.node.sim.now()
        self.error = error
        self.node.close_session(self.sid)
        if self.on_done:
            self.on_done(self)

    def on_block(self, cid: CID, data: Any) -> None:
        if self.done_at is not None or not self.walk.is_open(cid):
            return
        self._wanted -= 1
        try:
            self.walk.on_block(cid, data)
        except MalformedBlock as e:
            self._finish(f"block {cid} is not a manifest node: {e}")
            return
        self.blocks += 1
        self.bytes += len(data)
        self.node.store_block(cid, data)
        self._pump()

    def on_failed(self, cid: CID, why: str) -> None:
        if self.done_at is not None or not self.walk.is_open(cid):
            return
        self._wanted -= 1
        self.failures += 1
        self._retrying += 1
        self.node.sim.after(self.retry_after, self._retry, cid)

    def _retry(self, cid: CID) -> None:
        self._retrying -= 1
        if self.done_at is not None or not self.node.alive:
            return
        self.walk.on_failed(cid)
        self._pump()
