"""The client half of the block exchange: sessions that fetch blocks from peers, as a sans-IO engine.

Owns: which peer is asked for which CID and when, every want outstanding at every peer, per-peer
service-time estimates, and the bookkeeping that keeps a block from being fetched twice. It must not
touch a store, a socket or a clock: the caller checks its own store before `Want`ing a CID, the driver
moves messages, and time arrives as `handle`'s `now`. It knows nothing about what blocks mean: the
caller decodes a manifest it received and `Want`s the children it names.

How a CID is fetched (after boxo's session design, simplified):
- Every connected peer and every provider added to the CID's sessions is a candidate.
- The CID's first ask sends want-block to the best candidate and want-have to up to `have_fanout`
  others not yet proven to hold content (discovery), all with send-dont-have, so a second source is
  known before the first one fails. Once a peer has sent a block or a HAVE it is simply a candidate
  for want-blocks: asking it want-have for every CID would only cost messages, and duplicates where
  servers answer a want-have for a small block with the block itself.
- "Best" prefers peers that said HAVE for it, then peers that have not timed out on it, then the
  lowest expected wait: (want-blocks outstanding there + 1) × measured service time. Service time is
  an EWMA of the gap between a block's arrival and the later of its request and the previous block
  from that peer, so it folds latency and throughput into one number and wants split across peers
  in proportion to how fast each delivers. Unmeasured peers are assumed fast, so they get tried;
  each timeout since a peer's last block adds `want_timeout` to its cost.
- At most `peer_window` want-blocks are outstanding per peer, `peer_have_window` want-haves, and
  `session_window` CIDs in flight per session; the rest wait in FIFO order.
- DONT_HAVE, a timeout (`SetTimer`/`Tick`) or a disconnect from the asked peer re-queues the CID (at
  the front) for another peer. When `max_attempts` asks have failed, or no candidate appeared within
  `no_provider_timeout`, the CID fails with `FetchFailed`.
- A DONT_HAVE is an answer for now, not for ever: bitswap servers (go-bitswap, Helia, ours) keep a
  want they could not answer in the peer's wantlist until it is cancelled, and answer it when the
  block arrives. So a peer that said DONT_HAVE is watching the CID for us: a later HAVE from it makes
  it a candidate again (the best one). When every candidate has said DONT_HAVE, or `park_after` of
  them have including every provider of its sessions (the rest would only be asked to say the same,
  and would register more watches to cancel), the CID is parked: it waits without
  messages for a HAVE or a block from a watching peer, or a new peer, for up to `dont_have_wait`
  seconds, then fails. `dont_have_wait = 0` fails at once, which suits the usual case of asking for
  something the swarm does not have (the caller falls back to the origin quickly); a fleet fetching
  one artifact at once, where a busy seed refuses and peers get blocks moments later, wants a wait.
- Swarm mode (`want_block_unproven=False`), for fleets fetching one artifact at once where most peers
  lack most blocks: want-block goes only to a peer that said HAVE for the CID or is a provider of its
  session; `have_fanout` connected peers (in rotation over all of them) are asked want-have without
  send-dont-have, so each keeps the want and says HAVE when the block reaches it, and the CID parks
  until a HAVE comes (up to `dont_have_wait`). A CID whose holders all have `peer_window` want-blocks
  outstanding waits off the queue until one of them has room. Every CID wanted at once is watched at
  up to `have_fanout` peers: set `peer_have_window` to the number of CIDs wanted at once or more.
- Cancels of want-haves and DONT_HAVE watches may wait `cancel_delay` to ride with the next message
  to that peer (the peer can only answer them with a small presence meanwhile); cancels of
  want-blocks always go at once, so no block is sent twice.
- When the block arrives it is delivered to every session that wants it and cancels go to every other
  peer that holds its want: asked and not yet answered, or watching after a DONT_HAVE. Blocks for
  CIDs already done are counted as duplicates.
- A block nobody asked for (its bytes hash to a CID we never wanted, which is what corrupt data
  looks like) gets the peer `PenalisePeer`d and dropped: its wants are re-asked elsewhere and it is
  never asked again by this engine.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import OrderedDict
from itertools import islice
from dataclasses import dataclass
from typing import cast

from ..content.cid import CID
from .deadlines import Deadlines
from .errors import ExchangeUsageError
from .events import (
    Action,
    AddProviders,
    BlocksAdded,
    CloseSession,
    Deliver,
    FetchFailed,
    MessageReceived,
    MessageSent,
    PeerConnected,
    PeerDisconnected,
    PeerId,
    PeerMisbehaved,
    PenalisePeer,
    Send,
    SessionId,
    SetTimer,
    Tick,
    Want,
)
from .message import Block, Message, Presence, WantEntry, WantType


@dataclass(frozen=True, slots=True)
class ClientConfig:
    peer_window: int = 16  # want-blocks outstanding at one peer
    peer_have_window: int = 64  # want-haves outstanding (unanswered) at one peer
    session_window: int = 64  # CIDs in flight (want-block sent) per session
    have_fanout: int = 2  # peers asked want-have beside the one asked want-block, on a CID's first ask
    want_timeout: float = 10.0  # a want-block is re-asked after max(this, timeout_factor × service time)
    timeout_factor: float = 8.0
    max_attempts: int = 5  # want-blocks sent for one CID before it fails
    no_provider_timeout: float = 30.0  # a CID with no candidate peer at all fails after this
    prior_service_time: float = 0.0  # service time assumed for a peer never measured
    ewma_alpha: float = 0.3
    remember_done: int = 16384  # finished CIDs remembered to tell a duplicate from an unsolicited block
    dont_have_wait: float = 0.0  # a CID every candidate said DONT_HAVE for waits this long for a HAVE
    park_after: int = 0  # park a CID (see dont_have_wait) once this many peers said DONT_HAVE; 0 = all
    # Swarm mode (False): want-block goes only to peers that said HAVE for the CID or are providers of
    # its session; connected peers are asked want-have (`have_fanout` of them, in rotation) and the
    # CID waits for a HAVE. For fleets fetching one artifact at once, where most peers lack most blocks.
    want_block_unproven: bool = True
    cancel_delay: float = 0.0  # cancels of want-haves and DONT_HAVE watches wait up to this to ride along

    def __post_init__(self) -> None:
        if self.peer_window < 1 or self.session_window < 1 or self.peer_have_window < 0 or self.max_attempts < 1:
            raise ExchangeUsageError(f"client windows and max_attempts must be positive: {self}")
        if self.dont_have_wait < 0 or self.park_after < 0 or self.cancel_delay < 0:
            raise ExchangeUsageError(f"dont_have_wait, park_after and cancel_delay must not be negative: {self}")
        if not self.want_block_unproven and self.dont_have_wait <= 0:
            raise ExchangeUsageError("swarm mode (want_block_unproven=False) waits for HAVEs: set dont_have_wait")


@dataclass(slots=True)
class ClientStats:
    """The client's counters; `BitswapClient.stats()` hands out a copy."""

    blocks_received: int = 0  # blocks delivered (first copy)
    bytes_received: int = 0
    duplicate_blocks: int = 0  # further copies of blocks already delivered
    duplicate_bytes: int = 0
    want_blocks_sent: int = 0
    want_haves_sent: int = 0
    cancels_sent: int = 0
    timeouts: int = 0
    failed: int = 0
    dont_haves: int = 0  # DONT_HAVE answers received
    parked: int = 0  # times a CID was parked to wait for a HAVE
    haves_after_dont_have: int = 0  # HAVEs from a peer that had said DONT_HAVE: the watch paid off


@dataclass(frozen=True, slots=True)
class PeerStats:
    blocks: int
    bytes: int
    duplicates: int
    timeouts: int
    service_time: float | None  # seconds per block, EWMA; None until measured
    throughput: float | None  # bytes per second while busy; None until measured
    want_blocks_outstanding: int
    want_haves_outstanding: int


class _Peer:
    __slots__ = ("connected", "blocks_out", "haves_out", "service", "last_arrival", "busy",
                 "stalls", "proven", "blocks", "bytes", "duplicates", "timeouts")

    def __init__(self) -> None:
        self.connected = False
        # dicts, not sets: a dropped peer's wants requeue in the order they were sent, whatever the hash seed.
        # Keyed, like every map of the engine, by the CID's bytes (`CID.buffer`): a bytes object hashes
        # in C and caches its hash, where a CID key costs a Python `__hash__` call per lookup.
        self.blocks_out: dict[bytes, CID] = {}
        self.haves_out: dict[bytes, None] = {}
        self.service: float | None = None
        self.last_arrival: float | None = None
        self.busy = 0.0
        self.stalls = 0  # timeouts since its last block
        self.proven = False  # it has sent a block or a HAVE: known to hold content, no discovery needed
        self.blocks = self.bytes = self.duplicates = self.timeouts = 0


class WantState(enum.Enum):
    """Where a want is in its lifecycle. Changed only by `BitswapClient._move`, which keeps the
    invariant (checked by `BitswapClient.check_invariants`, after every step of the engine tests):

    - QUEUED  ⇔ its CID is in `_pending` (the FIFO of wants waiting for a want-block), block_peer is None.
                It may also be in `_stalled` (no candidate peer at all; `stalled_since` set).
    - ASKED   ⇔ its CID is in `_inflight` and in `block_peer`'s `blocks_out`, with a live deadline.
    - PARKED  ⇔ its CID is in `_parked` (every candidate said DONT_HAVE, or swarm mode waits for a
                HAVE); `parked_since` set.
    - BLOCKED   swarm mode: its holders' windows are full; it is in none of the three and listed in
                `_blocked` under each holder (entries there may be stale: `_unblock` checks the state).
    A want in none of these states is done: it has left `_wants`.
    """

    QUEUED = 1
    ASKED = 2
    PARKED = 3
    BLOCKED = 4


class _Want:
    __slots__ = ("cid", "key", "state", "sessions", "priority", "block_peer", "sent_at", "deadline", "have_asked",
                 "dont_haves", "holders", "timed_out", "attempts", "stalled_since", "parked_since",
                 "discovered")

    def __init__(self, cid: CID, priority: int) -> None:
        self.cid = cid
        self.key = cid.buffer
        self.state = WantState.QUEUED
        self.sessions: dict[SessionId, None] = {}
        self.priority = priority
        self.block_peer: PeerId | None = None
        self.sent_at = 0.0
        self.deadline = 0.0
        # dicts, not sets: cancels go out in the order peers were asked, whatever the hash seed
        self.have_asked: dict[PeerId, None] = {}  # want-have sent, no answer yet
        self.dont_haves: dict[PeerId, None] = {}  # said DONT_HAVE (and not HAVE since): watching it for us
        self.holders: dict[PeerId, None] = {}  # said HAVE (and not DONT_HAVE since)
        self.discovered = False  # swarm mode: the want-haves of its first ask went out
        self.timed_out: dict[PeerId, None] = {}  # a dict: an empty one is a quarter of an empty set's size
        self.attempts = 0
        self.stalled_since: float | None = None
        self.parked_since: float | None = None  # first parked, waiting for a HAVE; reset by one


class _Session:
    __slots__ = ("cids", "providers", "lost", "inflight")

    def __init__(self) -> None:
        self.cids: dict[bytes, CID] = {}
        self.providers: dict[PeerId, None] = {}
        # providers whose connection went: not candidates (nobody dials a dead peer for ever), and
        # providers again when they reconnect (a restarted seed, a network blip)
        self.lost: dict[PeerId, None] = {}
        self.inflight = 0


class BitswapClient:
    """Sans-IO bitswap client: `handle(event, now) -> list[Action]`. One owner of all fetch state."""

    def __init__(self, config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig()
        self._peers: dict[PeerId, _Peer] = {}
        self._banned: set[PeerId] = set()
        self._sessions: dict[SessionId, _Session] = {}
        # Every map of wants is keyed by the CID's bytes (`_Want.key`), see `_Peer`.
        self._wants: dict[bytes, _Want] = {}
        self._pending: OrderedDict[bytes, None] = OrderedDict()  # wants waiting for a want-block
        self._inflight: dict[bytes, _Want] = {}
        self._stalled: dict[bytes, _Want] = {}  # pending wants with no candidate peer at all
        self._parked: dict[bytes, _Want] = {}  # not pending: waiting for a HAVE from a watching peer
        self._parked_min: float | None = None  # no parked CID's wait began before this (may be early)
        self._deadlines: Deadlines[bytes] = Deadlines()  # want-block deadlines of the ASKED wants
        self._done: OrderedDict[bytes, None] = OrderedDict()
        self._timer_at: float | None = None
        self._next_priority = 2**31 - 1
        self._rotation = 0  # swarm mode: where the next CID's want-haves start in the peer list
        self._lazy: dict[PeerId, dict[bytes, tuple[float, CID]]] = {}  # cancels waiting to ride along: key -> (due, cid)
        self._lazy_due: float | None = None  # no lazy cancel falls due before this
        # swarm mode: CIDs out of the pending queue until one of these peers (all holders busy) has room
        self._blocked: dict[PeerId, dict[bytes, None]] = {}
        self._recheck: dict[PeerId, None] = {}  # peers with CIDs still blocked on them after an unblock
        self._stats = ClientStats()
        # per handle() call
        self._out: list[Action] = []
        self._outbox: dict[PeerId, dict[bytes, WantEntry]] = {}
        self._now = 0.0

    # -- public API ---------------------------------------------------------------------------
    def handle(self, event: object, now: float) -> list[Action]:
        self._out, self._outbox = [], {}
        self._now = now
        if isinstance(event, MessageReceived):
            self._on_message(event.peer, event.message, now)
        elif isinstance(event, Tick):
            self._timer_at = None
            self._on_tick(now)
        elif isinstance(event, Want):
            self._on_want(event.session, event.cids, now)
        elif isinstance(event, AddProviders):
            session = self._session(event.session)
            for p in event.peers:
                session.providers.setdefault(p, None)
                self._peers.setdefault(p, _Peer())
            self._unstall()
            self._unpark_all()
        elif isinstance(event, PeerConnected):
            self._peers.setdefault(event.peer, _Peer()).connected = True
            for s in self._sessions.values():
                if event.peer in s.lost:
                    del s.lost[event.peer]
                    s.providers.setdefault(event.peer, None)
            self._unstall()
            self._unpark_all()
        elif isinstance(event, PeerDisconnected):
            self._drop_peer(event.peer)
        elif isinstance(event, PeerMisbehaved):
            self._ban(event.peer, event.why, penalise=False)
        elif isinstance(event, CloseSession):
            self._close_session(event.session)
        elif isinstance(event, (MessageSent, BlocksAdded)):
            pass  # server events
        else:
            raise ExchangeUsageError(f"the bitswap client does not handle {type(event).__name__}")
        self._schedule(now)
        return self._finish(now)

    def stats(self) -> ClientStats:
        return dataclasses.replace(self._stats)

    def check_invariants(self) -> None:
        """Assert `WantState`'s invariant over every want (for tests: O(wants + peers))."""
        for cid, w in self._wants.items():
            assert cid == w.key, (cid, w.cid)
            st = w.state
            assert (cid in self._pending) == (st is WantState.QUEUED), (cid, st)
            assert (cid in self._inflight) == (st is WantState.ASKED), (cid, st)
            assert (cid in self._parked) == (st is WantState.PARKED), (cid, st)
            assert (w.block_peer is not None) == (st is WantState.ASKED), (cid, st, w.block_peer)
            assert (cid in self._deadlines) == (st is WantState.ASKED), (cid, st)
            if st is WantState.ASKED:
                assert cid in self._peers[w.block_peer].blocks_out, (cid, w.block_peer)
            if st is WantState.PARKED:
                assert w.parked_since is not None, cid
            if st is WantState.BLOCKED:
                assert any(cid in b for b in self._blocked.values()), cid
            if cid in self._stalled:
                assert st is WantState.QUEUED and w.stalled_since is not None, (cid, st)
        for peer, p in self._peers.items():
            for cid in p.blocks_out:
                w = self._wants[cid]
                assert w.state is WantState.ASKED and w.block_peer == peer, (peer, cid, w.state)
        assert len(self._pending) + len(self._inflight) + len(self._parked) <= len(self._wants)

    def peer_stats(self, peer: PeerId) -> PeerStats | None:
        p = self._peers.get(peer)
        if p is None:
            return None
        return PeerStats(
            blocks=p.blocks, bytes=p.bytes, duplicates=p.duplicates, timeouts=p.timeouts,
            service_time=p.service, throughput=(p.bytes / p.busy) if p.busy > 0 else None,
            want_blocks_outstanding=len(p.blocks_out), want_haves_outstanding=len(p.haves_out),
        )

    def wanted(self, session: SessionId) -> frozenset[CID]:
        """CIDs `session` still waits for."""
        s = self._sessions.get(session)
        return frozenset(s.cids.values()) if s else frozenset()

    def outstanding(self, peer: PeerId) -> frozenset[CID]:
        """CIDs with a want-block outstanding at `peer`."""
        p = self._peers.get(peer)
        return frozenset(p.blocks_out.values()) if p else frozenset()

    # -- events -------------------------------------------------------------------------------
    def _session(self, sid: SessionId) -> _Session:
        s = self._sessions.get(sid)
        if s is None:
            s = self._sessions[sid] = _Session()
        return s

    def _on_want(self, sid: SessionId, cids: tuple[CID, ...], now: float) -> None:
        session = self._session(sid)
        for cid in cids:
            if not isinstance(cid, CID):
                raise ExchangeUsageError(f"Want takes CIDs, got {type(cid).__name__}")
            key = cid.buffer
            if key in session.cids:
                continue
            session.cids[key] = cid
            w = self._wants.get(key)
            if w is None:
                w = self._wants[key] = _Want(cid, self._next_priority)
                self._next_priority = max(1, self._next_priority - 1)
                self._pending[key] = None  # born QUEUED
            w.sessions[sid] = None
            if w.block_peer is not None:
                session.inflight += 1

    def _close_session(self, sid: SessionId) -> None:
        session = self._sessions.pop(sid, None)
        if session is None:
            return
        for cid in session.cids:
            w = self._wants[cid]
            del w.sessions[sid]
            if not w.sessions:
                self._forget(w)

    def _on_message(self, peer: PeerId, msg: Message, now: float) -> None:
        if self._banned and peer in self._banned:  # (a set hashes its key even when empty)
            return
        p = self._peers.get(peer)
        if p is None:  # (not setdefault: that builds a _Peer for every message)
            p = self._peers[peer] = _Peer()
        for block in msg.blocks:
            if not self._on_block(peer, p, block, now):
                return  # peer was banned; ignore the rest of its message
        for presence in msg.presences:
            self._on_presence(peer, p, presence, now)

    def _on_block(self, peer: PeerId, p: _Peer, block: Block, now: float) -> bool:
        cid = block.cid
        key = cid.buffer
        w = self._wants.get(key)
        if w is None:
            if key in self._done:
                p.duplicates += 1
                self._stats.duplicate_blocks += 1
                self._stats.duplicate_bytes += len(block.data)
                return True
            self._ban(peer, f"sent block {cid} that was never asked for (corrupt or unsolicited)", penalise=True)
            return False
        if key in p.blocks_out:
            start = w.sent_at if p.last_arrival is None else max(w.sent_at, p.last_arrival)
            sample = max(0.0, now - start)
            a = self.config.ewma_alpha
            p.service = sample if p.service is None else a * sample + (1 - a) * p.service
            p.busy += sample
            p.last_arrival = now
        p.stalls = 0
        p.proven = True
        p.blocks += 1
        p.bytes += len(block.data)
        self._stats.blocks_received += 1
        self._stats.bytes_received += len(block.data)
        for sid in w.sessions:
            self._out.append(Deliver(sid, cid, block.data))
            self._sessions[sid].cids.pop(key, None)
        w.have_asked.pop(peer, None)
        p.haves_out.pop(key, None)
        if w.block_peer == peer:
            self._release(w)
        self._forget(w)
        return True

    def _on_presence(self, peer: PeerId, p: _Peer, presence: Presence, now: float) -> None:
        key = presence.cid.buffer
        w = self._wants.get(key)
        if w is None:
            if presence.have and peer in self._lazy:
                # It holds the block, so it keeps no want of ours for it: a cancel would tell it nothing.
                self._unlazy(peer, key)
            return
        w.have_asked.pop(peer, None)
        p.haves_out.pop(key, None)
        if presence.have:
            p.proven = True
            w.holders[peer] = None
            if peer in w.dont_haves:
                w.dont_haves.pop(peer, None)
                self._stats.haves_after_dont_have += 1
            state = w.state
            if state is WantState.PARKED:
                w.parked_since = None
                self._requeue(w)
            elif state is WantState.BLOCKED:
                self._requeue(w)  # it waited for room at its other holders: this one may have some
            return
        self._stats.dont_haves += 1
        w.holders.pop(peer, None)
        w.dont_haves[peer] = None
        if w.block_peer == peer:
            self._release(w)
            self._requeue(w)

    def _on_tick(self, now: float) -> None:
        for w in [w for w in self._inflight.values() if w.deadline <= now]:
            peer = w.block_peer
            p = self._peers[peer]
            p.timeouts += 1
            self._stats.timeouts += 1
            p.stalls += 1  # ranks it behind peers that answer, until it delivers again
            w.timed_out[peer] = None
            self._cancel(peer, w.cid)
            self._release(w)
            if w.attempts >= self.config.max_attempts:
                self._fail(w, f"no block after {w.attempts} asks (last timed out at {peer})")
            else:
                self._requeue(w)
        self._unstall()
        for w in list(self._stalled.values()):
            if now - cast(float, w.stalled_since) >= self.config.no_provider_timeout:  # set while stalled
                self._fail(w, f"no peer to ask within {self.config.no_provider_timeout:g}s")
        for w in list(self._parked.values()):
            if now - cast(float, w.parked_since) >= self.config.dont_have_wait:  # set while parked
                self._fail(w, f"{len(w.dont_haves)} peers said they do not have it and none had it "
                              f"within {self.config.dont_have_wait:g}s")
        self._parked_min = min((cast(float, w.parked_since) for w in self._parked.values()), default=None)

    # -- peers --------------------------------------------------------------------------------
    def _drop_peer(self, peer: PeerId) -> None:
        self._lazy.pop(peer, None)
        p = self._peers.pop(peer, None)
        self._unblock(peer)  # gone: every CID that waited for it goes back to the queue
        if p is None:
            return
        for key in list(p.blocks_out):
            w = self._inflight[key]
            self._release(w, p)
            self._requeue(w)
        # What the peer's server kept for us went with the connection: the want-haves it held and the
        # wants it said DONT_HAVE to (it was watching them). If it comes back it is asked afresh, not
        # taken for a peer that still watches them (which left those CIDs parked until they failed).
        # In swarm mode such a CID asks for its watches again at its next placement.
        for key in p.haves_out:
            w = self._wants[key]
            w.have_asked.pop(peer, None)
            w.discovered = False
        for w in self._wants.values():
            if w.dont_haves.pop(peer, 0) is None:
                w.discovered = False
        for s in self._sessions.values():
            if s.providers.pop(peer, 0) is None:
                s.lost[peer] = None

    def _ban(self, peer: PeerId, why: str, penalise: bool) -> None:
        self._banned.add(peer)
        self._drop_peer(peer)
        for s in self._sessions.values():
            s.lost.pop(peer, None)  # never a provider again
        if penalise:
            self._out.append(PenalisePeer(peer, why))

    # -- want bookkeeping ---------------------------------------------------------------------
    def _release(self, w: _Want, p: _Peer | None = None) -> None:
        """The want-block at w.block_peer is over (answered, refused, timed out or lost)."""
        (p or self._peers[w.block_peer]).blocks_out.pop(w.key, None)
        self._unblock(w.block_peer)
        w.block_peer = None
        self._deadlines.remove(w.key)  # still ASKED: the caller requeues or forgets it next
        for sid in w.sessions:
            self._sessions[sid].inflight -= 1

    def _unblock(self, peer: PeerId) -> None:
        """`peer` has room again: as many of the CIDs that waited for room at it as it has room for go
        back to the queue, oldest first (all of them if it is gone). `_schedule` comes back for more
        while it still has room, so a CID placed elsewhere does not leave its slot idle."""
        blocked = self._blocked.get(peer)
        if not blocked:
            return
        p = self._peers.get(peer)
        room = self.config.peer_window - len(p.blocks_out) if p is not None and p.connected else len(blocked)
        released = 0
        while blocked and released < max(1, room):
            key = next(iter(blocked))
            del blocked[key]
            w = self._wants.get(key)
            if w is not None and w.state is WantState.BLOCKED:
                self._move(w, WantState.QUEUED)
                released += 1
        if blocked:
            self._recheck[peer] = None
        else:
            del self._blocked[peer]

    def _requeue(self, w: _Want) -> None:
        self._move(w, WantState.QUEUED, front=True)

    def _move(self, w: _Want, to: WantState | None, front: bool = False) -> None:
        """The one place a want changes state (None: done), so the containers of `WantState`'s
        invariant change together. A QUEUED want goes to the back of the queue, or the front."""
        key = w.key
        was = w.state
        if was is WantState.QUEUED:
            if to is WantState.QUEUED:
                if front:
                    self._pending.move_to_end(key, last=False)
                return
            del self._pending[key]
        elif was is WantState.ASKED:
            del self._inflight[key]
        elif was is WantState.PARKED:
            del self._parked[key]
        if to is None:
            return
        w.state = to
        if to is WantState.QUEUED:
            self._pending[key] = None
            if front:
                self._pending.move_to_end(key, last=False)
        elif to is WantState.ASKED:
            self._inflight[key] = w
        elif to is WantState.PARKED:
            self._parked[key] = w

    def _forget(self, w: _Want) -> None:
        """Drop a want that is answered, failed or unwanted; cancel it wherever it is still asked."""
        if w.block_peer is not None:
            self._cancel(w.block_peer, w.cid)
            self._release(w)
        for peer in w.have_asked:
            self._cancel(peer, w.cid, lazy=True)
            if peer in self._peers:
                self._peers[peer].haves_out.pop(w.key, None)
        for peer in w.dont_haves:  # servers keep a want they said DONT_HAVE to until it is cancelled
            if peer in self._peers and peer not in self._banned:
                self._cancel(peer, w.cid, lazy=True)
        self._move(w, None)
        self._stalled.pop(w.key, None)
        del self._wants[w.key]
        self._done[w.key] = None
        if len(self._done) > self.config.remember_done:
            self._done.popitem(last=False)

    def _fail(self, w: _Want, why: str) -> None:
        self._stats.failed += 1
        for sid in w.sessions:
            self._out.append(FetchFailed(sid, w.cid, why))
            self._sessions[sid].cids.pop(w.key, None)
        self._forget(w)

    def _cancel(self, peer: PeerId, cid: CID, lazy: bool = False) -> None:
        """Cancel a want at `peer`. A lazy cancel (of a want-have or a DONT_HAVE watch: the peer can only
        answer it with a small presence) waits up to `cancel_delay` for another message to that peer."""
        self._stats.cancels_sent += 1
        if lazy and self.config.cancel_delay > 0:
            due = self._now + self.config.cancel_delay
            pending = self._lazy.setdefault(peer, {})
            pending.setdefault(cid.buffer, (due, cid))
            if self._lazy_due is None or due < self._lazy_due:
                self._lazy_due = due
            if len(pending) >= 256:
                self._send_lazy(peer)
            return
        self._outbox.setdefault(peer, {})[cid.buffer] = WantEntry(cid, cancel=True)

    # -- scheduling ---------------------------------------------------------------------------
    def _candidates(self, w: _Want) -> list[PeerId]:
        seen: dict[PeerId, None] = {}
        for peer, p in self._peers.items():
            if p.connected:
                seen[peer] = None
        for sid in w.sessions:
            for peer in self._sessions[sid].providers:
                seen[peer] = None
        banned = self._banned
        return [peer for peer in seen if not banned or peer not in banned]

    def _cost(self, peer: PeerId) -> float:
        p = self._peers[peer]
        service = p.service if p.service is not None else self.config.prior_service_time
        return (len(p.blocks_out) + 1) * service + p.stalls * self.config.want_timeout

    def _schedule(self, now: float) -> None:
        if self._pending:  # (`_schedule_queue`'s own first test, without a call on most steps)
            self._schedule_queue(now)
        while self._recheck:
            peer, _ = self._recheck.popitem()
            p = self._peers.get(peer)
            if p is not None and len(p.blocks_out) < self.config.peer_window and self._blocked.get(peer):
                self._unblock(peer)
                self._schedule_queue(now)

    def _schedule_queue(self, now: float) -> None:
        cfg = self.config
        if not self._pending:
            return
        # Early exits keep a steady-state step (one block in, one want out) from scanning every
        # pending CID: stop once no session or no peer has room left. During a scan windows only fill
        # (wants are asked, none is answered), so whether some session and some peer have room is
        # looked up again only after a placement filled one: `room` says it is known to hold.
        # (plain loops: this runs on every event, and a generator per count costs more than the count)
        room = False
        session_window, peer_window, banned = cfg.session_window, cfg.peer_window, self._banned
        session_map, swarm = self._sessions, not cfg.want_block_unproven
        # Candidates depend only on a want's sessions (their providers) and the connected peers, which
        # do not change during a pass: one list per session set, not one O(peers) build per CID asked.
        candidates_of: dict[tuple[SessionId, ...], list[PeerId]] = {}
        # Pending CIDs front to back while the loop removes some of them, without copying the whole queue:
        # a scan costs the CIDs it skips or places, not the length of the queue. (A loop here, not a
        # generator: a generator's resumption per CID cost more than the CID's placement.)
        pending = self._pending
        skipped = 0
        while True:
            chunk = list(islice(pending, skipped, skipped + 64))
            if not chunk:
                return
            for cid in chunk:
                if not room:
                    for sess in session_map.values():
                        if sess.inflight < session_window:  # a session has room: has a peer?
                            for peer, p in self._peers.items():
                                if len(p.blocks_out) < peer_window and not (banned and peer in banned):
                                    room = True
                                    break
                            break
                    if not room:
                        # Still look for CIDs that have no candidate at all, so they fail or start their clock.
                        self._mark_stalled(now)
                        return
                w = self._wants.get(cid)
                if w is None or w.block_peer is not None:
                    continue
                full = False
                for sid in w.sessions:
                    if session_map[sid].inflight >= session_window:
                        full = True
                        break
                if full:
                    continue
                if swarm:
                    best = self._place_swarm(w, now)
                    if best is not None:
                        if len(self._peers[best].blocks_out) >= peer_window:
                            room = False
                        else:
                            for sid in w.sessions:
                                if session_map[sid].inflight == session_window:
                                    room = False
                                    break
                    continue
                sessions = tuple(w.sessions)
                candidates = candidates_of.get(sessions)
                if candidates is None:
                    candidates = candidates_of[sessions] = self._candidates(w)
                usable = [peer for peer in candidates if peer not in w.dont_haves]
                if candidates and (not usable or cfg.park_after and self._enough_dont_haves(w, candidates, usable)):
                    if cfg.dont_have_wait > 0:
                        self._park(w, now)
                    elif not usable:
                        self._fail(w, f"all {len(candidates)} peers asked said they do not have it")
                    continue
                if not usable:
                    if w.stalled_since is None:
                        w.stalled_since = now
                        self._stalled[cid] = w
                    continue
                w.stalled_since = None
                self._stalled.pop(cid, None)
                open_ = [peer for peer in usable if len(self._peers[peer].blocks_out) < cfg.peer_window]
                if not open_:
                    continue
                order = {peer: i for i, peer in enumerate(usable)}
                best = min(
                    open_,
                    key=lambda peer: (
                        peer not in w.holders,
                        peer in w.timed_out,
                        self._cost(peer),
                        len(self._peers[peer].blocks_out),
                        order[peer],
                    ),
                )
                self._ask_block(w, best, now)
                filled_peer, filled_sessions = self._windows_filled(w, best)
                if filled_peer or filled_sessions:
                    room = False
                if w.attempts == 1 and cfg.have_fanout:
                    others = sorted(
                        (peer for peer in usable if peer != best and peer not in w.have_asked
                         and not self._peers[peer].proven
                         and len(self._peers[peer].haves_out) < cfg.peer_have_window),
                        key=lambda peer: (self._cost(peer), order[peer]),
                    )
                    for peer in others[: cfg.have_fanout]:
                        self._ask_have(w, peer)
            # what is still pending of this chunk was skipped, and stays in front of the rest
            for cid in chunk:
                if cid in pending:
                    skipped += 1

    def _windows_filled(self, w: _Want, peer: PeerId) -> tuple[int, int]:
        """After a want-block to `peer` for `w`: whether that filled the peer's window, and how many
        of `w`'s sessions it filled."""
        cfg = self.config
        return (int(len(self._peers[peer].blocks_out) >= cfg.peer_window),
                sum(1 for sid in w.sessions if self._sessions[sid].inflight == cfg.session_window))

    def _place_swarm(self, w: _Want, now: float) -> PeerId | None:
        """Swarm mode: want-block to the best peer that said HAVE or is a provider; on the first ask,
        want-have to `have_fanout` other connected peers so holders make themselves known (now, or
        with a HAVE when the block reaches them). With no such peer the CID parks until a HAVE comes.
        Returns the peer asked for the block, if any."""
        cfg, peers, banned = self.config, self._peers, self._banned
        if len(w.sessions) == 1:
            providers = self._sessions[next(iter(w.sessions))].providers
        else:
            providers = {}
            for sid in w.sessions:
                providers.update(self._sessions[sid].providers)
        window = cfg.peer_window
        usable: list[PeerId] = []
        open_: list[PeerId] = []
        for peer in w.holders:
            p = peers.get(peer)
            if p is None or peer in banned or not (p.connected or peer in providers):
                continue
            usable.append(peer)
            if len(p.blocks_out) < window:
                open_.append(peer)
        for peer in providers:
            if peer in banned or peer in w.dont_haves or peer in w.holders:
                continue
            usable.append(peer)
            p = peers.get(peer)
            if p is not None and len(p.blocks_out) < window:
                open_.append(peer)
        if not w.discovered:
            self._discover(w, providers)
        if usable:
            w.stalled_since = None
            self._stalled.pop(w.key, None)
            if not open_:
                # holders are busy: out of the queue until one of them has room (or a new one says HAVE)
                self._move(w, WantState.BLOCKED)
                for peer in usable:
                    self._blocked.setdefault(peer, {})[w.key] = None
                return None
            best = open_[0] if len(open_) == 1 else min(
                open_, key=lambda peer: (peer in w.timed_out, self._cost(peer), len(peers[peer].blocks_out)))
            self._ask_block(w, best, now)
            return best
        if w.have_asked or w.dont_haves:
            self._park(w, now)
        elif w.stalled_since is None:
            w.stalled_since = now  # nobody to ask at all: fails after no_provider_timeout
            self._stalled[w.key] = w
        return None

    def _discover(self, w: _Want, providers: dict[PeerId, None]) -> None:
        """Want-have to up to `have_fanout` connected peers, starting where the previous CID's stopped,
        so discovery (and later HAVE notifications) spreads over all peers."""
        cfg, peers = self.config, self._peers
        ring = [peer for peer, p in peers.items()
                if p.connected and not (self._banned and peer in self._banned) and peer not in providers
                and peer not in w.holders and peer not in w.dont_haves and peer not in w.have_asked
                and len(p.haves_out) < cfg.peer_have_window]
        if not ring:
            return
        w.discovered = True
        start = self._rotation % len(ring)
        chosen = (ring[start:] + ring[:start])[: cfg.have_fanout]
        self._rotation = start + len(chosen)
        for peer in chosen:
            # No DONT_HAVE asked for: the peer keeps the want and says HAVE once it has the block,
            # which is all a parked CID waits for; a DONT_HAVE per peer and CID would only cost messages.
            self._ask_have(w, peer, send_dont_have=False)

    def _enough_dont_haves(self, w: _Want, candidates: list[PeerId], usable: list[PeerId]) -> bool:
        """`park_after` peers said DONT_HAVE, and so did the session's providers: routing named them as
        holders, so until they have refused too, the swarm may not have the block anywhere."""
        if len(candidates) - len(usable) < self.config.park_after:
            return False
        return not any(peer in usable for sid in w.sessions for peer in self._sessions[sid].providers)

    def _park(self, w: _Want, now: float) -> None:
        self._move(w, WantState.PARKED)
        if w.parked_since is None:
            w.parked_since = now
            self._stats.parked += 1
        if self._parked_min is None or w.parked_since < self._parked_min:
            self._parked_min = w.parked_since

    def _unpark_all(self) -> None:
        """A peer appeared: parked wants may have a candidate that has not said DONT_HAVE."""
        for w in list(self._parked.values()):
            self._requeue(w)  # parked_since stays: a re-park does not restart the wait

    def _unstall(self) -> None:
        """A peer appeared: stalled wants that now have a candidate wait for a window, not a peer."""
        for w in list(self._stalled.values()):
            if self._candidates(w):
                w.stalled_since = None
                del self._stalled[w.key]

    def _mark_stalled(self, now: float) -> None:
        """Give CIDs with no candidate peer at all a start time for `no_provider_timeout`."""
        if any(p.connected for peer, p in self._peers.items() if peer not in self._banned):
            return  # every CID has a candidate: the connected peers
        for cid in self._pending:
            w = self._wants[cid]
            if w.stalled_since is None and not self._candidates(w):
                w.stalled_since = now
                self._stalled[cid] = w

    def _ask_block(self, w: _Want, peer: PeerId, now: float) -> None:
        p = self._peers[peer]
        self._move(w, WantState.ASKED)
        w.block_peer = peer
        w.sent_at = now
        service = p.service if p.service is not None else 0.0
        w.deadline = now + max(self.config.want_timeout, self.config.timeout_factor * service)
        key = w.key
        self._deadlines.add(w.deadline, key)
        w.attempts += 1
        w.have_asked.pop(peer, None)
        p.haves_out.pop(key, None)
        p.blocks_out[key] = w.cid
        for sid in w.sessions:
            self._sessions[sid].inflight += 1
        self._stats.want_blocks_sent += 1
        self._queue_want(peer, key, WantEntry(w.cid, WantType.BLOCK, w.priority, send_dont_have=True))

    def _ask_have(self, w: _Want, peer: PeerId, send_dont_have: bool = True) -> None:
        w.have_asked[peer] = None
        key = w.key
        self._peers[peer].haves_out[key] = None
        self._stats.want_haves_sent += 1
        self._queue_want(peer, key, WantEntry(w.cid, WantType.HAVE, w.priority, send_dont_have=send_dont_have))

    def _queue_want(self, peer: PeerId, key: bytes, entry: WantEntry) -> None:
        """`entry` goes in this step's message to `peer`, instead of a lazy cancel of the same CID."""
        self._unlazy(peer, key)
        box = self._outbox.get(peer)
        if box is None:
            box = self._outbox[peer] = {}
        box[key] = entry

    def _unlazy(self, peer: PeerId, key: bytes) -> None:
        lazy = self._lazy.get(peer)
        if lazy and lazy.pop(key, None) is not None and not lazy:
            del self._lazy[peer]

    def _send_lazy(self, peer: PeerId) -> None:
        """Put `peer`'s waiting cancels into this step's message to it."""
        box = self._outbox.setdefault(peer, {})
        for key, (_, cid) in self._lazy.pop(peer).items():
            box.setdefault(key, WantEntry(cid, cancel=True))

    def _flush_lazy(self, now: float) -> float | None:
        """Lazy cancels ride with a message going to their peer anyway; the rest go out when due (or
        when a peer has 256 of them, in `_cancel`). Returns when the next one falls due."""
        due_now = self._lazy_due is not None and self._lazy_due <= now
        if due_now:
            peers = list(self._lazy)
        elif not self._outbox:
            return self._lazy_due  # nothing to ride with, nothing due (most steps)
        else:
            peers = [peer for peer in self._outbox if peer in self._lazy]
        for peer in peers:
            lazy = self._lazy[peer]
            # dicts keep insertion order and every due is insertion time + cancel_delay
            if peer in self._outbox or next(iter(lazy.values()))[0] <= now:
                self._send_lazy(peer)
        if due_now:
            self._lazy_due = min((next(iter(lazy.values()))[0] for lazy in self._lazy.values()), default=None)
        return self._lazy_due

    def _finish(self, now: float) -> list[Action]:
        out = self._out
        earliest = self._flush_lazy(now) if self._lazy else None
        for peer, entries in self._outbox.items():
            if entries:
                out.append(Send(peer, Message(wants=tuple(entries.values()))))
        at = self._deadlines.next_deadline()
        if at is not None and (earliest is None or at < earliest):  # `min`, without the call
            earliest = at
        for w in self._stalled.values():
            at = cast(float, w.stalled_since) + self.config.no_provider_timeout
            earliest = at if earliest is None else min(earliest, at)
        if self._parked:
            parked_min = self._parked_min
            assert parked_min is not None  # set while any CID is parked (not `cast`: a call on every step)
            at = parked_min + self.config.dont_have_wait
            earliest = at if earliest is None else min(earliest, at)
        if earliest is not None and (self._timer_at is None or earliest < self._timer_at):
            self._timer_at = earliest
            out.append(SetTimer(earliest))
        self._out, self._outbox = [], {}
        return out
