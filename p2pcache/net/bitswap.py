"""The bitswap driver: pumps the sans-IO exchange engines over libp2p streams, and the fetch API.

Owns: the streams (one long-lived outbound stream per peer for what we send, any number of inbound
streams we read, as go and js bitswap do: a peer answers on a stream *it* opens, never on ours), the
uvarint framing on them, the engines' timer, peer up/down events, and what happens to a peer that
breaks the protocol (its connection is dropped and it is banned for `ban_seconds`; everyone else is
still served). On top of that: `fetch_blocks` (some CIDs) and `fetch_archive` (a whole p2pcache
archive: manifest root, then index nodes, then chunks, stored in the repo as they arrive).

It must not decide what blocks mean beyond walking an archive's manifest, and never stores a block
that was not verified (the engine rebuilds every CID from the bytes; `Repo.put_blocks` checks again).

    exchange = BitswapExchange(host, RepoBlockSource(repo))
    await nursery.start(exchange.run)
    info = await exchange.fetch_archive(root, providers=[peer_addr], repo=repo)

One owner of mutable state: both engines are called only from this module's `_client`/`_server`
helpers, synchronously, on the trio thread; no `await` ever sits between an event and its actions.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TypeAlias, cast

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from ..content.cid import CID, DAG_CBOR
from ..errors import CorruptData, InvalidInput, MalformedBlock, NotFound, P2PCacheError
from ..exchange import (
    AddProviders,
    BitswapClient,
    BitswapServer,
    BlocksAdded,
    ClientConfig,
    CloseSession,
    Deliver,
    FetchFailed,
    FrameDecoder,
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
    frame,
)
from ..exchange.bans import BanList
from ..exchange.dispatch import apply_actions
from ..exchange.events import Action, PeerId
from ..exchange.budget import EmptyMessageBudget
from ..exchange.message import PROTOCOL_1_0_0, PROTOCOL_1_1_0, PROTOCOL_1_2_0
from ..transfer import DagWalk
from .host import parse_peer_addr
from .peers import Host, reset_quietly

if TYPE_CHECKING:
    from ..exchange.server import BlockSource
    from ..store.repo import Repo

log = logging.getLogger(__name__)

__all__ = ["BitswapExchange", "DriverConfig", "FetchError", "RepoBatcher", "RepoBlockSource", "StoredBatch"]

# We send 1.2.0 (1.1.0 peers ignore presences and want-have fields they do not know); we read all three.
SEND_PROTOCOLS = (PROTOCOL_1_2_0, PROTOCOL_1_1_0)
RECEIVE_PROTOCOLS = (PROTOCOL_1_2_0, PROTOCOL_1_1_0, PROTOCOL_1_0_0)


class FetchError(P2PCacheError):
    """Blocks could not be fetched from any peer (each CID's reason is in the message)."""

    exit_code = 7


@dataclass(frozen=True, slots=True)
class DriverConfig:
    read_size: int = 1 << 20  # bytes asked of a stream per read
    write_batch: int = 8 << 20  # framed messages to one peer are joined into writes up to this size
    ban_seconds: float = 600.0  # a peer that broke the protocol is refused this long
    store_batch_bytes: int = 4 << 20  # fetch_archive hands blocks to the repo in batches this big
    archive_window: int = 256  # fetch_archive: blocks wanted but not yet stored, at most
    commit_batch_bytes: int = 8 << 20  # fetch_dag records written blocks in the index (and tells peers) this often
    quiet_store_bytes: int = 1 << 20  # fetch_dag writes what it holds when the wire goes quiet, from this much
    idle_stream_seconds: float = 2.0  # an outbound stream with nothing to send is closed after this


def _one_by_one(get: Callable[[CID], bytes | None], cids: Sequence[CID]) -> list[bytes | None]:
    """`get` of each of `cids` in order, ending at the first None."""
    out: list[bytes | None] = []
    for cid in cids:
        out.append(get(cid))
        if out[-1] is None:
            break
    return out


class RepoBlockSource:
    """The server engine's `BlockSource` over a `Repo`: only verified bytes are served; a block that
    fails verification on disk is served as missing (and logged), never sent."""

    def __init__(self, repo: Repo) -> None:
        self.repo = repo
        # Blocks a fetch verified and has not committed to the index yet, served from memory: a
        # fetcher passes a block on the moment it has it, not a store batch later (a fleet's blocks
        # hop from runner to runner). Bounded by the fetches' store batches: released at commit.
        self.fresh: dict[CID, bytes] = {}

    def hold(self, cid: CID, data: bytes) -> None:
        self.fresh[cid] = data

    def release(self, cids: Iterable[CID]) -> None:
        fresh = self.fresh
        for cid in cids:
            fresh.pop(cid, None)

    def has(self, cid: CID) -> bool:
        return cid in self.fresh or self.repo.has_block(cid)

    def size(self, cid: CID) -> int | None:
        data = self.fresh.get(cid)
        return len(data) if data is not None else self.repo.index.block_size(cid)

    def sizes(self, cids: Sequence[CID]) -> list[int | None]:
        """`size` of each of `cids`, in one index query (a DAG stream's next run of leaves)."""
        fresh = self.fresh
        known = self.repo.index.block_sizes([c for c in cids if c not in fresh])
        return [len(data) if (data := fresh.get(c)) is not None else known.get(c.buffer) for c in cids]

    def get(self, cid: CID) -> bytes | None:
        data = self.fresh.get(cid)
        if data is not None:
            return data
        try:
            return self.repo.load_block(cid)
        except NotFound:
            return None
        except CorruptData as e:
            log.warning("not serving %s: %s", cid, e)
            return None

    def get_many(self, cids: Sequence[CID]) -> list[bytes | None]:
        """`get` for a run of blocks (a DAG stream's next leaves), ending at the first one not served
        (None): one index query and one pread per run of adjacent records, each block still checked
        against the crc32 recorded when it was verified. A subclass that changes `get` (and not this) is asked
        block by block."""
        if type(self).get is not RepoBlockSource.get:
            return _one_by_one(self.get, cids)
        return self._read_many(cids)

    def _read_many(self, cids: Sequence[CID]) -> list[bytes | None]:
        """`get_many`'s batched read, whatever the subclass's `get` does around it."""
        if any(c in self.fresh for c in cids):
            return _one_by_one(lambda cid: RepoBlockSource.get(self, cid), cids)
        repo = self.repo
        # Pending (appended, not yet recorded) first, then the index: a commit records a block before it
        # stops being pending, so a block stored all along is found in one of the two.
        pending = repo.packs.pending
        held = {k: loc for c in cids if (loc := pending.get(k := c.buffer)) is not None} if pending else {}
        found = repo.index.locate_many([c for c in cids if c.buffer not in held])
        items = []
        for cid in cids:
            loc = held.get(cid.buffer) or found.get(cid.buffer)
            if loc is None:
                break
            items.append((cid, loc))
        out: list[bytes | None] = []
        try:
            for data in repo.packs.read_many(items, relocate=repo.index.locate):
                out.append(data)
        except NotFound:
            pass
        except CorruptData as e:
            log.warning("not serving %s: %s", items[len(out)][0], e)
        if len(out) < len(cids):
            out.append(None)
        return out


class _Session:
    """The caller's side of one client session: delivered blocks and failures, as a channel."""

    def __init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel(math.inf)


class _Link:
    """What we send to one peer: a queue of Sends and the one task that writes them."""

    __slots__ = ("queue", "wake", "running")

    def __init__(self) -> None:
        self.queue: deque[Send] = deque()
        self.wake = trio.Event()
        self.running = False


ProviderSpec: TypeAlias = ID | str | multiaddr.Multiaddr | PeerInfo


class BitswapExchange:
    """Bitswap over a `Host` (a `NodeHost`, or simnet's `SimHost`): serves `source` to everyone and fetches
    for our callers."""

    def __init__(
        self,
        host: Host,
        source: BlockSource,
        client_config: ClientConfig | None = None,
        server_config: ServerConfig | None = None,
        config: DriverConfig | None = None,
    ) -> None:
        self.host = host
        self.config = config or DriverConfig()
        self.client = BitswapClient(client_config)
        # Twice bitswap's message size outstanding per peer: the next batch is ready while the
        # previous one is still being written.
        self.server = BitswapServer(source, server_config or ServerConfig(max_outstanding_bytes=8 << 20))
        self._sessions: dict[object, _Session] = {}
        self._links: dict[ID, _Link] = {}
        self._bans: BanList[ID] = BanList(self.config.ban_seconds)
        self._timer_at: float | None = None
        self._timer_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._next_session = 0
        self.penalised: list[tuple[ID, str]] = []  # (peer, why), for logs and tests
        self.empty_budget = EmptyMessageBudget()  # messages that carry nothing, per peer
        self._told: set[CID] = set()  # fresh blocks the server heard of before they were committed

    # -- running ----------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve and drive until cancelled. `task_status.started(self)` once the handlers are set."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            events = self.host.subscribe()
            for proto in RECEIVE_PROTOCOLS:
                self.host.set_stream_handler(proto, self._on_stream)
            nursery.start_soon(self._watch_peers, events)
            nursery.start_soon(self._run_timer)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for s in self._sessions.values():
                    s.send.close()

    def blocks_added(self, cids: Iterable[CID]) -> None:
        """Tell the server these blocks are now in the store (peers waiting for them get them)."""
        cids = tuple(cids)
        if cids:
            src = self.server.source
            if isinstance(src, RepoBlockSource) and src.fresh:
                src.release(cids)  # in the index now
            if self._told:  # the server heard of these when they were verified
                told = self._told
                new = tuple(c for c in cids if c not in told)
                told.difference_update(cids)
                cids = new
            if cids:
                self._server(BlocksAdded(cids))

    @contextmanager
    def serving_fresh(self) -> Iterator[Callable[[CID, bytes], None]]:
        """For one fetch: a `block_verified` to call on each new block; when the fetch ends, whatever
        it held in memory and did not commit (a failed fetch) is dropped."""
        held: list[CID] = []

        def verified(cid: CID, data: bytes) -> None:
            held.append(cid)
            self.block_verified(cid, data)

        try:
            yield verified
        finally:
            src = self.server.source
            if isinstance(src, RepoBlockSource) and src.fresh:
                src.release(held)
            self._told.difference_update(held)

    def block_verified(self, cid: CID, data: bytes) -> None:
        """A block a fetch just verified, not stored yet: servable from memory at once (see
        `RepoBlockSource.fresh`) until `blocks_added` names it. Peers watching it hear HAVE now."""
        src = self.server.source
        if isinstance(src, RepoBlockSource):
            src.hold(cid, data)
            self._told.add(cid)
            self._server(BlocksAdded((cid,)))

    # -- engines ----------------------------------------------------------------------------------
    def _now(self) -> float:
        return trio.current_time()

    def _client(self, event: object) -> None:
        self._apply(self.client.handle(event, self._now()))

    def _server(self, event: object) -> None:
        self._apply(self.server.handle(event, self._now()))

    def _both(self, event: object) -> None:
        self._client(event)
        self._server(event)

    def _apply(self, actions: list[Action]) -> None:
        apply_actions(actions, self)

    # `ActionHandler`: what each engine action means here (called by `apply_actions` only)
    def on_send(self, action: Send) -> None:
        self._enqueue(action)

    def on_deliver(self, action: Deliver) -> None:
        s = self._sessions.get(action.session)
        if s is not None:
            s.send.send_nowait((action.cid, action.data, None))

    def on_fetch_failed(self, action: FetchFailed) -> None:
        s = self._sessions.get(action.session)
        if s is not None:
            s.send.send_nowait((action.cid, None, action.why))

    def on_timer(self, at: float) -> None:
        if self._timer_at is None or at < self._timer_at:
            self._timer_at = at
            self._timer_changed.set()

    def on_penalise(self, peer: PeerId, why: str) -> None:
        self._penalise(cast(ID, peer), why, tell_engines=False)  # the engines' peers are our IDs

    async def _run_timer(self) -> None:
        while True:
            changed = self._timer_changed = trio.Event()
            at = self._timer_at
            if at is None:
                await changed.wait()
                continue
            with trio.move_on_at(at):
                await changed.wait()
            if self._timer_at is not None and self._now() >= self._timer_at:
                self._timer_at = None
                self._both(Tick())  # one timer for both engines: each asks again for what it still needs

    # -- peers ------------------------------------------------------------------------------------
    async def _watch_peers(self, events: trio.MemoryReceiveChannel) -> None:
        async for ev in events:
            if ev.connected:
                if self._is_banned(ev.peer):
                    assert self._nursery is not None  # this task runs inside that nursery
                    self._nursery.start_soon(self._disconnect, ev.peer)
                    continue
                self._both(PeerConnected(ev.peer))
            else:
                self._peer_gone(ev.peer)

    def _peer_gone(self, peer: ID) -> None:
        link = self._links.get(peer)
        if link is not None:
            link.queue.clear()
            link.wake.set()
        self._both(PeerDisconnected(peer))

    def _is_banned(self, peer: ID) -> bool:
        # Asked on every message read: with nobody banned (the usual case) neither the clock nor the
        # peer id's hash (a Python-level `ID.__hash__`) is needed.
        return len(self._bans) > 0 and self._bans.is_banned(peer, self._now())

    def _penalise(self, peer: ID, why: str, tell_engines: bool) -> None:
        """Drop a peer that broke the protocol or sent bad data: ban it and close its connections."""
        if self._is_banned(peer):  # already dropped (e.g. two of its streams failed at once): one line per ban
            if self._nursery is not None:
                self._nursery.start_soon(self._disconnect, peer)
            return
        log.warning("dropping peer %s: %s", peer, why)
        self.penalised.append((peer, why))
        self._bans.ban(peer, self._now())
        if tell_engines:
            self._both(PeerMisbehaved(peer, why))
        else:
            self._server(PeerMisbehaved(peer, why))
        link = self._links.get(peer)
        if link is not None:
            link.queue.clear()
            link.wake.set()
        if self._nursery is not None:
            self._nursery.start_soon(self._disconnect, peer)

    async def _disconnect(self, peer: ID) -> None:
        try:
            await self.host.disconnect(peer)
        except Exception as e:  # already gone
            log.debug("disconnecting %s: %s", peer, e)

    # -- receiving --------------------------------------------------------------------------------
    async def _on_stream(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if self._is_banned(peer):
            await reset_quietly(stream)
            return
        decoder = FrameDecoder()
        try:
            while True:
                try:
                    data = await stream.read(self.config.read_size)
                except Exception:  # EOF, reset or connection gone: the stream is over
                    return
                if not data:
                    return
                decoder.push(data)
                while True:  # one message at a time: a peer over its budget is stopped mid-read
                    try:
                        payload = decoder.next_frame()
                        if payload is None:
                            break
                        msg = decode(payload)
                    except ProtocolViolation as e:
                        await reset_quietly(stream)
                        self._penalise(peer, str(e), tell_engines=True)
                        return
                    if self._is_banned(peer):
                        return
                    if not (msg.wants or msg.blocks or msg.presences):  # carries nothing
                        if not self.empty_budget.charge(peer, self._now()):
                            await reset_quietly(stream)
                            self._penalise(peer, "sent more bitswap messages that carry nothing than its budget "
                                           f"({self.empty_budget.burst} at once, "
                                           f"{self.empty_budget.per_second:g}/s after)", tell_engines=True)
                            return
                        if not msg.full:
                            continue
                    event = MessageReceived(peer, msg)
                    # The server first: what the message proves the peer holds (its blocks, its
                    # HAVEs) must be known before the client's blocks are stored and announced.
                    self._server(event)
                    if msg.blocks or msg.presences:
                        self._client(event)
        finally:
            try:
                await stream.close()
            except Exception:
                pass

    # -- sending ----------------------------------------------------------------------------------
    def _enqueue(self, send: Send) -> None:
        peer = cast(ID, send.peer)  # the engines' peers are the IDs this exchange gave them
        if self._is_banned(peer):
            return
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = _Link()
        link.queue.append(send)
        link.wake.set()
        if not link.running and self._nursery is not None:
            link.running = True
            self._nursery.start_soon(self._pump_link, send.peer, link)

    async def _pump_link(self, peer: ID, link: _Link) -> None:
        """Write everything queued for `peer` on one outbound stream, opened on first need.
        Several framed messages go out in one write; each server message is acknowledged with
        `MessageSent` once written, which is the server's flow control."""
        stream = None
        try:
            while True:
                if not link.queue:
                    link.wake = trio.Event()
                    # An idle link gives its stream back before the peer gives up on it (js bitswap
                    # aborts an inbound stream after 5 s without a message).
                    with trio.move_on_after(self.config.idle_stream_seconds):
                        await link.wake.wait()
                    if not link.queue:
                        return
                if self._is_banned(peer):
                    link.queue.clear()
                    return
                batch: list[bytes] = []
                acks: list[int] = []
                size = 0
                while link.queue and (not batch or size < self.config.write_batch):
                    send = link.queue.popleft()
                    framed = frame(encode(send.message))
                    batch.append(framed)
                    size += len(framed)
                    if send.size:
                        acks.append(send.size)
                payload = b"".join(batch) if len(batch) > 1 else batch[0]
                stream, error = await self._write(peer, stream, payload)
                if error is not None:
                    log.info("cannot send to %s: %s", peer, error)
                    link.queue.clear()
                    self._both(PeerDisconnected(peer))  # unreachable for bitswap: re-ask elsewhere
                    return
                for n in acks:
                    self._server(MessageSent(peer, n))
        finally:
            link.running = False
            if self._links.get(peer) is link and not link.queue:
                del self._links[peer]
            if stream is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await stream.close()
                    except Exception:
                        pass

    async def _write(self, peer: ID, stream: Any, payload: bytes) -> tuple[Any, Exception | None]:
        """Write on the peer's stream, opening one if needed. A stream that was already open may have
        been closed by the peer meanwhile: then one fresh stream is tried before giving up."""
        for attempt in (0, 1):
            fresh = stream is None
            try:
                if stream is None:
                    stream = await self.host.new_stream(peer, SEND_PROTOCOLS)
                await stream.write(payload)
                return stream, None
            except Exception as e:
                if stream is not None:
                    await reset_quietly(stream)
                stream = None
                if fresh or attempt == 1:
                    return None, e
        return None, None  # not reached

    # -- fetching ---------------------------------------------------------------------------------
    def provider_ids(self, providers: Iterable[ProviderSpec]) -> tuple[ID, ...]:
        """Peer IDs of `providers` (IDs, addresses with /p2p/, PeerInfos); addresses are remembered."""
        out = []
        for p in providers:
            if isinstance(p, ID):
                out.append(p)
                continue
            info = p if isinstance(p, PeerInfo) else parse_peer_addr(p)
            self.host.add_addrs(info.peer_id, info.addrs)
            out.append(info.peer_id)
        return tuple(dict.fromkeys(out))

    def _open_session(self, providers: Iterable[ProviderSpec]) -> tuple[object, _Session]:
        if self._nursery is None:
            raise FetchError("the bitswap exchange is not running; start it with `await nursery.start(exchange.run)`")
        self._next_session += 1
        sid = ("session", self._next_session)
        session = self._sessions[sid] = _Session()
        peers = self.provider_ids(providers)
        if peers:
            self._client(AddProviders(sid, peers))
        return sid, session

    def _close_session(self, sid: object) -> None:
        self._sessions.pop(sid, None)
        self._client(CloseSession(sid))

    async def fetch_blocks(self, cids: Sequence[CID], providers: Iterable[ProviderSpec] = ()) -> dict[CID, bytes]:
        """Fetch `cids` (each verified against its hash) from `providers` and connected peers.
        Raises FetchError naming the CIDs no peer could give. Cancel (a cancel scope) to give up."""
        wanted = list(dict.fromkeys(cids))
        sid, session = self._open_session(providers)
        got: dict[CID, bytes] = {}
        failed: dict[CID, str] = {}
        try:
            if wanted:
                self._client(Want(sid, tuple(wanted)))
            while len(got) + len(failed) < len(wanted):
                cid, data, why = await session.recv.receive()
                if data is None:
                    failed[cid] = why
                else:
                    got[cid] = data
        finally:
            self._close_session(sid)
        if failed:
            first = next(iter(failed.items()))
            raise FetchError(f"could not fetch {len(failed)} of {len(wanted)} blocks; {first[0]}: {first[1]}")
        return got

    async def fetch_archive(self, root: CID, providers: Iterable[ProviderSpec], repo: Any) -> Any:
        """Fetch a whole archive into `repo` (see `fetch_dag`) and register it: `repo.register_root`
        checks the manifest tree and sizes, and returns its RootInfo."""
        if root.codec != DAG_CBOR:
            raise InvalidInput(f"{root} is not a dag-cbor manifest CID; an archive root is dag-cbor")
        await self.fetch_dag(root, providers, repo)
        return await trio.to_thread.run_sync(repo.register_root, root)

    async def fetch_dag(self, root: CID, providers: Iterable[ProviderSpec], repo: Any,
                        on_stored: Callable[[list[CID]], None] | None = None,
                        walk: DagWalk | None = None) -> int:
        """Fetch every block reachable from `root` that `repo` lacks, for any manifest shape, one want
        per block: the shared `DagWalk` hands out wants depth-first — the order a NAR or an archive is
        read back in — with at most `archive_window` wanted ahead. Blocks are stored as they arrive
        (`RepoBatcher`: manifest nodes at once, chunks in batches, or sooner when the wire goes quiet) and
        `on_stored(cids)` is called after each batch, so a reader can stream the content while it is
        still arriving. `walk` continues a walk another driver began. Returns the bytes fetched. Does not
        register a root."""
        sid, session = self._open_session(providers)
        walk = walk if walk is not None else DagWalk(root, repo.has_block)
        window = self.config.archive_window
        fetched = 0
        try:
            with self.serving_fresh() as verified:
                async with RepoBatcher(repo, self.config.store_batch_bytes, self.config.commit_batch_bytes,
                                       on_stored=on_stored, on_committed=self.blocks_added) as store:
                    while not walk.finished:
                        # Refill the window in bursts (when half of it has drained), so wants travel many to a
                        # message instead of one message per block received.
                        if walk.outstanding <= window // 2:
                            wants = walk.next_wants(window - walk.outstanding)
                            for cid in walk.take_loads():
                                walk.on_block(cid, await trio.to_thread.run_sync(repo.load_block, cid), local=True)
                            if wants:
                                self._client(Want(sid, tuple(wants)))
                            if not walk.outstanding and not walk.finished:
                                continue
                        if walk.finished:
                            break
                        try:
                            cid, data, why = session.recv.receive_nowait()
                        except trio.WouldBlock:
                            if store.pending_bytes >= self.config.quiet_store_bytes:
                                await store.write()  # nothing more right now: let readers have what we hold
                            cid, data, why = await session.recv.receive()
                        if not walk.is_open(cid):
                            continue
                        if data is None:
                            raise FetchError(f"could not fetch block {cid} under {root}: {why}")
                        try:
                            walk.on_block(cid, data)
                        except MalformedBlock as e:
                            raise FetchError(f"block {cid} under {root} is not valid dag-cbor: {e}") from None
                        fetched += len(data)
                        verified(cid, data)
                        await store.add(cid, data)
        finally:
            self._close_session(sid)
        return fetched

    def superseed_allows(self, peer: ID, cid: CID, size: int) -> bool:
        """Whether super-seeding lets `cid` go to `peer` over another protocol now (the DAG transfer's
        server asks before each block): the bitswap server's one lending table decides, see
        `BitswapServer.lend_for_stream`."""
        ok, actions = self.server.lend_for_stream(peer, cid, size, self._now())
        self._apply(actions)
        return ok

    def penalise(self, peer: ID, why: str) -> None:
        """Ban `peer` for `ban_seconds` and drop its connections (another protocol caught it lying)."""
        self._penalise(peer, why, tell_engines=True)

    def is_banned(self, peer: ID) -> bool:
        return self._is_banned(peer)


class StoredBatch:
    """What the writer's worker thread appended of one batch (`RepoBatcher._store`): `appended`, the
    (cid, bytes) pairs now in the repo's packs. A subclass's `_store` returns a subclass of this with what
    else it found out there (`_stored` reads it back on the event loop)."""

    __slots__ = ("appended",)

    def __init__(self, appended: list[tuple[CID, bytes]]) -> None:
        self.appended = appended


class RepoBatcher:
    """Verified blocks into a repo in batches, through its public API only, written by a task of its
    own so the caller goes on reading the network meanwhile: files first (`write_blocks`; readers may
    load them at once, `on_stored` says which), index rows in bigger batches (`commit_blocks`: each
    commit flushes the file system, which costs far more than the writes; `on_committed` says which).
    Manifest nodes are written at once, so a crash leaves a walkable prefix and a resumed fetch finds
    the nodes whose links it needs. Holds at most `store_bytes` times (1 + `queued`) in memory: `add`
    waits while that much is queued (backpressure onto the stream). On an exit by an error or a cancel,
    what was written is still recorded (a retry then resumes from it, and `stored_bytes` counts it);
    what was only held is dropped.

        async with RepoBatcher(repo, 4 << 20, 8 << 20) as store:
            await store.add(cid, data)

    A subclass may hand the writer batches of its own (`_take`) and do more with them in the worker
    thread (`_store`, e.g. hash them there, off the event loop) and back on the loop (`_stored`).
    """

    def __init__(self, repo: Any, store_bytes: int, commit_bytes: int,
                 on_stored: Callable[[list[CID]], None] | None = None,
                 on_committed: Callable[[list[CID]], None] | None = None, queued: int = 2,
                 drop_cached: bool = True) -> None:
        self.repo = repo
        # False where the fetched blocks are read back at once: a build-cache restore writes the tree's
        # files from them while they arrive (with fsync on, dropped pages made every such read a disk read)
        self.drop_cached = drop_cached
        self.store_bytes = store_bytes
        self.commit_bytes = commit_bytes
        self.on_stored = on_stored
        self.on_committed = on_committed
        self._batch: list[tuple[CID, bytes]] = []
        self.pending_bytes = 0
        self._unrecorded: list[tuple[CID, int]] = []  # appended, not yet handed to the committer
        self._unrecorded_bytes = 0
        self._committing: list[list[tuple[CID, int]]] = []  # handed to the committer, not yet committed
        self._send, self._recv = trio.open_memory_channel[object](queued)
        self._nursery_manager: Any = None

    async def __aenter__(self) -> "RepoBatcher":
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        nursery.start_soon(self._writer)
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        try:
            if exc[0] is None:
                await self.write()
        finally:
            self._send.close()
        try:
            return await self._nursery_manager.__aexit__(*exc)
        except BaseExceptionGroup as group:  # one error (the caller's or the writer's): raise it as it is
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            await self._record_the_rest()

    async def add(self, cid: CID, data: bytes) -> None:
        """`data` must be verified against `cid` already (the repo does not hash it again)."""
        self._batch.append((cid, data))
        self.pending_bytes += len(data)
        if cid.codec == DAG_CBOR or self.pending_bytes >= self.store_bytes:
            await self.write()

    async def write(self) -> None:
        """Hand what is held to the writer (waits only while the queue is full)."""
        batch = self._take()
        if batch is not None:
            await self._send.send(batch)

    def _take(self) -> object | None:
        """The batch held, for the writer (None if nothing is held); `pending_bytes` starts again at 0."""
        if not self._batch:
            return None
        blocks, self._batch, self.pending_bytes = self._batch, [], 0
        return blocks

    def _store(self, batch: object) -> StoredBatch:
        """In the writer's worker thread: append one batch (as `_take` made it)."""
        # Every block reaching `add` was hashed against its CID by the receiver that got it.
        blocks = cast("list[tuple[CID, bytes]]", batch)
        self.repo.write_blocks(blocks, True)
        return StoredBatch(blocks)

    def _stored(self, stored: StoredBatch) -> None:
        """Back on the event loop, once a batch is appended."""
        if self.on_stored is not None:
            self.on_stored([c for c, _ in stored.appended])

    async def _writer(self) -> None:
        # Index commits run beside the appends: the next batches are written while a commit waits for the
        # disk (its flush), instead of the stream waiting behind it; one more commit may wait its turn.
        commits_send, commits_recv = trio.open_memory_channel[list[tuple[CID, int]]](1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._committer, commits_recv)
            async with commits_send:
                async for batch in self._recv:
                    stored = await trio.to_thread.run_sync(self._store, batch)
                    # (from here to the next checkpoint nothing is cancelled: a batch appended is noted)
                    self._unrecorded += [(c, len(d)) for c, d in stored.appended]
                    self._unrecorded_bytes += sum(len(d) for _, d in stored.appended)
                    self._stored(stored)
                    if self._unrecorded_bytes >= self.commit_bytes:
                        await self._commit(commits_send)
                await self._commit(commits_send)

    async def _commit(self, commits: trio.MemorySendChannel[list[tuple[CID, int]]]) -> None:
        if self._unrecorded:
            done, self._unrecorded, self._unrecorded_bytes = self._unrecorded, [], 0
            self._committing.append(done)  # until committed (a send cut by a cancel delivers nothing)
            await commits.send(done)

    async def _committer(self, commits: trio.MemoryReceiveChannel[list[tuple[CID, int]]]) -> None:
        async for done in commits:  # one at a time, in order
            # The fetched blocks leave the page cache once durable: nobody reads them back soon (a NAR's
            # bytes go to Nix as they are verified), and keeping them made the kernel take a fresh page for
            # every byte fetched (bench/dagxfer.py: the store thread's CPU)
            await trio.to_thread.run_sync(partial(self.repo.commit_blocks, done, drop_cached=self.drop_cached))
            del self._committing[0]  # `done` (commits go in order)
            if self.on_committed is not None:
                self.on_committed([c for c, _ in done])

    async def _record_the_rest(self) -> None:
        """After the writer stopped: record what it appended but did not commit (nothing, after a clean
        exit; after an error or a cancel, what the batches written so far hold), shielded from the cancel."""
        rest = [b for done in self._committing for b in done] + self._unrecorded
        self._committing, self._unrecorded, self._unrecorded_bytes = [], [], 0
        if not rest:
            return
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(partial(self.repo.commit_blocks, rest, drop_cached=self.drop_cached))
            except Exception as e:  # the error that ended the batcher (a full disk, say) says more: keep it
                log.warning("could not record %d blocks written before the error: %s", len(rest), e)
                return
        if self.on_committed is not None:
            self.on_committed([c for c, _ in rest])
