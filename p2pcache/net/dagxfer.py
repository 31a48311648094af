"""The DAG transfer driver: `/p2pcache/dag/1.0.0` over libp2p streams (wire format in proto/p2pcache.proto).

Owns: serving DAG walks from the node's block source (`DagServer`: depth-first order from `DfsOrder`, blocks read from
the repo in small batches on a worker thread while the previous batch is written, frames joined into
large writes; the stream's own flow control is the backpressure), and fetching a whole DAG from several
providers at once (`DagTransfer.fetch`): one shared `DagWalk` hands out work, each provider gets up to
`streams_per_peer` requests in flight, a provider that finishes early takes the tail of a slower one's
request (work stealing), and a request that fails gives its blocks back to the walk for the others.

Every block from a peer is checked as it arrives, against the link in its already-verified parent
(`DfsOrder.expect`): a block out of order, one that does not hash to its link, a frame after the end,
a malformed frame, or an end before the walk's end ends that peer's share with one log line and bans
the peer through the bitswap driver (`BitswapExchange.penalise`, so it is refused by both protocols). A
stream silent for `stall_seconds` ends that peer's share in this fetch with one log line but bans nothing:
a stall proves no lie (a loaded CPU or a congested link looks the same), so the peer is asked again by
the next fetch (or the caller's retry). A peer that does not speak the protocol, or lacks a block, is
not punished: its share goes to the others, and whatever no DAG stream delivered is fetched over
bitswap from the providers still standing (IPFS peers speak only bitswap).

Must not: store a block it did not verify, hold more than a bounded window per stream in memory
(`RepoBatcher`'s batch plus one read), or decide what blocks mean beyond following their links.
"""

from __future__ import annotations

import logging
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable

import trio
from google.protobuf.message import DecodeError
from libp2p.peer.id import ID

from ..content.chunking import MAX_BLOCK_SIZE
from ..content.cid import CID, DAG_CBOR, RAW
from ..content.varint import decode as varint_decode
from ..content.varint import encode as uvarint
from ..errors import InvalidCID, InvalidInput, MalformedBlock
from ..exchange import FrameDecoder, ProtocolViolation
from ..routing.pb import p2pcache_pb2 as pb
from ..transfer import DagWalk, DfsOrder, OutOfOrder
from .bitswap import BitswapExchange, FetchError, ProviderSpec, RepoBatcher, StoredBatch
from .peers import Host, close_quietly, reset_quietly

if TYPE_CHECKING:
    from ..exchange.server import BlockSource

log = logging.getLogger(__name__)
timeline = logging.getLogger("p2pcache.timeline")  # debug lines of a cold copy's timeline (bench/nixcopy.py)

__all__ = ["PROTOCOL", "DagConfig", "DagServer", "DagTransfer", "TransferStats"]

PROTOCOL = "/p2pcache/dag/1.0.0"
MAX_REQUEST = 1 << 20
MAX_FRAME = MAX_BLOCK_SIZE + 1024


@dataclass(frozen=True, slots=True)
class DagConfig:
    request_blocks: int = 128  # CIDs named in one request (subtree roots or leaves) when providers share a fetch
    # ... and when one provider has it all: no share to keep fine for work stealing, and each stream costs
    # both sides CPU of its own (bench/dagxfer.py, 256 MiB: 128 -> 512 took about 8 % off the total)
    solo_request_blocks: int = 512
    streams_per_peer: int = 2  # requests in flight to one provider: the next is asked while one streams ...
    # ... and, when one provider has it all, once the one streaming has at most this many leaves left to
    # send: two streams of one provider interleaved cost both sides about 15 % more CPU per byte than one
    # after the other (bench/dagxfer.py), and this much of a tail still covers a round trip on any link a
    # CI runner fetches over. (With several providers on WAN links the wait measured 8 % slower in simnet's
    # node-fetch, where the links, not CPU, bound the fetch: their streams interleave.)
    pipeline_blocks: int = 64
    # server: blocks read from the repo per batch, and bytes: the batch ends at whichever comes first (two
    # batches in memory at most). Each batch is one thread hop, and on these VMs waking a thread costs more
    # than reading a small block, so a tree of small files is read 256 blocks at a time, not 32.
    read_blocks: int = 256
    read_bytes: int = 2 << 20
    write_bytes: int = 4 << 20  # server: frames joined into writes up to this size
    read_size: int = 1 << 20  # asker: bytes asked of a stream per read
    stall_seconds: float = 20.0  # a stream with nothing for this long: the peer's share of this fetch ends
    request_timeout: float = 10.0  # server: a request must arrive within this
    serve_streams: int = 32  # server: DAG streams served at once; more are refused
    # server: an asker must take each write at this rate (after `serve_grace` s of slack per write), or
    # its stream is cut: a reader that stops (or trickles) must not hold one of `serve_streams` for ever
    serve_min_rate: int = 64 << 10  # bytes/s (512 kbit/s: below any link a CI runner fetches over)
    serve_grace: float = 10.0
    steal_min: int = 8  # a request's tail is stolen only if at least this many blocks are left ...
    steal_after: float = 5.0  # ... and nothing arrived on it for this long (a stalled or dead provider),
    steal_slower: float = 4.0  # ... or its provider runs this many times slower than the thief, the request
    # under way for `steal_measure` s: the thief takes the share of the tail its speed earns (measured in
    # simnet's node-fetch, 4 equal WAN providers: a shorter wait robbed healthy ones and cost 30 %)
    steal_measure: float = 2.0


@dataclass
class TransferStats:
    fetches: int = 0
    active_fetches: int = 0  # in progress now (a NAR's response may end before its fetch has stored the last batch)
    streams: int = 0
    blocks: int = 0
    bytes: int = 0
    duplicate_blocks: int = 0
    duplicate_bytes: int = 0
    steals: int = 0
    peers_dropped: int = 0
    providers_lost: int = 0  # providers whose connection closed during a fetch (their share moved at once)
    providers_stalled: int = 0  # providers whose stream went silent for `stall_seconds` (share moved, not banned)
    bitswap_fallbacks: int = 0
    served_streams: int = 0
    served_blocks: int = 0
    served_bytes: int = 0
    refused: int = 0
    slow_askers_cut: int = 0
    superseed_stops: int = 0  # served streams ended at a leaf lent to another peer


def _frame(msg: pb.DagFrame) -> bytes:
    data = msg.SerializeToString()
    return uvarint(len(data)) + data


def encode_request(roots: Iterable[CID], have: Iterable[CID] = (), nodes_only: bool = True) -> bytes:
    req = pb.DagRequest(roots=[c.buffer for c in roots], have=[c.buffer for c in have],
                        scope=pb.DagRequest.NODES if nodes_only else pb.DagRequest.ALL)
    data = req.SerializeToString()
    if len(data) > MAX_REQUEST:
        raise InvalidInput(f"DAG request of {len(data)} bytes is over the {MAX_REQUEST}-byte limit")
    return uvarint(len(data)) + data


def decode_request(payload: bytes) -> tuple[list[CID], list[CID], bool]:
    msg = pb.DagRequest()
    try:
        msg.ParseFromString(payload)
        roots = [CID.decode(b) for b in msg.roots]
        have = [CID.decode(b) for b in msg.have]
    except (DecodeError, InvalidCID, IndexError) as e:
        raise ProtocolViolation(f"DAG request is malformed: {e}") from None
    if not roots:
        raise ProtocolViolation("DAG request names no root")
    if any(c.codec not in (RAW, DAG_CBOR) for c in roots):
        raise ProtocolViolation("DAG request names a root of a codec other than raw or dag-cbor")
    return roots, have, msg.scope == pb.DagRequest.NODES


class _Frames:
    """A DAG stream cut into frames as its bytes come in (`feed`): each frame is (cid, data) for a block
    or a `DagEnd`. A block frame in the layout protobuf writes (field 1 holding a DagBlock of field 1 cid,
    field 2 data) is read straight out of the buffer, its data copied once; any other frame goes through
    protobuf, so what is accepted is what protobuf would accept. ProtocolViolation for a frame over
    MAX_FRAME (as soon as its length prefix is read) or one protobuf rejects."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> list[tuple[bytes, bytes] | pb.DagEnd]:
        out: list[tuple[bytes, bytes] | pb.DagEnd] = []
        buf = self._buf
        if self._pos:
            del buf[: self._pos]
            self._pos = 0
        rest = memoryview(data)
        if buf:  # a frame the last read cut: complete it from the front of `data`, read the rest from `data`
            need = _lacking(buf)
            if need is None or need > len(data):
                buf += data
                self._pos = _parse(buf, out)
                return out
            buf += rest[:need]
            _parse(buf, out)
            buf.clear()
            rest = rest[need:]
        pos = _parse(rest, out)  # (most frames: no copy of the read behind a leftover first)
        if pos < len(rest):
            buf += rest[pos:]
        return out


def _lacking(buf: bytearray) -> int | None:
    """Bytes the frame at the start of `buf` lacks (None if its length prefix is not all there yet)."""
    try:
        n, start = varint_decode(buf, 0)
    except ValueError:
        if len(buf) >= 10:
            raise ProtocolViolation("DAG stream has a malformed length prefix") from None
        return None
    if n > MAX_FRAME:
        raise ProtocolViolation(f"DAG stream announces a {n} byte frame, over the {MAX_FRAME} byte limit")
    return start + n - len(buf)


def _parse(data: bytes | bytearray | memoryview, out: list[tuple[bytes, bytes] | pb.DagEnd]) -> int:
    """Append the whole frames at the start of `data` to `out`; returns where the first incomplete one begins."""
    view = memoryview(data)
    try:
        pos, size = 0, len(view)
        while pos < size:
            try:
                n, start = varint_decode(view, pos)
            except ValueError:
                if size - pos >= 10:
                    raise ProtocolViolation("DAG stream has a malformed length prefix") from None
                break  # the prefix is not all here yet
            if n > MAX_FRAME:
                raise ProtocolViolation(f"DAG stream announces a {n} byte frame, over the {MAX_FRAME} byte limit")
            end = start + n
            if end > size:
                break
            out.append(_block_fields(view, start, end) or _parsed_frame(view[start:end]))
            pos = end
    finally:
        view.release()
    return pos


def _block_fields(view: memoryview, start: int, end: int) -> tuple[bytes, bytes] | None:
    """(cid, data) of a block frame in protobuf's own layout at view[start:end], else None."""
    try:
        if view[start] != 0x0A:
            return None
        n, i = varint_decode(view, start + 1)
        if i + n != end or view[i] != 0x0A:
            return None
        n, i = varint_decode(view, i + 1)
        cid_end = i + n
        if cid_end >= end or view[cid_end] != 0x12:
            return None
        cid = bytes(view[i:cid_end])
        n, i = varint_decode(view, cid_end + 1)
        if i + n != end:
            return None
        return cid, bytes(view[i:end])
    except (ValueError, IndexError):
        return None


def _parsed_frame(payload: memoryview) -> tuple[bytes, bytes] | pb.DagEnd:
    frame = pb.DagFrame()
    try:
        frame.ParseFromString(payload.tobytes())  # rare: an end frame, or a block frame in another layout
    except DecodeError as e:
        raise ProtocolViolation(f"malformed frame ({e})") from None
    kind = frame.WhichOneof("frame")
    if kind == "block":
        return frame.block.cid, frame.block.data
    if kind == "end":
        return frame.end
    raise ProtocolViolation("frame that is neither a block nor an end")


def _block_head(cid: bytes, size: int) -> bytes:
    """A block frame up to its data, in the layout protobuf writes a DagFrame holding a DagBlock in (the
    data field written even when empty), so the data goes to the stream without being copied into a
    message first."""
    inner = b"\x0a" + uvarint(len(cid)) + cid + b"\x12" + uvarint(size)
    msg = b"\x0a" + uvarint(len(inner) + size) + inner
    return uvarint(len(msg) + size) + msg


def _block_frame(cid: CID, data: bytes) -> bytes:
    return _block_head(cid.buffer, len(data)) + data


def _end_frame(status: pb.DagEnd.Status, missing: CID | None = None, message: str = "") -> bytes:
    return _frame(pb.DagFrame(end=pb.DagEnd(status=status, missing=missing.buffer if missing else b"",
                                            message=message)))




_LENT = b"lent"  # read-ahead marker: the next leaf is lent to another peer (super-seeding)


# -- serving ----------------------------------------------------------------------------------------------


class _SlowAsker(Exception):
    """The asker read slower than the server's minimum rate: its stream is reset."""


FIRST_READ_BLOCKS = 4  # server: blocks in a stream's first read from the repo (then `read_blocks`)


class DagServer:
    """Answers DAG requests from `source` (the bitswap server's `BlockSource`: `get(cid)` gives verified
    bytes or None; a block that fails verification on disk is served as missing, never sent)."""

    def __init__(self, source: BlockSource, is_banned: Callable[[ID], bool], config: DagConfig | None = None,
                 stats: TransferStats | None = None,
                 may_send: Callable[[ID, CID, int], bool] | None = None) -> None:
        self.source = source
        self.is_banned = is_banned
        # The super-seeding decision for each leaf (`BitswapExchange.superseed_allows`): a leaf lent
        # to another peer ends the stream as NOT_FOUND, so the asker gets it from the peers that have it.
        self.may_send = may_send
        self.config = config or DagConfig()
        self.stats = stats or TransferStats()
        self._active = 0

    def register(self, host: Host) -> None:
        host.set_stream_handler(PROTOCOL, self.handle_stream)

    def _load(self, cids: list[CID]) -> list[tuple[CID, bytes | None]]:
        """In a worker thread: the blocks' bytes in order, ending at the first one not here (None); one
        index query and one pread per run of adjacent records where the source reads a repo."""
        get_many = getattr(self.source, "get_many", None)
        if get_many is not None:
            return list(zip(cids, get_many(cids)))
        out: list[tuple[CID, bytes | None]] = []
        for cid in cids:
            data = self.source.get(cid)
            out.append((cid, data))
            if data is None:
                break
        return out

    def _load_walking(self, walk: DfsOrder, cids: list[CID], limit: int, peer: ID) -> list[tuple[CID, bytes | None]]:
        """In a worker thread (the walk is only ever used by the one task awaiting this): `_load(cids)`,
        then, while the last block is a dag-cbor node, feed it to the walk and load the node after it, up to
        `limit` blocks and `read_bytes` in all, so a request for a tree's nodes takes one thread hop per batch,
        not one per node. Stops before a raw block (the event loop asks super-seeding about each) and at
        the first block not here (None)."""
        loaded = self._load(cids)
        size = sum(len(d) for _, d in loaded if d is not None)
        while True:
            last_cid, last = loaded[-1]
            if last is None or last_cid.codec != DAG_CBOR:
                return loaded
            try:
                walk.give(last_cid, last)
            except MalformedBlock as e:
                log.warning("cannot walk %s for %s: %s", last_cid, peer, e)
                loaded[-1] = (last_cid, None)
                return loaded
            nxt = walk.peek()
            if nxt is None or nxt.codec != DAG_CBOR or len(loaded) >= limit or size >= self.config.read_bytes:
                return loaded
            more = self._load([nxt])
            size += len(more[0][1] or b"")
            loaded += more

    def _sizes_of(self) -> Callable[[list[CID]], list[int | None]]:
        """The source's sizes of a run of CIDs: one query where it can (`RepoBlockSource.sizes`)."""
        sizes = getattr(self.source, "sizes", None)
        if sizes is not None:
            return sizes
        size = self.source.size
        return lambda cids: [size(c) for c in cids]

    async def handle_stream(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if self.is_banned(peer):
            await reset_quietly(stream)
            return
        try:
            if self._active >= self.config.serve_streams:
                self.stats.refused += 1
                await stream.write(_end_frame(pb.DagEnd.REFUSED, message="too many DAG streams; try later"))
                return
            self._active += 1
            try:
                await self._serve(stream, peer)
            finally:
                self._active -= 1
        except ProtocolViolation as e:
            log.info("DAG request from %s refused: %s", peer, e)
            await reset_quietly(stream)
        except Exception as e:  # the asker went away (reset, EOF, connection closed)
            log.debug("DAG stream to %s ended: %s", peer, e)
            await reset_quietly(stream)
        finally:
            await close_quietly(stream)

    async def _read_request(self, stream: Any) -> bytes:
        decoder = FrameDecoder(MAX_REQUEST, "DAG request")
        with trio.fail_after(self.config.request_timeout):
            while True:
                data = await stream.read(64 << 10)
                if not data:
                    raise ProtocolViolation("DAG stream closed before a whole request arrived")
                payloads = decoder.feed(data)
                if payloads:
                    return payloads[0]

    async def _write(self, stream: Any, data: bytes | bytearray, peer: ID) -> None:
        """One write, bounded by the minimum rate: yamux's window blocks it while the asker does not read."""
        cfg = self.config
        with trio.move_on_after(cfg.serve_grace + len(data) / cfg.serve_min_rate) as scope:
            await stream.write(data)
        if scope.cancelled_caught:
            self.stats.slow_askers_cut += 1
            log.info("DAG stream to %s cut: it took less than %d bytes/s (%d bytes pending)", peer,
                     cfg.serve_min_rate, len(data))
            raise _SlowAsker()

    async def _serve(self, stream: Any, peer: ID) -> None:
        roots, have, nodes_only = decode_request(await self._read_request(stream))
        timeline.debug("dag serve %s: request of %d root(s) read", roots[0] if roots else None, len(roots))
        self.stats.served_streams += 1
        walk = DfsOrder(roots, have, nodes_only)
        batches_send, batches_recv = trio.open_memory_channel(1)  # one batch read ahead of the writes

        async def read_ahead() -> None:
            # The first read is small: the asker's first bytes (a NAR's first to Nix) wait for all of it
            limit = min(FIRST_READ_BLOCKS, self.config.read_blocks)
            read_bytes, may_send = self.config.read_bytes, self.may_send
            sizes_of = self._sizes_of()
            async with batches_send:
                while True:
                    cids: list[CID] = []
                    lent: CID | None = None
                    size = 0
                    # The batch's run: leaves up to `limit`, or up to and including the next node (whose
                    # bytes tell what comes next), their sizes in one index query
                    ahead = walk.upcoming(limit)
                    raw = [c for c in ahead if c.codec == RAW]
                    sizes = iter(sizes_of(raw) if raw else ())
                    for cid in ahead:
                        if cid.codec == RAW:
                            n = next(sizes) or 0
                            if may_send is not None and not may_send(peer, cid, n):
                                lent = cid  # asked before the read: a lent block is not read at all
                                break
                            size += n
                        cids.append(cid)
                        if cid.codec == DAG_CBOR:
                            break
                        walk.give(cid, None)
                        if size >= read_bytes:
                            break
                    if not cids:
                        if lent is not None:
                            await batches_send.send([(lent, _LENT)])
                        return
                    loaded = await trio.to_thread.run_sync(self._load_walking, walk, cids, limit, peer)
                    limit = self.config.read_blocks
                    if lent is not None and loaded[-1][1] is not None:
                        loaded.append((lent, _LENT))
                    await batches_send.send(loaded)
                    if loaded[-1][1] is None or loaded[-1][1] is _LENT:
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_ahead)
            # Frames are joined into one buffer per write, handed to the stream as it is (no copy of it)
            # and never touched again: the next write gets a new one.
            out = bytearray()
            stats, write_bytes = self.stats, self.config.write_bytes
            stats_first = [False]
            async for loaded in batches_recv:
                for cid, data in loaded:
                    if data is None:
                        out += _end_frame(pb.DagEnd.NOT_FOUND, cid, f"{cid} is not here")
                        await self._write(stream, out, peer)
                        return
                    if data is _LENT:
                        stats.superseed_stops += 1
                        out += _end_frame(pb.DagEnd.NOT_FOUND, cid, f"{cid} is lent to another peer (super-seeding)")
                        await self._write(stream, out, peer)
                        return
                    out += _block_head(cid.buffer, len(data))
                    out += data
                    stats.served_blocks += 1
                    stats.served_bytes += len(data)
                    if len(out) >= write_bytes:
                        await self._write(stream, out, peer)
                        out = bytearray()
                if out:
                    if not stats_first[0]:
                        stats_first[0] = True
                        timeline.debug("dag serve: first write of %d bytes", len(out))
                    await self._write(stream, out, peer)
                    out = bytearray()
            await self._write(stream, _end_frame(pb.DagEnd.OK), peer)
            timeline.debug("dag serve: end written")


# -- fetching ---------------------------------------------------------------------------------------------


class _Hostile(Exception):
    """The peer broke the protocol: ban it."""


class _Stalled(Exception):
    """The peer's stream went silent: its share of this fetch moves to the others, nothing is banned."""


class _Request:
    """One DAG stream in flight: what it was asked for and how far its walk got."""

    __slots__ = ("peer", "wants", "order", "stop_after", "progress_at", "started_at", "tail_at", "in_tail")

    def __init__(self, peer: ID, wants: list[CID], pipeline_blocks: int | None = None) -> None:
        self.peer = peer
        self.wants = wants
        self.order = DfsOrder(wants, nodes_only=True)
        self.stop_after: int | None = None  # blocks to deliver in all, once a thief took the tail
        self.started_at = self.progress_at = trio.current_time()  # progress: when the last block arrived
        # The provider's next request is sent once this one has sent `tail_at` blocks (`in_tail` set): a
        # request of leaves sends one block per want; one naming inner nodes, or one with no
        # `pipeline_blocks`, lets the next go at once.
        self.tail_at = 0
        if pipeline_blocks is not None and all(c.codec == RAW for c in wants):
            self.tail_at = max(0, len(wants) - pipeline_blocks)
        self.in_tail = trio.Event()
        if self.tail_at == 0:
            self.in_tail.set()

    def trim(self) -> list[CID]:
        """Before the request is sent: ask only for what a thief left us."""
        if self.stop_after is not None:
            self.wants = self.owned()
            self.order = DfsOrder(self.wants, nodes_only=True)
            self.stop_after = None
        return self.wants

    def owned(self) -> list[CID]:
        """What this request still answers for (a stolen tail belongs to the thief)."""
        rem = self.order.remaining()
        if self.stop_after is not None:
            rem = rem[: max(0, self.stop_after - self.order.sent)]
        return rem


class _Run:
    """One fetch, shared by its lanes (one lane = one request at a time to one provider)."""

    def __init__(self, walk: DagWalk, repo: Any) -> None:
        self.walk = walk
        self.store: _LeafStore
        self.repo = repo
        self.active: set[_Request] = set()
        # Providers whose stream broke with their connection gone (the process died, the link dropped):
        # none of their lanes takes more work in this fetch, so what they held goes to the others at
        # once instead of to a sibling lane that would wait out a dial to a dead peer.
        self.lost: set[ID] = set()
        self.providers = 0  # providers reachable so far (`counted`)
        self.counted: set[ID] = set()
        self.fixed_request_blocks: int | None = None  # the caller's CIDs per request, if it chose
        self.stalled: set[ID] = set()  # likewise for providers whose stream went silent (not banned)
        self.dials: set[trio.CancelScope] = set()  # lanes connecting to their provider (`DagTransfer._reached`)
        self.loading = 0
        self.request_blocks = DagConfig().request_blocks  # CIDs per request (`DagTransfer._fetch` sets it)
        self.on_verified: Callable[[CID, bytes], None] | None = None
        self.drop: Callable[[ID, str], None] = lambda peer, why: None  # a peer's bytes proved it lied
        self.changed = trio.Event()
        self.last_error = ""
        # per provider: block bytes delivered, and seconds it had a request in flight (its lanes share
        # its uplink, so a provider is measured as a whole, never one request against another)
        self.delivered: dict[ID, int] = {}
        self._busy: dict[ID, float] = {}
        self._busy_since: dict[ID, float] = {}
        self._in_flight: dict[ID, int] = {}

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def leaves_checked(self, good: list[tuple[CID, bytes, ID]], bad: list[tuple[CID, bytes, ID]]) -> list[CID]:
        """A batch of raw leaves was hashed (`_LeafStore`): those that hash to their CID arrive now (the
        new ones are returned); one that does not goes back to the walk and its sender is dropped."""
        walk, seen, new = self.walk, self.on_verified, []
        for cid, data, _ in good:
            if walk.on_block(cid, data):
                new.append(cid)
                if seen is not None:
                    seen(cid, data)
        liars: dict[ID, CID] = {}
        for cid, _, peer in bad:
            walk.on_failed(cid)
            liars.setdefault(peer, cid)
        for peer, cid in liars.items():
            self.drop(peer, f"block sent as {cid} does not hash to that CID")
        self.notify()
        return new

    def started(self, req: _Request) -> None:
        self.active.add(req)
        n = self._in_flight.get(req.peer, 0)
        if n == 0:
            self._busy_since[req.peer] = trio.current_time()
        self._in_flight[req.peer] = n + 1

    def finished(self, req: _Request) -> None:
        req.in_tail.set()
        if req not in self.active:
            return
        self.active.discard(req)
        n = self._in_flight[req.peer] - 1
        self._in_flight[req.peer] = n
        if n == 0:
            self._busy[req.peer] = self._busy.get(req.peer, 0.0) + trio.current_time() - self._busy_since[req.peer]

    def rate_of(self, peer: ID, now: float) -> float | None:
        """`peer`'s bytes/s over the time it had requests in flight (None: nothing measured yet)."""
        busy = self._busy.get(peer, 0.0)
        if self._in_flight.get(peer, 0):
            busy += now - self._busy_since[peer]
        n = self.delivered.get(peer, 0)
        return n / busy if n and busy > 0 else None

    async def wait_for_tail(self, peer: ID) -> bool:
        """Wait until every request streaming from `peer` is in its tail (or ended); True if it waited."""
        waited = False
        while True:
            req = next((r for r in self.active if r.peer == peer and not r.in_tail.is_set()), None)
            if req is None:
                return waited
            await req.in_tail.wait()
            waited = True

    async def next_wants(self, room: int) -> list[CID]:
        wants = self.walk.next_wants(room)
        loads = self.walk.take_loads()
        if loads:
            self.loading += 1
            try:
                for cid in loads:
                    data = await trio.to_thread.run_sync(self.repo.load_block, cid)
                    self.walk.on_block(cid, data, local=True)
            finally:
                self.loading -= 1
            self.notify()
        return wants

    def steal(self, thief: ID, config: DagConfig) -> list[CID]:
        """Part of the tail of the largest leaf-only request of another provider: half of it if nothing
        arrived on it for `steal_after` s (a stalled or dead provider); if its provider runs
        `steal_slower` times slower than the thief, the share of the tail the thief's speed earns. Else
        []. (Providers of like speed sharing one downlink are never robbed: what a robbed server already
        sent is wasted on the wire.)"""
        now = trio.current_time()
        mine = self.rate_of(thief, now)
        best: _Request | None = None
        best_rem: list[CID] = []
        best_keep = 0.0
        for req in self.active:
            if req.peer == thief:
                continue
            rem = req.owned()
            if len(rem) < config.steal_min or len(rem) <= len(best_rem) or not all(c.codec == RAW for c in rem):
                continue
            if now - req.progress_at >= config.steal_after:
                keep = 0.5
            else:  # slow, not silent: measured on this request too (it is under way, not just asked)
                if req.order.sent == 0 or now - req.started_at < config.steal_measure:
                    continue
                theirs = self.rate_of(req.peer, now)
                if mine is None or theirs is None or theirs * config.steal_slower > mine:
                    continue
                keep = theirs / (theirs + mine)
            best, best_rem, best_keep = req, rem, keep
        if best is None:
            return []
        keep = int(len(best_rem) * best_keep)
        best.stop_after = best.order.sent + keep
        return best_rem[keep:]


FIRST_LEAF_BATCH = 128 << 10  # bytes of leaves in a fetch's first hashed batch (`_LeafStore`)


class _LeafBatch:
    """A batch on its way to `_LeafStore`'s writer: manifest nodes (hashed on arrival) and raw leaves
    with their senders (checked for their place only, hashed by the writer)."""

    __slots__ = ("nodes", "leaves")

    def __init__(self, nodes: list[tuple[CID, bytes]], leaves: list[tuple[CID, bytes, ID]]) -> None:
        self.nodes = nodes
        self.leaves = leaves


class _HashedBatch(StoredBatch):
    """What `_LeafStore`'s writer made of a `_LeafBatch`: everything appended, and which leaves hashed
    to their CID (`good`) and which did not (`bad`, not appended)."""

    __slots__ = ("nodes", "good", "bad", "new", "error")

    def __init__(self, appended: list[tuple[CID, bytes]], nodes: list[CID], good: list[tuple[CID, bytes, ID]],
                 bad: list[tuple[CID, bytes, ID]]) -> None:
        super().__init__(appended)
        self.nodes = nodes
        self.good = good
        self.bad = bad
        self.new: list[CID] | None = None  # the good leaves new to the walk, once they arrived there
        self.error: Exception | None = None  # what letting them arrive raised (re-raised by the writer's task)



@asynccontextmanager
async def _keeping_cached(repo: Any, keep: bool) -> AsyncIterator[None]:
    """`keep`: the repo's appends keep their pages cached while the fetch lasts (`PackFiles.keeping_cached`)."""
    if not keep:
        yield
        return
    with repo.packs.keeping_cached():
        yield

class _LeafStore(RepoBatcher):
    """The fetch's store. Raw leaves come in with their place in the walk checked but not yet hashed
    (`add_leaf`): the writer's worker thread hashes a whole batch (hashlib lets go of the GIL, so the
    event loop goes on reading the network meanwhile) and appends only those that hash to their CID,
    in the same thread hop; once hashed, and while the append runs, `_Run.leaves_checked` lets them
    arrive on the loop (the walk, the `on_verified` hook) and drops the sender of any that did not; once
    appended, `on_stored` says so. Nothing is appended, handed on or served before it is hashed. Manifest nodes (hashed on arrival: the walk needs their links) go
    through `add` as before. `unchecked`: leaves taken in and not yet hashed."""

    def __init__(self, run: _Run, repo: Any, store_bytes: int, commit_bytes: int,
                 on_stored: Callable[[list[CID]], None] | None,
                 on_committed: Callable[[list[CID]], None] | None, drop_cached: bool = True) -> None:
        super().__init__(repo, store_bytes, commit_bytes, on_committed=on_committed, drop_cached=drop_cached)
        self._run = run
        self._then = on_stored
        self._leaves: list[tuple[CID, bytes, ID]] = []
        self.unchecked = 0
        # The first batches are small and double up to `store_bytes`: a leaf reaches `on_verified` (a NAR
        # streaming to Nix) only once its batch is hashed, so one whole 4 MiB batch first would leave the
        # reader idle for the first 4 MiB of every fetch (half of an 8 MiB NAR); 6 more thread hops a fetch.
        self._limit = min(store_bytes, FIRST_LEAF_BATCH)
        # ... and the very first leaves of a fetch someone reads as it arrives are hashed here, on the loop
        # (FIRST_LEAF_BATCH takes about 0.1 ms), and handed on at once: the first NAR byte no longer waits for
        # a worker thread's turn and a pack append, which under load took tens of ms (bench/nixcopy.py --timeline).
        self._inline = FIRST_LEAF_BATCH if run.on_verified is not None else 0
        self._token = trio.lowlevel.current_trio_token()

    async def add_leaf(self, cid: CID, data: bytes, peer: ID) -> None:
        if self._inline > 0:
            self._inline -= len(data)
            leaf = (cid, data, peer)
            if cid.verify(data):
                self._run.leaves_checked([leaf], [])
                await self.add(cid, data)  # appended with the next batch, as a verified node is
            else:
                self._run.leaves_checked([], [leaf])
            return
        self._leaves.append((cid, data, peer))
        self.unchecked += 1
        self.pending_bytes += len(data)
        if self.pending_bytes >= self._limit:
            self._limit = min(self.store_bytes, 2 * self._limit)
            await self.write()

    def _take(self) -> _LeafBatch | None:
        if not self._batch and not self._leaves:
            return None
        batch = _LeafBatch(self._batch, self._leaves)
        self._batch, self._leaves, self.pending_bytes = [], [], 0
        return batch

    def _store(self, batch: object) -> _HashedBatch:
        """In the writer's worker thread: hash the leaves, let the good ones arrive (on the event loop, without
        waiting for it), then append them. A NAR stream gets a batch's bytes while its append (a copy into the
        pack's pages, crc32) is under way, not after it; what reads a block back from the repo still waits
        for `_stored`."""
        assert isinstance(batch, _LeafBatch)
        good: list[tuple[CID, bytes, ID]] = []
        bad: list[tuple[CID, bytes, ID]] = []
        for leaf in batch.leaves:
            (good if leaf[0].verify(leaf[1]) else bad).append(leaf)
        appended = batch.nodes + [(cid, data) for cid, data, _ in good]
        hashed = _HashedBatch(appended, [cid for cid, _ in batch.nodes], good, bad)
        if good or bad:
            try:
                self._token.run_sync_soon(self._checked, hashed)  # before `_stored`: the loop runs them in order
            except trio.RunFinishedError:
                pass
        if appended:
            self.repo.write_blocks(appended, True)
        return hashed

    def _checked(self, hashed: _HashedBatch) -> None:
        """On the event loop: a hashed batch's good leaves arrive (the walk, `on_verified`), liars are dropped."""
        if hashed.new is None:
            self.unchecked -= len(hashed.good) + len(hashed.bad)
            hashed.new = []
            try:
                hashed.new = self._run.leaves_checked(hashed.good, hashed.bad)
            except Exception as e:  # raised here, outside any task, it would end the whole trio run
                hashed.error = e

    def _stored(self, stored: StoredBatch) -> None:
        assert isinstance(stored, _HashedBatch)
        self._checked(stored)  # (where work runs inline, as in simnet, or the callback was not run)
        if stored.error is not None:
            raise stored.error
        if self._then is not None:
            self._then(stored.nodes + (stored.new or []))


def _held_many(repo: Any) -> Callable[[list[CID]], list[bool]] | None:
    """`repo.has_block` for many CIDs in one index query, where the repo has an index."""
    known = getattr(getattr(repo, "index", None), "known_blocks", None)
    if known is None:
        return None

    def held(cids: list[CID]) -> list[bool]:
        found = known(cids)
        return [c.buffer in found for c in cids]
    return held


class DagTransfer:
    """Fetches whole DAGs over `/p2pcache/dag/1.0.0`, falling back to `exchange` (bitswap)."""

    def __init__(self, host: Host, exchange: BitswapExchange, config: DagConfig | None = None) -> None:
        self.host = host
        self.exchange = exchange
        self.config = config or DagConfig()
        self.stats = TransferStats()

    def server(self, source: BlockSource) -> DagServer:
        """A server of `source` (a `BlockSource`) sharing this transfer's config, stats and bans."""
        return DagServer(source, self.exchange.is_banned, self.config, self.stats,
                         may_send=self.exchange.superseed_allows if self.exchange.server.config.superseed_window else None)

    async def fetch(self, root: CID, providers: Iterable[ProviderSpec], repo: Any,
                    on_stored: Callable[[list[CID]], None] | None = None,
                    on_verified: Callable[[CID, bytes], None] | None = None,
                    root_block: bytes | None = None, request_blocks: int | None = None,
                    keep_cached: bool = False) -> int:
        """Fetch every block under `root` that `repo` lacks (blocks already stored are not fetched again,
        so an interrupted fetch resumes), storing verified blocks in batches and calling `on_stored` after
        each; `on_verified(cid, data)` sees each new block the moment it is verified, before it is stored.
        `root_block`: the root's bytes if the caller already has them (fetched to check a narinfo or a
        hash against the manifest): checked against `root` here, then the first requests name its links
        directly, a round trip sooner. Returns the bytes fetched (`root_block`'s counted: it came from a
        peer too). `request_blocks`: CIDs per request for this fetch (default `config.solo_request_blocks` from one
        provider, else `config.request_blocks`). `keep_cached`: the blocks stay in the page cache once durable
        (someone reads them back at once; by default they leave it, see `RepoBatcher`). Raises FetchError (one
        line) if neither protocol could finish."""
        if root_block is not None and not root.verify(root_block):
            raise InvalidInput(f"the bytes handed in as {root} do not hash to it")
        self.stats.fetches += 1
        self.stats.active_fetches += 1
        try:
            return await self._fetch(root, providers, repo, on_stored, on_verified, root_block, request_blocks,
                                     keep_cached)
        finally:
            self.stats.active_fetches -= 1

    async def _fetch(self, root: CID, providers: Iterable[ProviderSpec], repo: Any,
                     on_stored: Callable[[list[CID]], None] | None,
                     on_verified: Callable[[CID, bytes], None] | None, root_block: bytes | None,
                     request_blocks: int | None, keep_cached: bool = False) -> int:
        peers = [p for p in self.exchange.provider_ids(providers) if p != self.host.peer_id]
        walk = DagWalk(root, repo.has_block, cover_nodes=True, held_many=_held_many(repo))
        ex = self.exchange
        before = walk.stats.bytes
        handed = 0
        try:
            run = _Run(walk, repo)
            # A fetch counts as one provider's (larger requests, one stream streaming at a time) until a second
            # is reachable: providers not connected yet are counted once their dial succeeds (`_reached`), so a
            # departed runner's record does not turn a lone live provider's fetch into a shared one.
            run.counted = {p for p in peers if self.host.is_connected(p)}
            run.fixed_request_blocks = request_blocks
            self._count_providers(run)
            run.on_verified = on_verified
            run.drop = lambda peer, why: self._drop(run, peer, why)
            run.store = store = _LeafStore(run, repo, ex.config.store_batch_bytes, ex.config.commit_batch_bytes,
                                           on_stored=on_stored, on_committed=ex.blocks_added,
                                           drop_cached=not keep_cached)
            async with store, _keeping_cached(repo, keep_cached):
                if root_block is not None and not repo.has_block(root):
                    try:
                        walk.on_block(root, root_block, local=True)  # its links are the first wants
                    except MalformedBlock as e:
                        raise FetchError(f"could not fetch {root}: its root block is malformed ({e})") from None
                    if on_verified is not None:
                        on_verified(root, root_block)
                    await store.add(root, root_block)
                    handed = len(root_block)
                async with trio.open_nursery() as nursery:
                    for peer in peers:
                        for _ in range(self.config.streams_per_peer):
                            nursery.start_soon(self._lane, run, peer)
        finally:
            self.stats.blocks += walk.stats.blocks
            self.stats.duplicate_blocks += walk.stats.duplicate_blocks
            self.stats.duplicate_bytes += walk.stats.duplicate_bytes
        fetched = walk.stats.bytes - before
        self.stats.bytes += fetched
        fetched += handed
        if walk.finished:
            return fetched
        # A provider whose connection went (`run.lost`) cannot serve bitswap either: falling back to it waits
        # on a peer that is gone; the caller is told at once instead (the Nix cache tries again).
        rest = [p for p in peers if not ex.is_banned(p) and p not in run.lost and p not in run.stalled]
        if not rest:
            raise FetchError(f"could not fetch {root}: every provider was dropped ({run.last_error or 'none left'})")
        self.stats.bitswap_fallbacks += 1
        log.info("fetching the rest of %s over bitswap from %d peer(s)", root, len(rest))
        walk.cover_nodes = False  # bitswap asks block by block
        return fetched + await ex.fetch_dag(root, rest, repo, on_stored, walk=walk)

    async def _lane(self, run: _Run, peer: ID) -> None:
        walk = run.walk
        if not self.host.is_connected(peer) and not await self._reached(run, peer):
            return
        while not walk.finished:
            if self.exchange.is_banned(peer):
                run.last_error = run.last_error or f"{peer} is banned for misbehaving"
                return
            if peer in run.lost or peer in run.stalled:
                return
            if await run.wait_for_tail(peer):
                continue  # the wait may have been long: look at the peer again
            wants = await run.next_wants(run.request_blocks)
            if not wants:
                if walk.finished:
                    break
                wants = run.steal(peer, self.config)
                if wants:
                    self.stats.steals += 1
                elif not run.active and not run.loading and not run.store.unchecked:
                    break  # nothing in flight anywhere and nothing to ask: the others gave up
                else:
                    await run.store.write()  # hand held leaves to the writer: they are hashed there
                    with trio.move_on_after(min(self.config.steal_after / 2, self.config.steal_measure)):  # look again
                        await run.changed.wait()
                    continue
            if not await self._request(run, peer, wants):
                return
        if walk.finished:  # nobody waits for a provider still being dialled
            for dial in list(run.dials):
                dial.cancel()
        run.notify()

    def _count_providers(self, run: _Run) -> None:
        run.providers = len(run.counted)
        run.request_blocks = run.fixed_request_blocks or (self.config.solo_request_blocks if run.providers == 1
                                                          else self.config.request_blocks)

    async def _reached(self, run: _Run, peer: ID) -> bool:
        """Connect to a provider this node is not connected to before its lane takes a share of the walk
        (and count it then):
        the DHT keeps the records of runners long gone (a CI fleet's come and go), and a lane that took its
        wants first held them while the dial to a dead address failed (0.8 s of a cold copy's NAR under
        load; up to `handshake_timeout` for an address that drops packets) — the live providers finished
        and then waited. A dial still under way when the walk is done is given up. False if it failed (the
        peer is lost for this fetch) or was given up."""
        with trio.CancelScope() as dial:
            run.dials.add(dial)
            try:
                await self.host.dial(peer)
            except Exception as e:  # unreachable: not its fault
                log.debug("cannot connect to DAG provider %s: %s", peer, e)
                run.last_error = f"{peer}: {e}"
                self._check_lost(run, peer)
                return False
            finally:
                run.dials.discard(dial)
            if peer not in run.counted:
                run.counted.add(peer)
                self._count_providers(run)
            return True
        return False

    async def _request(self, run: _Run, peer: ID, wants: list[CID]) -> bool:
        """One request on one stream. True if the lane may go on with this peer."""
        walk = run.walk
        req = _Request(peer, wants, self.config.pipeline_blocks if run.providers == 1 else None)
        run.started(req)
        stream = None
        try:
            try:
                timeline.debug("dag %s: opening a stream to %s", run.walk.root, peer)
                stream = await self.host.new_stream(peer, [PROTOCOL])
                wants = req.trim()
                if not wants:
                    return True
                await stream.write(encode_request(wants))
                await stream.close_write()
                timeline.debug("dag %s: request of %d sent", run.walk.root, len(wants))
            except Exception as e:  # does not speak the protocol, or unreachable: not its fault
                log.debug("no DAG stream to %s: %s", peer, e)
                run.last_error = f"{peer}: {e}"
                self._check_lost(run, peer)
                return False
            self.stats.streams += 1
            return await self._receive(run, req, stream)
        except _Hostile as e:
            self._drop(run, peer, str(e))
            return False
        except _Stalled as e:
            self._stalled(run, peer, str(e))
            return False
        finally:
            run.finished(req)
            for cid in req.owned():
                walk.on_failed(cid)
            run.notify()
            if stream is not None:
                await reset_quietly(stream)

    async def _receive(self, run: _Run, req: _Request, stream: Any) -> bool:
        frames = _Frames()
        stall, read_size = self.config.stall_seconds, self.config.read_size
        # One cancel scope for the stream's reads, its deadline set before each read and lifted after
        # (cheaper than a scope per read; waits on our own store are not the peer's stall)
        with trio.CancelScope() as waited:
            result = await self._read_frames(run, req, stream, frames, waited, stall, read_size)
        if waited.cancelled_caught:
            raise _Stalled(f"stalled: nothing for {stall:g} s")
        return result

    async def _read_frames(self, run: _Run, req: _Request, stream: Any, frames: _Frames, waited: trio.CancelScope,
                           stall: float, read_size: int) -> bool:
        walk, order = run.walk, req.order
        while True:
            waited.deadline = trio.current_time() + stall
            try:
                data = await stream.read(read_size)
            except Exception as e:  # reset, EOF or connection gone (trio.Cancelled is not an Exception)
                run.last_error = f"{req.peer}: stream broke ({e or type(e).__name__})"
                self._check_lost(run, req.peer)
                return False
            waited.deadline = math.inf
            if not data:
                run.last_error = f"{req.peer}: stream ended without an end frame"
                self._check_lost(run, req.peer)
                return False
            try:
                got = frames.feed(data)
            except ProtocolViolation as e:
                raise _Hostile(str(e)) from None
            if req.order.sent == 0:
                timeline.debug("dag %s: first %d bytes read", walk.root, len(data))
            if got:
                req.progress_at = trio.current_time()  # (the frames of one read arrived together)
            for frame in got:
                if not isinstance(frame, tuple):
                    return self._ended(run, req, frame)
                key, block = frame
                cid = order.peek()  # the CID the walk expects next, already parsed: most frames carry it
                if cid is None or cid.buffer != key:
                    try:
                        cid = CID.decode(key)
                    except (InvalidCID, IndexError) as e:
                        raise _Hostile(f"malformed frame ({e})") from None
                try:
                    links = order.expect(cid, block, hash_leaf=False)
                except OutOfOrder as e:
                    raise _Hostile(str(e)) from None
                if order.sent >= req.tail_at:
                    req.in_tail.set()
                run.delivered[req.peer] = run.delivered.get(req.peer, 0) + len(block)
                if cid.codec == RAW:
                    if walk.is_new(cid):
                        await run.store.add_leaf(cid, block, req.peer)  # hashed there, in a batch
                    else:
                        walk.on_block(cid, block)  # counted as a duplicate, dropped unhashed
                elif walk.on_block(cid, block, links=links):  # decoded once, by the order check
                    if run.on_verified is not None:
                        run.on_verified(cid, block)
                    await run.store.add(cid, block)
                    run.notify()
                if req.stop_after is not None and order.sent >= req.stop_after:
                    return True  # a thief took the rest

    def _drop(self, run: _Run, peer: ID, why: str) -> None:
        """`peer` broke the protocol or sent a block that does not hash to its CID: ban it."""
        run.last_error = f"{peer}: {why}"
        if not self.exchange.is_banned(peer):  # counted once (its lanes and batches may all catch it)
            self.stats.peers_dropped += 1
        self.exchange.penalise(peer, f"DAG stream: {why}")

    def _stalled(self, run: _Run, peer: ID, why: str) -> None:
        """`peer`'s stream went silent: none of its lanes takes more of this fetch (what it held goes back to
        the walk for the others); it is not banned, so later fetches ask it again."""
        run.last_error = f"{peer}: {why}"
        if peer not in run.stalled:
            run.stalled.add(peer)
            self.stats.providers_stalled += 1
            log.warning("DAG fetch: provider %s %s; its share goes to the others (not banned: a stall may be "
                        "load or the network, it is asked again next time)", peer, why)

    def _check_lost(self, run: _Run, peer: ID) -> None:
        """A stream to `peer` broke: if its connection went with it, the peer is lost for this fetch
        (marked before the request hands its blocks back, so no sibling lane picks them up)."""
        if not self.host.is_connected(peer) and peer not in run.lost:
            run.lost.add(peer)
            self.stats.providers_lost += 1
            log.info("DAG fetch: provider %s is gone (its connection closed); its share goes to the others", peer)

    def _ended(self, run: _Run, req: _Request, end: pb.DagEnd) -> bool:
        if end.status == pb.DagEnd.OK:
            if not req.order.done:
                raise _Hostile(f"stream ended with {len(req.order.remaining())}+ blocks of its walk unsent")
            return True
        why = end.message[:200] or pb.DagEnd.Status.Name(end.status) if end.status in (1, 2) else "unknown"
        run.last_error = f"{req.peer}: {why}"
        log.info("DAG stream from %s ended early: %s", req.peer, why)
        return False
