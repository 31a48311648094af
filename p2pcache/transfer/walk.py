"""Walking a DAG to fetch it: which blocks to ask for next, and the order one DAG stream sends them in.

Owns two small state machines, with no I/O and no `await` (the drivers in `net/` pump them):

- `DagWalk` — one fetch of everything under a root, as the asker sees it: a frontier of known links in
  depth-first order (each link keyed by its path from the root, so wants follow NAR/archive order whatever
  order the inner nodes arrived in — a reader streaming the content needs its blocks in that order), what is
  wanted, what is expected as part of a wanted subtree, what is done. `next_wants(room)` hands out CIDs
  to ask for, `take_loads()` the held inner nodes whose links it needs read locally, `on_block` /
  `on_failed` feed results back, `finished` says when nothing is left. The bitswap driver and the DAG
  transfer driver share it unchanged (and simnet runs both through real Nodes).
- `DfsOrder` — the exact block order of one `/p2pcache/dag/1.0.0` stream (see proto/p2pcache.proto):
  the server walks it to know what to send, the asker walks the same to know what must come next, so a
  block is checked against the link in its already-verified parent the moment it arrives.

Must not: decide which peer to ask (the driver's business), store anything, or trust a block's bytes
beyond its CID (callers hand in blocks they verified against their CID; `DfsOrder.expect` does that
itself for wire blocks). Links are the tag-42 CIDs of a dag-cbor block in document order, which is the
order archive and NAR manifests list their contents in; raw blocks are leaves.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Callable, Iterable
from typing import Any, Iterator

from ..content import dagcbor
from ..content.cid import CID, DAG_CBOR, RAW
from ..errors import InvalidInput, MalformedBlock

__all__ = ["DagWalk", "DfsOrder", "OutOfOrder", "WalkStats", "dag_links"]


class OutOfOrder(InvalidInput):
    """A peer sent a block the walk did not expect next, or one that does not hash to its link."""


def dag_links(cid: CID, data: bytes | memoryview) -> list[CID]:
    """The links of a block in document order (none for a raw block). MalformedBlock for bad dag-cbor or
    a link to a codec we do not fetch. The CBOR is parsed strictly but not re-encoded to check it is
    canonical (the larger half of a decode): the walk needs only the links of bytes already checked against
    their CID, and whoever reads a node's content (a manifest, a tree page) decodes it strictly then."""
    if cid.codec != DAG_CBOR:
        return []
    links: list[CID] = []
    dagcbor.decode(data, recheck=False, links=links)
    for link in links:
        if link.codec not in (RAW, DAG_CBOR):
            raise MalformedBlock(f"block {cid} links to {link}, of codec {link.codec_name}; only raw and "
                                 "dag-cbor are fetched")
    return links


# -- one stream's order ---------------------------------------------------------------------------------


class DfsOrder:
    """The blocks of one DAG stream in order: for each root in turn, depth-first in document order; a CID
    already sent on the stream or in `have` is skipped with its subtree; with `nodes_only`, raw blocks
    below a root are skipped. `peek()` is the next CID (None at the end), `give(cid, data)` feeds that
    block's bytes so its links are known (a raw block may be given as None)."""

    __slots__ = ("_stack", "_seen", "_have", "_nodes_only", "_next", "sent")

    def __init__(self, roots: Iterable[CID], have: Iterable[CID] = (), nodes_only: bool = False):
        self._stack: list[tuple[CID, bool]] = [(c, True) for c in reversed(list(roots))]
        self._seen: set[CID] = set()
        self._have = set(have)
        self._nodes_only = nodes_only
        self._next: CID | None = None
        self.sent = 0

    def peek(self) -> CID | None:
        if self._next is None:
            while self._stack:
                cid, is_root = self._stack.pop()
                if cid in self._seen or cid in self._have or (self._nodes_only and not is_root and cid.codec == RAW):
                    continue
                self._next = cid
                break
        return self._next

    def give(self, cid: CID, data: bytes | memoryview | None) -> list[CID]:
        """Feed the block `peek()` named; returns its links (already queued)."""
        if cid != self.peek():
            raise OutOfOrder(f"block {cid} is not the next one in the walk (expected {self._next})")
        self._next = None
        self._seen.add(cid)
        self.sent += 1
        if cid.codec != DAG_CBOR:
            return []
        if data is None:
            raise ValueError("a dag-cbor block's bytes are needed to continue the walk")
        links = dag_links(cid, data)
        self._stack.extend((c, False) for c in reversed(links))
        return links

    def expect(self, cid: CID, data: bytes | memoryview, hash_leaf: bool = True) -> list[CID]:
        """The asker's side of `give`: the block must be the next one and hash to its CID. With
        `hash_leaf=False` a raw block is checked for its place only: the caller hashes it later (in a
        batch, off the event loop) and must not use its bytes before; a dag-cbor block is always hashed
        here, as the walk needs its links."""
        nxt = self.peek()
        if nxt is None:
            raise OutOfOrder(f"block {cid} after the end of the walk")
        if cid != nxt:
            raise OutOfOrder(f"block {cid} out of order (the walk expects {nxt} next)")
        if (hash_leaf or cid.codec != RAW) and not cid.verify(data):
            raise OutOfOrder(f"block sent as {cid} does not hash to that CID")
        try:
            return self.give(cid, data)
        except MalformedBlock as e:
            raise OutOfOrder(f"block {cid}: {e}") from None

    def upcoming(self, n: int) -> list[CID]:
        """The next (up to) `n` CIDs `give` will take, in order, without taking them: the run up to and
        including the next dag-cbor block (whose links are not known before its bytes are given), e.g. to
        look up the sizes of a run of raw blocks at once."""
        out: list[CID] = []
        if n <= 0:
            return out
        nxt = self.peek()
        if nxt is None:
            return out
        out.append(nxt)
        if nxt.codec == DAG_CBOR:
            return out
        taken = {nxt}
        seen, have, nodes_only = self._seen, self._have, self._nodes_only
        for cid, is_root in reversed(self._stack):
            if len(out) >= n:
                break
            if cid in seen or cid in have or cid in taken or (nodes_only and not is_root and cid.codec == RAW):
                continue
            out.append(cid)
            if cid.codec == DAG_CBOR:
                break
            taken.add(cid)
        return out

    def remaining(self) -> list[CID]:
        """What the walk still knows it would send (the peeked CID first), e.g. to ask another peer."""
        out = [] if self._next is None else [self._next]
        out += [c for c, _ in reversed(self._stack) if c not in self._seen]
        return out

    @property
    def done(self) -> bool:
        return self.peek() is None


# -- one fetch ----------------------------------------------------------------------------------------


class _State(enum.Enum):
    FRONTIER = 1  # a known link nobody has asked for yet
    LOADING = 2  # held here: its links are being read locally
    WANTED = 3  # handed out by next_wants
    COVERED = 4  # will come with a wanted subtree (cover_nodes)
    DONE = 5


class WalkStats:
    __slots__ = ("blocks", "bytes", "duplicate_blocks", "duplicate_bytes", "held_blocks", "failures")

    def __init__(self) -> None:
        self.blocks = self.bytes = self.duplicate_blocks = self.duplicate_bytes = 0
        self.held_blocks = self.failures = 0


class DagWalk:
    """Everything under `root` that `held` says is not here, as a sequence of wants in depth-first order.

    `held(cid)` answers from the local index (blocks already stored are never asked for: an interrupted
    fetch resumes from them). With `cover_nodes`, a wanted dag-cbor CID stands for its whole subtree of
    dag-cbor nodes (a DAG stream with scope NODES sends them), so only it and raw leaves are handed out.
    """

    def __init__(self, root: CID, held: Callable[[CID], bool], *, cover_nodes: bool = False,
                 link_order: Callable[[CID, int], list[int]] | None = None,
                 held_many: Callable[[list[CID]], list[bool]] | None = None):
        if root.codec not in (RAW, DAG_CBOR):
            raise InvalidInput(f"{root} has codec {root.codec_name}; only raw and dag-cbor DAGs are fetched")
        self.root = root
        self._held = held
        # `held_many(cids)`: `held` for many CIDs at once (one index query for a request's worth of wants)
        self._held_many = held_many or (lambda cids: [held(c) for c in cids])
        self.cover_nodes = cover_nodes
        # `link_order(cid, n)`: the rank of each of a node's n links among its siblings (a permutation;
        # default document order). Simnet's rarest-first stand-in shuffles; NAR streaming needs the default.
        self._link_order = link_order
        self._state: dict[CID, _State] = {root: _State.FRONTIER}
        self._key: dict[CID, tuple[int, ...]] = {root: ()}  # path from the root: DFS order is key order
        self._frontier: list[tuple[tuple[int, ...], CID]] = [((), root)]  # a heap
        # An arrived dag-cbor node's links (and their ranks), to move a shared subtree to its earlier place.
        self._children: dict[CID, tuple[list[CID], list[int] | None]] = {}
        self._loads: list[CID] = []
        self._open = 0  # LOADING + WANTED + COVERED
        self._in_frontier = 1
        self.stats = WalkStats()

    # -- asking -----------------------------------------------------------------------------------
    def next_wants(self, room: int) -> list[CID]:
        """Up to `room` CIDs to ask for, frontier order. Held blocks met on the way are settled here (raw)
        or queued for `take_loads` (dag-cbor)."""
        out: list[CID] = []
        state, frontier = self._state, self._frontier
        while frontier and len(out) < room:
            batch: list[CID] = []  # the next frontier CIDs, asked of `held_many` at once
            while frontier and len(batch) < room - len(out):
                _, cid = heapq.heappop(frontier)
                if state[cid] is not _State.FRONTIER:
                    continue
                state[cid] = _State.WANTED  # taken (a moved block may sit in the heap twice)
                batch.append(cid)
            for cid, held in zip(batch, self._held_many(batch)):
                self._in_frontier -= 1
                if held:
                    self.stats.held_blocks += 1
                    if cid.codec == DAG_CBOR:
                        state[cid] = _State.LOADING
                        self._open += 1
                        self._loads.append(cid)
                    else:
                        state[cid] = _State.DONE
                    continue
                self._open += 1
                out.append(cid)
        return out

    def take_loads(self) -> list[CID]:
        """Held dag-cbor blocks to read locally and hand back with `on_block(cid, data, local=True)`."""
        loads, self._loads = self._loads, []
        return loads

    def is_new(self, cid: CID) -> bool:
        """Linked from the walk and not arrived yet: `on_block` would take it."""
        st = self._state.get(cid)
        return st is not None and st is not _State.DONE

    def is_open(self, cid: CID) -> bool:
        """Asked for or expected, not arrived yet."""
        return self._state.get(cid) in (_State.WANTED, _State.COVERED, _State.LOADING)

    # -- results ----------------------------------------------------------------------------------
    def on_block(self, cid: CID, data: bytes | memoryview, local: bool = False,
                 links: list[CID] | None = None) -> bool:
        """A verified block arrived (or was read locally). True if it was new to this walk; False for a
        duplicate or a block this walk never linked to (ignored). MalformedBlock if a dag-cbor block does
        not decode: the caller decides whose fault that is. `links`: the block's `dag_links`, where the
        caller has just decoded them from these bytes (a stream's order check), so they are not decoded
        again."""
        st = self._state.get(cid)
        if st is None or st is _State.DONE:
            if not local:
                self.stats.duplicate_blocks += 1
                self.stats.duplicate_bytes += len(data)
            return False
        if links is None:
            links = dag_links(cid, data)
        if st is _State.FRONTIER:
            self._in_frontier -= 1
        else:
            self._open -= 1
        self._state[cid] = _State.DONE
        if not local:
            self.stats.blocks += 1
            self.stats.bytes += len(data)
        if not links:
            return True  # a leaf (most blocks): nothing below it to place
        cover = self.cover_nodes and st in (_State.WANTED, _State.COVERED)
        state, keys, frontier = self._state, self._key, self._frontier
        base = keys[cid]
        ranks = self._link_order(cid, len(links)) if self._link_order is not None and links else None
        if links and cid.codec == DAG_CBOR:
            self._children[cid] = (links, ranks)
        for i, link in enumerate(links):
            key = base + ((ranks[i] if ranks is not None else i),)
            if link in state:
                # A block linked from two places is wanted once, at its first place in DFS order; that
                # place may only become known now (its earlier parent arrived after the later one).
                if key < keys[link]:
                    self._move_earlier(link, key)
                continue
            keys[link] = key
            if cover and link.codec == DAG_CBOR:
                state[link] = _State.COVERED
                self._open += 1
            else:
                state[link] = _State.FRONTIER
                self._in_frontier += 1
                heapq.heappush(frontier, (key, link))
        return True

    def _move_earlier(self, cid: CID, key: tuple[int, ...]) -> None:
        """Give `cid`, and what is known below it, the earlier DFS place `key`. A block not asked for yet
        is queued again there (its old heap entry goes stale: popped later, it is no longer FRONTIER)."""
        todo = [(cid, key)]
        while todo:
            c, k = todo.pop()
            if k >= self._key[c]:
                continue
            self._key[c] = k
            if self._state[c] is _State.FRONTIER:
                heapq.heappush(self._frontier, (k, c))
            below = self._children.get(c)
            if below is not None:
                kids, ranks = below
                todo += [(kid, k + ((ranks[i] if ranks is not None else i),)) for i, kid in enumerate(kids)]

    def on_failed(self, cid: CID) -> None:
        """A want (or a covered block) will not come from where it was asked: ask again, in its place."""
        if self._state.get(cid) in (_State.WANTED, _State.COVERED):
            self._state[cid] = _State.FRONTIER
            self._open -= 1
            self._in_frontier += 1
            heapq.heappush(self._frontier, (self._key[cid], cid))
            self.stats.failures += 1

    @property
    def outstanding(self) -> int:
        """Wanted, covered or loading, not arrived."""
        return self._open

    @property
    def finished(self) -> bool:
        return self._open == 0 and self._in_frontier == 0
