"""One provider lookup as a sans-IO state machine: which peer to ask next, what the answers taught us.

Owns the Kademlia iteration of a GET_PROVIDERS lookup: candidates ordered by XOR distance to the key
(distance is `sha256(key) XOR sha256(peer id bytes)`, as libp2p's Kademlia spec and py-libp2p order peers),
at most `alpha` questions in flight, the hop count of every peer (seeds are hop 1; a peer first named by
an answer from a hop-h peer is hop h+1), and when to stop: once `want` distinct providers are known, or
once nobody unasked is left among the `k` closest peers seen and nothing is in flight.

Peer selection in the style of rust-libp2p's iterators: `next_peer()` hands out the next peer to ask,
`on_answer()` / `on_failure()` feed results back. Nothing here awaits or touches a network: the trio
driver (`ProviderFinder`) and a simnet driver pump the same machine. Peers are any hashable values;
`peer_bytes` gives the bytes whose sha256 places a peer in the key space.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

from .errors import RoutingUsageError

__all__ = ["CandidateState", "ProviderQuery", "QueryStats", "distance"]

P = TypeVar("P", bound=Hashable)
R = TypeVar("R")  # whatever the driver uses to describe a provider (PeerInfo for libp2p)


def distance(key: bytes, peer_bytes: bytes) -> int:
    return int.from_bytes(hashlib.sha256(key).digest(), "big") ^ int.from_bytes(
        hashlib.sha256(peer_bytes).digest(), "big"
    )


@dataclass
class QueryStats:
    asked: int = 0  # questions sent
    answered: int = 0
    failed: int = 0
    max_hop: int = 0  # deepest hop asked
    found_at_hop: int | None = None  # hop of the peer whose answer named the first provider


class CandidateState(Enum):
    """Where a candidate peer is in the lookup. It only moves forward: NEW -> ASKING (handed out by
    `next_peer`) -> ANSWERED or FAILED (by `on_answer` / `on_failure`), and only there."""

    NEW = "new"
    ASKING = "asking"
    ANSWERED = "answered"
    FAILED = "failed"


@dataclass
class _Candidate:
    distance: int
    hop: int
    state: CandidateState = CandidateState.NEW


@dataclass
class ProviderQuery(Generic[P, R]):
    key: bytes
    peer_bytes: Callable[[P], bytes]
    self_peer: P | None = None
    alpha: int = 3
    k: int = 20
    want: int = 1
    max_asks: int = 200
    providers: dict[P, R] = field(default_factory=dict)
    stats: QueryStats = field(default_factory=QueryStats)

    def __post_init__(self) -> None:
        if self.alpha < 1 or self.k < 1 or self.want < 1:
            raise RoutingUsageError("alpha, k and want must be at least 1")
        self._candidates: dict[P, _Candidate] = {}
        # Invariant: `_asking` == the number of candidates in state ASKING (kept, not recounted, as
        # rust-libp2p's `num_waiting`); every state change goes through `_ask` / `_settle`.
        self._asking = 0

    # -- feeding ------------------------------------------------------------------------------
    def add_seeds(self, peers: Iterable[P]) -> None:
        self._learn(peers, hop=1)

    def _learn(self, peers: Iterable[P], hop: int) -> None:
        for p in peers:
            if p == self.self_peer or p in self._candidates:
                continue
            self._candidates[p] = _Candidate(distance(self.key, self.peer_bytes(p)), hop)

    def on_answer(self, peer: P, providers: Iterable[tuple[P, R]], closer: Iterable[P]) -> None:
        """`peer` answered: `providers` are (provider id, description) pairs, `closer` peers it knows."""
        c = self._settle(peer, CandidateState.ANSWERED, "answer from")
        self.stats.answered += 1
        for pid, info in providers:
            if pid == self.self_peer or pid in self.providers:
                continue
            self.providers[pid] = info
            if self.stats.found_at_hop is None:
                self.stats.found_at_hop = c.hop
        self._learn(closer, hop=c.hop + 1)

    def on_failure(self, peer: P) -> None:
        self._settle(peer, CandidateState.FAILED, "failure of")
        self.stats.failed += 1

    def _settle(self, peer: P, state: CandidateState, what: str) -> _Candidate:
        c = self._candidates[peer]
        if c.state is not CandidateState.ASKING:
            raise RoutingUsageError(f"{what} {peer!r}, which was not being asked")
        c.state = state
        self._asking -= 1
        return c

    # -- asking -------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self._asking

    def _closest_live(self) -> list[tuple[P, _Candidate]]:
        """The k closest peers that have not failed, closest first."""
        live = [(p, c) for p, c in self._candidates.items() if c.state is not CandidateState.FAILED]
        live.sort(key=lambda pc: pc[1].distance)
        return live[: self.k]

    def next_peer(self) -> P | None:
        """The next peer to ask, or None if there is nothing to ask now (slots full, or no candidate
        left among the k closest, or the lookup is done)."""
        if self.done or self.in_flight >= self.alpha or self.stats.asked >= self.max_asks:
            return None
        for p, c in self._closest_live():
            if c.state is CandidateState.NEW:
                c.state = CandidateState.ASKING
                self._asking += 1
                self.stats.asked += 1
                self.stats.max_hop = max(self.stats.max_hop, c.hop)
                return p
        return None

    @property
    def found(self) -> bool:
        return len(self.providers) >= self.want

    @property
    def done(self) -> bool:
        """Enough providers, or nothing left to ask and nothing in flight."""
        if self.found:
            return True
        if self.in_flight:
            return False
        if self.stats.asked >= self.max_asks:
            return True
        return not any(c.state is CandidateState.NEW for _, c in self._closest_live())

    def hop_of(self, peer: P) -> int:
        return self._candidates[peer].hop

    def state_of(self, peer: P) -> CandidateState | None:
        """Where `peer` is in this lookup; None if it was never a candidate."""
        c = self._candidates.get(peer)
        return c.state if c is not None else None
