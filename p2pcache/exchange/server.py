"""The server half of the block exchange: what to send to whom, from the local store, as a sans-IO engine.

Owns: one ledger per peer (its wants, what is queued for it, what it has been sent, bytes written but
not yet acknowledged) and the order in which peers are served. It must not write to a socket or read
a clock; it does not verify blocks (the store only holds verified blocks) and does not decide whom to
serve at all (that is the driver's or node's policy: it simply never sends events for refused peers).

Store access is a narrow synchronous `BlockSource` (`has`, `size`, `get`) injected at construction,
not `LoadBlock` actions answered by `BlockLoaded` events. Every decision needs store facts in its
middle: a want-have is answered from `has`/`size`, a want's place in the byte budget from `size`, a
batch is filled with `get` until the message is full. Split across action/event round-trips, each of
those would become a pending state to track, cancel and test, for a store that is local and whose
index lookups are synchronous anyway. The engine still does no I/O of its own: a driver that finds
`get` slow runs `handle` in a worker thread, and tests inject a dict.

Decisions:
- want-have: HAVE if we have it (or the block itself when it is at most `inline_have_max` bytes, as
  the spec allows); DONT_HAVE if not and the peer asked for DONT_HAVE. want-block: the block, or
  DONT_HAVE if asked. A want we cannot answer yet stays in the peer's wantlist until it cancels it, as
  in go-bitswap and Helia: it waits in the ledger until `BlocksAdded` names its CID, and is then
  answered. After a DONT_HAVE (`keep_wants_after_dont_have`) it is answered with HAVE even if it was
  a want-block (or with the block if small): the peer has most likely asked elsewhere since, and a
  HAVE lets it choose instead of receiving a second copy. Kept wants do not count towards
  `max_wants_per_peer` but have a bound of that size of their own, the oldest making room for a new
  one (a peer that never cancels cannot lock itself out or grow the ledger). Cancel drops a want and anything queued for it. `full`
  replaces the peer's wantlist.
- A peer that sends us a block or says HAVE for it holds it: a want it left with us for that block
  (typically a want-have watch whose cancel has not arrived) is dropped with any presence queued for
  it, so two peers watching a block at each other exchange one HAVE, not two. Its queued blocks stay
  (a want-block is the peer's to cancel). The driver hands every received message to the server
  before the client, so this is known before the client's blocks are stored and announced.
- Within a peer, blocks go higher priority first (then arrival order), from a heap; presences go
  oldest first and before blocks, because they are small and let the client re-ask elsewhere sooner.
- Across peers, deficit round-robin by bytes: each visit adds `quantum` bytes of credit to a peer
  with blocks queued, and a block goes out when the credit covers it, so peers share the upload
  by bytes whatever their block sizes.
- Per peer at most `max_outstanding_bytes` of messages with blocks are handed to the driver and not
  yet acknowledged with `MessageSent` (presence-only messages are not counted and need no ack), so a slow reader does not hold blocks for everyone in memory; one block is always
  allowed when nothing is outstanding. Each message stays within `max_message_size`.
- Across all peers at most `max_total_outstanding_bytes` of blocks are handed to the driver and not
  yet acknowledged (0 = no limit; one block always goes when nothing is outstanding). Blocks are
  stored and forwarded whole, so a swarm spreads a block fastest when a server sends it to one peer
  after another rather than to all at once at a fraction of the rate each: the first receiver can
  serve it onwards after one block time instead of after n. A short queue also keeps the small
  messages the node sends (wants, presences) from waiting behind megabytes of blocks in its uplink.
- Super-seeding (`superseed_window` T > 0, off at 0): a block queued for one peer, or sent to it less
  than T seconds ago, is not handed to another: their wants for it
  (want-block or want-have) are answered DONT_HAVE where asked, and kept as watchers. The block's
  lending ends T after it went out, or at once when the peer it went to disconnects (it may have
  left with it) or cancels before it went; then the watchers still wanting it hear HAVE and may ask
  again. So the seed's uplink carries each block about once and the peers it went to serve the rest,
  as BitTorrent's super-seeding does; a block nobody else passes on is only delayed by T. Blocks up
  to `inline_have_max` bytes are exempt. The window needs the engine's timer (`SetTimer`/`Tick`).
  A block this node got from the swarm (named by `BlocksAdded`) is lent for `superseed_relay_window`
  instead (None: the same T): other peers hold it already, so refusing it for T saves no scarce
  uplink, and a fleet of runners each refusing what it has passed on once leaves its fellow fetchers
  asking peer after peer while the block sits unused.
- New want entries are rate-limited per peer by a token bucket (`want_rate`/s, burst `want_burst`)
  and a peer holds at most `max_wants_per_peer` wants; refused wants get DONT_HAVE if asked for (the
  spec's "has it but is not willing to give it") and are otherwise dropped.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Protocol

from ..content.cid import CID
from .deadlines import Deadlines
from .errors import ExchangeUsageError
from .events import (
    Action,
    AddProviders,
    BlocksAdded,
    CloseSession,
    MessageReceived,
    MessageSent,
    PeerConnected,
    PeerDisconnected,
    PeerId,
    PeerMisbehaved,
    Send,
    SetTimer,
    Tick,
    Want,
)
from .message import (
    MAX_BLOCK_SIZE,
    MAX_MESSAGE_SIZE,
    Block,
    Message,
    Presence,
    WantEntry,
    WantType,
    block_wire_size,
    presence_wire_size,
    uvarint_size,
)


class BlockSource(Protocol):
    """What the server reads from the store. Synchronous; `get` returns verified bytes or None."""

    def has(self, cid: CID) -> bool: ...

    def size(self, cid: CID) -> int | None: ...

    def get(self, cid: CID) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class ServerConfig:
    max_outstanding_bytes: int = 4 * 1024 * 1024  # per peer, handed to the driver and not yet acknowledged
    quantum: int = 256 * 1024  # bytes of credit per round-robin visit
    max_message_size: int = MAX_MESSAGE_SIZE
    max_wants_per_peer: int = 4096
    want_rate: float = 4000.0  # new want entries per second per peer
    want_burst: float = 8192.0
    inline_have_max: int = 1024  # answer a want-have with the block itself up to this size
    keep_wants_after_dont_have: bool = True  # a DONT_HAVE'd want waits for BlocksAdded (answered HAVE)
    max_total_outstanding_bytes: int = 0  # blocks handed to the driver, not yet acknowledged, all peers
    superseed_window: float = 0.0  # seconds a block handed to one peer is refused to others (0 = off)
    have_batch_delay: float = 0.0  # BlocksAdded answers waiting wants this long after, in one batch (0 = at once)
    # super-seeding: lent blocks one peer may hold that no other peer is known to have got since, while
    # other peers are refused blocks (0 = no bound)
    superseed_share: int = 0
    # super-seeding of blocks this node fetched from the swarm (`BlocksAdded`): lent this long (None =
    # superseed_window; 0 = not lent). Runners that refused each block they passed on for the seed's whole
    # window left the fleet's wants mostly refused (node-fetch 20 x 16 MiB, LAN mesh: ~400 DONT_HAVEs per
    # 10 ms per fetcher while it got 5 blocks in the first 80 ms, every session window full of refused asks).
    superseed_relay_window: float | None = None

    def __post_init__(self) -> None:
        if self.quantum < 1 or self.max_outstanding_bytes < 1 or self.max_message_size < 64:
            raise ExchangeUsageError(f"server limits must be positive: {self}")
        if self.max_message_size > MAX_MESSAGE_SIZE:
            raise ExchangeUsageError(f"max_message_size {self.max_message_size} is over bitswap's {MAX_MESSAGE_SIZE}")
        if not self.have_batch_delay >= 0:
            raise ExchangeUsageError(f"have_batch_delay must be >= 0 seconds, not {self.have_batch_delay}")
        if not self.superseed_window >= 0:
            raise ExchangeUsageError(f"superseed_window must be >= 0 seconds, not {self.superseed_window}")
        if self.superseed_relay_window is not None and not self.superseed_relay_window >= 0:
            raise ExchangeUsageError(f"superseed_relay_window must be >= 0 seconds, not {self.superseed_relay_window}")
        if self.superseed_share < 0:
            raise ExchangeUsageError(f"superseed_share must be >= 0 blocks, not {self.superseed_share}")


@dataclass(frozen=True, slots=True)
class ServerStats:
    superseed_refused: int  # wants answered DONT_HAVE (or kept unanswered) because the block was lent
    superseed_released_early: int  # lendings ended before the window: the peer left or cancelled
    superseed_lent: int  # blocks lent now
    superseed_share_refused: int = 0  # wants refused because the peer held its share of unspread lent blocks


@dataclass(frozen=True, slots=True)
class Ledger:
    """What the server has done for one peer, and what it still owes it."""

    blocks_sent: int
    bytes_sent: int
    haves_sent: int
    dont_haves_sent: int
    wants_refused: int
    queued_blocks: int
    queued_bytes: int
    outstanding_bytes: int
    waiting: int  # wants for blocks we do not have, kept until BlocksAdded


_BLOCK, _HAVE, _DONT_HAVE = 0, 1, 2


class _Task:
    __slots__ = ("cid", "key", "kind", "priority", "seq", "size", "send_dont_have", "wire")

    def __init__(self, cid: CID, kind: int, priority: int, seq: int, size: int, send_dont_have: bool) -> None:
        self.cid, self.kind, self.priority, self.seq = cid, kind, priority, seq
        self.key = cid.buffer
        self.size, self.send_dont_have = size, send_dont_have
        self.wire = block_wire_size(cid, size) if kind == _BLOCK else presence_wire_size(cid, kind == _HAVE)


class _PeerLedger:
    __slots__ = ("peer", "tasks", "presences", "_heap", "_pushes", "block_bytes", "waiting", "kept", "outstanding", "deficit", "served",
                 "tokens", "refilled_at", "blocks_sent", "bytes_sent", "haves_sent", "dont_haves_sent",
                 "wants_refused")

    def __init__(self, peer: PeerId, burst: float, now: float) -> None:
        self.peer = peer
        # Every map of the server is keyed by the CID's bytes (`CID.buffer`): a bytes object hashes in C
        # and caches its hash, where a CID key costs a Python `__hash__` call per lookup.
        self.tasks: dict[bytes, _Task] = {}  # every queued task, by CID bytes
        self.presences: dict[bytes, _Task] = {}  # the HAVE / DONT_HAVE tasks among them, oldest first
        # block tasks by (priority desc, arrival): a heap whose entries go stale when their task is
        # dropped or replaced, skipped when they reach the top
        self._heap: list[tuple[int, int, int, _Task]] = []  # (-priority, seq, push number, task)
        self._pushes = 0  # a task replaced by one with the same priority and seq must not tie
        self.block_bytes = 0  # bytes of the queued block tasks
        self.waiting: dict[bytes, WantEntry] = {}
        self.kept: dict[bytes, None] = {}  # waiting wants already answered DONT_HAVE, oldest first
        self.outstanding = 0
        self.deficit = 0
        self.served = 0  # when a block last went to it (a server sequence number), for fairness
        self.tokens = burst
        self.refilled_at = now
        self.blocks_sent = self.bytes_sent = self.haves_sent = self.dont_haves_sent = self.wants_refused = 0

    def put(self, task: _Task) -> None:
        key = task.key
        if key in self.tasks:
            self.drop(key)
        self.tasks[key] = task
        if task.kind == _BLOCK:
            self._pushes += 1
            heapq.heappush(self._heap, (-task.priority, task.seq, self._pushes, task))
            self.block_bytes += task.size
        else:
            self.presences[task.key] = task

    def drop(self, key: bytes) -> _Task | None:
        t = self.tasks.pop(key, None)
        if t is not None:
            if t.kind == _BLOCK:
                self.block_bytes -= t.size
            else:
                del self.presences[key]
        return t

    def clear(self) -> None:
        self.tasks.clear()
        self.presences.clear()
        self._heap.clear()
        self.block_bytes = 0

    def head(self) -> _Task | None:
        """The next block task to send, or None."""
        heap, tasks = self._heap, self.tasks
        while heap and tasks.get(heap[0][3].key) is not heap[0][3]:
            heapq.heappop(heap)
        return heap[0][3] if heap else None


class BitswapServer:
    """Sans-IO bitswap server: `handle(event, now) -> list[Action]`, reading blocks from `source`."""

    def __init__(self, source: BlockSource, config: ServerConfig | None = None) -> None:
        self.source = source
        self.config = config or ServerConfig()
        self._ledgers: dict[PeerId, _PeerLedger] = {}
        # Blocks up to this size fit a message whatever their CID (a block's entry is at most its data
        # plus 64 bytes of framing and CID prefix), so `_consider` skips computing their wire size.
        self._carried = min(MAX_BLOCK_SIZE, self.config.max_message_size - 128 - 64)
        # Ledgers with tasks queued, in the order they got them: the round-robin ring. Visiting only
        # these keeps a step's cost independent of how many idle peers are connected.
        self._active: dict[PeerId, _PeerLedger] = {}  # peer -> its ledger
        # Peers whose next block waits only for room under `max_total_outstanding_bytes`, out of the
        # ring (a seed with hundreds of waiting peers must not visit them all on every event), in a
        # heap by block size: when acknowledgements make room, the ones that fit come back.
        self._capped: dict[PeerId, int] = {}  # peer -> seq of its live heap entry
        self._cap_heap: list[tuple[int, int, int, PeerId]] = []  # (block size, last served, seq, peer)
        self._cursor = 0
        self._seq = 0
        self._outstanding_total = 0
        self._now = 0.0
        # Super-seeding: block -> (peer it is lent to, since when); blocks lent per peer; peers that
        # were refused a lent block and keep a want for it (checked against their ledger when the
        # lending ends); each lent block's window end.
        # lendings ended. Keyed by CID bytes, as the ledgers.
        self._lent: dict[bytes, tuple[PeerId, float]] = {}
        self._lent_to: dict[PeerId, dict[bytes, None]] = {}
        self._watchers: dict[bytes, dict[PeerId, None]] = {}
        self._lendings: Deadlines[bytes] = Deadlines()
        # The share bound (`superseed_share`): per peer, its lent blocks no other peer is known to have
        # got since (another peer's cancel or HAVE for the block says it has); the keys of wants refused
        # because that share was full (reconsidered when it has room); when peers were last refused a
        # lent block, latest last (another peer refused lately is what makes the share bind).
        self._unspread: dict[PeerId, dict[bytes, None]] = {}
        self._share_refused: dict[PeerId, dict[bytes, None]] = {}
        self._refused_at: dict[PeerId, float] = {}
        self._timer_at: float | None = None
        self._refused = self._released_early = self._share_refusals = 0
        self._added: dict[CID, None] = {}  # BlocksAdded not yet answered (have_batch_delay), in order
        # Blocks fetched from the swarm (`BlocksAdded`), lent for `superseed_relay_window`: kept only
        # when that differs from superseed_window, oldest forgotten first past RELAYED_MAX (a forgotten
        # one is lent for the full window: the safe side for an uplink).
        cfg = self.config
        relay = cfg.superseed_relay_window
        self._relay_window = relay if cfg.superseed_window and relay is not None and relay != cfg.superseed_window else None
        self._relayed: dict[bytes, None] = {}
        self._added_due: float | None = None

    # -- public API ---------------------------------------------------------------------------
    def handle(self, event: object, now: float) -> list[Action]:
        self._now = now
        if isinstance(event, MessageReceived):
            msg = event.message
            if msg.blocks or msg.presences:
                self._on_holdings(event.peer, msg)
            if not (msg.wants or msg.full):
                return []  # nothing queued or sendable changed
            self._on_wants(event.peer, msg, now)
        elif isinstance(event, MessageSent):
            led = self._ledgers.get(event.peer)
            if led is not None:
                self._outstanding_total -= min(led.outstanding, event.size)
                led.outstanding = max(0, led.outstanding - event.size)
        elif isinstance(event, (PeerDisconnected, PeerMisbehaved)):
            led = self._ledgers.pop(event.peer, None)
            if led is not None:
                self._outstanding_total -= led.outstanding
            self._active.pop(event.peer, None)
            self._capped.pop(event.peer, None)
            for key in list(self._lent_to.get(event.peer, ())):
                self._released_early += 1
                self._end_lending(key)
            self._share_refused.pop(event.peer, None)
            self._refused_at.pop(event.peer, None)
        elif isinstance(event, BlocksAdded):
            if self._relay_window is not None:
                self._note_relayed(event.cids)
            if self.config.have_batch_delay:
                # Debounced: the HAVEs (and blocks) for waiting wants of everything added within the
                # delay go out together, one message per watching peer instead of one per block.
                self._added.update(dict.fromkeys(event.cids))
                if self._added_due is None:
                    self._added_due = now + self.config.have_batch_delay
            else:
                self._on_blocks_added(event.cids)
        elif isinstance(event, Tick):
            self._timer_at = None
            self._expire_lendings(now)
        elif isinstance(event, (PeerConnected, Want, AddProviders, CloseSession)):
            pass  # nothing to do: a ledger starts with the peer's first want; client events
        else:
            raise ExchangeUsageError(f"the bitswap server does not handle {type(event).__name__}")
        if self._added_due is not None and now >= self._added_due:
            added, self._added, self._added_due = tuple(self._added), {}, None
            self._on_blocks_added(added)
        return self._finish([])

    def stats(self) -> ServerStats:
        return ServerStats(superseed_refused=self._refused, superseed_released_early=self._released_early,
                           superseed_lent=len(self._lent), superseed_share_refused=self._share_refusals)

    # -- super-seeding ------------------------------------------------------------------------
    def lend_for_stream(self, peer: PeerId, cid: CID, size: int, now: float) -> tuple[bool, list[Action]]:
        """The super-seeding decision for a block another protocol (the DAG transfer) is about to send
        `peer`, so one lending table governs every byte this node uploads: False if the block is lent
        to another peer (do not send it), else True and the block is lent to `peer` from `now`. The
        actions (a `SetTimer` for the window's end, HAVEs to bitswap watchers of a lending that
        ended) are the driver's to apply. Always True with super-seeding off or for small blocks."""
        if not self.config.superseed_window or size <= self.config.inline_have_max:
            return True, []
        self._now = now
        if self._lent_elsewhere(peer, cid.buffer):
            self._refused += 1
            self._note_refused(peer)
            return False, self._finish([])
        if self._over_share(peer):
            self._share_refusals += 1
            self._note_refused(peer)
            return False, self._finish([])
        self._lend(peer, cid.buffer)
        return True, self._finish([])

    def _finish(self, out: list[Action]) -> list[Action]:
        out += self._pump()
        lend_at = self._lendings.next_deadline() if self._lent else None  # every live deadline is a lending
        if lend_at is not None or self._added_due is not None:
            at = min(lend_at if lend_at is not None else math.inf,
                     self._added_due if self._added_due is not None else math.inf)
            if self._timer_at is None or at < self._timer_at:
                self._timer_at = at
                out.append(SetTimer(at))
        return out

    RELAYED_MAX = 1 << 17  # blocks remembered as fetched from the swarm (a 8 GiB archive's chunks)

    def _note_relayed(self, cids: tuple[CID, ...]) -> None:
        relayed = self._relayed
        for cid in cids:
            relayed[cid.buffer] = None
        while len(relayed) > self.RELAYED_MAX:
            del relayed[next(iter(relayed))]

    def _window(self, key: bytes) -> float:
        """How long `key` stays lent once handed to a peer."""
        if self._relay_window is not None and key in self._relayed:
            return self._relay_window
        return self.config.superseed_window

    def _lend(self, peer: PeerId, key: bytes) -> None:
        old = self._lent.get(key)
        if old is not None and old[0] != peer:
            self._lent_to[old[0]].pop(key, None)
            self._spread(key)
        if self.config.superseed_share and (old is None or old[0] != peer):
            self._unspread.setdefault(peer, {})[key] = None
        self._lent[key] = (peer, self._now)
        self._lent_to.setdefault(peer, {})[key] = None
        self._lendings.add(self._now + self._window(key), key)

    # -- the share bound: BitTorrent super-seeding's "a new piece once the last one was seen elsewhere"
    def _note_refused(self, peer: PeerId) -> None:
        refused = self._refused_at
        refused.pop(peer, None)
        refused[peer] = self._now
        if len(refused) > 64:
            del refused[next(iter(refused))]

    def _over_share(self, peer: PeerId) -> bool:
        """`peer` holds its share of lent blocks nobody else is known to have, and another peer was
        refused a block lately: it gets no more until one of them spreads (or its window ends). A lone
        fetcher (nobody else refused) is never bound."""
        share = self.config.superseed_share
        if not share or len(self._unspread.get(peer, ())) < share:
            return False
        window, now = self.config.superseed_window, self._now
        for other in reversed(self._refused_at):  # the latest two suffice: one of them is not `peer`
            if other != peer:
                return self._refused_at[other] + window > now
        return False

    def _spread(self, key: bytes) -> None:
        """Another peer than the one `key` is lent to has it now: it no longer counts against the
        holder's share, and the holder's refused wants are looked at again."""
        lent = self._lent.get(key)
        if lent is None:
            return
        holder = lent[0]
        unspread = self._unspread.get(holder)
        if unspread is None or key not in unspread:
            return
        del unspread[key]
        if not unspread:
            del self._unspread[holder]
        self._readmit(holder)

    def _readmit(self, peer: PeerId) -> None:
        """`peer`'s share has room: wants refused for it are considered again (the peer hears HAVE,
        or gets the block, while the share lasts)."""
        refused = self._share_refused.get(peer)
        led = self._ledgers.get(peer)
        while refused and led is not None and not self._over_share(peer):
            key = next(iter(refused))
            del refused[key]
            e = led.waiting.get(key)
            if e is not None:
                self._consider(led, e)
        if not refused or led is None:
            self._share_refused.pop(peer, None)

    def _lent_elsewhere(self, peer: PeerId, key: bytes) -> bool:
        lent = self._lent.get(key)
        if lent is None or lent[0] == peer:
            return False
        if lent[1] + self._window(key) <= self._now and not self._still_queued(lent[0], key):
            self._end_lending(key)  # over, though the timer has not fired yet
            return False
        return True

    def _still_queued(self, peer: PeerId, key: bytes) -> bool:
        """The block lent to `peer` waits in its queue: it has not been handed over yet."""
        led = self._ledgers.get(peer)
        t = led.tasks.get(key) if led is not None else None
        return t is not None and t.kind == _BLOCK

    def _end_lending(self, key: bytes) -> None:
        """The block may go to others again: watchers still wanting it hear HAVE (or get it, if small)."""
        peer, _ = self._lent.pop(key)
        self._lendings.remove(key)
        unspread = self._unspread.get(peer)
        if unspread is not None and key in unspread:
            del unspread[key]
            if not unspread:
                del self._unspread[peer]
            self._readmit(peer)
        to = self._lent_to.get(peer)
        if to is not None:
            to.pop(key, None)
            if not to:
                del self._lent_to[peer]
        for watcher in self._watchers.pop(key, ()):
            led = self._ledgers.get(watcher)
            if led is not None and (e := led.waiting.get(key)) is not None:
                self._consider(led, e)

    def _expire_lendings(self, now: float) -> None:
        for key in self._lendings.expire(now):
            lent = self._lent.get(key)
            if lent is None:
                continue
            window = self._window(key)
            if lent[1] + window > now:
                continue  # lent again while earlier ones ended (its new window runs)
            if self._still_queued(lent[0], key):
                # not handed over yet (a long queue): the window starts when it goes out
                self._lendings.add(now + window, key)
                continue
            self._end_lending(key)

    def ledger(self, peer: PeerId) -> Ledger | None:
        led = self._ledgers.get(peer)
        if led is None:
            return None
        return Ledger(
            blocks_sent=led.blocks_sent, bytes_sent=led.bytes_sent, haves_sent=led.haves_sent,
            dont_haves_sent=led.dont_haves_sent, wants_refused=led.wants_refused,
            queued_blocks=len(led.tasks) - len(led.presences),
            queued_bytes=led.block_bytes, outstanding_bytes=led.outstanding, waiting=len(led.waiting),
        )

    # -- wants --------------------------------------------------------------------------------
    def _on_wants(self, peer: PeerId, msg: Message, now: float) -> None:
        cfg = self.config
        led = self._ledgers.get(peer)
        if led is None:
            led = self._ledgers[peer] = _PeerLedger(peer, cfg.want_burst, now)
        led.tokens = min(cfg.want_burst, led.tokens + (now - led.refilled_at) * cfg.want_rate)
        led.refilled_at = now
        if msg.full:
            led.clear()
            led.waiting.clear()
            led.kept.clear()
        # (the ledger's maps are never replaced, only changed: held here for a wantlist of thousands)
        tasks, waiting, kept, max_wants = led.tasks, led.waiting, led.kept, cfg.max_wants_per_peer
        for e in msg.wants:
            key = e.cid.buffer
            if e.cancel:
                t = led.drop(key)
                waiting.pop(key, None)
                kept.pop(key, None)
                if t is not None and t.kind == _BLOCK and key in self._lent_to.get(peer, ()):
                    self._released_early += 1  # it never went: someone else may have it now
                    self._end_lending(key)
                elif self._unspread:
                    self._spread_if_elsewhere(peer, key)  # it cancels: it got the block elsewhere
                continue
            known = key in tasks or key in waiting
            # kept wants have their own bound
            if not known and (led.tokens < 1 or len(tasks) + len(waiting) - len(kept) >= max_wants):
                led.wants_refused += 1
                # Bound even the refusals: a peer that stops reading cannot grow our queue forever.
                if e.send_dont_have and len(tasks) < 2 * max_wants:
                    self._queue(led, e, _DONT_HAVE, 0)
                continue
            if not known:
                led.tokens -= 1
            self._consider(led, e)

    def _on_holdings(self, peer: PeerId, msg: Message) -> None:
        """A peer that sends a block or says HAVE holds it: a want it left with us for that block (a
        want-have watch whose cancel may still be on its way) needs no HAVE, and a presence queued
        for it no longer says anything the peer needs. Without this, two peers watching a block at
        each other both send HAVE once each has it, though the second HAVE only tells the first
        what it already knows. Queued blocks stay: a want-block is the peer's to cancel."""
        if self._unspread:
            for b in msg.blocks:
                self._spread_if_elsewhere(peer, b.cid.buffer)
            for p in msg.presences:
                if p.have:
                    self._spread_if_elsewhere(peer, p.cid.buffer)
        led = self._ledgers.get(peer)
        if led is None or not (led.waiting or led.presences):
            return
        for b in msg.blocks:
            self._peer_holds(led, b.cid.buffer)
        waiting, queued = led.waiting, led.presences
        for p in msg.presences:
            if p.have:
                key = p.cid.buffer  # `_peer_holds`, inlined: one HAVE per message is the common case
                if waiting.pop(key, None) is not None:
                    led.kept.pop(key, None)
                if key in queued:
                    led.drop(key)

    def _spread_if_elsewhere(self, peer: PeerId, key: bytes) -> None:
        lent = self._lent.get(key)
        if lent is not None and lent[0] != peer:
            self._spread(key)

    @staticmethod
    def _peer_holds(led: _PeerLedger, key: bytes) -> None:
        if led.waiting.pop(key, None) is not None:
            led.kept.pop(key, None)
        if key in led.presences:
            led.drop(key)

    def _consider(self, led: _PeerLedger, e: WantEntry) -> None:
        key = e.cid.buffer
        size = self.source.size(e.cid)
        if size is not None and size > self._carried and (
            size > MAX_BLOCK_SIZE or block_wire_size(e.cid, size) > self.config.max_message_size - 64
        ):
            size = None  # a block bitswap cannot carry is a block we do not have, for this protocol
        if size is None:
            if e.send_dont_have:
                self._queue(led, e, _DONT_HAVE, 0)
                if self.config.keep_wants_after_dont_have:
                    # Kept as a want-have that needs no second DONT_HAVE: when the block arrives,
                    # the peer hears HAVE and decides whether it still wants it from us.
                    self._keep(led, e)
                else:
                    led.waiting.pop(key, None)
                    led.kept.pop(key, None)
            else:
                led.drop(key)  # a want we cannot answer yet waits (the common want-have of a fleet)
                led.waiting[key] = e
                led.kept.pop(key, None)
            return
        if self.config.superseed_window and size > self.config.inline_have_max:
            if self._lent_elsewhere(led.peer, key):
                self._refuse_lent(led, e)
                return
            if key not in self._lent_to.get(led.peer, ()) and self._over_share(led.peer):
                self._refuse_share(led, e)
                return
        led.waiting.pop(key, None)
        led.kept.pop(key, None)
        if e.want_type == WantType.BLOCK or size <= self.config.inline_have_max:
            if self.config.superseed_window and size > self.config.inline_have_max:
                self._lend(led.peer, key)
            self._queue(led, e, _BLOCK, size)
        else:
            old = led.tasks.get(key)
            if old is not None and old.kind == _BLOCK:
                # a want-have does not downgrade a queued want-block; it only changes its priority
                led.put(_Task(e.cid, _BLOCK, e.priority, old.seq, old.size, old.send_dont_have))
                return
            self._queue(led, e, _HAVE, 0)

    def _refuse_share(self, led: _PeerLedger, e: WantEntry) -> None:
        """A want from a peer that holds its share of unspread lent blocks: refused (`_refuse`), and
        considered again when its share has room (`_readmit`)."""
        self._share_refusals += 1
        self._share_refused.setdefault(led.peer, {})[self._refuse(led, e)] = None

    def _refuse_lent(self, led: _PeerLedger, e: WantEntry) -> None:
        """A want for a block lent to another peer: refused (`_refuse`) until the lending ends."""
        self._refused += 1
        self._watchers.setdefault(self._refuse(led, e), {})[led.peer] = None

    def _refuse(self, led: _PeerLedger, e: WantEntry) -> bytes:
        """DONT_HAVE if asked, and the want kept as a want-have that needs no second DONT_HAVE.
        Returns the CID's key."""
        self._note_refused(led.peer)
        key = e.cid.buffer
        led.drop(key)
        if e.send_dont_have:
            self._queue(led, e, _DONT_HAVE, 0)
            self._keep(led, e)
        else:
            led.waiting[key] = WantEntry(e.cid, WantType.HAVE, e.priority)
        return key

    def _keep(self, led: _PeerLedger, e: WantEntry) -> None:
        """Keep a want answered DONT_HAVE as a want-have, within the kept wants' own bound (the oldest
        makes room)."""
        key = e.cid.buffer
        led.waiting[key] = WantEntry(e.cid, WantType.HAVE, e.priority)
        led.kept.pop(key, None)
        if len(led.kept) >= self.config.max_wants_per_peer:
            oldest = next(iter(led.kept))
            del led.kept[oldest]
            del led.waiting[oldest]
        led.kept[key] = None

    def _queue(self, led: _PeerLedger, e: WantEntry, kind: int, size: int) -> None:
        old = led.tasks.get(e.cid.buffer)
        seq = old.seq if old is not None else self._next_seq()
        led.put(_Task(e.cid, kind, e.priority, seq, size, e.send_dont_have))
        self._active[led.peer] = led
        self._capped.pop(led.peer, None)  # its head may have changed, or it has presences now

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _on_blocks_added(self, cids: tuple[CID, ...]) -> None:
        keys = [cid.buffer for cid in cids]
        for led in self._ledgers.values():
            waiting = led.waiting
            if not waiting:
                continue
            for key in keys:
                e = waiting.get(key)
                if e is not None:
                    self._consider(led, e)

    # -- sending ------------------------------------------------------------------------------
    def _uncap(self) -> list[PeerId]:
        """Peers whose waiting block fits under the total limit now rejoin the ring; returned in the
        order they go first: smallest block, then the one served longest ago."""
        heap, cap = self._cap_heap, self.config.max_total_outstanding_bytes
        capped, total, heappop = self._capped, self._outstanding_total, heapq.heappop
        back: list[PeerId] = []
        while heap:
            size, _, seq, peer = heap[0]
            if capped.get(peer) != seq:
                heappop(heap)  # stale: it rejoined the ring already, or left
            elif not total or total + size <= cap:
                heappop(heap)
                del capped[peer]
                self._active[peer] = self._ledgers[peer]
                back.append(peer)
            else:
                break
        return back

    def _pump(self) -> list[Action]:
        out: list[Action] = []
        active = self._active
        if not active and not self._cap_heap:
            return out  # the common step of a busy node: nothing queued for anyone
        back = self._uncap() if self._cap_heap else []
        # `_drop_idle` and the ring's list in one pass (a peer with no tasks leaves the ring)
        peers = [peer for peer, led in active.items() if led.tasks]
        if len(peers) != len(active):
            self._drop_idle()
        n = len(peers)
        if not n:
            return out
        # Rounds of deficit round-robin. A peer that cannot send in one round cannot in the next (its
        # queue is unchanged and outstanding bytes only grow while pumping), so a round visits only the
        # peers that made progress in the one before.
        start = self._cursor % n
        rnd = peers[start:] + peers[:start] if start else peers
        self._cursor = (self._cursor + 1) % n
        if back:  # they waited for room: they go first
            first = set(back)
            rnd = [peer for peer in back if peer in active] + [peer for peer in rnd if peer not in first]
        ledgers, cfg = self._ledgers, self.config
        max_out, cap, quantum = cfg.max_outstanding_bytes, cfg.max_total_outstanding_bytes, cfg.quantum
        while rnd:
            progressed = []
            for peer in rnd:
                led = ledgers[peer]
                # `_can_send`, inlined (a visit per peer and round: the server's innermost loop)
                tasks = led.tasks
                if not tasks:
                    led.deficit = 0
                    continue
                head = led.head()
                if head is None:
                    led.deficit = 0
                if not led.presences:  # presences go whatever the block limits say; `_build` applies those
                    busy = led.outstanding
                    if head is None or busy and (busy >= max_out or busy + head.wire > max_out):
                        continue
                    total = self._outstanding_total
                    if cap and total and total + head.wire > cap:
                        # only the total limit holds its block back: out of the ring until acks make room
                        del active[peer]
                        seq = self._next_seq()
                        self._capped[peer] = seq
                        heapq.heappush(self._cap_heap, (head.wire, led.served, seq, peer))
                        continue
                if head is not None:
                    led.deficit += quantum
                progressed.append(peer)
                send = self._build(led)
                if send is not None:
                    # Only messages carrying blocks count against the outstanding limits (and so want
                    # a `MessageSent`): presences are a few bytes each and must not wait behind blocks.
                    msg, size = send
                    if msg.blocks:
                        led.served = self._next_seq()
                        out.append(Send(peer, msg, size))
                        led.outstanding += size
                        self._outstanding_total += size
                    else:
                        out.append(Send(peer, msg, 0))
            rnd = progressed
        self._drop_idle()  # so a peer that gets tasks again joins the ring at its end
        return out

    def _drop_idle(self) -> None:
        active = self._active
        if not active:
            return
        idle = [peer for peer, led in active.items() if not led.tasks]
        for peer in idle:
            active.pop(peer).deficit = 0

    def _build(self, led: _PeerLedger) -> tuple[Message, int] | None:
        cfg = self.config
        budget = cfg.max_message_size - 6  # room for the pendingBytes field
        size = 0
        presences: list[Presence] = []
        blocks: list[Block] = []
        t: _Task | None  # the presences' loop, then the block queue's head
        pending_presences, tasks = led.presences, led.tasks
        for key, t in list(pending_presences.items()):  # oldest first
            s = t.wire
            if size + s > budget:
                break
            have = t.kind == _HAVE
            presences.append(Presence(t.cid, have))
            size += s
            del tasks[key], pending_presences[key]  # `led.drop` of a presence
            if have:
                led.haves_sent += 1
            else:
                led.dont_haves_sent += 1
        while True:
            t = led.head()
            if t is None:
                break
            s = t.wire
            if t.size > led.deficit or size + s > budget:
                break
            if blocks and led.outstanding + size + s > cfg.max_outstanding_bytes:
                break
            if led.outstanding and led.outstanding + size + s > cfg.max_outstanding_bytes:
                break
            total = self._outstanding_total + size + s
            if cfg.max_total_outstanding_bytes and total > cfg.max_total_outstanding_bytes and (
                    blocks or self._outstanding_total):
                break
            led.drop(t.key)
            data = self.source.get(t.cid)
            if data is None or len(data) != t.size:
                # Gone (or changed size) since the want was queued: answer as if we never had it.
                if t.send_dont_have and size + presence_wire_size(t.cid, False) <= budget:
                    presences.append(Presence(t.cid, False))
                    size += presence_wire_size(t.cid, False)
                    led.dont_haves_sent += 1
                continue
            blocks.append(Block(t.cid, data))
            if self.config.superseed_window and t.key in self._lent_to.get(led.peer, ()):
                self._lend(led.peer, t.key)  # the window counts from when it went out
            size += s
            led.deficit -= t.size
            led.blocks_sent += 1
            led.bytes_sent += t.size
        if not presences and not blocks:
            return None
        pending = led.block_bytes
        if pending > 2147483647:  # `min(block_bytes, 2**31 - 1)`: the field is an int32
            pending = 2147483647
        if pending:
            size += 1 + uvarint_size(pending)
        return Message(blocks=tuple(blocks), presences=tuple(presences), pending_bytes=pending), size
