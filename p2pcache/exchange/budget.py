"""A per-peer budget for bitswap messages that carry nothing, as a token bucket. Pure: the caller passes
`now`.

Owns only the arithmetic: a peer may send `burst` such messages at once and `per_second` more every
second after that; `charge(peer, now)` spends one and says whether the peer is still within budget.
What to do with a peer over it (the driver bans it, as for any protocol violation) is the caller's
decision. Empty messages cost us a decode and an event each and give us nothing: a peer flooding
them is wasting our time on purpose, and a legitimate one sends a few (an empty full wantlist to say
"nothing wanted any more").
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["EmptyMessageBudget"]


@dataclass
class _Bucket:
    tokens: float
    at: float


class EmptyMessageBudget:
    def __init__(self, burst: int = 256, per_second: float = 16.0, max_peers: int = 65536) -> None:
        if burst < 1 or per_second < 0:
            raise ValueError("burst must be >= 1 and per_second >= 0")
        self.burst = burst
        self.per_second = per_second
        self.max_peers = max_peers
        self._buckets: dict[Hashable, _Bucket] = {}

    def charge(self, peer: Hashable, now: float) -> bool:
        """Spend one message of `peer`'s budget; False if it had none left."""
        b = self._buckets.get(peer)
        if b is None:
            if len(self._buckets) >= self.max_peers:
                self._buckets.pop(next(iter(self._buckets)))
            b = self._buckets[peer] = _Bucket(float(self.burst), now)
        else:
            b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.per_second)
            b.at = now
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True

    def forget(self, peer: Hashable) -> None:
        self._buckets.pop(peer, None)

    def remaining(self, peer: Hashable, now: float) -> float:
        b = self._buckets.get(peer)
        if b is None:
            return float(self.burst)
        return min(float(self.burst), b.tokens + (now - b.at) * self.per_second)
